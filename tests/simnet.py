"""A seeded, in-process cluster of election cores over a faulty network with a virtual clock.

The network can drop, delay, duplicate and reorder messages and partition nodes, all drawn from
one `random.Random(seed)`, so every run replays exactly. Messages are msgpack-encoded on send
and decoded on delivery, as on the real peer links, which also catches values that msgpack
cannot carry.

Time moves from event to event: a message delivery, or the next deadline a core reports through
`next_deadline()`. Between events nothing changes, so checking the invariants after every event
checks them at every virtual instant. The invariants are:

- never two leaders in one term;
- at most one node holds a valid lease at any instant;
- a command sent and delivered while its sender has a valid lease is never rejected by an
  epoch fence, and no fence ever receives commands from two coordinators in one epoch;
- a leader whose registry is ready has a value at least as new as every value ever reported
  committed (by position, and by `value_key` when the test gives one).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from coordinator.election import (
    BecameLeader,
    Committed,
    ElectionCore,
    ElectionTiming,
    Outbound,
    Role,
)
from coordinator.election_storage import ElectionStorage, MemoryElectionStorage
from coordinator.fencing import EpochConflictError, EpochFence, MemoryFenceStorage, StaleEpochError

COMMAND = "sim_command"


class InvariantViolation(AssertionError):
    """Raised by the simulation when a safety property fails."""


@dataclass
class NetworkFaults:
    """Per-message fault probabilities and delay range, in seconds."""

    drop: float = 0.0
    duplicate: float = 0.0
    delay_min_s: float = 0.001
    delay_max_s: float = 0.02
    # Probability that a message takes a long detour (reordering past later messages).
    long_delay: float = 0.0
    long_delay_max_s: float = 1.0


@dataclass(order=True)
class _Delivery:
    at: float
    seq: int
    src: str = field(compare=False)
    dst: str = field(compare=False)
    payload: bytes = field(compare=False)


class SimNet:
    """Message queue with seeded faults and partitions; times are virtual seconds."""

    def __init__(self, rng: random.Random, faults: NetworkFaults | None = None) -> None:
        self.rng = rng
        self.faults = faults or NetworkFaults()
        self._queue: list[_Delivery] = []
        self._seq = 0
        self._group_of: dict[str, int] | None = None
        self._cut_links: set[tuple[str, str]] = set()
        self.sent = 0
        self.dropped = 0
        self.duplicated = 0

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the nodes into `groups`; messages cross no group boundary until `heal`."""
        self._group_of = {}
        for number, group in enumerate(groups):
            for node in group:
                self._group_of[node] = number

    def cut(self, a: str, b: str) -> None:
        """Break the link between `a` and `b` in both directions."""
        self._cut_links.add((a, b))
        self._cut_links.add((b, a))

    def heal(self) -> None:
        self._group_of = None
        self._cut_links.clear()

    def connected(self, a: str, b: str) -> bool:
        if (a, b) in self._cut_links:
            return False
        if self._group_of is None:
            return True
        return self._group_of.get(a, -1) == self._group_of.get(b, -2)

    def send(self, now: float, src: str, dst: str, msg: dict[str, Any]) -> None:
        self.sent += 1
        faults = self.faults
        if not self.connected(src, dst) or self.rng.random() < faults.drop:
            self.dropped += 1
            return
        payload = msgpack.packb(msg, use_bin_type=True)
        copies = 2 if self.rng.random() < faults.duplicate else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            if self.rng.random() < faults.long_delay:
                delay = self.rng.uniform(faults.delay_max_s, faults.long_delay_max_s)
            else:
                delay = self.rng.uniform(faults.delay_min_s, faults.delay_max_s)
            self._seq += 1
            heapq.heappush(self._queue, _Delivery(now + delay, self._seq, src, dst, payload))

    def next_time(self) -> float:
        return self._queue[0].at if self._queue else float("inf")

    def pop(self) -> tuple[float, str, str, dict[str, Any]]:
        item = heapq.heappop(self._queue)
        msg = msgpack.unpackb(item.payload, raw=False)
        return item.at, item.src, item.dst, msg


class SimCluster:
    """Election cores, their storage and epoch fences, driven by one seeded event loop."""

    def __init__(
        self,
        seed: int,
        node_ids: Iterable[str],
        *,
        voters: Iterable[str] | None = None,
        timing: ElectionTiming | None = None,
        faults: NetworkFaults | None = None,
        storage_factory: Callable[[str], ElectionStorage] | None = None,
        command_interval_s: float = 0.3,
        value_key: Callable[[dict[str, Any]], int] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.node_ids = sorted(node_ids)
        self.voters = sorted(voters) if voters is not None else list(self.node_ids)
        self.timing = timing or ElectionTiming()
        self.net = SimNet(self.rng, faults)
        make_storage = storage_factory or (lambda node_id: MemoryElectionStorage())
        self.storages: dict[str, ElectionStorage] = {n: make_storage(n) for n in self.node_ids}
        self.fences = {n: EpochFence(MemoryFenceStorage(), node_id=n) for n in self.node_ids}
        self.nodes: dict[str, ElectionCore | None] = {}
        self.now = 0.0
        self.command_interval_s = command_interval_s
        self._next_command: dict[str, float] = {}
        self.leader_of_term: dict[int, str] = {}
        self.events: dict[str, list[Any]] = {n: [] for n in self.node_ids}
        self.committed_events: list[tuple[float, str, Committed]] = []
        self.newest_committed: tuple[int, int] = (0, 0)
        self.newest_committed_value: dict[str, Any] | None = None
        # With `value_key`, values must grow in that key: a ready leader whose value has a
        # smaller key than any value ever committed has lost a committed write.
        self.value_key = value_key
        self.max_committed_key = 0
        self.commands_accepted = 0
        self.commands_rejected = 0
        self.max_leases_seen = 0
        for node_id in self.node_ids:
            self.start(node_id)

    # ----------------------------------------------------------------- node lifecycle

    def start(self, node_id: str) -> ElectionCore:
        """Create (or re-create after a crash) the core of `node_id` from its storage."""
        learners = [n for n in self.node_ids if n not in self.voters]
        core = ElectionCore(
            node_id,
            self.voters,
            self.storages[node_id],
            self.timing,
            random.Random(self.rng.random()),
            learners=learners,
        )
        self.nodes[node_id] = core
        self._next_command[node_id] = self.now
        self._send_all(node_id, core.tick(self.now))
        self._collect_events(node_id, core)
        return core

    def crash(self, node_id: str) -> None:
        """Stop `node_id`; messages addressed to it are lost until `start`."""
        self.nodes[node_id] = None

    def alive(self) -> list[str]:
        return [n for n, core in self.nodes.items() if core is not None]

    # ----------------------------------------------------------------- queries

    def core(self, node_id: str) -> ElectionCore:
        core = self.nodes[node_id]
        assert core is not None, f"node {node_id} is crashed"
        return core

    def leaders(self) -> list[str]:
        return [n for n, c in self.nodes.items() if c is not None and c.role is Role.LEADER]

    def lease_holders(self) -> list[str]:
        return [n for n, c in self.nodes.items() if c is not None and c.lease_valid(self.now)]

    def ready_leader(self) -> str | None:
        holders = self.lease_holders()
        return holders[0] if holders else None

    # ----------------------------------------------------------------- event loop

    def run_for(self, duration_s: float, *, max_events: int = 2_000_000) -> None:
        self.run_until(self.now + duration_s, max_events=max_events)

    def run_until(self, end: float, *, max_events: int = 2_000_000) -> None:
        for _ in range(max_events):
            node_id, tick_at = self._next_tick()
            message_at = self.net.next_time()
            at = min(tick_at, message_at)
            if at > end:
                self.now = end
                self.check_invariants()
                return
            self.now = max(self.now, at)
            if message_at <= tick_at:
                self._deliver()
            else:
                self._tick(node_id)
            self.check_invariants()
        raise InvariantViolation(f"simulation exceeded {max_events} events before t={end}")

    def run_until_leader(self, timeout_s: float, *, exclude: Iterable[str] = ()) -> str:
        """Run until a node not in `exclude` holds a valid lease; return its id."""
        excluded = set(exclude)
        deadline = self.now + timeout_s
        while self.now < deadline:
            self.run_for(0.05)
            leader = self.ready_leader()
            if leader is not None and leader not in excluded:
                return leader
        raise InvariantViolation(
            f"no leader with a valid lease within {timeout_s} s (t={self.now:.2f}, "
            f"roles={self.roles()})"
        )

    def roles(self) -> dict[str, str]:
        return {n: (c.role.value if c else "crashed") for n, c in self.nodes.items()}

    def _next_tick(self) -> tuple[str, float]:
        best_node, best_at = "", float("inf")
        for node_id, core in self.nodes.items():
            if core is None:
                continue
            at = max(core.next_deadline(), self.now)
            if core.role is Role.LEADER:
                at = min(at, max(self._next_command[node_id], self.now))
            if at < best_at:
                best_node, best_at = node_id, at
        return best_node, best_at

    def _tick(self, node_id: str) -> None:
        core = self.core(node_id)
        self._send_all(node_id, core.tick(self.now))
        self._collect_events(node_id, core)
        if core.role is Role.LEADER and self.now >= self._next_command[node_id]:
            # Leaders command even without a lease, like a shell that forgot to check it, so
            # that the fences see stale epochs.
            # The coordinator's own agent obeys its commands too, through its own fence.
            self._next_command[node_id] = self.now + self.command_interval_s
            for peer in self.node_ids:
                self.send_command(node_id, peer, core.term)

    def send_zombie_command(self) -> None:
        """Replay a command of a past term from its leader, like a process waking from a pause."""
        if not self.leader_of_term:
            return
        term = self.rng.choice(sorted(self.leader_of_term))
        src = self.leader_of_term[term]
        if self.nodes[src] is None:
            return
        for peer in self.node_ids:
            if peer != src:
                self.net.send(self.now, src, peer, {"type": COMMAND, "epoch": term,
                                                    "lease_end": -1.0})

    def send_command(self, src: str, dst: str, epoch: int) -> None:
        """Send a coordinator command stamped with `epoch` (lease state recorded for checks)."""
        core = self.nodes[src]
        lease_end = core.lease_expires_at() if core is not None else None
        valid = core is not None and core.lease_valid(self.now) and lease_end is not None
        self.net.send(
            self.now, src, dst,
            {"type": COMMAND, "epoch": epoch, "lease_end": lease_end if valid else -1.0},
        )

    def _deliver(self) -> None:
        at, src, dst, msg = self.net.pop()
        core = self.nodes.get(dst)
        if core is None:
            return
        if msg.get("type") == COMMAND:
            self._apply_command(src, dst, msg)
            return
        self._send_all(dst, core.receive(self.now, src, msg))
        self._collect_events(dst, core)

    def _apply_command(self, src: str, dst: str, msg: dict[str, Any]) -> None:
        try:
            self.fences[dst].check(msg["epoch"], src)
        except EpochConflictError as exc:
            raise InvariantViolation(f"t={self.now:.3f}: {exc}") from exc
        except StaleEpochError as exc:
            self.commands_rejected += 1
            if self.now < msg["lease_end"]:
                raise InvariantViolation(
                    f"t={self.now:.3f}: {dst} rejected a command sent within the sender's lease "
                    f"(ends {msg['lease_end']:.3f}): {exc}"
                ) from exc
            return
        self.commands_accepted += 1

    def _send_all(self, src: str, outbound: list[Outbound]) -> None:
        for dest, msg in outbound:
            self.net.send(self.now, src, dest, msg)

    def _collect_events(self, node_id: str, core: ElectionCore) -> None:
        for event in core.drain_events():
            self.events[node_id].append(event)
            if isinstance(event, BecameLeader):
                other = self.leader_of_term.setdefault(event.term, node_id)
                if other != node_id:
                    raise InvariantViolation(
                        f"t={self.now:.3f}: two leaders in term {event.term}: {other} and "
                        f"{node_id}"
                    )
            elif isinstance(event, Committed):
                self.committed_events.append((self.now, node_id, event))
                position = (event.value_term, event.index)
                if position > self.newest_committed:
                    self.newest_committed = position
                    self.newest_committed_value = event.value
                if self.value_key is not None:
                    self.max_committed_key = max(self.max_committed_key,
                                                 self.value_key(event.value))

    # ----------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        holders = self.lease_holders()
        self.max_leases_seen = max(self.max_leases_seen, len(holders))
        if len(holders) > 1:
            raise InvariantViolation(
                f"t={self.now:.3f}: {len(holders)} nodes hold a valid lease: {holders}"
            )
        for node_id, core in self.nodes.items():
            if core is None or not core.registry_ready:
                continue
            position = core.registry_position
            if position < self.newest_committed:
                raise InvariantViolation(
                    f"t={self.now:.3f}: leader {node_id} is ready with registry {position}, "
                    f"older than the committed {self.newest_committed}"
                )
            if self.value_key is not None:
                key = self.value_key(core.registry_value or {})
                if key < self.max_committed_key:
                    raise InvariantViolation(
                        f"t={self.now:.3f}: leader {node_id} is ready with value key {key}, "
                        f"but key {self.max_committed_key} was committed before"
                    )
