"""A cluster of real agent processes on this machine, for the demo, tests and benchmarks.

``LocalCluster`` makes throwaway credentials (one CA, one certificate per agent), writes one
config file per agent, starts each agent as its own process (its own session, so a Ctrl-C at the
terminal reaches only the caller), and offers small helpers over the admin HTTP API. Everything
binds to 127.0.0.1, mDNS included; nothing is sent to any other address.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Timings for agents that share one machine's two cores with model compute: failure detection
# within about 2 s, and an election timeout long enough that a busy event loop does not cost the
# coordinator its lease.
LOCAL_TIMING = {
    "heartbeat_interval_s": 0.2,
    "suspect_after_s": 1.0,
    "dead_after_s": 2.0,
    "election_timeout_min_s": 1.0,
    "election_timeout_max_s": 2.0,
    "lease_s": 0.8,
    "hop_timeout_s": 5.0,
}


class ClusterError(RuntimeError):
    """A local cluster did not start or respond as expected."""


@dataclass
class AgentProcess:
    """One agent process of a local cluster."""

    node_id: str
    data_dir: Path
    config_path: Path
    log_path: Path
    process: subprocess.Popen | None = None
    admin_url: str = ""
    peer_port: int = 0

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(str(value))


def render_config(sections: dict[str, Any]) -> str:
    """Render a two-level dict as TOML (top-level scalars first, then one table per section)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in sections.items() if not isinstance(value, dict)]
    for key, value in sections.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines.extend(f"{name} = {_toml_value(item)}" for name, item in value.items())
    return "\n".join(lines) + "\n"


class LocalCluster:
    """Agents ``agent-0`` .. ``agent-{n-1}`` under ``root``, all voters unless ``voters`` lists fewer."""

    def __init__(
        self,
        root: Path,
        count: int,
        *,
        mdns: bool = True,
        voters: list[str] | None = None,
        timing: dict[str, float] | None = None,
        runtime: dict[str, Any] | None = None,
        cluster_id: str | None = None,
        static_peers: bool = False,
    ) -> None:
        if count < 1:
            raise ValueError(f"a local cluster needs at least 1 agent, got {count}")
        self.root = Path(root)
        self.node_ids = [f"agent-{i}" for i in range(count)]
        self.mdns = mdns
        self.voters = voters if voters is not None else list(self.node_ids)
        self.timing = {**LOCAL_TIMING, **(timing or {})}
        self.runtime = {"torch_threads": 1, **(runtime or {})}
        self.cluster_id = cluster_id or f"local-{os.getpid()}-{int(time.time())}"
        self.static_peers = static_peers
        self.agents = [
            AgentProcess(node_id, self.root / node_id, self.root / node_id / "agent.toml", self.root / f"{node_id}.log")
            for node_id in self.node_ids
        ]
        self._peer_ports: dict[str, int] = {}

    # ----------------------------------------------------------------- set-up

    def create(self) -> None:
        """Make credentials and config files; measure this machine's compute score once."""
        from protocol.tls import init_cluster, issue_node

        first = self.agents[0].data_dir
        init_cluster(first, node_id=self.node_ids[0], cluster_id=self.cluster_id)
        for agent in self.agents[1:]:
            issue_node(first, agent.data_dir, agent.node_id)
        self._share_compute_score()
        for index, agent in enumerate(self.agents):
            self.write_config(index)

    def write_config(self, index: int, *, extra: dict[str, dict[str, Any]] | None = None) -> None:
        agent = self.agents[index]
        # Static peers need fixed ports; with mDNS, port 0 lets the kernel pick.
        peer_port = self._fixed_port(agent.node_id) if self.static_peers else 0
        network: dict[str, Any] = {
            "bind_host": "127.0.0.1",
            "admin_host": "127.0.0.1",
            "peer_port": peer_port,
            "mdns_enabled": self.mdns,
            "mdns_interfaces": ["127.0.0.1"],
        }
        if self.static_peers:
            network["static_peers"] = [
                f"127.0.0.1:{self._fixed_port(other)}" for other in self.node_ids if other != agent.node_id
            ]
        sections: dict[str, Any] = {
            "profile": "test",
            "data_dir": str(agent.data_dir),
            "cluster_name": "local",
            "log_level": "INFO",
            "network": network,
            "timing": dict(self.timing),
            "election": self._election_section(agent.node_id),
            "runtime": dict(self.runtime),
        }
        for section, values in (extra or {}).items():
            sections.setdefault(section, {}).update(values)
        agent.data_dir.mkdir(parents=True, exist_ok=True)
        agent.config_path.write_text(render_config(sections))

    def _election_section(self, node_id: str) -> dict[str, Any]:
        section: dict[str, Any] = {"voters": list(self.voters), "voter": node_id in self.voters}
        if len(self.voters) == 2:
            # Two voters cannot survive the loss of either, so a two-agent cluster runs with a
            # fixed coordinator instead of elections.
            section["static_coordinator"] = self.voters[0]
        return section

    def _fixed_port(self, node_id: str) -> int:
        if node_id not in self._peer_ports:
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                self._peer_ports[node_id] = sock.getsockname()[1]
        return self._peer_ports[node_id]

    def _share_compute_score(self) -> None:
        """Give every agent the same measured compute score.

        The agents share one machine's cores. Probed at the same moment they would compete for
        them and measure different speeds at random, and the planner would then trust noise.
        """
        from nodeagent.probe import CACHE_RELATIVE_PATH, probe

        probe(self.agents[0].data_dir)
        source = self.agents[0].data_dir / CACHE_RELATIVE_PATH
        for agent in self.agents[1:]:
            target = agent.data_dir / CACHE_RELATIVE_PATH
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)

    # ----------------------------------------------------------------- processes

    def start(self, indices: list[int] | None = None) -> None:
        for index in indices if indices is not None else range(len(self.agents)):
            self.start_agent(index)

    def start_agent(self, index: int) -> AgentProcess:
        agent = self.agents[index]
        if agent.running:
            raise ClusterError(f"{agent.node_id} is already running (pid {agent.process.pid})")
        (agent.data_dir / "agent.json").unlink(missing_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        with open(agent.log_path, "ab") as log:
            agent.process = subprocess.Popen(
                [sys.executable, "-m", "nodeagent.cli", "agent", "--config", str(agent.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )
        logger.info("started %s pid=%d", agent.node_id, agent.process.pid)
        return agent

    def signal_agent(self, index: int, sig: int) -> None:
        agent = self.agents[index]
        if agent.running:
            agent.process.send_signal(sig)

    def kill(self, index: int) -> None:
        """SIGKILL an agent and reap it."""
        agent = self.agents[index]
        if agent.process is not None:
            agent.process.kill()
            agent.process.wait(10)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every running agent (SIGCONT first, in case one was stopped), then SIGKILL."""
        for agent in self.agents:
            if agent.running:
                agent.process.send_signal(signal.SIGCONT)
                agent.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for agent in self.agents:
            if agent.process is None:
                continue
            try:
                agent.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.process.kill()
                agent.process.wait(5)

    def log_tail(self, index: int, lines: int = 20) -> str:
        try:
            return "\n".join(self.agents[index].log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # ----------------------------------------------------------------- readiness

    def wait_started(self, index: int, timeout_s: float = 60.0) -> AgentProcess:
        """Wait until an agent wrote its ready file; return it with its admin URL filled in."""
        agent = self.agents[index]
        ready_file = agent.data_dir / "agent.json"
        deadline = time.monotonic() + timeout_s
        while True:
            if ready_file.exists():
                info = json.loads(ready_file.read_text())
                if agent.process is not None and info.get("pid") == agent.process.pid:
                    agent.admin_url = f"http://{info['admin_host']}:{info['admin_port']}"
                    agent.peer_port = int(info["peer_port"])
                    return agent
            if agent.process is not None and agent.process.poll() is not None:
                raise ClusterError(f"{agent.node_id} exited with status {agent.process.returncode}:\n{self.log_tail(index)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{agent.node_id} did not start within {timeout_s:.0f} s:\n{self.log_tail(index)}")
            time.sleep(0.05)

    def wait_formed(self, timeout_s: float = 60.0, *, via: int = 0, expect: list[str] | None = None) -> dict:
        """Wait until ``expect`` (default: every running agent) are alive members and a coordinator leads."""
        expected = set(expect if expect is not None else [a.node_id for a in self.agents if a.running])
        for index, agent in enumerate(self.agents):
            if agent.node_id in expected:
                self.wait_started(index, timeout_s)
        deadline = time.monotonic() + timeout_s
        status: dict = {}
        while time.monotonic() < deadline:
            try:
                status = self.get(via, "/v1/cluster")
            except (OSError, ClusterError):
                time.sleep(0.1)
                continue
            alive = {m["node_id"] for m in status["members"] if m["state"] == "alive"}
            coordinator = (status.get("coordinator") or {}).get("node_id")
            if expected <= alive and coordinator in expected:
                return status
            time.sleep(0.1)
        raise ClusterError(f"cluster did not form within {timeout_s:.0f} s; last status members="
                           f"{[(m['node_id'], m['state']) for m in status.get('members', [])]} "
                           f"coordinator={status.get('coordinator')}")

    # ----------------------------------------------------------------- admin API

    def request(self, index: int, method: str, path: str, body: Any = None, *, timeout_s: float = 30.0) -> tuple[int, Any]:
        """Send one JSON request to an agent's admin API; return (status, decoded body)."""
        agent = self.agents[index]
        if not agent.admin_url:
            self.wait_started(index)
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(agent.admin_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def get(self, index: int, path: str) -> Any:
        status, body = self.request(index, "GET", path)
        if status != 200:
            raise ClusterError(f"GET {path} on {self.agents[index].node_id} returned {status}: {body}")
        return body

    def deploy(self, model: str, version: str, source: str, *, via: int = 0, timeout_s: float = 300.0,
               replicas: int = 1, options: dict | None = None, progress=None) -> dict:
        """Deploy through any agent; wait until every running agent routes to the version.

        A 503 (no coordinator holds the lease yet, for example right after an election) is
        retried until ``timeout_s``, as a client following Retry-After would.
        """
        deadline = time.monotonic() + timeout_s
        request = {"name": model, "version": version, "source": source, "replicas": replicas,
                   "options": options or {}}
        while True:
            status, body = self.request(via, "POST", "/v1/models", request)
            if status == 202:
                break
            if status != 503 or time.monotonic() > deadline:
                raise ClusterError(f"deploy of {model} {version} returned {status}: {body}")
            time.sleep(0.25)
        last = ""
        while time.monotonic() < deadline:
            code, state = self.request(via, "GET", f"/v1/deployments/{body['id']}")
            if code == 200:
                if progress is not None and state["message"] != last:
                    progress(state)
                    last = state["message"]
                if state["state"] == "failed":
                    raise ClusterError(f"deployment of {model} {version} failed: {state['message']}")
                if state["state"] == "ready" and self._version_routable(model, version):
                    return self.get(via, f"/v1/models/{model}")
            time.sleep(0.2)
        raise ClusterError(f"deployment of {model} {version} not ready within {timeout_s:.0f} s")

    def _version_routable(self, model: str, version: str) -> bool:
        """Tell whether every running agent has committed the version as ready with traffic."""
        for index, agent in enumerate(self.agents):
            if not agent.running:
                continue
            code, info = self.request(index, "GET", f"/v1/models/{model}")
            if code != 200 or info.get("weights", {}).get(version, 0) <= 0:
                return False
        return True

    def index_of(self, node_id: str) -> int:
        return self.node_ids.index(node_id)
