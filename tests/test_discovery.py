"""Tests of mDNS discovery with real zeroconf on 127.0.0.1, in subprocesses and in namespaces.

zeroconf is always bound to 127.0.0.1 here, or to addresses inside network namespaces that the
test creates, because its default interface choice would multicast out of the machine's real
network interface.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent.actors import Supervisor
from nodeagent.config import AgentConfig
from nodeagent.discovery import (
    MAX_TXT_STRING_BYTES,
    Discovery,
    DiscoveryActor,
    DiscoveryEvent,
    InterfaceCandidate,
    PeerGone,
    PeerSeen,
    UpdateAnnouncement,
    build_txt,
    choose_interfaces,
    instance_label,
    select_interfaces,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ["127.0.0.1"]
FIND_TIMEOUT_S = 15.0


def _unique(prefix: str) -> str:
    # Unique per test run, so that concurrent test runs on one host never see each other.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _actor(node_id: str, cluster_id: str, events: list[DiscoveryEvent], **kwargs: Any
           ) -> DiscoveryActor:
    return DiscoveryActor(node_id=node_id, cluster_id=cluster_id, peer_port=7000,
                          admin_port=7001, protocol_versions=(1,), on_event=events.append,
                          interfaces=kwargs.pop("interfaces", LOOPBACK),
                          capability_summary="cpu:2c/23G/90gf", **kwargs)


async def _wait_for(condition: Callable[[], bool], timeout_s: float = FIND_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


def _seen(events: list[DiscoveryEvent], node_id: str) -> list[PeerSeen]:
    return [e for e in events if isinstance(e, PeerSeen) and e.node_id == node_id]


async def test_discovery_two_agents_find_each_other() -> None:
    cluster = _unique("cluster")
    a_id, b_id = _unique("node-a"), _unique("node-b")
    a_events: list[DiscoveryEvent] = []
    b_events: list[DiscoveryEvent] = []
    a = _actor(a_id, cluster, a_events, incarnation=3)
    b = _actor(b_id, cluster, b_events)

    async with Supervisor("test") as supervisor:
        supervisor.start(a)
        supervisor.start(b)
        await _wait_for(lambda: bool(_seen(a_events, b_id)) and bool(_seen(b_events, a_id)))

        seen_by_b = _seen(b_events, a_id)[0]
        assert seen_by_b.cluster_id == cluster
        assert seen_by_b.host == "127.0.0.1"
        assert seen_by_b.port == 7000
        assert seen_by_b.admin_port == 7001
        assert seen_by_b.source == "mdns"
        assert seen_by_b.incarnation == 3
        assert seen_by_b.protocol_versions == (1,)
        assert seen_by_b.txt["caps"] == "cpu:2c/23G/90gf"
        assert seen_by_b.txt["id"] == a_id
        # Neither reports itself.
        assert not _seen(a_events, a_id)

        diagnostics = b.diagnostics.to_dict()
        assert diagnostics["interfaces"] == LOOPBACK
        assert diagnostics["announced_as"] == f"{b_id}._shardmesh._tcp.local."
        present = [s for s in diagnostics["services"] if s["node_id"] == a_id]
        assert present[0]["state"] == "present"
        assert diagnostics["alone"] is None

        # A re-announcement with a higher incarnation reaches the peer.
        a.send_nowait(UpdateAnnouncement(incarnation=4))
        await _wait_for(lambda: any(e.incarnation == 4 for e in _seen(b_events, a_id)))

        # Stopping one agent sends goodbye packets, which the other reports as PeerGone.
        await supervisor._stop_child(supervisor._children[0])
        await _wait_for(lambda: any(isinstance(e, PeerGone) and e.node_id == a_id
                                    for e in b_events))
        assert b.diagnostics.services[a.service_name].state == "gone"


async def test_discovery_ignores_other_cluster(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nodeagent.discovery")
    ours, theirs = _unique("ours"), _unique("theirs")
    events: list[DiscoveryEvent] = []
    mine = _actor(_unique("mine"), ours, events)
    stranger = _actor(_unique("stranger"), theirs, [])
    friend_id = _unique("friend")
    friend = _actor(friend_id, ours, [])

    async with Supervisor("test") as supervisor:
        supervisor.start(mine)
        supervisor.start(stranger)
        supervisor.start(friend)
        await _wait_for(lambda: bool(_seen(events, friend_id)))
        await _wait_for(lambda: theirs in mine.diagnostics.ignored_clusters)
        ignored = [s for s in mine.diagnostics.services.values() if s.cluster_id == theirs]
        assert ignored[0].state == "ignored"
        assert ignored[0].reason == f"other cluster {theirs!r}"

    assert {e.cluster_id for e in events if isinstance(e, PeerSeen)} == {ours}
    ignore_lines = [r for r in caplog.records
                    if f"ignoring mDNS services of cluster {theirs!r}" in r.getMessage()
                    and r.levelno == logging.INFO and mine.node_id in r.getMessage()]
    assert len(ignore_lines) == 1


async def test_discovery_reports_duplicate_node_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="nodeagent.discovery")
    cluster, node_id = _unique("cluster"), _unique("clone")
    first = _actor(node_id, cluster, [])
    second = _actor(node_id, cluster, [])
    async with Supervisor("test") as supervisor:
        supervisor.start(first)
        await asyncio.wait_for(first.started.wait(), FIND_TIMEOUT_S)
        supervisor.start(second)
        # Either agent may notice first: zeroconf's probe in the second one, or the cache check
        # in either.
        await _wait_for(lambda: first.diagnostics.duplicate_node_id is not None
                        or second.diagnostics.duplicate_node_id is not None)
    reports = [a.diagnostics.duplicate_node_id for a in (first, second)
               if a.diagnostics.duplicate_node_id is not None]
    assert repr(node_id) in reports[0]
    assert "share node id" in reports[0]
    error_lines = [r for r in caplog.records if "share node id" in r.getMessage()]
    assert error_lines
    assert error_lines[0].levelno == logging.ERROR


async def test_discovery_static_peers_without_mdns() -> None:
    events: list[DiscoveryEvent] = []
    actor = _actor(_unique("node"), "c", events, mdns_enabled=False,
                   static_peers=["127.0.0.1:7100", "[::1]:7101"])
    async with Supervisor("test") as supervisor:
        supervisor.start(actor)
        await asyncio.wait_for(actor.started.wait(), 5.0)
    assert events == [
        PeerSeen(node_id=None, cluster_id=None, host="127.0.0.1", port=7100, admin_port=None,
                 source="static", addresses=("127.0.0.1",)),
        PeerSeen(node_id=None, cluster_id=None, host="::1", port=7101, admin_port=None,
                 source="static", addresses=("::1",)),
    ]
    diagnostics = actor.diagnostics.to_dict()
    assert diagnostics["interfaces"] == []
    assert diagnostics["static_peers"] == ["127.0.0.1:7100", "[::1]:7101"]
    assert diagnostics["alone"] is None


async def test_discovery_reports_being_alone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.discovery")
    actor = _actor(_unique("lonely"), _unique("cluster"), [], alone_after_s=0.3)
    async with Supervisor("test") as supervisor:
        supervisor.start(actor)
        await asyncio.wait_for(actor.started.wait(), FIND_TIMEOUT_S)
        await _wait_for(lambda: any("no peers found" in r.getMessage()
                                    for r in caplog.records), timeout_s=5.0)
        alone = actor.diagnostics.to_dict(alone_after_s=0.3)["alone"]
    assert alone is not None
    assert alone.startswith("no peers found on 127.0.0.1 after ")
    assert alone.endswith(" s")


async def test_discovery_callback_error_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: DiscoveryEvent) -> None:
        raise KeyError("consumer bug")

    actor = DiscoveryActor(node_id="n", cluster_id="c", peer_port=1, admin_port=None,
                           protocol_versions=(1,), on_event=broken, mdns_enabled=False,
                           static_peers=["127.0.0.1:9"])
    async with Supervisor("test") as supervisor:
        supervisor.start(actor)
        await asyncio.wait_for(actor.started.wait(), 5.0)
        assert actor.state.value == "running"
    assert actor.diagnostics.errors == ["event callback failed: KeyError: 'consumer bug'"]


async def test_discovery_facade_from_config() -> None:
    config = AgentConfig.with_profile("test", {"network.mdns_enabled": True})
    events: list[DiscoveryEvent] = []
    discovery = Discovery(node_id=_unique("n"), cluster_id=_unique("c"), peer_port=7200,
                          admin_port=None, on_event=events.append,
                          interfaces=config.network.mdns_interfaces,
                          mdns_enabled=config.network.mdns_enabled)
    await discovery.start()
    try:
        diagnostics = discovery.diagnostics()
        assert diagnostics["interfaces"] == ["127.0.0.1"]
        assert diagnostics["announced_as"] is not None
    finally:
        await discovery.stop()
    assert discovery.actor.state.value == "stopped"

    built = DiscoveryActor.from_config(config, node_id="x", cluster_id="y", peer_port=1,
                                       admin_port=2, on_event=events.append)
    assert built.configured_interfaces == ("127.0.0.1",)
    assert built.mdns_enabled is True


PEER_SCRIPT = """
import asyncio, json, sys
from nodeagent.discovery import Discovery

node_id, cluster_id, address, wait_for_peer = sys.argv[1:5]

def report(event):
    print(json.dumps({"type": type(event).__name__, "node_id": event.node_id,
                      "host": event.host, "port": event.port}), flush=True)

async def main():
    discovery = Discovery(node_id=node_id, cluster_id=cluster_id, peer_port=7300,
                          admin_port=7301, protocol_versions=(1,), on_event=report,
                          interfaces=[address])
    await discovery.start()
    print(json.dumps({"type": "ready"}), flush=True)
    loop = asyncio.get_running_loop()
    # Runs until stdin closes (the test's signal to leave) or 30 s pass.
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), 30)
    except TimeoutError:
        pass
    await discovery.stop()
    print(json.dumps({"type": "stopped"}), flush=True)

asyncio.run(main())
"""


def _start_peer_process(node_id: str, cluster_id: str, address: str,
                        prefix: list[str] | None = None) -> subprocess.Popen[str]:
    command = [*(prefix or []), sys.executable, "-c", PEER_SCRIPT, node_id, cluster_id, address,
               "0"]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


def _stop_process(process: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return process.communicate(input="", timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


async def test_discovery_finds_subprocess_peer() -> None:
    cluster, remote_id = _unique("cluster"), _unique("remote")
    events: list[DiscoveryEvent] = []
    local = _actor(_unique("local"), cluster, events)
    process = _start_peer_process(remote_id, cluster, "127.0.0.1")
    try:
        async with Supervisor("test") as supervisor:
            supervisor.start(local)
            await _wait_for(lambda: bool(_seen(events, remote_id)))
            peer = _seen(events, remote_id)[0]
            assert (peer.host, peer.port, peer.admin_port) == ("127.0.0.1", 7300, 7301)

            stdout, stderr = await asyncio.get_running_loop().run_in_executor(
                None, _stop_process, process)
            assert process.returncode == 0, stderr
            await _wait_for(lambda: any(isinstance(e, PeerGone) and e.node_id == remote_id
                                        for e in events))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert {"type": "ready"} in lines
    assert any(line.get("node_id") == local.node_id for line in lines)
    assert lines[-1] == {"type": "stopped"}


# -- pure parts --------------------------------------------------------------------------------


def test_build_txt_cuts_long_summary(caplog: pytest.LogCaptureFixture) -> None:
    txt = build_txt(node_id="n1", cluster_id="c1", protocol_versions=(1, 2), peer_port=7470,
                    admin_port=7471, incarnation=9, capability_summary="x" * 400)
    assert txt["pv"] == "1,2"
    assert txt["inc"] == "9"
    assert len(("caps=" + txt["caps"]).encode()) == MAX_TXT_STRING_BYTES
    for key, value in txt.items():
        assert len(f"{key}={value}".encode()) <= MAX_TXT_STRING_BYTES
    assert any("cut from 400" in r.getMessage() for r in caplog.records)


def test_build_txt_cuts_on_character_boundary() -> None:
    txt = build_txt(node_id="n1", cluster_id="c1", protocol_versions=(1,), peer_port=1,
                    admin_port=None, incarnation=0, capability_summary="é" * 200)
    assert "admin" not in txt
    txt["caps"].encode("utf-8")  # still valid text
    assert len(("caps=" + txt["caps"]).encode()) <= MAX_TXT_STRING_BYTES


def test_build_txt_rejects_long_node_id() -> None:
    with pytest.raises(ValueError) as caught:
        build_txt(node_id="n" * 300, cluster_id="c", protocol_versions=(1,), peer_port=1,
                  admin_port=None, incarnation=0, capability_summary="")
    assert "TXT entry 'id'" in str(caught.value)


def test_instance_label_fits_dns_label() -> None:
    assert instance_label("node-a") == "node-a"
    long_id = "n" * 100
    label = instance_label(long_id)
    assert len(label.encode()) <= 63
    assert label != instance_label("n" * 99)


@pytest.mark.parametrize(("candidate", "reason"), [
    (InterfaceCandidate("eth0", "192.0.2.7", 0x1003, False), None),
    (InterfaceCandidate("lo", "127.0.0.1", 0x9, True), "loopback address"),
    (InterfaceCandidate("eth1", "169.254.3.4", 0x1003, False), "link-local address"),
    (InterfaceCandidate("docker0", "172.17.0.1", 0x1003, True), "virtual interface"),
    (InterfaceCandidate("br-5f2a", "172.18.0.1", 0x1003, False), "virtual interface"),
    (InterfaceCandidate("veth12", "10.1.0.1", 0x1003, False), "virtual interface"),
    (InterfaceCandidate("virbr0", "192.168.122.1", 0x1003, False), "virtual interface"),
    (InterfaceCandidate("wg0", "10.9.0.1", 0x91, True), "virtual interface"),
    (InterfaceCandidate("eth2", "192.0.2.8", 0x1002, False), "interface is down"),
    (InterfaceCandidate("eth3", "192.0.2.9", 0x3, False), "not multicast capable"),
])
def test_select_interfaces_rules(candidate: InterfaceCandidate, reason: str | None) -> None:
    chosen, rejected = select_interfaces([candidate])
    if reason is None:
        assert chosen == [candidate.address]
        assert rejected == {}
    else:
        assert chosen == []
        assert reason in rejected[f"{candidate.name}/{candidate.address}"]


def test_choose_interfaces_on_this_host() -> None:
    # Only lists addresses; nothing is sent.
    chosen, rejected = choose_interfaces([])
    assert "127.0.0.1" not in chosen
    assert rejected["lo/127.0.0.1"] == "loopback address"
    assert choose_interfaces(["lo"]) == (["127.0.0.1"], {})
    assert choose_interfaces(["127.0.0.1", "127.0.0.1"]) == (["127.0.0.1"], {})
    with pytest.raises(ValueError) as caught:
        choose_interfaces(["nosuch0"])
    assert "'nosuch0' has no IPv4 address" in str(caught.value)
    assert "lo" in str(caught.value)


# -- network namespaces ------------------------------------------------------------------------


def _netns_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


class _LineReader:
    """Collects a subprocess's stdout lines on a thread, so the test can poll without blocking."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._stream = process.stdout
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._stream is not None
        for line in self._stream:
            with self._lock:
                self._lines.append(line)

    def contains(self, fragment: str) -> bool:
        with self._lock:
            return any(fragment in line for line in self._lines)

    def text(self) -> str:
        self._thread.join(timeout=5)
        with self._lock:
            return "".join(self._lines)


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@pytest.mark.netns
@pytest.mark.skipif(_netns_unavailable_reason() is not None,
                    reason=_netns_unavailable_reason() or "")
def test_discovery_across_network_namespaces() -> None:
    """Two hosts simulated by namespaces joined by a bridge that lives in a third namespace."""
    tag = secrets.token_hex(3)
    bridge_ns = f"smbr{tag}"
    hosts = {f"sma{tag}": "10.213.0.1", f"smb{tag}": "10.213.0.2"}
    created: list[str] = []
    processes: list[subprocess.Popen[str]] = []
    try:
        _ip("netns", "add", bridge_ns)
        created.append(bridge_ns)
        _ip("-n", bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge_ns, "link", "set", "br0", "up")
        for index, (namespace, address) in enumerate(hosts.items()):
            _ip("netns", "add", namespace)
            created.append(namespace)
            host_end, bridge_end = f"h{index}{tag}", f"b{index}{tag}"
            _ip("link", "add", host_end, "type", "veth", "peer", "name", bridge_end)
            _ip("link", "set", host_end, "netns", namespace)
            _ip("link", "set", bridge_end, "netns", bridge_ns)
            _ip("-n", bridge_ns, "link", "set", bridge_end, "master", "br0")
            _ip("-n", bridge_ns, "link", "set", bridge_end, "up")
            _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", host_end)
            _ip("-n", namespace, "link", "set", host_end, "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

        cluster = _unique("cluster")
        node_ids = {namespace: _unique(namespace[:3]) for namespace in hosts}
        readers: list[_LineReader] = []
        for namespace, address in hosts.items():
            process = _start_peer_process(node_ids[namespace], cluster, address,
                                          prefix=["ip", "netns", "exec", namespace])
            processes.append(process)
            readers.append(_LineReader(process))
        names = list(hosts)
        deadline = time.monotonic() + FIND_TIMEOUT_S
        while time.monotonic() < deadline and not all(
                reader.contains(f'"node_id": "{node_ids[names[1 - index]]}"')
                for index, reader in enumerate(readers)):
            time.sleep(0.05)
        outputs = []
        for process, reader in zip(processes, readers):
            # Closing stdin tells the peer script to leave; the reader thread owns stdout.
            assert process.stdin is not None and process.stderr is not None
            process.stdin.close()
            process.wait(timeout=20)
            outputs.append((reader.text(), process.stderr.read()))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for namespace in reversed(created):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)

    for index, (stdout, stderr) in enumerate(outputs):
        assert processes[index].returncode == 0, stderr
        lines = [json.loads(line) for line in stdout.splitlines()]
        other = names[1 - index]
        found = [line for line in lines
                 if line["type"] == "PeerSeen" and line["node_id"] == node_ids[other]]
        assert found, f"{names[index]} did not find {other}: {stdout}\n{stderr}"
        assert found[0]["host"] == hosts[other]
        assert found[0]["port"] == 7300
