"""Failure detection: decide when a silent agent is dead, without letting one bad link kill it.

Problem
-------
Every agent sends a heartbeat to every peer on the control link. When heartbeats from a peer
stop, the peer may have crashed, or only the link between the two may be broken, or the
observer's own event loop may have stalled so that heartbeats sit unread in its socket buffer.
Only the first case should lead to the peer's segments being re-placed. A false positive is
expensive, because declaring a healthy node dead costs a re-plan and moves model weights across
the network. A slow detection costs the requests that wait meanwhile. The detector must bound
detection time and keep false positives rare.

Options considered
------------------
- Phi-accrual (Hayashibara et al., "The Phi Accrual Failure Detector"; used by Akka and
  Hazelcast) keeps a window of heartbeat inter-arrival times. Its suspicion level grows with
  the silence, measured against the observed distribution. It adapts to jitter, but its
  detection time depends on the history, so it cannot be stated as one number in the config,
  and a single observer still decides alone, so one bad link still kills a healthy node.
- SWIM with suspicion and indirect probes ("SWIM: Scalable Weakly-consistent Infection-style
  Process Group Membership Protocol", as implemented by HashiCorp memberlist):
  a member that misses its probe is suspected, and k other members are asked to probe it. Only
  when they cannot reach it either is it declared dead. memberlist's DefaultLANConfig: probe every
  1 s, probe timeout 500 ms, 3 indirect checks, suspicion for 5 x log(N+1) probe intervals.
  Randomized probing and gossip dissemination pay off in clusters of hundreds; shardmesh clusters
  are a handful of machines that already exchange heartbeats on every link.

Rule chosen
-----------
A deadline detector with SWIM's confirmation step:

1. Silence longer than `suspect_after_s` makes a peer *suspect*. The detector asks up to
   `indirect_probes` other alive members (the ones heard from most recently) to probe it.
2. A helper that reaches it clears the suspicion: the peer is alive and only the direct link is
   bad, which is recorded in `degraded_links`.
3. A suspect is declared *dead* once its silence exceeds `dead_after_s` and at least one helper
   reported that it cannot reach it either. Unanswered probe rounds are retried every
   `indirect_probe_timeout_s` with the freshest helpers.
4. When no other alive member exists (a two-node cluster, or all other members are suspect
   too), the timeout alone decides: there is nobody to ask, and waiting forever would never
   detect a real crash. In that case one bad link can declare a healthy peer dead, and an
   observer cut off from every peer declares them all dead. Such an observer has no quorum,
   so it cannot act as coordinator on that belief.

Incarnations follow SWIM. Each agent life has an incarnation number, higher after every
restart. News about an older incarnation (a late heartbeat, a probe result) is ignored. A higher
incarnation means the peer restarted, so its state is reset and the restart is reported even if
the old life was never declared dead, because work in flight on the old life is lost. A
heartbeat of the current incarnation revives a dead or suspect peer: heartbeats arrive on a
direct link from the peer itself, so hearing one proves the peer is running.

Loop lag: a stalled event loop makes every peer look silent. The agent reports measured lag
with `note_loop_lag`, and the detector adds `lag_widen_factor` x the largest lag seen in the
last `lag_window_s` to both thresholds (capped at `max_widening_s`). A gap between two `tick`
calls longer than two heartbeat intervals counts as lag too, since it means the caller itself
was stalled.

Defaults, `lan` profile: heartbeats every 0.5 s; suspect after 1.5 s (three missed heartbeats);
indirect probes answered within 1.0 s (twice memberlist's LAN probe timeout, because our probe
is a round trip on a TLS link through a Python event loop); dead after 3.0 s. A crashed agent is
therefore declared dead about 3 s after its last heartbeat, plus one tick.

All times are seconds of a monotonic clock supplied by the caller; the core does no I/O.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


class DetectorConfigError(ValueError):
    """Raised for detector timings that cannot work together."""


@dataclass(frozen=True, slots=True)
class DetectorConfig:
    """Failure-detector timings in seconds; see the module docstring for the defaults."""

    heartbeat_interval_s: float = 0.5
    suspect_after_s: float = 1.5
    dead_after_s: float = 3.0
    indirect_probe_timeout_s: float = 1.0
    indirect_probes: int = 2
    lag_widen_factor: float = 2.0
    lag_window_s: float = 30.0
    max_widening_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.heartbeat_interval_s > 0:
            raise DetectorConfigError(
                f"heartbeat_interval_s must be > 0, got {self.heartbeat_interval_s!r}"
            )
        if self.suspect_after_s < 2 * self.heartbeat_interval_s:
            raise DetectorConfigError(
                f"suspect_after_s ({self.suspect_after_s}) must be at least two heartbeat "
                f"intervals ({2 * self.heartbeat_interval_s}) so that one late heartbeat does "
                "not raise suspicion"
            )
        if self.dead_after_s <= self.suspect_after_s:
            raise DetectorConfigError(
                f"dead_after_s ({self.dead_after_s}) must be greater than suspect_after_s "
                f"({self.suspect_after_s}) to leave time for indirect probes"
            )
        if not self.indirect_probe_timeout_s > 0:
            raise DetectorConfigError(
                f"indirect_probe_timeout_s must be > 0, got {self.indirect_probe_timeout_s!r}"
            )
        if self.indirect_probes < 1:
            raise DetectorConfigError(
                f"indirect_probes must be >= 1, got {self.indirect_probes!r}"
            )
        if self.lag_widen_factor < 0 or self.lag_window_s <= 0 or self.max_widening_s < 0:
            raise DetectorConfigError(
                "lag_widen_factor and max_widening_s must be >= 0 and lag_window_s > 0, got "
                f"{self.lag_widen_factor!r}, {self.max_widening_s!r}, {self.lag_window_s!r}"
            )

    @classmethod
    def for_profile(cls, profile: str) -> DetectorConfig:
        """Timings for the `lan` (default), `wan` or `test` profile."""
        try:
            return _PROFILES[profile]
        except KeyError:
            raise DetectorConfigError(
                f"unknown timing profile {profile!r}; expected one of {sorted(_PROFILES)}"
            ) from None


_PROFILES: dict[str, DetectorConfig] = {
    "lan": DetectorConfig(),
    # memberlist's WAN profile probes every 5 s with a 3 s timeout; links here are long-lived
    # TCP connections, so heartbeats stay cheap at 1 s.
    "wan": DetectorConfig(
        heartbeat_interval_s=1.0,
        suspect_after_s=5.0,
        dead_after_s=10.0,
        indirect_probe_timeout_s=3.0,
    ),
    "test": DetectorConfig(
        heartbeat_interval_s=0.1,
        suspect_after_s=0.3,
        dead_after_s=0.6,
        indirect_probe_timeout_s=0.2,
    ),
}


class PeerState(str, enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class RequestProbe:
    """Ask member `via` to probe `target` and report with `indirect_result`."""

    target: str
    via: str
    incarnation: int


@dataclass(frozen=True, slots=True)
class Suspect:
    peer: str
    incarnation: int
    silent_s: float


@dataclass(frozen=True, slots=True)
class DeclareDead:
    """`peer` is dead. `confirmed_by` lists the members that could not reach it either."""

    peer: str
    incarnation: int
    silent_s: float
    confirmed_by: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DeclareAlive:
    """`peer` is alive: `reason` is "joined", "restarted", "recovered" or "indirect"."""

    peer: str
    incarnation: int
    reason: str


DetectorAction = RequestProbe | Suspect | DeclareDead | DeclareAlive


@dataclass
class _Peer:
    peer_id: str
    incarnation: int
    state: PeerState
    last_heard: float
    pending_probes: set[str] = field(default_factory=set)
    probe_round_deadline: float = 0.0
    confirmed_by: set[str] = field(default_factory=set)


class FailureDetector:
    """Heartbeat deadlines with indirect-probe confirmation, for one observing agent."""

    def __init__(self, self_id: str, config: DetectorConfig) -> None:
        self.self_id = self_id
        self.config = config
        self._peers: dict[str, _Peer] = {}
        self._lag_samples: deque[tuple[float, float]] = deque()
        self._last_tick: float | None = None
        self._last_now = 0.0
        self._degraded_links: set[str] = set()

    # ----------------------------------------------------------------- queries

    def state_of(self, peer_id: str) -> PeerState | None:
        peer = self._peers.get(peer_id)
        return peer.state if peer is not None else None

    def silent_s(self, now: float, peer_id: str) -> float | None:
        """Return the seconds since `peer_id` was last heard, or None for an untracked peer."""
        peer = self._peers.get(peer_id)
        return max(0.0, now - peer.last_heard) if peer is not None else None

    def incarnation_of(self, peer_id: str) -> int | None:
        peer = self._peers.get(peer_id)
        return peer.incarnation if peer is not None else None

    def members(self, state: PeerState | None = None) -> list[str]:
        """Sorted ids of tracked peers, optionally only those in `state`."""
        return sorted(p for p, rec in self._peers.items() if state is None or rec.state is state)

    def degraded_links(self) -> list[str]:
        """Peers reachable only through another member the last time they were suspected."""
        return sorted(self._degraded_links)

    def widening_s(self, now: float) -> float:
        """Seconds currently added to both thresholds because of local loop lag."""
        horizon = now - self.config.lag_window_s
        while self._lag_samples and self._lag_samples[0][0] < horizon:
            self._lag_samples.popleft()
        if not self._lag_samples:
            return 0.0
        worst = max(lag for _, lag in self._lag_samples)
        return min(self.config.max_widening_s, self.config.lag_widen_factor * worst)

    def detection_bound_s(self, now: float) -> float:
        """Return the silence after which a crashed peer is declared dead, if helpers reply."""
        return self.config.dead_after_s + self.widening_s(now)

    def recently_heard(self, now: float, peer_id: str) -> bool:
        """Return True when `peer_id` was heard within `suspect_after_s`.

        A helper can send this as its probe result without a probe of its own.
        """
        peer = self._peers.get(peer_id)
        return (
            peer is not None
            and peer.state in (PeerState.ALIVE, PeerState.SUSPECT)
            and now - peer.last_heard < self.config.suspect_after_s
        )

    # ----------------------------------------------------------------- inputs

    def track(self, now: float, peer_id: str, incarnation: int = 0) -> list[DetectorAction]:
        """Start the silence clock for a member that joined but has not sent a heartbeat yet."""
        if peer_id == self.self_id or peer_id in self._peers:
            return []
        self._peers[peer_id] = _Peer(peer_id, incarnation, PeerState.ALIVE, now)
        return []

    def heartbeat(self, now: float, peer_id: str, incarnation: int) -> list[DetectorAction]:
        """Record a heartbeat of life `incarnation` received directly from `peer_id`."""
        self._last_now = max(self._last_now, now)
        if peer_id == self.self_id:
            return []

        peer = self._peers.get(peer_id)
        if peer is None:
            self._peers[peer_id] = _Peer(peer_id, incarnation, PeerState.ALIVE, now)
            logger.info("node %s: peer %s joined, incarnation %d", self.self_id, peer_id,
                        incarnation)
            return [DeclareAlive(peer_id, incarnation, "joined")]

        if incarnation < peer.incarnation:
            logger.debug(
                "node %s ignored heartbeat of %s: incarnation %d < %d", self.self_id, peer_id,
                incarnation, peer.incarnation,
            )
            return []
        if incarnation > peer.incarnation:
            logger.warning(
                "node %s: peer %s restarted (incarnation %d -> %d, was %s)", self.self_id,
                peer_id, peer.incarnation, incarnation, peer.state.value,
            )
            self._reset(peer, incarnation, now)
            return [DeclareAlive(peer_id, incarnation, "restarted")]

        if peer.state is PeerState.LEFT:
            # A late heartbeat of a life that announced its departure.
            return []

        previous = peer.state
        self._reset(peer, incarnation, now)
        if previous is PeerState.ALIVE:
            return []
        logger.warning(
            "node %s: peer %s is alive again (was %s)", self.self_id, peer_id, previous.value
        )
        return [DeclareAlive(peer_id, incarnation, "recovered")]

    def left(self, now: float, peer_id: str, incarnation: int) -> None:
        """Record that `peer_id` announced its departure; it is never declared dead."""
        peer = self._peers.get(peer_id)
        if peer is None or incarnation < peer.incarnation:
            return
        peer.incarnation = incarnation
        peer.state = PeerState.LEFT
        peer.pending_probes.clear()
        peer.confirmed_by.clear()
        logger.info("node %s: peer %s left (incarnation %d)", self.self_id, peer_id, incarnation)

    def forget(self, peer_id: str) -> None:
        """Stop tracking `peer_id` (removed from the cluster)."""
        self._peers.pop(peer_id, None)
        self._degraded_links.discard(peer_id)

    def note_loop_lag(self, lag_s: float, now: float | None = None) -> None:
        """Record a measured event-loop lag of this process; thresholds widen for a while."""
        if lag_s <= 0:
            return
        at = self._last_now if now is None else now
        self._lag_samples.append((at, lag_s))
        if lag_s >= self.config.heartbeat_interval_s:
            logger.warning(
                "node %s: event loop lagged %.3f s; failure thresholds widen by %.3f s",
                self.self_id, lag_s, self.widening_s(at),
            )

    def indirect_result(
        self,
        now: float,
        target: str,
        via: str,
        reachable: bool,
        incarnation: int | None = None,
    ) -> list[DetectorAction]:
        """Record the result of helper `via` probing `target`.

        Results that were not requested for the current suspicion, or that concern an older
        incarnation, are ignored.
        """
        self._last_now = max(self._last_now, now)
        peer = self._peers.get(target)
        if peer is None or via not in peer.pending_probes:
            return []
        if incarnation is not None and incarnation < peer.incarnation:
            return []
        peer.pending_probes.discard(via)
        if peer.state is not PeerState.SUSPECT:
            return []
        if reachable:
            logger.warning(
                "node %s: peer %s is reachable through %s but not directly; keeping it alive",
                self.self_id, target, via,
            )
            self._degraded_links.add(target)
            self._reset(peer, peer.incarnation, now)
            return [DeclareAlive(target, peer.incarnation, "indirect")]
        peer.confirmed_by.add(via)
        logger.info(
            "node %s: %s cannot reach suspect %s either", self.self_id, via, target
        )
        return []

    def tick(self, now: float) -> list[DetectorAction]:
        """Advance to `now`: raise suspicions, request probes, declare deaths."""
        gap_limit = 2 * self.config.heartbeat_interval_s
        if self._last_tick is not None and now - self._last_tick > gap_limit:
            self.note_loop_lag(now - self._last_tick - self.config.heartbeat_interval_s, now)
        self._last_tick = now
        self._last_now = max(self._last_now, now)

        widening = self.widening_s(now)
        suspect_after = self.config.suspect_after_s + widening
        dead_after = self.config.dead_after_s + widening
        actions: list[DetectorAction] = []
        for peer in sorted(self._peers.values(), key=lambda p: p.peer_id):
            silent = now - peer.last_heard
            if peer.state is PeerState.ALIVE and silent >= suspect_after:
                peer.state = PeerState.SUSPECT
                peer.confirmed_by = set()
                peer.pending_probes = set()
                peer.probe_round_deadline = now
                logger.info(
                    "node %s suspects %s: silent for %.2f s", self.self_id, peer.peer_id, silent
                )
                actions.append(Suspect(peer.peer_id, peer.incarnation, silent))
            if peer.state is not PeerState.SUSPECT:
                continue
            helpers = self._helpers_for(peer.peer_id)
            if silent >= dead_after and (peer.confirmed_by or not helpers):
                actions.append(self._declare_dead(peer, silent))
            elif helpers and now >= peer.probe_round_deadline:
                actions.extend(self._start_probe_round(peer, helpers, now, widening))
        return actions

    # ----------------------------------------------------------------- internals

    def _reset(self, peer: _Peer, incarnation: int, now: float) -> None:
        peer.incarnation = incarnation
        peer.state = PeerState.ALIVE
        peer.last_heard = now
        peer.pending_probes = set()
        peer.confirmed_by = set()

    def _helpers_for(self, target: str) -> list[str]:
        alive = [
            p for p in self._peers.values()
            if p.state is PeerState.ALIVE and p.peer_id != target
        ]
        alive.sort(key=lambda p: (-p.last_heard, p.peer_id))
        return [p.peer_id for p in alive[: self.config.indirect_probes]]

    def _start_probe_round(
        self, peer: _Peer, helpers: list[str], now: float, widening: float
    ) -> list[DetectorAction]:
        peer.pending_probes = set(helpers)
        peer.probe_round_deadline = now + self.config.indirect_probe_timeout_s + widening
        logger.info(
            "node %s asks %s to probe suspect %s", self.self_id, helpers, peer.peer_id
        )
        return [RequestProbe(peer.peer_id, via, peer.incarnation) for via in helpers]

    def _declare_dead(self, peer: _Peer, silent: float) -> DeclareDead:
        peer.state = PeerState.DEAD
        confirmed = tuple(sorted(peer.confirmed_by))
        peer.pending_probes = set()
        peer.confirmed_by = set()
        self._degraded_links.discard(peer.peer_id)
        logger.warning(
            "node %s declares %s dead (incarnation %d): silent for %.2f s, confirmed by %s",
            self.self_id, peer.peer_id, peer.incarnation, silent,
            list(confirmed) or "nobody (no other member to ask)",
        )
        return DeclareDead(peer.peer_id, peer.incarnation, silent, confirmed)
