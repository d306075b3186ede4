"""``AgentService``: the node agent seen through the HTTP layer's ``AgentFacade``.

Reads come from this agent's own view (committed registry, membership, heartbeats), so any agent
answers them. Writes go through the coordinator role and raise ``NotCoordinator`` on every other
agent; the HTTP layer forwards them to the coordinator's admin URL. Inference runs through this
agent as the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coordinator import registry as registry_ops
from coordinator.detector import PeerState
from coordinator.micromodel import route_for_task
from coordinator.registry import RegistryError
from nodeagent import facade
from nodeagent.coordinator_role import NotCoordinatorError
from nodeagent.dataplane import InferenceError
from nodeagent.traffic import TrafficError, choose_version

logger = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 30.0
# A deadline under this share of the planner's latency estimate is rejected before any hop runs.
# The estimate is for the profiled batch on an idle cluster. Half of it leaves room for the
# estimate's error, because a request that finishes in less is unlikely but not impossible.
DEADLINE_FLOOR_FRACTION = 0.5
TOKENIZER_MAX_LENGTH = 128


def _facade_error(exc: RegistryError) -> facade.FacadeError:
    if exc.kind == "not_found":
        return facade.NotFound(str(exc))
    if exc.kind == "conflict":
        return facade.Conflict(str(exc))
    return facade.BadRequest(str(exc))


class AgentService:
    """Implements ``nodeagent.facade.AgentFacade`` for a running ``Agent``."""

    def __init__(self, host) -> None:
        self.host = host
        self._tokenizers: dict[str, Any] = {}

    def health(self) -> str:
        """Return "ok", or "draining" while the agent shuts down."""
        return "draining" if self.host.draining else "ok"

    # ----------------------------------------------------------------- helpers

    def _admin_url(self, node_id: str | None) -> str | None:
        if node_id is None:
            return None
        if node_id == self.host.node_id:
            return f"http://{self.host.config.network.admin_host}:{self.host.admin_port}"
        peer = self.host.links.peers.get(node_id)
        if peer is None or not peer.admin_port:
            return None
        return f"http://{peer.host}:{peer.admin_port}"

    def _require_coordinator(self) -> None:
        if not self.host.role.active:
            leader = self.host.leader_id
            raise facade.NotCoordinator(self._admin_url(leader) if leader != self.host.node_id else None,
                                        leader_id=leader)

    async def _commit(self, change) -> dict:
        self._require_coordinator()
        try:
            return await self.host.role.commit(change)
        except RegistryError as exc:
            raise _facade_error(exc) from exc
        except NotCoordinatorError as exc:
            raise facade.NotCoordinator(self._admin_url(exc.leader_id), leader_id=exc.leader_id) from exc
        except TimeoutError as exc:
            raise facade.Unavailable(str(exc), reason="no_quorum", retry_after_s=2.0) from exc

    # ----------------------------------------------------------------- reads

    async def cluster_status(self) -> facade.ClusterStatus:
        host = self.host
        leader = host.leader_id
        members = [self._member(host.node_id)]
        for peer in sorted(set(host.links.peers) - {host.node_id}):
            members.append(self._member(peer))
        registry = host.registry()
        return {
            "cluster": host.config.cluster_name,
            "cluster_id": host.cluster_id,
            "node_id": host.node_id,
            "coordinator": {"node_id": leader, "admin_url": self._admin_url(leader)} if leader else None,
            "epoch": host.epoch,
            "plan_version": int(registry.get("plan_version", 0)),
            "members": members,
            "election": host.election.status(time.monotonic()),
            "voters": sorted(host.voters),
            "duplicate_node_ids": host.links.status()["duplicate_node_ids"],
            "dataplane": host.dataplane.status(),
            "segments": host.segments.status(),
            "draining": host.draining,
            "alerts": await self.alerts(),
        }

    def _member(self, node_id: str) -> facade.MemberInfo:
        host = self.host
        role = "coordinator" if node_id == host.leader_id else ("voter" if node_id in host.voters else "agent")
        if node_id == host.node_id:
            return {
                "node_id": node_id, "role": role, "state": "draining" if host.draining else "alive",
                "address": f"{host.config.network.bind_host}:{host.peer_port}",
                "admin_url": self._admin_url(node_id), "capabilities": host.capabilities,
                "health": {"loop_lag_ms": round(host.looplag.lag_s * 1000, 2),
                           "inflight": len(host.dataplane.tracker),
                           "degraded": host.segments.is_wedged(10.0)},
                "incarnation": host.incarnation,
            }
        peer = host.links.peers[node_id]
        membership = host.membership
        if node_id in membership.left:
            state = "left"
        elif node_id in membership.dead:
            state = "dead"
        elif membership.detector.state_of(node_id) is PeerState.SUSPECT:
            # Silent past suspect_after_s. Routes avoid it where another replica of its segment exists.
            state = "suspect"
        elif peer.is_member:
            state = "alive"
        else:
            state = peer.reachability
        report = membership.reports.get(node_id, {})
        silent_s = membership.detector.silent_s(time.monotonic(), node_id)
        return {
            "node_id": node_id, "role": role, "state": state,
            "address": f"{peer.host}:{peer.port}" if peer.host else "",
            "admin_url": self._admin_url(node_id),
            "capabilities": peer.info.get("caps", {}),
            "health": {"queue": report.get("queue", 0), "degraded": bool(report.get("wedged")),
                       "rtt_ms": round(membership.rtt_s.get(node_id, 0.0) * 1000, 3),
                       "silent_s": round(silent_s, 3) if silent_s is not None else None},
            "incarnation": peer.incarnation,
        }

    async def discovery_status(self) -> dict[str, Any]:
        host = self.host
        mdns = host.discovery.diagnostics() if host.discovery is not None else {
            "enabled": False, "reason": "network.mdns_enabled is false"}
        return {
            "node_id": host.node_id,
            "mdns": mdns,
            "static_peers": list(host.config.network.static_peers),
            "links": host.links.status(),
            "membership": host.membership.status(),
        }

    def _model_info(self, name: str, model: dict) -> facade.ModelInfo:
        versions = []
        for version, entry in sorted(model["versions"].items()):
            placement = entry.get("placement") or {"segments": []}
            # Unit names when this agent has parsed the manifest (it has, once it served or loaded
            # the version), else unit indices.
            manifest = self.host.segments.cached_manifest(entry["manifest"]) if entry.get("manifest") else None
            unit_names = [unit.name for unit in manifest.units] if manifest is not None else None
            info: facade.VersionInfo = {
                "version": version,
                "state": entry["state"],
                "source": entry["source"],
                "segments": [
                    {"segment": f"{name}@{version}#{s['index']}", "index": s["index"],
                     "units": [unit_names[u] if unit_names and u < len(unit_names) else str(u)
                               for u in range(s["first"], s["last"] + 1)],
                     "first_unit": s["first"], "last_unit": s["last"], "agents": list(s["agents"])}
                    for s in placement["segments"]
                ],
                "plan_version": placement.get("plan_version"),
                "predicted": entry.get("predicted", {}),
                "manifest": entry["manifest"],
            }
            if self.host.metrics is not None:
                stats = self.host.metrics.version_stats(name, version)
                info["stats"] = {k: v for k, v in vars(stats).items()} if hasattr(stats, "__dict__") else {}
            versions.append(info)
        previous = model.get("previous_traffic") or {}
        return {
            "name": name,
            "versions": versions,
            "weights": dict(model["traffic"]),
            "previous_version": max(previous, key=previous.get) if previous else None,
            # Text requests work for any version whose export shipped a tokenizer.
            "text_input": any(bool(v.get("tokenizer")) for v in model["versions"].values()),
        }

    async def list_models(self) -> list[facade.ModelInfo]:
        registry = self.host.registry()
        return [self._model_info(name, model) for name, model in sorted(registry["models"].items())]

    async def get_model(self, name: str) -> facade.ModelInfo:
        registry = self.host.registry()
        model = registry["models"].get(name)
        if model is None:
            raise facade.NotFound(f"model {name!r} not found", field="name", value=name,
                                  expected=sorted(registry["models"]))
        return self._model_info(name, model)

    async def alerts(self) -> list[facade.AlertInfo]:
        alerts = getattr(self.host, "alerts_engine", None)
        return alerts.firing() if alerts is not None else []

    # ----------------------------------------------------------------- writes

    async def deploy(self, request: facade.DeployRequest) -> facade.DeployProgress:
        self._require_coordinator()
        try:
            deployment = self.host.role.start_deploy(
                name=request.name, version=request.version, source=request.source,
                rollout=request.strategy, replicas=request.replicas, options=dict(request.options))
        except RegistryError as exc:
            raise _facade_error(exc) from exc
        except NotCoordinatorError as exc:
            raise facade.NotCoordinator(self._admin_url(exc.leader_id), leader_id=exc.leader_id) from exc
        return facade.DeployProgress(deployment.id, deployment.model, deployment.version,
                                     "pending", 0.0, "deployment accepted")

    async def deploy_progress(self, deployment_id: str) -> dict[str, Any]:
        deployment = self.host.role.deployment(deployment_id)
        if deployment is None:
            if not self.host.role.active:
                self._require_coordinator()
            raise facade.NotFound(f"deployment {deployment_id!r} not found on the coordinator",
                                  field="id", value=deployment_id,
                                  expected=sorted(self.host.role.deployments))
        return deployment.to_dict()

    async def set_traffic(self, name: str, weights: dict[str, float]) -> facade.ModelInfo:
        registry = await self._commit(lambda reg: registry_ops.set_traffic(reg, name, weights))
        return self._model_info(name, registry["models"][name])

    async def rollback(self, name: str) -> facade.ModelInfo:
        registry = await self._commit(lambda reg: registry_ops.rollback(reg, name))
        logger.warning("traffic rolled back model=%s weights=%s", name, registry["models"][name]["traffic"])
        return self._model_info(name, registry["models"][name])

    async def delete_version(self, name: str, version: str) -> facade.ModelInfo:
        registry = await self._commit(lambda reg: registry_ops.delete_version(reg, name, version))
        if self.host.metrics is not None:
            self.host.metrics.forget_version(name, version)
        model = registry["models"].get(name) or {"versions": {}, "traffic": {}, "previous_traffic": None}
        return self._model_info(name, model)

    # ----------------------------------------------------------------- inference

    def _resolve_version(self, name: str, version: str | None, request_key: str | None) -> tuple[str, Mapping]:
        # Runs on every inference request: read the committed registry without copying it.
        registry = self.host.registry_view()
        model = registry["models"].get(name)
        if model is None:
            raise facade.NotFound(f"model {name!r} not found", field="model", value=name,
                                  expected=sorted(registry["models"]))
        if version is None:
            try:
                version = choose_version(model["traffic"], request_key)
            except TrafficError as exc:
                raise facade.Unavailable(f"model {name!r} has no version that receives traffic yet: {exc}",
                                         reason="no_ready_version", retry_after_s=1.0) from exc
        entry = model["versions"].get(version)
        if entry is None:
            raise facade.NotFound(f"version {version!r} of model {name!r} not found", field="version",
                                  value=version, expected=sorted(model["versions"]))
        if entry["state"] != "ready":
            raise facade.Unavailable(f"version {version!r} of model {name!r} is {entry['state']}, not ready",
                                     reason="version_not_ready", retry_after_s=1.0)
        return version, entry

    async def input_spec(self, name: str, version: str | None) -> facade.InputSpec:
        version, entry = self._resolve_version(name, version, None)
        manifest = await self.host.segments.manifest(entry["manifest"])
        return {
            "model": name,
            "version": version,
            "inputs": [
                {"name": input_name, "dtype": spec.dtype, "shape": list(spec.shape)}
                for input_name, spec in manifest.input_specs.items()
            ],
            "text_input": bool(entry.get("tokenizer")),
            "tasks": sorted(manifest.heads or {}),
            "equal_dims": [[[input_name, dim] for input_name, dim in group] for group in manifest.equal_dims],
        }

    async def _tokenize(self, entry: dict, text: list[str]) -> dict[str, torch.Tensor]:
        sha = entry.get("tokenizer")
        if not sha:
            raise facade.BadRequest("this model ships no tokenizer; send tensors in `inputs`",
                                    field="text", value=text[:1], expected="inputs")
        tokenizer = self._tokenizers.get(sha)
        if tokenizer is None:
            from tokenizers import Tokenizer

            from coordinator.zoo import SharedTokenizer
            path = await self.host.blobs.fetch(sha, self.host.segments._holders())
            tokenizer = SharedTokenizer(Tokenizer.from_str(path.read_text()), TOKENIZER_MAX_LENGTH)
            self._tokenizers[sha] = tokenizer
        # Tokenizing a large batch takes long enough to stall heartbeats: run it in a thread.
        return await asyncio.to_thread(tokenizer, text)

    async def _route_units(self, name: str, version: str, entry: dict, task: str | None) -> tuple[int, ...] | None:
        """Check ``task`` against the version's heads; return the task's route units (None: no heads)."""
        manifest = await self.host.segments.manifest(entry["manifest"])
        tasks = sorted(manifest.heads or {})
        if not tasks:
            if task is not None:
                raise facade.BadRequest(
                    f"model {name!r} version {version!r} has no heads, so it takes no task; omit `task`",
                    field="task", value=task, expected=[])
            return None
        if task is None:
            raise facade.BadRequest(
                f"model {name!r} version {version!r} is a branch model; name the head to run in `task`, "
                f"one of {tasks}", field="task", value=None, expected=tasks)
        if task not in tasks:
            raise facade.BadRequest(f"task {task!r} is not a head of model {name!r} version {version!r}; "
                                    f"use one of {tasks}", field="task", value=task, expected=tasks)
        return route_for_task(manifest, task)

    def _check_deadline_reachable(self, request: facade.InferRequest, version: str, entry: dict,
                                  deadline_s: float) -> None:
        """Reject at once a deadline far below the planner's latency estimate for this version.

        Such a request would be routed, queued and run only to miss its deadline. The estimate
        comes from unit profiles at deploy time, for the profiled batch. So only a deadline under
        DEADLINE_FLOOR_FRACTION of it is rejected, and a deadline closer to it is tried.
        """
        estimate_s = (entry.get("predicted") or {}).get("latency_s")
        if not isinstance(estimate_s, (int, float)) or deadline_s >= DEADLINE_FLOOR_FRACTION * estimate_s:
            return
        logger.info("rejected request for model %s version %s: deadline %.1f ms, estimated latency %.1f ms",
                    request.model, version, deadline_s * 1000, estimate_s * 1000)
        raise facade.Unavailable(
            f"the deadline of {deadline_s * 1000:.1f} ms cannot be met: model {request.model!r} version {version!r} "
            f"needs about {estimate_s * 1000:.1f} ms per request (planner estimate); allow more time in deadline_ms",
            reason="deadline_unreachable", field="deadline_ms", value=round(request.deadline_s * 1000, 3),
            expected=f"at least {DEADLINE_FLOOR_FRACTION * estimate_s * 1000:.1f} ms, and about "
                     f"{estimate_s * 1000:.1f} ms for the request to finish")

    async def infer(self, request: facade.InferRequest) -> facade.InferResult:
        host = self.host
        if host.draining:
            raise facade.Unavailable(f"agent {host.node_id} is shutting down; send the request to another agent",
                                     reason="draining", retry_after_s=0.5)
        version, entry = self._resolve_version(request.model, request.version, request.request_key)
        route_units = await self._route_units(request.model, version, entry, request.task)
        tokenize_started = time.monotonic()
        inputs = request.inputs if request.inputs is not None else await self._tokenize(entry, request.text or [])
        tokenize_s = time.monotonic() - tokenize_started
        deadline_s = DEFAULT_DEADLINE_S
        if request.deadline_monotonic() is not None:
            deadline_s = request.deadline_monotonic() - time.monotonic()
            if deadline_s <= 0:
                # Reading the body, and tokenizing a long text, can use up a short budget before any hop.
                spent_ms = (time.monotonic() - request.received_monotonic) * 1000
                logger.info("rejected request for model %s version %s: its %.1f ms deadline passed before "
                            "it was scheduled (%.1f ms after arrival, %.1f ms of it tokenizing)", request.model,
                            version, request.deadline_s * 1000, spent_ms, tokenize_s * 1000)
                raise facade.Unavailable(
                    f"the deadline of {request.deadline_s * 1000:.1f} ms passed before the request was scheduled "
                    f"({spent_ms:.1f} ms after it arrived, {tokenize_s * 1000:.1f} ms of it tokenizing); allow more "
                    f"time in deadline_ms",
                    reason="deadline_unreachable", field="deadline_ms", value=round(request.deadline_s * 1000, 3),
                    expected="a budget of at least a few milliseconds per segment")
            self._check_deadline_reachable(request, version, entry, deadline_s)
        started = time.monotonic()
        try:
            outputs, info = await host.dataplane.infer(
                request.model, version, inputs, priority=request.priority, deadline_s=deadline_s,
                task=request.task, route_units=route_units)
        except InferenceError as exc:
            if exc.status == 500:
                hint = ""
                if "IndexError" in str(exc):
                    # An embedding lookup past its table: token or class ids the model does not know.
                    hint = (" An integer input holds a value outside the model's range, for example a token id "
                            "at or above the vocabulary size or below 0.")
                raise facade.BadRequest(
                    f"the model rejected these inputs: {exc}.{hint} Fix the input named above; the model's "
                    f"limits, such as a maximum sequence length or vocabulary size, apply to every request",
                    status=422, field="inputs") from exc
            error = (facade.DeadlineExceeded(str(exc)) if exc.status == 504
                     else facade.Unavailable(str(exc), reason="deadline_unreachable"))
            error.version = version
            raise error from exc
        elapsed = time.monotonic() - started
        return facade.InferResult(
            outputs=outputs, version=version, request_id=info["request_id"],
            route=[hop[2] for hop in info["route"]],
            timings={"total": elapsed + tokenize_s, **({"tokenize": tokenize_s} if request.inputs is None else {})}, failovers=int(info["failovers"]),
        )


def build_http_app(host):
    """Create the aiohttp application and the metrics object for ``host``."""
    from nodeagent.http_api import create_app
    from nodeagent.http_auth import load_tokens, token_required
    from nodeagent.metrics import AgentMetrics

    metrics = AgentMetrics(host.node_id)
    tokens = None
    token_path = host.config.admin.token_file or host.data_dir / "tokens.json"
    if token_required(host.config.network.admin_host, host.config.admin.require_token) or Path(token_path).exists():
        # Loaded whenever present: a loopback gateway still needs the token to forward writes to
        # a coordinator that requires one.
        tokens = load_tokens(host.data_dir, path=host.config.admin.token_file)
    app = create_app(AgentService(host), config=host.config, tokens=tokens, metrics=metrics, node_id=host.node_id)
    return app, metrics
