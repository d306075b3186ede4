"""The node agent: one process per machine that wires every component together.

Components and who owns them (each long-running loop is an actor under one Supervisor, so a
crash is logged and the loop restarted with backoff instead of being lost):

- ``PeerLinks`` (nodeagent.peers): the mutual-TLS peer server and one dialer per known address.
- ``Discovery`` (nodeagent.discovery): mDNS announce/browse plus the static peer list.
- ``Membership`` (nodeagent.membership): heartbeats, the failure detector, indirect probes.
- election loop: drives ``coordinator.election.ElectionCore`` with timer ticks and ELECTION
  frames; its events start and stop the coordinator role.
- ``CoordinatorRole`` (nodeagent.coordinator_role): deploys, plans and re-plans while this agent
  holds the coordinator lease.
- ``SegmentHost`` (nodeagent.segments): loads the segments the committed placement assigns here.
- ``DataPlane`` (nodeagent.dataplane): gateway and hop logic for inference requests.
- the admin HTTP endpoint (nodeagent.http_api) through ``AgentService`` (nodeagent.service).

Shutdown on SIGTERM or SIGINT runs in these steps: (1) stop accepting new requests (the
endpoint returns 503 and /healthz says "draining"); (2) tell peers we are leaving (LEAVE), so the
coordinator re-places our segments at once instead of waiting for the failure detector; (3) wait
up to ``timing.drain_timeout_s`` for in-flight requests; (4) close the HTTP endpoint, discovery
and peer links; (5) exit 0. A second signal exits at once with status 1. Signal handlers only
record the signal; a task acts on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from coordinator import registry as registry_ops
from coordinator.detector import PeerState
from coordinator.election import ElectionCore, ElectionTiming
from coordinator.election_storage import FileElectionStorage
from coordinator.fencing import EpochFence, FencingError, FileFenceStorage
from coordinator.placement import Placement
from nodeagent.actors import Actor, Supervisor
from nodeagent.atomicfile import atomic_write_json
from nodeagent.blobs import BlobTransfer
from nodeagent.config import AgentConfig
from nodeagent.dataplane import DataPlane
from nodeagent.looplag import LoopLagMonitor
from nodeagent.membership import Membership
from nodeagent.segments import SegmentHost
from protocol.frames import Frame
from protocol.limits import Limits
from protocol.messages import MsgType, PROTOCOL_VERSIONS
from protocol.tls import load_credentials

logger = logging.getLogger(__name__)

ELECTION_TICK_S = 0.02


def _bump_incarnation(data_dir: Path) -> int:
    """Persist and return a counter that rises on every start, so peers ignore older news."""
    path = data_dir / "incarnation.json"
    previous = 0
    try:
        previous = int(json.loads(path.read_text())["incarnation"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        previous = 0
    current = max(previous + 1, int(time.time()))
    atomic_write_json(path, {"incarnation": current})
    return current


class _LoopActor(Actor[object]):
    """One of the agent's loops as an actor, so the supervisor owns it and restarts it after a crash."""

    def __init__(self, name: str, loop_factory) -> None:
        super().__init__(name, mailbox_size=1)
        self._loop_factory = loop_factory

    async def run(self) -> None:
        await self._loop_factory()


class Agent:
    """A running node agent. ``await Agent(config).run()`` serves until a stop is requested."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.creds = load_credentials(self.data_dir, tls_dir=config.tls_dir)
        self.node_id: str = self.creds.node_id
        self.cluster_id: str = self.creds.cluster_id
        self.instance = uuid.uuid4().hex[:12]
        self.incarnation = _bump_incarnation(self.data_dir)
        self.limits = Limits(max_payload_bytes=config.limits.max_tensor_bytes)
        self.started_unix = time.time()
        self.draining = False
        self._placement_cache: tuple[object, dict] = (object(), {})
        self._stop = asyncio.Event()
        self._signals = 0
        self.exit_code = 0

        voters = tuple(config.election.voters) or (self.node_id,)
        timing = config.timing
        self.voters = voters
        self.election = ElectionCore(
            self.node_id,
            voters,
            FileElectionStorage(self.data_dir / "election.json"),
            ElectionTiming.from_config(timing),
            random.Random(),
            static_coordinator=config.election.static_coordinator,
        )
        self.fence = EpochFence(FileFenceStorage(self.data_dir / "fence.json"), node_id=self.node_id)

        from nodeagent.store import BlobStore  # imported late: the store pulls in hashing helpers
        self.store = BlobStore(self.data_dir / "store", config.store.quota_bytes)
        from nodeagent.peers import PeerLinks
        self.links = PeerLinks(
            node_id=self.node_id, creds=self.creds, limits=self.limits, timing=timing,
            member_info=self._member_info, on_frame=self._on_frame, on_membership=self._on_membership,
        )
        self.blobs = BlobTransfer(node_id=self.node_id, store=self.store, links=self.links)
        self.membership = Membership(self)
        self.segments = SegmentHost(self)
        self.dataplane = DataPlane(self, hop_timeout_s=timing.hop_timeout_s)
        from nodeagent.coordinator_role import CoordinatorRole
        self.role = CoordinatorRole(self)
        self.looplag = LoopLagMonitor(warn_s=timing.loop_lag_warn_s, node_id=self.node_id)
        self.capabilities: dict = {}
        self.discovery = None
        self.http_runner = None
        self.admin_port = 0
        self.peer_port = 0
        self.metrics = None
        self.alerts_engine = None

    # ================================================================= views used by components

    @property
    def epoch(self) -> int:
        return int(self.election.term)

    def fenced_epoch(self) -> int:
        return int(self.fence.highest_epoch)

    @property
    def leader_id(self) -> str | None:
        return self.election.leader_id

    def is_coordinator(self) -> bool:
        return self.election.leader_id == self.node_id and self.election.lease_valid(time.monotonic())

    def registry(self) -> dict:
        """Return a copy of the committed registry that the caller may change."""
        return registry_ops.normalize(self.election.committed_value)

    def registry_view(self) -> Mapping:
        """Return the committed registry itself, without a copy, for readers that change nothing."""
        return registry_ops.view(self.election.committed_value)

    def placement_for(self, model: str, version: str) -> Placement | None:
        # Placements are parsed once per committed value: a commit replaces the value object, so
        # holding a reference to the parsed one is enough to tell that the cache is current.
        value = self.election.committed_value
        if self._placement_cache[0] is not value:
            self._placement_cache = (value, {})
        cache = self._placement_cache[1]
        key = (model, version)
        if key not in cache:
            cache[key] = registry_ops.find_placement(value, model, version)
        return cache[key]

    def ready_placement(self, placement: Placement) -> Placement:
        """Return ``placement`` with each segment's agents cut to those that report it loaded.

        An agent that a new placement names may still be fetching its blobs; routing to it
        would only earn a refusal.
        """
        segments = []
        for segment in placement.segments:
            key = (placement.model, placement.version, segment.first, segment.last)
            agents = tuple(agent for agent in segment.agents if self._reports_loaded(agent, key))
            segments.append(replace(segment, agents=agents))
        return replace(placement, segments=tuple(segments))

    def _reports_loaded(self, agent: str, key: tuple[str, str, int, int]) -> bool:
        if agent == self.node_id:
            return self.segments.get(*key) is not None
        loaded = self.membership.reports.get(agent, {}).get("loaded", [])
        return any(tuple(item[:4]) == key for item in loaded)

    def usable_agents(self) -> set[str]:
        """Agents that can take work now: this one plus connected members not declared dead."""
        usable = {self.node_id} if not self.draining else set()
        for peer in self.links.members():
            if self.links.connected(peer, "data") and self.membership.is_usable(peer):
                usable.add(peer)
        return usable

    def suspected_agents(self) -> set[str]:
        """Members the failure detector suspects: silent past suspect_after_s, not yet declared dead."""
        return set(self.membership.detector.members(PeerState.SUSPECT))

    def timeout_scale(self) -> float:
        return self.looplag.timeout_scale()

    def metric_failover(self, model: str) -> None:
        if self.metrics is not None:
            self.metrics.count_failover("request_resumed")

    def _member_info(self) -> dict:
        return {
            "instance": self.instance,
            "incarnation": self.incarnation,
            "listen": [self.config.network.advertise_host or self.config.network.bind_host, self.peer_port],
            "admin_port": self.admin_port,
            "voter": self.config.election.voter,
            "witness": self.config.election.witness,
            "caps": self.capabilities,
            "versions": list(PROTOCOL_VERSIONS),
        }

    # ================================================================= frame routing

    def _on_frame(self, peer: str, frame: Frame) -> None:
        msg_type = frame.msg_type
        header = frame.header
        try:
            if msg_type in (MsgType.ACTIVATION, MsgType.RESULT, MsgType.PROGRESS, MsgType.HOP_REFUSE,
                            MsgType.RESEND, MsgType.CANCEL):
                self.dataplane.on_frame(peer, msg_type, header, frame.payload)
            elif msg_type == MsgType.HEARTBEAT:
                self.membership.on_heartbeat(peer, header)
            elif msg_type in (MsgType.INDIRECT_PROBE, MsgType.INDIRECT_PROBE_ACK, MsgType.PING, MsgType.PONG):
                self.membership.on_probe_frame(peer, msg_type, header)
            elif msg_type == MsgType.LEAVE:
                self.membership.on_leave(peer, header)
            elif msg_type == MsgType.ELECTION:
                self._election_receive(peer, header)
            elif msg_type == MsgType.BLOB_REQUEST:
                self.blobs.on_request(peer, header)
            elif msg_type == MsgType.BLOB_CHUNK:
                self.blobs.on_chunk(peer, header, frame.payload)
            elif msg_type == MsgType.COMMAND:
                self._on_command(peer, header)
            elif msg_type in (MsgType.BANDWIDTH_PROBE, MsgType.BANDWIDTH_ECHO):
                self.membership.on_bandwidth_frame(peer, msg_type, header, frame.payload)
            else:
                logger.debug("ignoring frame type %s from peer=%s node=%s", msg_type, peer, self.node_id)
        except Exception:
            logger.exception("handling %s from peer=%s failed node=%s", getattr(msg_type, "name", msg_type), peer, self.node_id)

    def _on_membership(self, peer: str, is_member: bool) -> None:
        # Members that are not voters still receive the registry, as learners.
        self.election.set_learners(set(self.links.members()) - set(self.election.voters))
        self.membership.link_changed(peer, is_member)

    def _on_command(self, peer: str, header: dict) -> None:
        """Apply a coordinator command after fencing: the sender's identity is its certificate."""
        try:
            self.fence.check(int(header.get("epoch", -1)), peer)
        except FencingError as exc:
            logger.warning("rejecting coordinator command from peer=%s node=%s: %s", peer, self.node_id, exc)
            return
        kind = header.get("kind")
        if kind == "reconcile":
            self.segments.kick()
        else:
            logger.info("unknown coordinator command kind=%r from peer=%s", kind, peer)

    # ================================================================= election

    def _election_send(self, outbound) -> None:
        for destination, message in outbound:
            if destination == self.node_id:
                continue
            self.links.send_nowait(destination, MsgType.ELECTION, message, plane="control")

    def _election_receive(self, peer: str, message: dict) -> None:
        self._election_send(self.election.receive(time.monotonic(), peer, message))
        self._process_election_events()

    async def _election_loop(self) -> None:
        while True:
            self._election_send(self.election.tick(time.monotonic()))
            self._process_election_events()
            await asyncio.sleep(ELECTION_TICK_S)

    def _process_election_events(self) -> None:
        for event in self.election.drain_events():
            name = type(event).__name__
            if name == "BecameLeader":
                logger.info("elected coordinator node=%s epoch=%d", self.node_id, event.term)
                try:
                    self.fence.check(event.term, self.node_id)
                except FencingError as exc:
                    logger.error("own election fenced node=%s: %s", self.node_id, exc)
                if self.metrics is not None:
                    self.metrics.count_election("won")
                self.role.start(event.term)
            elif name == "SteppedDown":
                logger.warning("stepped down as coordinator node=%s epoch=%d reason=%s",
                               self.node_id, event.term, getattr(event, "reason", ""))
                self.role.stop()
            elif name == "LeaderChanged":
                logger.info("coordinator is now %s epoch=%d node=%s", event.leader_id, event.term, self.node_id)
                if event.leader_id:
                    try:
                        self.fence.check(event.term, event.leader_id)
                    except FencingError as exc:
                        logger.warning("leader change fenced node=%s: %s", self.node_id, exc)
            elif name == "Committed":
                self._registry_committed()

    def _registry_committed(self) -> None:
        self.segments.kick()
        self.dataplane.placement_changed()
        self.role.registry_changed()

    # ================================================================= lifecycle

    async def run(self) -> int:
        """Start every component, serve until a stop is requested, then shut down in steps."""
        loop = asyncio.get_running_loop()
        previous = sys.getswitchinterval()
        sys.setswitchinterval(self.config.runtime.switch_interval_ms / 1000.0)
        logger.info("thread switch interval %.2f ms (was %.2f ms) node=%s",
                    self.config.runtime.switch_interval_ms, previous * 1000.0, self.node_id)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._record_signal, sig)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            self.supervisor = Supervisor(f"agent {self.node_id}", on_escalate=self._escalate)
            await self.start()
            await self._stop.wait()
            await self.shutdown()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.remove_signal_handler(sig)
                except (NotImplementedError, RuntimeError):
                    pass
        return self.exit_code

    def _record_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:
            # A second signal means the operator does not want to wait for the drain.
            os.write(2, b"shardmesh: second signal, exiting now\n")
            os._exit(1)
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        from nodeagent import probe
        from nodeagent.sdnotify import SystemdNotifier

        net = self.config.network
        logger.info("agent starting node=%s cluster=%s instance=%s incarnation=%d voters=%s",
                    self.node_id, self.cluster_id, self.instance, self.incarnation, ",".join(self.voters))
        self.capabilities = await asyncio.to_thread(probe.probe_capabilities_dict, self.data_dir,
                                                    torch_threads=self.config.runtime.torch_threads)
        self.peer_port = await self.links.start(net.bind_host, net.peer_port)
        await self._start_http()
        self._start_alerts()
        self.supervisor.start(self.looplag)
        self._spawn(self._election_loop, "election")
        self._spawn(self.membership.run, "membership")
        self._spawn(self.dataplane.watchdog, "dataplane-watchdog")
        self._spawn(self.segments.run, "segments")
        await self._start_discovery()
        self.notifier = SystemdNotifier()
        self.notifier.ready(f"node {self.node_id} serving")
        if self.notifier.watchdog_interval_s:
            from nodeagent.sdnotify import WatchdogPinger

            # Pings stop when the event loop stalls or a component escalated, so systemd
            # restarts a hung or failing agent.
            self.supervisor.start(WatchdogPinger(self.notifier, is_healthy=lambda: self.supervisor.escalation is None))
        self._write_ready_file()
        logger.info("agent ready node=%s peer_port=%d admin=http://%s:%d",
                    self.node_id, self.peer_port, net.admin_host, self.admin_port)

    def _spawn(self, loop_factory, name: str) -> None:
        """Run a component loop under the supervisor, which restarts it with backoff after a crash."""
        self.supervisor.start(_LoopActor(name, loop_factory))

    def _escalate(self, escalation) -> None:
        """A component kept crashing: stop the agent with a failure status so systemd restarts it."""
        logger.error("component failed repeatedly node=%s: %s; stopping the agent", self.node_id, escalation)
        self.exit_code = 1
        self._stop.set()

    def _start_alerts(self) -> None:
        """Load the alarm rules file, if configured, and evaluate it against this agent's metrics."""
        import tomllib

        from nodeagent.alerts import AlertMonitor, rules_from_config

        path = self.config.admin.alert_rules_file
        if path is None:
            return
        with open(path, "rb") as handle:
            rules = rules_from_config(tomllib.load(handle).get("rules", []))
        self.alerts_engine = AlertMonitor(rules, self.metrics.sample_value, node_id=self.node_id,
                                          interval_s=max(1.0, self.config.timing.heartbeat_interval_s * 2))
        self._spawn(self.alerts_engine.run, "alerts")
        logger.info("alarm rules loaded node=%s file=%s rules=%d", self.node_id, path, len(rules))

    async def _start_http(self) -> None:
        from aiohttp import web

        from nodeagent.service import build_http_app

        app, self.metrics = build_http_app(self)
        self.metrics.add_refresher(lambda metrics: metrics.set_queue_depths(self.segments.queue_depths()))
        self.http_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.http_runner.setup()
        site = web.TCPSite(self.http_runner, self.config.network.admin_host, self.config.network.admin_port)
        await site.start()
        sockets = site._server.sockets if site._server else []
        self.admin_port = sockets[0].getsockname()[1] if sockets else self.config.network.admin_port

    async def _start_discovery(self) -> None:
        from nodeagent.discovery import DEFAULT_ALONE_AFTER_S, Discovery

        net = self.config.network
        self.discovery = Discovery(
            node_id=self.node_id, cluster_id=self.cluster_id, peer_port=self.peer_port,
            admin_port=self.admin_port, on_event=self._on_discovery_event,
            interfaces=net.mdns_interfaces, static_peers=net.static_peers,
            mdns_enabled=net.mdns_enabled, advertise_host=net.advertise_host,
            capability_summary=str(self.capabilities.get("summary", "")), incarnation=self.incarnation,
            alone_after_s=max(DEFAULT_ALONE_AFTER_S, 4 * self.config.timing.dead_after_s),
        )
        await self.discovery.start()

    def _on_discovery_event(self, event) -> None:
        from nodeagent.discovery import PeerSeen

        if isinstance(event, PeerSeen):
            self.links.learn(event.host, event.port, node_id=event.node_id, source=event.source)

    def _write_ready_file(self) -> None:
        atomic_write_json(self.data_dir / "agent.json", {
            "node_id": self.node_id,
            "pid": os.getpid(),
            "instance": self.instance,
            "peer_port": self.peer_port,
            "admin_host": self.config.network.admin_host,
            "admin_port": self.admin_port,
            "started_unix": self.started_unix,
        }, mode=0o644)

    async def shutdown(self) -> None:
        """Leave the cluster in the documented steps; see the module docstring."""
        logger.info("agent stopping node=%s: draining", self.node_id)
        self.draining = True
        if getattr(self, "notifier", None) is not None:
            self.notifier.stopping(f"node {self.node_id} draining")
        await self.membership.announce_leave()
        deadline = time.monotonic() + self.config.timing.drain_timeout_s
        while time.monotonic() < deadline and (len(self.dataplane.tracker) or self.segments.busy()):
            await asyncio.sleep(0.05)
        self.role.stop()
        await self.dataplane.close()
        if self.discovery is not None:
            await self.discovery.stop()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.supervisor.stop()
        await self.segments.close()
        await self.links.close()
        logger.info("agent stopped node=%s", self.node_id)
