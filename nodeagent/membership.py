"""Membership: heartbeats to every member, the failure detector, indirect probes, link measurements.

Heartbeats travel on the control plane every ``timing.heartbeat_interval_s``. Each carries the
sender's incarnation (so news about an older incarnation is ignored), its loaded segments and
queue depth (so a new coordinator rebuilds its view from what agents report), whether a segment
worker is wedged (progress on the data path counts as liveness), its gateway's request counts per
model version (``vstats``, for the coordinator's canary rollback), and an echo of the last
timestamp it received from the destination, which gives the round-trip time without extra
frames.

The pure failure detector (``coordinator.detector``) decides when a silent member is suspected,
asks for an indirect probe through another member, and declares it dead only when that member
cannot reach it either, so one bad link cannot kill a healthy node. A member that sends LEAVE is
removed at once. The detector's timeouts widen while this agent's own event loop lags.

Link bandwidth to each member is measured with a bounded probe (``BANDWIDTH_PROBE_BYTES``) on the
data plane when the link comes up and then every ``timing.link_probe_interval_s``. Other work on
either agent (a segment loading, a busy worker) can only slow a probe down, never speed it up,
so the estimate that the planner reads is the fastest of the last ``BANDWIDTH_SAMPLES`` probes. A link
that really got slower is seen as slower once those samples have aged out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from coordinator.detector import (
    DeclareAlive,
    DeclareDead,
    DetectorConfig,
    FailureDetector,
    RequestProbe,
    Suspect,
)
from nodeagent.canary import version_summary
from protocol.messages import MsgType

logger = logging.getLogger(__name__)

BANDWIDTH_PROBE_BYTES = 2 * 1024 * 1024
BANDWIDTH_SAMPLES = 4
# A probe whose echo has not come back after this long is forgotten, so the next one can start.
PROBE_GIVE_UP_S = 30.0
WEDGED_AFTER_S = 10.0


class Membership:
    """Heartbeat sender, detector driver and per-peer link facts for one agent."""

    def __init__(self, host) -> None:
        self.host = host
        timing = host.config.timing
        self.timing = timing
        self.detector = FailureDetector(
            host.node_id,
            DetectorConfig(
                heartbeat_interval_s=timing.heartbeat_interval_s,
                suspect_after_s=timing.suspect_after_s,
                dead_after_s=timing.dead_after_s,
                indirect_probe_timeout_s=timing.indirect_probe_timeout_s,
            ),
        )
        self.reports: dict[str, dict] = {}
        self.rtt_s: dict[str, float] = {}
        self.bandwidth: dict[str, float] = {}
        self.left: set[str] = set()
        self.dead: set[str] = set()
        self._last_seen_ts: dict[str, tuple[float, float]] = {}
        self._probe_started: dict[str, tuple[str, float]] = {}  # probe id -> (peer, start time)
        self._bandwidth_samples: dict[str, deque[float]] = {}
        self._next_probe: dict[str, float] = {}
        self._probe_waiters: dict[str, tuple[str, str]] = {}

    # ----------------------------------------------------------------- queries

    def is_usable(self, peer: str) -> bool:
        if peer in self.left or peer in self.dead:
            return False
        report = self.reports.get(peer, {})
        return not report.get("wedged") and not report.get("draining")

    # ----------------------------------------------------------------- loop

    async def run(self) -> None:
        interval = self.timing.heartbeat_interval_s
        while True:
            now = time.monotonic()
            self._send_heartbeats(now)
            self._probe_links(now)
            self.detector.note_loop_lag(self.host.looplag.lag_s)
            for action in self.detector.tick(now):
                self._apply(action, now)
            await asyncio.sleep(interval)

    def _send_heartbeats(self, now: float) -> None:
        segments = self.host.segments
        body_common = {
            "inc": self.host.incarnation,
            "ts": now,
            "loaded": segments.loaded_report(),
            "queue": segments.queue_depth(),
            "wedged": segments.is_wedged(WEDGED_AFTER_S),
            "draining": self.host.draining,
            "term": self.host.epoch,
            "vstats": self.version_summary(),
        }
        for peer in self.host.links.members():
            body = dict(body_common)
            seen = self._last_seen_ts.get(peer)
            if seen is not None:
                # Echo the peer's own timestamp and how long we held it, so the peer computes
                # the round trip on its own clock without the wait for our next heartbeat.
                body["echo"], body["echo_held_s"] = seen[0], now - seen[1]
            self.host.links.send_nowait(peer, MsgType.HEARTBEAT, body, plane="control")

    def _probe_links(self, now: float) -> None:
        """Start a bandwidth probe to each member whose next probe is due and has none running."""
        for probe_id, (_, started) in list(self._probe_started.items()):
            if now - started > PROBE_GIVE_UP_S:
                del self._probe_started[probe_id]
        interval = self.timing.link_probe_interval_s
        if interval <= 0:
            return
        running = {peer for peer, _ in self._probe_started.values()}
        for peer in self.host.links.members():
            if peer not in running and now >= self._next_probe.get(peer, float("inf")):
                self._start_probe(peer, now)

    def _start_probe(self, peer: str, now: float) -> None:
        probe_id = f"{peer}-{time.monotonic_ns()}"
        self._probe_started[probe_id] = (peer, now)
        self._next_probe[peer] = now + self.timing.link_probe_interval_s
        self.host.links.send_nowait(peer, MsgType.BANDWIDTH_PROBE, {"id": probe_id},
                                    (bytes(BANDWIDTH_PROBE_BYTES),), plane="data")

    def version_summary(self) -> dict:
        """This gateway's per-version counts, for the coordinator's canary rollback check."""
        if self.host.metrics is None:
            return {}
        return version_summary(self.host.registry_view(), self.host.metrics.version_stats)

    def _apply(self, action, now: float) -> None:
        if isinstance(action, RequestProbe):
            self.host.links.send_nowait(action.via, MsgType.INDIRECT_PROBE,
                                        {"target": action.target, "inc": action.incarnation}, plane="control")
            logger.info("asking peer=%s to probe suspect=%s node=%s", action.via, action.target, self.host.node_id)
        elif isinstance(action, Suspect):
            logger.warning("member suspected node=%s peer=%s silent=%.2fs", self.host.node_id, action.peer, action.silent_s)
        elif isinstance(action, DeclareDead):
            if action.peer not in self.dead:
                self.dead.add(action.peer)
                logger.warning("member declared dead node=%s peer=%s silent=%.2fs confirmed_by=%s",
                               self.host.node_id, action.peer, action.silent_s, ",".join(action.confirmed_by) or "-")
                self._lost(action.peer, "declared dead by the failure detector")
        elif isinstance(action, DeclareAlive):
            if action.peer in self.dead:
                logger.info("member alive again node=%s peer=%s reason=%s", self.host.node_id, action.peer, action.reason)
            self.dead.discard(action.peer)

    def _lost(self, peer: str, reason: str) -> None:
        self.host.dataplane.agent_lost(peer, reason)
        self.host.role.member_lost(peer, reason)

    # ----------------------------------------------------------------- frames

    def on_heartbeat(self, peer: str, header: dict) -> None:
        now = time.monotonic()
        incarnation = int(header.get("inc", 0))
        for action in self.detector.heartbeat(now, peer, incarnation):
            self._apply(action, now)
        if incarnation < self.detector.incarnation_of(peer):
            return
        if isinstance(header.get("ts"), (int, float)):
            self._last_seen_ts[peer] = (float(header["ts"]), now)
        echo, held = header.get("echo"), header.get("echo_held_s")
        if isinstance(echo, (int, float)) and isinstance(held, (int, float)):
            sample = max(0.0, now - float(echo) - float(held))
            previous = self.rtt_s.get(peer)
            # Smoothed like TCP's SRTT (RFC 6298, alpha = 1/8) so one slow heartbeat does not
            # move the planner's link cost.
            self.rtt_s[peer] = sample if previous is None else 0.875 * previous + 0.125 * sample
            if self.host.metrics is not None:
                self.host.metrics.observe_heartbeat_rtt(peer, sample)
        was_dead = peer in self.dead
        self.dead.discard(peer)
        self.left.discard(peer)
        previous = self.reports.get(peer)
        self.reports[peer] = dict(header, received=now)
        if was_dead or previous is None or previous.get("loaded") != header.get("loaded"):
            self.host.role.member_report(peer)
            self.host.dataplane.placement_changed()

    def on_leave(self, peer: str, header: dict) -> None:
        logger.info("member leaving node=%s peer=%s", self.host.node_id, peer)
        self.left.add(peer)
        self.detector.left(time.monotonic(), peer, int(header.get("inc", 0)))
        self._lost(peer, "left the cluster")

    def on_probe_frame(self, peer: str, msg_type: MsgType, header: dict) -> None:
        if msg_type == MsgType.INDIRECT_PROBE:
            target = str(header.get("target"))
            heard = self.reports.get(target, {}).get("received", float("-inf"))
            reachable = (target in self.host.links.members()
                         and time.monotonic() - heard < self.timing.suspect_after_s)
            self.host.links.send_nowait(peer, MsgType.INDIRECT_PROBE_ACK,
                                        {"target": target, "reachable": bool(reachable)}, plane="control")
        elif msg_type == MsgType.INDIRECT_PROBE_ACK:
            target = str(header.get("target"))
            now = time.monotonic()
            for action in self.detector.indirect_result(now, target, peer, bool(header.get("reachable"))):
                self._apply(action, now)

    def on_bandwidth_frame(self, peer: str, msg_type: MsgType, header: dict, payload) -> None:
        if msg_type == MsgType.BANDWIDTH_PROBE:
            self.host.links.send_nowait(peer, MsgType.BANDWIDTH_ECHO,
                                        {"id": header.get("id"), "bytes": len(payload)}, plane="data")
        elif msg_type == MsgType.BANDWIDTH_ECHO:
            probe = self._probe_started.pop(str(header.get("id")), None)
            if probe is None or probe[0] != peer:
                return
            elapsed = max(time.monotonic() - probe[1], 1e-6)
            sample = int(header.get("bytes", 0)) / elapsed
            samples = self._bandwidth_samples.setdefault(peer, deque(maxlen=BANDWIDTH_SAMPLES))
            samples.append(sample)
            previous = self.bandwidth.get(peer)
            self.bandwidth[peer] = max(samples)
            # Log the first measurement and any move of the estimate by more than a fifth at INFO.
            # The periodic probes that confirm it go to DEBUG.
            changed = previous is None or abs(self.bandwidth[peer] - previous) > 0.2 * previous
            logger.log(logging.INFO if changed else logging.DEBUG,
                       "measured link node=%s peer=%s probe=%.0f MB/s estimate=%.0f MB/s rtt=%.2f ms",
                       self.host.node_id, peer, sample / 1e6, self.bandwidth[peer] / 1e6,
                       self.rtt_s.get(peer, 0) * 1e3)

    def link_changed(self, peer: str, is_member: bool) -> None:
        if is_member:
            self.detector.track(time.monotonic(), peer, self.host.links.peers[peer].incarnation)
            self.left.discard(peer)
            # A new connection may take another path: its first probe replaces the old estimate.
            self._bandwidth_samples.pop(peer, None)
            self._start_probe(peer, time.monotonic())
            self.host.role.member_report(peer)
        elif not self.host.links.connected(peer, "control") and peer not in self.left:
            # The control link dropped, which happens at once when the peer's process is killed.
            # Its in-flight work is resumed elsewhere now; the detector still decides if it is dead.
            self.host.dataplane.agent_lost(peer, "link dropped")

    async def announce_leave(self) -> None:
        sends = [
            self.host.links.send_nowait(peer, MsgType.LEAVE, {"inc": self.host.incarnation}, plane="control")
            for peer in self.host.links.members()
        ]
        sends = [task for task in sends if task is not None]
        if sends:
            await asyncio.wait(sends, timeout=1.0)

    def status(self) -> dict:
        now = time.monotonic()
        return {
            peer: {
                "alive": peer not in self.dead and peer not in self.left,
                "left": peer in self.left,
                "rtt_ms": round(self.rtt_s.get(peer, 0.0) * 1000, 3),
                "bandwidth_bytes_per_s": self.bandwidth.get(peer),
                "bandwidth_probes": len(self._bandwidth_samples.get(peer, ())),
                "last_heartbeat_age_s": round(now - report["received"], 3) if (report := self.reports.get(peer)) else None,
                "loaded": (self.reports.get(peer) or {}).get("loaded", []),
                "queue": (self.reports.get(peer) or {}).get("queue", 0),
                "wedged": bool((self.reports.get(peer) or {}).get("wedged")),
            }
            for peer in set(self.host.links.peers) | self.dead
        }
