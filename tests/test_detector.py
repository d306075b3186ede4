"""Tests of the failure-detector core.

A small in-process mesh of `FailureDetector`s exchanges heartbeats over links that the test can
cut, and helpers reply to indirect probes from their own detector state, as the agent does. Time
is virtual: the tests step a float clock in 50 ms ticks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from coordinator.detector import (
    DeclareAlive,
    DeclareDead,
    DetectorAction,
    DetectorConfig,
    DetectorConfigError,
    FailureDetector,
    PeerState,
    RequestProbe,
    Suspect,
)

LAN = DetectorConfig.for_profile("lan")
TICK_S = 0.05


@dataclass
class Mesh:
    """Detectors on every node, heartbeats on every uncut link, probe results from helpers."""

    nodes: list[str]
    config: DetectorConfig = LAN
    now: float = 0.0
    stopped: set[str] = field(default_factory=set)
    cut_links: set[frozenset[str]] = field(default_factory=set)
    incarnation: dict[str, int] = field(default_factory=dict)
    actions: dict[str, list[tuple[float, DetectorAction]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.detectors = {n: FailureDetector(n, self.config) for n in self.nodes}
        self.next_heartbeat = {n: 0.0 for n in self.nodes}
        for node in self.nodes:
            self.incarnation.setdefault(node, 1)
            self.actions[node] = []
        for node in self.nodes:
            for peer in self.nodes:
                if peer != node:
                    self.detectors[node].track(0.0, peer, self.incarnation[peer])

    def linked(self, a: str, b: str) -> bool:
        return frozenset((a, b)) not in self.cut_links

    def run_until(self, end: float) -> None:
        while self.now < end:
            self.now = round(self.now + TICK_S, 6)
            for node in self.nodes:
                if node in self.stopped or self.now < self.next_heartbeat[node]:
                    continue
                self.next_heartbeat[node] = self.now + self.config.heartbeat_interval_s
                for peer in self.nodes:
                    if peer != node and peer not in self.stopped and self.linked(node, peer):
                        self._record(
                            peer,
                            self.detectors[peer].heartbeat(self.now, node, self.incarnation[node]),
                        )
            for node in self.nodes:
                if node not in self.stopped:
                    self._record(node, self.detectors[node].tick(self.now))

    def _record(self, node: str, actions: list[DetectorAction]) -> None:
        for action in actions:
            self.actions[node].append((self.now, action))
            if isinstance(action, RequestProbe):
                self._answer_probe(node, action)

    def _answer_probe(self, asker: str, probe: RequestProbe) -> None:
        # The helper replies at once from its own view. An unreachable helper never replies.
        helper = probe.via
        if helper in self.stopped or not self.linked(asker, helper):
            return
        reachable = self.detectors[helper].recently_heard(self.now, probe.target)
        self._record(
            asker,
            self.detectors[asker].indirect_result(
                self.now, probe.target, helper, reachable, probe.incarnation
            ),
        )

    def deaths(self, observer: str, peer: str) -> list[tuple[float, DeclareDead]]:
        return [
            (t, a) for t, a in self.actions[observer]
            if isinstance(a, DeclareDead) and a.peer == peer
        ]


def tick_until(detector: FailureDetector, start: float, end: float) -> list[DetectorAction]:
    """Tick every TICK_S from `start` to `end`, as an agent's timer would; return the actions."""
    actions: list[DetectorAction] = []
    now = start
    while now < end:
        now = round(now + TICK_S, 6)
        actions.extend(detector.tick(now))
    return actions


@pytest.mark.parametrize("profile", ["lan", "wan", "test"])
def test_detector_kill_detected_within_bound(profile: str) -> None:
    config = DetectorConfig.for_profile(profile)
    mesh = Mesh(["a", "b", "c", "d"], config=config)
    mesh.run_until(5 * config.dead_after_s)
    last_heartbeat = mesh.next_heartbeat["b"] - config.heartbeat_interval_s
    mesh.stopped.add("b")
    mesh.run_until(mesh.now + 3 * config.dead_after_s)

    for observer in ("a", "c", "d"):
        deaths = mesh.deaths(observer, "b")
        assert len(deaths) == 1, f"{observer} saw {deaths}"
        declared_at, death = deaths[0]
        assert death.confirmed_by, "a death with helpers available needs a confirmation"
        assert "b" not in death.confirmed_by
        silence = declared_at - last_heartbeat
        assert silence >= config.dead_after_s
        assert silence <= config.dead_after_s + 2 * TICK_S
        assert mesh.detectors[observer].state_of("b") is PeerState.DEAD


def test_detector_bad_link_keeps_node_alive() -> None:
    mesh = Mesh(["a", "b", "c"])
    mesh.run_until(2.0)
    mesh.cut_links.add(frozenset(("a", "b")))
    mesh.run_until(30.0)

    assert mesh.deaths("a", "b") == []
    assert mesh.deaths("b", "a") == []
    assert mesh.detectors["a"].state_of("b") in (PeerState.ALIVE, PeerState.SUSPECT)
    suspicions = [a for _, a in mesh.actions["a"] if isinstance(a, Suspect) and a.peer == "b"]
    revivals = [
        a for _, a in mesh.actions["a"]
        if isinstance(a, DeclareAlive) and a.peer == "b" and a.reason == "indirect"
    ]
    assert suspicions
    assert revivals
    assert mesh.detectors["a"].degraded_links() == ["b"]


def test_detector_two_nodes_timeout_suffices() -> None:
    mesh = Mesh(["a", "b"])
    mesh.run_until(2.0)
    mesh.stopped.add("b")
    mesh.run_until(10.0)

    deaths = mesh.deaths("a", "b")
    assert len(deaths) == 1
    assert deaths[0][1].confirmed_by == ()


def test_detector_no_death_without_confirmation() -> None:
    config = LAN
    detector = FailureDetector("a", config)
    detector.heartbeat(0.0, "b", 1)
    detector.heartbeat(0.0, "c", 1)
    probes: list[RequestProbe] = []
    now = 0.0
    while now < 20.0:
        now = round(now + TICK_S, 6)
        detector.heartbeat(now, "c", 1)  # c stays healthy but never sends a probe result
        for action in detector.tick(now):
            assert not isinstance(action, DeclareDead)
            if isinstance(action, RequestProbe):
                probes.append(action)
    assert detector.state_of("b") is PeerState.SUSPECT
    assert {p.via for p in probes} == {"c"}
    # Unanswered rounds are retried once per probe timeout.
    assert len(probes) >= int((20.0 - config.suspect_after_s) / config.indirect_probe_timeout_s)

    detector.indirect_result(now, "b", "c", reachable=False, incarnation=1)
    dead = [a for a in detector.tick(now + TICK_S) if isinstance(a, DeclareDead)]
    assert [d.confirmed_by for d in dead] == [("c",)]


def test_detector_incarnation_rules() -> None:
    detector = FailureDetector("a", LAN)
    assert detector.heartbeat(0.0, "b", 5) == [DeclareAlive("b", 5, "joined")]

    # Stale news: an older incarnation changes nothing, even after b is dead.
    assert tick_until(detector, 0.0, 10.0) != []
    assert detector.state_of("b") is PeerState.DEAD
    assert detector.heartbeat(10.1, "b", 4) == []
    assert detector.state_of("b") is PeerState.DEAD

    # A restart comes back with a higher incarnation and is accepted.
    assert detector.heartbeat(10.2, "b", 6) == [DeclareAlive("b", 6, "restarted")]
    assert detector.state_of("b") is PeerState.ALIVE
    assert detector.incarnation_of("b") == 6

    # A restart is reported even when the old life was never declared dead.
    assert detector.heartbeat(10.3, "b", 7) == [DeclareAlive("b", 7, "restarted")]

    # A heartbeat of the current life revives a dead peer (it proves the peer runs).
    tick_until(detector, 10.3, 30.0)
    assert detector.state_of("b") is PeerState.DEAD
    assert detector.heartbeat(30.1, "b", 7) == [DeclareAlive("b", 7, "recovered")]


def test_detector_stale_probe_result_ignored() -> None:
    detector = FailureDetector("a", LAN)
    detector.heartbeat(0.0, "b", 3)
    detector.heartbeat(0.0, "c", 1)
    detector.heartbeat(1.4, "c", 1)
    actions = detector.tick(LAN.suspect_after_s)
    assert Suspect("b", 3, LAN.suspect_after_s) in actions
    assert RequestProbe("b", "c", 3) in actions

    # A "reachable" result about an older life, and one from a member never asked, change nothing.
    assert detector.indirect_result(1.6, "b", "c", True, incarnation=2) == []
    assert detector.indirect_result(1.6, "b", "x", True, incarnation=3) == []
    assert detector.state_of("b") is PeerState.SUSPECT

    # After b restarts, a late "unreachable" about the new life's first round is not pending.
    detector.heartbeat(1.7, "b", 4)
    assert detector.indirect_result(1.8, "b", "c", False, incarnation=4) == []
    assert detector.state_of("b") is PeerState.ALIVE


def test_detector_loop_lag_widens_timeouts() -> None:
    detector = FailureDetector("a", LAN)
    detector.heartbeat(0.0, "b", 1)
    detector.tick(0.0)
    detector.note_loop_lag(1.0, now=0.0)
    assert detector.widening_s(0.0) == pytest.approx(2.0)
    assert detector.detection_bound_s(0.0) == pytest.approx(LAN.dead_after_s + 2.0)

    # Silent for twice the normal suspicion time: not suspected while the widening lasts.
    now = 0.0
    while now < 2 * LAN.suspect_after_s:
        now = round(now + TICK_S, 6)
        assert detector.tick(now) == []
    assert detector.state_of("b") is PeerState.ALIVE

    # Once the lag sample leaves the window, normal thresholds apply again.
    later = LAN.lag_window_s + 1.0
    assert detector.widening_s(later) == 0.0


def test_detector_tick_gap_counts_as_lag() -> None:
    detector = FailureDetector("a", LAN)
    detector.heartbeat(0.0, "b", 1)
    detector.tick(0.0)
    # The caller was stalled for 2.5 s: every peer looks silent, but none is suspected.
    assert detector.tick(2.5) == []
    assert detector.state_of("b") is PeerState.ALIVE
    assert detector.widening_s(2.5) >= 2 * (2.5 - LAN.heartbeat_interval_s)


def test_detector_left_peer_never_dead() -> None:
    detector = FailureDetector("a", LAN)
    detector.heartbeat(0.0, "b", 1)
    detector.left(0.5, "b", 1)
    assert detector.tick(60.0) == []
    assert detector.state_of("b") is PeerState.LEFT
    # A late heartbeat of the departed life does not bring it back; a new life does.
    assert detector.heartbeat(60.1, "b", 1) == []
    assert detector.heartbeat(60.2, "b", 2) == [DeclareAlive("b", 2, "restarted")]


def test_detector_config_validation() -> None:
    with pytest.raises(DetectorConfigError, match="suspect_after_s"):
        DetectorConfig(heartbeat_interval_s=1.0, suspect_after_s=1.5)
    with pytest.raises(DetectorConfigError, match="dead_after_s"):
        DetectorConfig(dead_after_s=1.0)
    with pytest.raises(DetectorConfigError, match="indirect_probes"):
        DetectorConfig(indirect_probes=0)
    with pytest.raises(DetectorConfigError, match="profile"):
        DetectorConfig.for_profile("lan2")
