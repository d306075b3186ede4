"""Tests of the election core, the registry replication and epoch fencing.

Most tests run whole clusters of `ElectionCore`s in `simnet`, a seeded in-process network with a
virtual clock, and check the safety invariants after every event. A real network cannot
reproduce a chosen interleaving of drops, duplicates and partitions; the real-socket and
subprocess tests of the agent cover the wiring.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from coordinator.election import (
    BecameLeader,
    Committed,
    ElectionConfigError,
    ElectionCore,
    ElectionTiming,
    LeaderChanged,
    NotLeaderError,
    Role,
    SteppedDown,
    validate_voters,
)
from coordinator.election_storage import (
    ElectionStorageError,
    FileElectionStorage,
    MemoryElectionStorage,
    PersistentState,
    RegistryEntry,
)
from coordinator.fencing import (
    EpochConflictError,
    EpochFence,
    FileFenceStorage,
    InvalidEpochError,
    MemoryFenceStorage,
    StaleEpochError,
)
from simnet import NetworkFaults, SimCluster

LAN = ElectionTiming.for_profile("lan")
FIVE = ["n1", "n2", "n3", "n4", "n5"]
THREE = ["n1", "n2", "n3"]


def make_core(
    node_id: str,
    voters: list[str],
    storage: MemoryElectionStorage | None = None,
    **kwargs: Any,
) -> ElectionCore:
    return ElectionCore(
        node_id, voters, storage or MemoryElectionStorage(), LAN, random.Random(1), **kwargs
    )


def vote_request(term: int, entry_term: int = 0, entry_index: int = 0) -> dict[str, Any]:
    return {"type": "vote", "term": term, "entry_term": entry_term, "entry_index": entry_index}


# --------------------------------------------------------------------------- basic elections


def test_election_single_leader_elected() -> None:
    cluster = SimCluster(seed=1, node_ids=THREE)
    leader = cluster.run_until_leader(timeout_s=10.0)

    cluster.run_for(5.0)
    assert cluster.leaders() == [leader]
    for node_id in THREE:
        assert cluster.core(node_id).leader_id == leader
        assert cluster.core(node_id).term == cluster.core(leader).term
    # LAN timing: first election after 1.5-3.0 s of silence plus a few round trips.
    assert cluster.leader_of_term[cluster.core(leader).term] == leader


def test_election_events_report_leadership() -> None:
    cluster = SimCluster(seed=2, node_ids=THREE)
    leader = cluster.run_until_leader(timeout_s=10.0)
    term = cluster.core(leader).term

    assert BecameLeader(term) in cluster.events[leader]
    for node_id in THREE:
        assert LeaderChanged(term, leader) in cluster.events[node_id]
    assert not any(isinstance(e, BecameLeader) for n in THREE if n != leader
                   for e in cluster.events[n])


def test_election_drain_events_order() -> None:
    storage = MemoryElectionStorage()
    core = make_core("solo", ["solo"], storage)

    core.tick(0.0)
    core.tick(LAN.election_timeout_max_s + 0.01)
    events = core.drain_events()

    assert isinstance(events[0], BecameLeader)
    assert events[0].term == 1
    assert LeaderChanged(1, "solo") in events
    assert Committed(index=1, value={}, value_term=1) in events
    assert core.drain_events() == []
    assert core.lease_valid(LAN.election_timeout_max_s + 100.0)


def test_election_kill_leader_replaced_within_bound() -> None:
    replaced_after: list[float] = []
    for seed in range(20):
        cluster = SimCluster(seed=seed, node_ids=FIVE)
        old = cluster.run_until_leader(timeout_s=15.0)
        cluster.run_for(2.0)
        killed_at = cluster.now
        cluster.crash(old)
        new = cluster.run_until_leader(timeout_s=10.0)
        assert new != old
        replaced_after.append(cluster.now - killed_at)

    # Bound with LAN timing: max election timeout 3.0 s, one extra pre-vote round on a split
    # vote (3.0 s), plus round trips of at most 20 ms each.
    assert max(replaced_after) < 6.5
    assert min(replaced_after) >= LAN.election_timeout_min_s - LAN.heartbeat_interval_s


# --------------------------------------------------------------------------- chaos


def _chaos_run(seed: int, duration_s: float) -> SimCluster:
    rng = random.Random(seed * 7919)
    size = rng.choice([3, 5])
    nodes = [f"n{i}" for i in range(1, size + 1)]
    with_learner = rng.random() < 0.3
    all_nodes = nodes + (["edge"] if with_learner else [])
    faults = NetworkFaults(
        drop=rng.choice([0.0, 0.05, 0.2]),
        duplicate=rng.choice([0.0, 0.1, 0.3]),
        delay_min_s=0.001,
        delay_max_s=rng.choice([0.005, 0.05]),
        long_delay=rng.choice([0.0, 0.02]),
        long_delay_max_s=1.5,
    )
    cluster = SimCluster(
        seed=seed, node_ids=all_nodes, voters=nodes, faults=faults,
        value_key=lambda value: int(value.get("n", 0)),
    )
    counter = 0
    while cluster.now < duration_s:
        cluster.run_for(rng.uniform(0.5, 4.0))
        action = rng.random()
        if action < 0.2:
            shuffled = rng.sample(all_nodes, len(all_nodes))
            cut = rng.randint(1, len(all_nodes) - 1)
            cluster.net.partition(shuffled[:cut], shuffled[cut:])
        elif action < 0.4:
            cluster.net.heal()
        elif action < 0.5:
            live = cluster.alive()
            if len(live) > 1:
                cluster.crash(rng.choice(live))
        elif action < 0.65:
            for node_id in all_nodes:
                if cluster.nodes[node_id] is None:
                    cluster.start(node_id)
        elif action < 0.7:
            a, b = rng.sample(all_nodes, 2)
            cluster.net.cut(a, b)
        elif action < 0.75:
            cluster.send_zombie_command()
        else:
            leader = cluster.ready_leader()
            if leader is not None:
                counter += 1
                cluster.core(leader).propose({"n": counter, "by": leader})
    return cluster


def _settle(cluster: SimCluster) -> str:
    cluster.net.heal()
    cluster.net.faults = NetworkFaults()
    for node_id in cluster.node_ids:
        if cluster.nodes[node_id] is None:
            cluster.start(node_id)
    leader = cluster.run_until_leader(timeout_s=20.0)
    cluster.run_for(2.0)
    return leader


def test_election_chaos_invariants_hold() -> None:
    total_terms = 0
    total_commits = 0
    rejected = 0
    for seed in range(200):
        cluster = _chaos_run(seed, duration_s=120.0)
        leader = _settle(cluster)

        assert cluster.max_leases_seen <= 1
        assert len(cluster.lease_holders()) == 1
        assert cluster.leaders() == [leader]
        value = cluster.core(leader).registry_value or {}
        newest = cluster.newest_committed_value or {}
        assert value.get("n", 0) >= newest.get("n", 0), f"seed {seed} lost a committed value"
        total_terms += len(cluster.leader_of_term)
        total_commits += len(cluster.committed_events)
        rejected += cluster.commands_rejected

    # The runs must actually exercise elections, commits and fencing.
    assert total_terms > 400
    assert total_commits > 1000
    assert rejected > 0


def test_election_duplicates_and_reordering_harmless() -> None:
    for seed in range(30):
        faults = NetworkFaults(
            duplicate=0.5, delay_min_s=0.001, delay_max_s=0.3, long_delay=0.1,
            long_delay_max_s=2.0,
        )
        cluster = SimCluster(seed=1000 + seed, node_ids=FIVE, faults=faults)
        leader = cluster.run_until_leader(timeout_s=30.0)
        cluster.core(leader).propose({"n": 1})
        cluster.run_for(20.0)

        assert cluster.net.duplicated > 0
        assert cluster.max_leases_seen == 1


# --------------------------------------------------------------------------- partitions


def test_election_minority_leader_steps_down() -> None:
    for seed in range(20):
        cluster = SimCluster(seed=seed, node_ids=FIVE)
        old = cluster.run_until_leader(timeout_s=15.0)
        old_term = cluster.core(old).term
        cluster.run_for(1.0)

        partner = next(n for n in FIVE if n != old)
        majority = [n for n in FIVE if n not in (old, partner)]
        cluster.net.partition([old, partner], majority)
        cut_at = cluster.now
        cluster.run_for(LAN.lease_s)
        assert not cluster.core(old).lease_valid(cluster.now)

        cluster.run_for(0.01)
        assert cluster.core(old).role is not Role.LEADER

        new = cluster.run_until_leader(timeout_s=10.0, exclude=[old])
        assert new in majority
        assert cluster.core(new).term > old_term
        assert cluster.now - cut_at < 10.0


def test_election_stale_leader_fenced_after_heal() -> None:
    cluster = SimCluster(seed=5, node_ids=FIVE)
    old = cluster.run_until_leader(timeout_s=15.0)
    old_term = cluster.core(old).term
    cluster.run_for(1.0)

    majority = [n for n in FIVE if n != old][:3]
    minority = [old, next(n for n in FIVE if n != old and n not in majority)]
    cluster.net.partition(minority, majority)
    new = cluster.run_until_leader(timeout_s=10.0, exclude=[old])
    new_term = cluster.core(new).term
    cluster.run_for(2.0)  # the new leader's commands reach the majority's fences

    cluster.net.heal()
    cluster.run_for(3.0)
    assert cluster.leaders() == [new]
    assert cluster.core(old).term == new_term

    # A paused process of the old leader wakes up and sends a command of its old epoch.
    for node_id in majority:
        fence = cluster.fences[node_id]
        with pytest.raises(StaleEpochError) as info:
            fence.check(old_term, old)
        message = str(info.value)
        assert f"epoch {old_term}" in message
        assert f"highest accepted epoch {new_term}" in message
        assert repr(old) in message


def test_election_prevote_rejoin_does_not_disrupt() -> None:
    cluster = SimCluster(seed=9, node_ids=THREE)
    leader = cluster.run_until_leader(timeout_s=10.0)
    term = cluster.core(leader).term
    loner = next(n for n in THREE if n != leader)
    rest = [n for n in THREE if n != loner]

    cluster.net.partition([loner], rest)
    cluster.run_for(30.0)
    # Pre-votes fail, so the isolated node never raises its term.
    assert cluster.core(loner).term == term
    assert cluster.core(loner).role is Role.PRE_CANDIDATE

    cluster.net.heal()
    cluster.run_for(5.0)
    assert cluster.leaders() == [leader]
    assert cluster.core(leader).term == term
    assert cluster.core(loner).leader_id == leader


# --------------------------------------------------------------------------- votes


def test_election_duplicate_vote_replies_counted_once() -> None:
    core = make_core("n1", FIVE)
    core.tick(0.0)
    core.tick(LAN.election_timeout_max_s + 0.01)  # pre-vote
    for peer in ("n2", "n3"):
        core.receive(4.0, peer, {"type": "pre_vote_reply", "term": 1, "granted": True})
    assert core.role is Role.CANDIDATE
    assert core.term == 1

    for _ in range(5):
        core.receive(4.1, "n2", {"type": "vote_reply", "term": 1, "granted": True})
    assert core.role is Role.CANDIDATE

    # A grant from an older term (reordered from an earlier election) does not count either.
    core.receive(4.2, "n3", {"type": "vote_reply", "term": 0, "granted": True})
    assert core.role is Role.CANDIDATE

    core.receive(4.3, "n4", {"type": "vote_reply", "term": 1, "granted": True})
    assert core.role is Role.LEADER


def test_election_vote_is_durable_before_reply() -> None:
    storage = MemoryElectionStorage()
    voter = make_core("n2", THREE, storage)
    voter.tick(0.0)
    at = LAN.election_timeout_min_s + 0.01  # past the start-up hold

    out = voter.receive(at, "n1", vote_request(term=3))
    assert out[0].msg == {"type": "vote_reply", "term": 3, "granted": True}
    assert storage.state.term == 3
    assert storage.state.voted_for == "n1"

    # A duplicate of the same request gets the same reply.
    again = voter.receive(at, "n1", vote_request(term=3))
    assert again[0].msg["granted"] is True

    # After a restart the stored vote still binds: another candidate of term 3 is refused.
    restarted = make_core("n2", THREE, storage)
    restarted.tick(100.0)
    rejected_reply = restarted.receive(100.0 + at, "n3", vote_request(term=3))
    assert rejected_reply[0].msg == {"type": "vote_reply", "term": 3, "granted": False}


def test_election_restarted_voter_holds_votes() -> None:
    voter = make_core("n2", THREE)
    voter.tick(50.0)

    early = voter.receive(50.1, "n1", vote_request(term=1))
    assert early[0].msg["granted"] is False
    assert voter.term == 0  # the newer term is not adopted while holding

    late = voter.receive(50.0 + LAN.election_timeout_min_s, "n1", vote_request(term=1))
    assert late[0].msg["granted"] is True


def test_election_up_to_date_rule() -> None:
    storage = MemoryElectionStorage(
        PersistentState(term=4, entry=RegistryEntry(term=4, index=7, value={"v": 1}))
    )
    voter = make_core("n2", THREE, storage)
    voter.tick(0.0)
    at = LAN.election_timeout_min_s + 0.01

    stale = voter.receive(at, "n1", vote_request(term=5, entry_term=3, entry_index=99))
    assert stale[0].msg["granted"] is False
    fresh = voter.receive(at, "n3", vote_request(term=5, entry_term=4, entry_index=7))
    assert fresh[0].msg["granted"] is True


def test_election_invalid_messages_dropped() -> None:
    core = make_core("n1", THREE)
    bad: list[Any] = [
        {},
        {"type": 7},
        {"type": "vote"},
        {"type": "vote", "term": -1, "entry_term": 0, "entry_index": 0},
        {"type": "vote", "term": True, "entry_term": 0, "entry_index": 0},
        {"type": "append", "term": 1, "round": 1, "commit_term": 0, "commit_index": 0,
         "entry": {"term": 1, "index": 1, "value": [1, 2]}},
        {"type": "append", "term": 1, "round": 1, "commit_term": 0, "commit_index": 0,
         "entry": {"term": 9, "index": 1, "value": {}}},
        {"type": "vote_reply", "term": 2**70, "granted": True},
        {"type": "no_such_type"},
        ["not", "a", "map"],
    ]
    for msg in bad:
        assert core.receive(1.0, "n2", msg) == []
    assert core.term == 0
    assert core.role is Role.FOLLOWER


def test_election_ignores_non_voters() -> None:
    voter = make_core("n2", THREE)
    voter.tick(0.0)
    at = LAN.election_timeout_min_s + 0.01

    assert voter.receive(at, "intruder", vote_request(term=9)) == []
    append = {"type": "append", "term": 9, "round": 1, "commit_term": 0, "commit_index": 0}
    assert voter.receive(at, "intruder", append) == []
    assert voter.term == 0


# --------------------------------------------------------------------------- registry


def test_election_propose_commits_on_majority() -> None:
    cluster = SimCluster(seed=3, node_ids=FIVE)
    leader = cluster.run_until_leader(timeout_s=15.0)
    core = cluster.core(leader)
    index = core.propose({"models": {"minilm": {"version": 2}}})
    cluster.run_for(1.0)

    assert core.committed_value == {"models": {"minilm": {"version": 2}}}
    commits = [e for _, node, e in cluster.committed_events if node == leader]
    assert commits[-1].index == index
    for node_id in FIVE:
        assert cluster.core(node_id).committed_value == core.committed_value

    with pytest.raises(TypeError, match="JSON"):
        core.propose({1: "integer keys do not survive JSON"})
    with pytest.raises(TypeError, match="JSON"):
        core.propose({"weights": float("nan")})
    with pytest.raises(ValueError, match="limit"):
        core.propose({"blob": "x" * 60_000})

    follower = next(n for n in FIVE if n != leader)
    with pytest.raises(NotLeaderError) as info:
        cluster.core(follower).propose({"x": 1})
    assert repr(leader) in str(info.value)


def test_election_no_commit_without_majority() -> None:
    cluster = SimCluster(seed=4, node_ids=FIVE)
    leader = cluster.run_until_leader(timeout_s=15.0)
    cluster.run_for(1.0)
    committed_before = cluster.core(leader).committed_position

    others = [n for n in FIVE if n != leader]
    cluster.net.partition([leader, others[0]], others[1:])
    cluster.core(leader).propose({"lost": True})
    cluster.run_for(5.0)

    assert cluster.core(leader).role is not Role.LEADER
    assert all(
        e.value.get("lost") is None for _, _, e in cluster.committed_events
    )
    assert cluster.core(leader).committed_position == committed_before
    new = cluster.run_until_leader(timeout_s=10.0, exclude=[leader])
    assert cluster.core(new).registry_value.get("lost") is None  # type: ignore[union-attr]


def test_election_registry_survives_leader_changes() -> None:
    cluster = SimCluster(seed=11, node_ids=FIVE)
    for n in range(1, 6):
        leader = cluster.run_until_leader(timeout_s=15.0)
        cluster.core(leader).propose({"n": n})
        cluster.run_for(1.0)
        assert cluster.core(leader).committed_value == {"n": n}
        cluster.crash(leader)
        successor = cluster.run_until_leader(timeout_s=15.0)
        assert cluster.core(successor).committed_value == {"n": n}
        cluster.start(leader)


def test_election_full_restart_keeps_registry(tmp_path: Path) -> None:
    def file_storage(node_id: str) -> FileElectionStorage:
        return FileElectionStorage(tmp_path / node_id / "election.json")

    cluster = SimCluster(seed=21, node_ids=THREE, storage_factory=file_storage)
    leader = cluster.run_until_leader(timeout_s=10.0)
    cluster.core(leader).propose({"models": ["minilm"], "weights": {"minilm": 1.0}})
    cluster.run_for(1.0)
    term_before = cluster.core(leader).term

    # Every node stops; a new cluster object reloads all state from the files.
    restarted = SimCluster(seed=22, node_ids=THREE, storage_factory=file_storage)
    new_leader = restarted.run_until_leader(timeout_s=10.0)
    core = restarted.core(new_leader)

    assert core.term > term_before
    assert core.committed_value == {"models": ["minilm"], "weights": {"minilm": 1.0}}
    stored = json.loads((tmp_path / new_leader / "election.json").read_text())
    assert stored["term"] == core.term
    assert stored["committed"]["value"] == core.committed_value


def test_election_learner_receives_registry() -> None:
    cluster = SimCluster(seed=6, node_ids=[*THREE, "edge"], voters=THREE)
    leader = cluster.run_until_leader(timeout_s=10.0)
    cluster.core(leader).propose({"n": 1})
    cluster.run_for(2.0)

    edge = cluster.core("edge")
    assert not edge.is_voter
    assert edge.committed_value == {"n": 1}
    assert edge.leader_id == leader

    # With every voter gone the learner never becomes a candidate.
    for node_id in THREE:
        cluster.crash(node_id)
    cluster.run_for(20.0)
    assert edge.role is Role.FOLLOWER
    assert edge.term == cluster.core("edge").term


# --------------------------------------------------------------------------- configuration


def test_validate_voters_rejects_two() -> None:
    with pytest.raises(ElectionConfigError) as info:
        validate_voters(["a", "b"])
    message = str(info.value)
    assert "witness" in message
    assert "static_coordinator" in message


def test_validate_voters_cases() -> None:
    assert validate_voters(["b", "a"], witnesses=["w"]) == ("a", "b", "w")
    assert validate_voters(["a"]) == ("a",)
    assert validate_voters(["a", "b"], static_coordinator="a") == ("a",)
    with pytest.raises(ElectionConfigError):
        validate_voters([])
    with pytest.raises(ElectionConfigError):
        validate_voters(["a", "a", "b"])
    with pytest.raises(ElectionConfigError):
        validate_voters(["a", ""])


def test_election_timing_validation() -> None:
    with pytest.raises(ElectionConfigError, match="lease_s"):
        ElectionTiming(lease_s=1.5, election_timeout_min_s=1.5)
    with pytest.raises(ElectionConfigError, match="election_timeout_max_s"):
        ElectionTiming(election_timeout_min_s=2.0, election_timeout_max_s=2.0)
    with pytest.raises(ElectionConfigError, match="heartbeat_interval_s"):
        ElectionTiming(heartbeat_interval_s=0.6)
    with pytest.raises(ElectionConfigError, match="profile"):
        ElectionTiming.for_profile("fast")
    for profile in ("lan", "wan", "test"):
        timing = ElectionTiming.for_profile(profile)
        assert timing.lease_s < timing.election_timeout_min_s


def test_election_static_coordinator_mode() -> None:
    storages = {n: MemoryElectionStorage() for n in ("a", "b")}

    def static_core(node_id: str, epoch: int) -> ElectionCore:
        return make_core(
            node_id, ["a", "b"], storages[node_id], static_coordinator="a", static_epoch=epoch
        )

    a, b = static_core("a", 1), static_core("b", 1)
    out = a.tick(0.0)
    assert a.role is Role.LEADER
    assert a.term == 1
    assert a.lease_valid(0.0)
    for dest, msg in out:
        assert dest == "b"
        b.receive(0.01, "a", msg)
    assert b.leader_id == "a"
    assert b.term == 1
    # The follower never becomes a candidate, however long the coordinator stays silent.
    assert b.tick(1000.0) == []
    assert b.role is Role.FOLLOWER

    a2 = static_core("a", 2)
    a2.tick(2000.0)
    assert a2.term == 2
    fence = EpochFence(MemoryFenceStorage())
    fence.check(2, "a")
    with pytest.raises(StaleEpochError):
        fence.check(1, "a")


# --------------------------------------------------------------------------- fencing and storage


def test_epoch_fence_persists_highest(tmp_path: Path) -> None:
    path = tmp_path / "fence.json"
    fence = EpochFence(FileFenceStorage(path))
    fence.check(3, "n1")
    fence.check(3, "n1")
    fence.check(5, "n2")

    reloaded = EpochFence(FileFenceStorage(path))
    assert reloaded.highest_epoch == 5
    assert reloaded.coordinator_id == "n2"
    with pytest.raises(StaleEpochError) as info:
        reloaded.check(4, "n1")
    assert info.value.epoch == 4
    assert info.value.highest == 5
    assert info.value.coordinator_id == "n1"


def test_epoch_fence_conflict_and_floor() -> None:
    fence = EpochFence(MemoryFenceStorage())
    fence.check(2, "n1")
    with pytest.raises(EpochConflictError):
        fence.check(2, "n9")

    fence.raise_floor(4)
    with pytest.raises(StaleEpochError):
        fence.check(3, "n1")
    fence.check(4, "n2")
    assert fence.coordinator_id == "n2"
    with pytest.raises(InvalidEpochError):
        fence.check(-1, "n2")
    with pytest.raises(InvalidEpochError):
        fence.check(True, "n2")  # type: ignore[arg-type]


def test_file_storage_roundtrip(tmp_path: Path) -> None:
    storage = FileElectionStorage(tmp_path / "state" / "election.json")
    assert storage.load() == PersistentState()
    state = PersistentState(
        term=7,
        voted_for="n3",
        entry=RegistryEntry(7, 12, {"models": {"m": [1, 2]}}),
        committed=RegistryEntry(6, 11, {"models": {}}),
    )
    storage.save(state)
    assert FileElectionStorage(tmp_path / "state" / "election.json").load() == state
    assert not list((tmp_path / "state").glob(".*.tmp"))


def test_file_storage_rejects_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "election.json"
    path.write_text("{\"format\": 1, \"term\": ")
    with pytest.raises(ElectionStorageError, match="not valid JSON"):
        FileElectionStorage(path).load()
    path.write_text(json.dumps({"format": 1, "term": -3, "voted_for": None, "entry": None,
                                "committed": None}))
    with pytest.raises(ElectionStorageError, match="term"):
        FileElectionStorage(path).load()


def test_election_stepped_down_event_reason() -> None:
    cluster = SimCluster(seed=8, node_ids=THREE)
    leader = cluster.run_until_leader(timeout_s=10.0)
    term = cluster.core(leader).term
    cluster.net.partition([leader], [n for n in THREE if n != leader])
    cluster.run_for(LAN.lease_s + 0.1)

    stepped = [e for e in cluster.events[leader] if isinstance(e, SteppedDown)]
    assert len(stepped) == 1
    assert stepped[0].term == term
    assert "majority" in stepped[0].reason
