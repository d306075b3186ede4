// Status page of a shardmesh agent. Plain browser JavaScript, no build step.
//
// It polls /v1/cluster, /v1/models and /v1/alerts every POLL_MS milliseconds. When the agent
// requires a token (a 401 response), the page shows a form and keeps the token in this tab's
// sessionStorage, never in the URL or in localStorage, and sends it as a Bearer header.
// All text from the API is inserted with textContent, never as HTML.
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "shardmesh.adminToken";
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

class AuthRequired extends Error {}

async function getJson(path) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new AuthRequired(path);
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      const body = await response.json();
      if (body.error && body.error.message) message = body.error.message;
    } catch (ignored) { /* body was not JSON */ }
    throw new Error(path + ": " + message);
  }
  return response.json();
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "-";
  return Number(value).toFixed(digits);
}

function renderCluster(cluster) {
  document.getElementById("cluster-name").textContent = cluster.cluster || "";
  const coordinator = cluster.coordinator;
  document.getElementById("coordinator").textContent = coordinator ? coordinator.node_id : "none elected";
  document.getElementById("epoch").textContent = cluster.epoch ?? "-";
  document.getElementById("plan-version").textContent = cluster.plan_version ?? "-";
  document.getElementById("answered-by").textContent = cluster.node_id || "-";

  const body = document.querySelector("#members tbody");
  body.replaceChildren();
  for (const member of cluster.members || []) {
    const row = el("tr", { "data-node-id": member.node_id });
    row.append(el("td", {}, member.node_id));
    row.append(el("td", { class: "role-" + (member.role || "") }, member.role || "-"));
    row.append(el("td", { class: "state-" + (member.state || "") }, member.state || "-"));
    row.append(el("td", {}, member.address || "-"));
    const caps = member.capabilities || {};
    row.append(el("td", {}, (caps.devices || []).join(", ") || "-"));
    const health = member.health || {};
    const parts = [];
    if (health.loop_lag_ms !== undefined) parts.push("lag " + fmt(health.loop_lag_ms, 1) + " ms");
    if (health.inflight !== undefined) parts.push(health.inflight + " in flight");
    if (health.degraded) parts.push("degraded");
    row.append(el("td", {}, parts.join(", ") || "-"));
    body.append(row);
  }
}

// Draw one version's segments as boxes joined by arrows: input -> seg0 -> seg1 -> ... -> output.
function pipeline(version) {
  const segments = (version.segments || []).slice().sort((a, b) => (a.index ?? 0) - (b.index ?? 0));
  const boxW = 150, boxH = 58, gap = 46, pad = 6;
  const maxAgents = Math.max(1, ...segments.map((s) => (s.agents || []).length));
  const height = Math.max(boxH, 34 + 15 * maxAgents) + 2 * pad;
  const width = pad * 2 + segments.length * boxW + Math.max(0, segments.length - 1) * gap;
  const root = svg("svg", { class: "pipeline", width, height, role: "img",
    "aria-label": "placement of " + segments.length + " segments" });
  segments.forEach((segment, i) => {
    const x = pad + i * (boxW + gap);
    const group = svg("g", { "data-segment": segment.segment });
    group.append(svg("rect", { x, y: pad, width: boxW, height: height - 2 * pad, rx: 6 }));
    group.append(svg("text", { x: x + 8, y: pad + 17, class: "segment" }, segment.segment));
    (segment.agents || []).forEach((agent, j) => {
      group.append(svg("text", { x: x + 8, y: pad + 35 + 15 * j, class: "agent" }, agent));
    });
    root.append(group);
    if (i + 1 < segments.length) {
      const y = height / 2, x1 = x + boxW + 4, x2 = x + boxW + gap - 4;
      root.append(svg("line", { x1, y1: y, x2: x2 - 8, y2: y }));
      root.append(svg("polygon", { points: `${x2},${y} ${x2 - 9},${y - 5} ${x2 - 9},${y + 5}` }));
    }
  });
  return root;
}

function renderModels(models) {
  const container = document.getElementById("models");
  container.replaceChildren();
  if (!models.length) {
    container.append(el("p", { class: "muted" }, "no models deployed"));
    return;
  }
  for (const model of models) {
    const block = el("div", { class: "model", "data-model": model.name });
    block.append(el("h3", {}, model.name));
    const weights = model.weights || {};
    for (const version of model.versions || []) {
      const line = el("div", { class: "version", "data-version": version.version });
      const weight = weights[version.version];
      line.append(el("strong", {}, version.version));
      line.append(document.createTextNode(
        " " + (version.state || "") + ", weight " + (weight === undefined ? "-" : fmt(weight, 2))));
      const stats = version.stats;
      if (stats) {
        line.append(el("span", { class: "stats" },
          fmt(stats.rate_per_s, 2) + " req/s, p50 " + fmt(stats.p50_ms, 1) + " ms, p99 " +
          fmt(stats.p99_ms, 1) + " ms, errors " + fmt(100 * (stats.error_rate || 0), 1) + "%"));
      }
      line.append(pipeline(version));
      block.append(line);
    }
    container.append(block);
  }
}

function renderAlarms(alarms) {
  const list = document.getElementById("alarms");
  list.replaceChildren();
  if (!alarms.length) {
    list.append(el("li", { class: "muted" }, "no alarms firing"));
    return;
  }
  for (const alarm of alarms) {
    const since = alarm.since ? new Date(alarm.since * 1000).toLocaleTimeString() : "-";
    list.append(el("li", { class: "firing" },
      alarm.name + ": " + (alarm.message || "") + " (value " + fmt(alarm.value, 3) + ", since " + since + ")"));
  }
}

function showError(message) {
  const box = document.getElementById("error");
  box.hidden = !message;
  box.textContent = message || "";
}

async function refresh() {
  try {
    const [cluster, models, alarms] = await Promise.all([
      getJson("/v1/cluster"), getJson("/v1/models"), getJson("/v1/alerts"),
    ]);
    document.getElementById("auth").hidden = true;
    renderCluster(cluster);
    renderModels(models);
    renderAlarms(alarms);
    showError("");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    if (error instanceof AuthRequired) {
      document.getElementById("auth").hidden = false;
      showError(sessionStorage.getItem(TOKEN_KEY) ? "the stored token was rejected" : "");
    } else {
      showError("cannot load status: " + error.message);
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = document.getElementById("auth-token").value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    refresh();
  });
  refresh();
  setInterval(refresh, POLL_MS);
});
