"""Tests of real agent processes on 127.0.0.1: membership, failure detection, leave, election.

Every agent here is its own ``shardmesh agent`` process started by ``LocalCluster``, joined to
the others by mutual TLS on loopback. Discovery uses the static peer list with mDNS off, which
starts faster; mDNS discovery has its own tests. The timings are ``LOCAL_TIMING`` (heartbeat
0.2 s, dead after 2 s, election timeout 1 to 2 s), chosen for agents sharing two cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nodeagent.config import PROFILES
from nodeagent.localcluster import AgentProcess, LocalCluster, render_config
from nodeagent.probe import CACHE_RELATIVE_PATH
from protocol.tls import init_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TESTS_DIR = Path(__file__).resolve().parent

# Slack for polling, process scheduling on a loaded two-core machine, and interpreter exit.
DETECTION_MARGIN_S = 1.5
EXIT_MARGIN_S = 3.0
COORDINATOR_FAILOVER_BOUND_S = 5.0
POLL_S = 0.05


# ===================================================================== helpers


def member_states(cluster: LocalCluster, index: int) -> dict[str, str]:
    """Return node id -> membership state as agent ``index`` reports it in /v1/cluster."""
    status = cluster.get(index, "/v1/cluster")
    return {member["node_id"]: member["state"] for member in status["members"]}


def coordinator_of(cluster: LocalCluster, index: int) -> tuple[str | None, int]:
    """Return (coordinator node id or None, epoch) as agent ``index`` reports them."""
    status = cluster.get(index, "/v1/cluster")
    return (status.get("coordinator") or {}).get("node_id"), int(status["epoch"])


def wait_until(check: Callable[[], Any], timeout_s: float, description: str) -> tuple[Any, float]:
    """Poll ``check`` until it returns a truthy value; return it with the seconds waited."""
    started = time.monotonic()
    last: Any = None
    while True:
        last = check()
        elapsed = time.monotonic() - started
        if last:
            return last, elapsed
        if elapsed > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {description}; last value {last!r}")
        time.sleep(POLL_S)


def versions_ready(cluster: LocalCluster, index: int) -> bool:
    models = cluster.get(index, "/v1/models")
    return all(version["state"] == "ready" for model in models for version in model["versions"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def add_extra_agent(cluster: LocalCluster, node_id: str, data_dir: Path, *, static_peers: list[str]) -> int:
    """Write a config for one more agent process in ``data_dir`` and register it with ``cluster``.

    The config copies agent-0's, with its own data directory, a fresh peer port and the given
    static peers. Registering it makes ``cluster.stop()`` stop it too. Returns its index.
    """
    sections = tomllib.loads(cluster.agents[0].config_path.read_text())
    sections["data_dir"] = str(data_dir)
    sections["network"]["peer_port"] = free_port()
    sections["network"]["static_peers"] = static_peers
    sections["election"]["voter"] = node_id in sections["election"]["voters"]
    config_path = data_dir / "agent.toml"
    config_path.write_text(render_config(sections))
    cluster.agents.append(AgentProcess(node_id, data_dir, config_path, cluster.root / f"{data_dir.name}.log"))
    return len(cluster.agents) - 1


def remove_extra_agent(cluster: LocalCluster, index: int) -> None:
    """SIGKILL an agent added by ``add_extra_agent`` and drop it from ``cluster``."""
    cluster.kill(index)
    del cluster.agents[index]


def peer_addresses(cluster: LocalCluster) -> list[str]:
    return [f"127.0.0.1:{agent.peer_port}" for agent in cluster.agents]


def start_cluster(root: Path) -> LocalCluster:
    cluster = LocalCluster(root, 3, mdns=False, static_peers=True)
    cluster.create()
    cluster.start()
    try:
        cluster.wait_formed(timeout_s=60)
        # Every agent, not only agent-0, must see the whole cluster before a test disturbs it.
        for index in range(3):
            cluster.wait_formed(timeout_s=30, via=index)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="class")
def stable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three agents shared by one test class. Tests must leave them as they found them.

    Class scope stops them before the tests that start their own, so no more than about four
    agents compete for the cores at a time.
    """
    cluster = start_cluster(tmp_path_factory.mktemp("stable"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def fresh_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three agents for one test that kills or stops some of them."""
    cluster = start_cluster(tmp_path)
    try:
        yield cluster
    finally:
        cluster.stop()


def non_coordinator(cluster: LocalCluster) -> tuple[int, list[int]]:
    """Return the index of an agent that is not the coordinator, and the other two indices."""
    coordinator, _ = coordinator_of(cluster, 0)
    victim = next(i for i, node_id in enumerate(cluster.node_ids) if node_id != coordinator)
    return victim, [i for i in range(3) if i != victim]


class TestStableCluster:
    """Tests that leave the shared three agents running and as they found them."""

    # ===================================================================== formation


    def test_agents_static_peers_form_cluster(self, stable_cluster: LocalCluster) -> None:
        cluster = stable_cluster
        views = [cluster.get(index, "/v1/cluster") for index in range(3)]

        for view in views:
            states = {member["node_id"]: member["state"] for member in view["members"]}
            assert states == {node_id: "alive" for node_id in cluster.node_ids}, view["node_id"]
        coordinators = {view["coordinator"]["node_id"] for view in views}
        assert len(coordinators) == 1
        assert coordinators <= set(cluster.node_ids)
        assert len({view["epoch"] for view in views}) == 1
        assert views[0]["epoch"] >= 1

        for index in range(3):
            discovery = cluster.get(index, "/v1/discovery")
            assert discovery["mdns"]["mdns_enabled"] is False
            assert all(service["name"].startswith("static:") for service in discovery["mdns"]["services"])
            assert len(discovery["static_peers"]) == 2
            peers = discovery["links"]["peers"]
            others = set(cluster.node_ids) - {cluster.node_ids[index]}
            assert set(peers) == others
            for peer in peers.values():
                assert peer["state"] == "member"
                assert "static" in peer["sources"]

    # ===================================================================== identity


    def test_agents_duplicate_node_id_rejected(self, stable_cluster: LocalCluster) -> None:
        cluster = stable_cluster
        original = cluster.agents[1]
        original_view = {m["node_id"]: m for m in cluster.get(0, "/v1/cluster")["members"]}[original.node_id]
        clone_dir = cluster.root / "agent-1-clone"
        shutil.copytree(original.data_dir, clone_dir, ignore=shutil.ignore_patterns("agent.json", "agent.toml"))
        clone = add_extra_agent(cluster, original.node_id, clone_dir,
                                static_peers=[f"127.0.0.1:{cluster.agents[i].peer_port}" for i in (0, 2)])
        try:
            cluster.start_agent(clone)
            cluster.wait_started(clone)
            clone_port = cluster.agents[clone].peer_port

            def rejected_everywhere() -> bool:
                for index in (0, 2):
                    entries = cluster.get(index, "/v1/cluster")["duplicate_node_ids"]
                    if not any(e["node_id"] == original.node_id and e["refused"]["listen"][1] == clone_port for e in entries):
                        return False
                return True

            wait_until(rejected_everywhere, 10.0, "agents 0 and 2 to report the duplicate node id")

            # Watch past the failure detector's bound: the original stays the one and only agent-1.
            watch_until = time.monotonic() + cluster.timing["dead_after_s"] + 0.5
            while time.monotonic() < watch_until:
                for index in (0, 2):
                    members = [m for m in cluster.get(index, "/v1/cluster")["members"] if m["node_id"] == original.node_id]
                    assert len(members) == 1
                    assert members[0]["state"] == "alive"
                    assert members[0]["address"] == original_view["address"]
                    assert members[0]["incarnation"] == original_view["incarnation"]
                time.sleep(0.2)

            clone_states = member_states(cluster, clone)
            assert [node_id for node_id, state in clone_states.items() if state == "alive"] == [original.node_id]
            assert member_states(cluster, 1) == {node_id: "alive" for node_id in cluster.node_ids}
        finally:
            remove_extra_agent(cluster, clone)


    @pytest.mark.parametrize("trust", ["own_ca", "cluster_ca"])
    def test_agents_bad_certificate_never_member(self, stable_cluster: LocalCluster, trust: str) -> None:
        """An agent whose certificate another CA signed, under the same cluster id string.

        With ``own_ca`` the intruder trusts only its own CA, so it rejects the cluster's
        certificates first. With ``cluster_ca`` it contains the cluster's ca.pem and accepts the
        cluster's certificates, so the cluster's agents must reject its certificate themselves.
        """
        cluster = stable_cluster
        intruder_id = "agent-3"
        intruder_dir = cluster.root / f"intruder-{trust}"
        init_cluster(intruder_dir, node_id=intruder_id, cluster_id=cluster.cluster_id)
        if trust == "cluster_ca":
            shutil.copyfile(cluster.agents[0].data_dir / "tls" / "ca.pem", intruder_dir / "tls" / "ca.pem")
            (intruder_dir / "tls" / "ca.key").unlink()
        (intruder_dir / CACHE_RELATIVE_PATH).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cluster.agents[0].data_dir / CACHE_RELATIVE_PATH, intruder_dir / CACHE_RELATIVE_PATH)
        targets = peer_addresses(cluster)
        log_sizes = [agent.log_path.stat().st_size for agent in cluster.agents]
        intruder = add_extra_agent(cluster, intruder_id, intruder_dir, static_peers=targets)
        try:
            cluster.start_agent(intruder)
            cluster.wait_started(intruder)

            # NOTE: when the cluster rejects the intruder's certificate, the intruder records only
            # "connection closed": the TLS 1.3 alert does not reach its first read as an SSLError.
            expected_reason = "rejected" if trust == "own_ca" else ""

            def failed_everywhere() -> dict | None:
                failed = cluster.get(intruder, "/v1/discovery")["links"]["failed_addresses"]
                return failed if all(expected_reason in failed.get(address, "-") for address in targets) else None

            wait_until(failed_everywhere, 10.0, "the intruder to record a failed connection to every agent")

            watch_until = time.monotonic() + cluster.timing["dead_after_s"] + 0.5
            while time.monotonic() < watch_until:
                for index in range(3):
                    states = member_states(cluster, index)
                    assert states.get(intruder_id) != "alive"
                    assert all(states[node_id] == "alive" for node_id in cluster.node_ids)
                time.sleep(0.2)

            intruder_states = member_states(cluster, intruder)
            assert [node_id for node_id, state in intruder_states.items() if state == "alive"] == [intruder_id]
            if trust == "cluster_ca":
                for index in range(3):
                    with open(cluster.agents[index].log_path, "rb") as log:
                        log.seek(log_sizes[index])
                        new_lines = log.read().decode(errors="replace")
                    assert "reason=unknown_ca" in new_lines, f"{cluster.node_ids[index]} log: {new_lines[-2000:]}"
        finally:
            remove_extra_agent(cluster, intruder)


# ===================================================================== failure detection and leave


def test_agents_kill_detected_within_bound(fresh_cluster: LocalCluster, record_property: Callable) -> None:
    cluster = fresh_cluster
    victim, survivors = non_coordinator(cluster)
    victim_id = cluster.node_ids[victim]
    bound_s = cluster.timing["dead_after_s"] + cluster.timing["heartbeat_interval_s"] + DETECTION_MARGIN_S

    killed_at = time.monotonic()
    cluster.kill(victim)
    detected: dict[int, float] = {}
    while len(detected) < len(survivors) and time.monotonic() - killed_at < bound_s + 2.0:
        for index in survivors:
            if index not in detected and member_states(cluster, index)[victim_id] == "dead":
                detected[index] = time.monotonic() - killed_at
        time.sleep(POLL_S)

    record_property("detection_s", {cluster.node_ids[i]: round(t, 3) for i, t in detected.items()})
    for index in survivors:
        assert index in detected, f"{cluster.node_ids[index]} never declared {victim_id} dead"
        assert detected[index] <= bound_s, f"{cluster.node_ids[index]} took {detected[index]:.2f} s"
    # The survivors still see each other as alive: one death does not spread.
    for index in survivors:
        states = member_states(cluster, index)
        assert all(states[cluster.node_ids[other]] == "alive" for other in survivors)


def test_agents_sigterm_leaves_cleanly(fresh_cluster: LocalCluster, record_property: Callable) -> None:
    cluster = fresh_cluster
    victim, survivors = non_coordinator(cluster)
    victim_id = cluster.node_ids[victim]
    process = cluster.agents[victim].process
    exit_bound_s = PROFILES["test"]["timing"]["drain_timeout_s"] + EXIT_MARGIN_S
    left_bound_s = cluster.timing["dead_after_s"] / 2

    signalled_at = time.monotonic()
    cluster.signal_agent(victim, signal.SIGTERM)
    left_at: dict[int, float] = {}
    while (len(left_at) < len(survivors) or process.poll() is None) and time.monotonic() - signalled_at < exit_bound_s + 2.0:
        for index in survivors:
            if index not in left_at and member_states(cluster, index)[victim_id] == "left":
                left_at[index] = time.monotonic() - signalled_at
        time.sleep(POLL_S / 5)
    exited_after_s = time.monotonic() - signalled_at

    record_property("left_s", {cluster.node_ids[i]: round(t, 3) for i, t in left_at.items()})
    record_property("exit_s", round(exited_after_s, 3))
    assert process.returncode == 0, cluster.log_tail(victim)
    assert exited_after_s <= exit_bound_s
    for index in survivors:
        assert index in left_at, f"{cluster.node_ids[index]} never marked {victim_id} as left"
        assert left_at[index] <= left_bound_s

    # Past the failure detector's bound the agent is still "left", never "dead".
    time.sleep(max(0.0, cluster.timing["dead_after_s"] + 0.5 - (time.monotonic() - signalled_at)))
    for index in survivors:
        assert member_states(cluster, index)[victim_id] == "left"


# ===================================================================== election


def test_agents_coordinator_kill_reelects(fresh_cluster: LocalCluster, record_property: Callable) -> None:
    cluster = fresh_cluster
    old_coordinator, old_epoch = coordinator_of(cluster, 0)
    victim = cluster.index_of(old_coordinator)
    survivors = [i for i in range(3) if i != victim]

    killed_at = time.monotonic()
    cluster.kill(victim)

    def new_coordinator() -> tuple[str, int] | None:
        views = [coordinator_of(cluster, index) for index in survivors]
        leaders = {leader for leader, _ in views}
        if len(leaders) == 1 and None not in leaders and old_coordinator not in leaders:
            return views[0][0], min(epoch for _, epoch in views)
        return None

    (leader, epoch), elapsed = wait_until(new_coordinator, COORDINATOR_FAILOVER_BOUND_S + 5.0, "a new coordinator")
    record_property("reelection_s", round(elapsed, 3))
    assert elapsed <= COORDINATOR_FAILOVER_BOUND_S
    assert leader in {cluster.node_ids[i] for i in survivors}
    assert epoch > old_epoch


def test_agents_restart_keeps_registry_and_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The agents import the toy model factory from tests/toymodels.py.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    cluster = start_cluster(tmp_path)
    try:
        cluster.deploy("toy", "v1", "factory:toymodels:build_sequential", timeout_s=90)
        epoch_before = max(coordinator_of(cluster, index)[1] for index in range(3))

        cluster.stop()
        assert [agent.process.returncode for agent in cluster.agents] == [0, 0, 0]

        cluster.start()
        cluster.wait_formed(timeout_s=60)
        for index in range(3):
            # A restarted follower learns the committed registry from the new coordinator.
            def versions() -> dict[tuple[str, str], str]:
                models = cluster.get(index, "/v1/models")
                return {(m["name"], v["version"]): v["state"] for m in models for v in m["versions"]}

            listed, _ = wait_until(versions, 10.0, f"{cluster.node_ids[index]} to list a model")
            assert set(listed) == {("toy", "v1")}, cluster.node_ids[index]
            assert coordinator_of(cluster, index)[1] > epoch_before

        # The new coordinator may re-place the version because no agent reports it loaded yet.
        # It must come back to ready without a new deploy.
        for index in range(3):
            wait_until(lambda: versions_ready(cluster, index), 30.0, f"toy v1 ready on {cluster.node_ids[index]}")
    finally:
        cluster.stop()


def test_agents_probe_link_bandwidth_again(tmp_path: Path) -> None:
    """Links are measured when they come up and then every link_probe_interval_s."""
    cluster = LocalCluster(tmp_path, 2, mdns=False, static_peers=True, timing={"link_probe_interval_s": 0.3})
    cluster.create()
    cluster.start()
    try:
        cluster.wait_formed(timeout_s=60)
        deadline = time.monotonic() + 30
        links: dict = {}
        while time.monotonic() < deadline:
            links = cluster.get(0, "/v1/discovery")["membership"]
            probes = [link.get("bandwidth_probes", 0) for link in links.values()]
            if probes and min(probes) >= 4:
                break
            time.sleep(0.3)
        # Four probes fill the window the estimate is taken from; one probe means no re-probing.
        assert [link["bandwidth_probes"] for link in links.values()] == [4], links
        assert all(link["bandwidth_bytes_per_s"] > 0 for link in links.values()), links
    finally:
        cluster.stop()


def test_bandwidth_estimate_is_fastest_recent_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """One slow probe does not lower the estimate; a link that stays slow is seen after four probes.

    Pure bookkeeping of ``Membership`` with a stub host and a fake clock: no frames are sent.
    """
    from types import SimpleNamespace

    from nodeagent import membership as membership_module
    from nodeagent.config import AgentConfig
    from protocol.messages import MsgType

    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(membership_module.time, "monotonic", lambda: clock.now)
    host = SimpleNamespace(node_id="a", config=AgentConfig(), metrics=None,
                           links=SimpleNamespace(send_nowait=lambda *args, **kwargs: None, members=lambda: ["b"]))
    links = membership_module.Membership(host)
    size = membership_module.BANDWIDTH_PROBE_BYTES

    def probe(seconds: float) -> float:
        links._start_probe("b", clock.now)
        probe_id = next(iter(links._probe_started))
        clock.now += seconds
        links.on_bandwidth_frame("b", MsgType.BANDWIDTH_ECHO, {"id": probe_id, "bytes": size}, b"")
        return links.bandwidth["b"]

    assert probe(0.02) == pytest.approx(size / 0.02)
    assert probe(0.2) == pytest.approx(size / 0.02)  # slowed by other work: ignored
    for _ in range(2):
        assert probe(0.1) == pytest.approx(size / 0.02)
    assert probe(0.1) == pytest.approx(size / 0.1)  # the fast sample aged out of the window
