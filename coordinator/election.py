"""Coordinator election: one coordinator per term, a quorum lease, and a replicated registry.

Problem
-------
The agents pick one of themselves to act as coordinator. Three things must hold. At most one
node may act as coordinator in a given term (the term doubles as the fencing epoch that every
agent checks, see `coordinator.fencing`). A coordinator that lost contact with the majority must
stop acting before anyone else starts, so that two nodes never steer the cluster at the same
instant. And a restart, of one node or of all of them, must neither reuse an old term nor lose a
registry write that was acknowledged to a client.

Options rejected
----------------
- Bully or lowest-id election, as exo does: every node that cannot see a lower id declares
  itself master. There is no quorum, so each side of a partition elects its own master (split
  brain), and nothing stops the old master from acting after the heal.
- Election libraries that keep the term only in memory: after a restart a node can vote twice
  in one term or hand out an epoch that was already used, and fencing by epoch is worthless.
  Some Python ones also send pickled objects over the wire, which lets any peer run code.
- Leases without fencing: a lease bounds how long a healthy coordinator acts, but a paused
  process wakes up with a lease it believes is valid. Leases need a fencing epoch on the
  receiving side.

Rule chosen
-----------
Raft's leader election (Ongaro and Ousterhout, "In Search of an Understandable Consensus
Algorithm", 2014) with two extensions that etcd's raft library offers as its `PreVote` and
`CheckQuorum` options:

- PreVote: a node whose election timer fires first sends the voters a pre-vote request: would
  they vote for it in the next term? Nobody changes its term for a pre-vote. Voters that heard from a leader within the
  minimum election timeout say no. A node rejoining after a partition therefore cannot force a
  healthy leader to step down by arriving with an inflated term.
- CheckQuorum with a lease: the leader counts a heartbeat round as acknowledged when a majority
  of voters (itself included) has replied to it, and holds a lease until the send time of the
  newest such round plus `lease_s`. A leader that cannot renew its lease steps down.

The lease is exclusive because of two rules. A voter refuses every vote (real or pre-vote,
without adopting the newer term) for `election_timeout_min_s` after it last heard from the
leader, and for `election_timeout_min_s` after it starts, since a restarted node no longer knows
when it last heard from one. And `lease_s` is at most 0.9 times `election_timeout_min_s`. A new
leader needs a majority of votes, and that majority shares a voter with every majority that
acknowledged the old leader's round sent at time t. That voter received the round no earlier
than t and refuses votes until at least t + `election_timeout_min_s`. This is later than the end
of the old lease, t + `lease_s`. The remaining 10 % covers clock-rate differences between
machines; monotonic clocks of ordinary hardware drift far less than that.

Instead of a log, the registry (deployed models, versions, traffic weights) is a single
replicated value: each write replaces the whole value and gets a `(term, index)` position, and
positions compare term first, as Raft log positions do. A write is committed when a majority of
voters has stored it. A voter grants votes only to candidates whose stored position is at least
its own (Raft's up-to-date rule), so every new leader holds the newest committed value. A new
leader re-proposes its current value under its own term (Raft's no-op entry) and reports itself
ready only once that entry is committed.

Non-voting members (learners) receive the registry but never vote and never stand.

Two voters cannot elect safely after losing either one, so `validate_voters` rejects that
configuration and names the two ways out: a witness voter (a third agent with `voter = true`
that runs no model) or static-coordinator mode. In static-coordinator mode one configured node is
coordinator, nobody votes, and the term is the configured epoch (at least 1, and never below the
stored term). To move the coordinator to another machine, raise the configured epoch so that
every agent's fence rejects the old coordinator.

Timing defaults and their sources
---------------------------------
Raft's timing requirement is broadcast time << election timeout << mean time between failures,
with broadcast times of 0.5-20 ms and election timeouts of 10-500 ms as typical values
(Wikipedia's summary of the Raft paper). etcd's tuning guide gives defaults of a 100 ms
heartbeat and a 1000 ms election timeout, with the heartbeat near the round-trip time between
members. shardmesh sends its election
messages on the same Python event loop as other control traffic, where a garbage collection or a
busy loop can delay a message by tens to hundreds of milliseconds, so the `lan` profile is
slower than etcd's:

- `heartbeat_interval_s = 0.2`: two etcd heartbeats. Five rounds fit into one lease, so four
  lost heartbeats in a row do not cost the lease.
- `lease_s = 1.0`: etcd's election timeout. A leader cut off from the majority stops acting at
  most 1 s after the last round the majority acknowledged.
- `election_timeout_min_s = 1.5`, `election_timeout_max_s = 3.0`: the minimum must exceed
  `lease_s` by the clock-drift margin above, and the maximum is twice the minimum, like the
  commonly cited Raft range of 150-300 ms, so that split votes are rare. A crashed leader is replaced after at most 3 s plus two round trips,
  inside a 5 s failover budget.

The `wan` and `test` profiles scale the same ratios.

Interface
---------
The core does no I/O and reads no clock: the caller passes monotonic time `now` in seconds to
`tick` and `receive`, sends the returned `Outbound` messages over the peer links (the sender's
node id must come from its TLS certificate), and reads `drain_events()` after each call. Every
message is a plain msgpack-able dict with a `"type"` key. Storage writes happen inside `tick`,
`receive` and `propose`, before the messages that depend on them are returned.
"""

from __future__ import annotations

import enum
import json
import logging
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from coordinator.election_storage import (
    ElectionStorage,
    PersistentState,
    RegistryEntry,
)

logger = logging.getLogger(__name__)

# Largest term or index accepted from a peer. msgpack encodes integers up to 2**64 - 1; the
# bound keeps them inside a signed 64-bit range for every consumer (JSON, SQLite, Go peers).
MAX_TERM = 2**63 - 1

# Registry values a leader keeps from its own term for commit reporting. Proposals are
# rare (deploys, weight changes), so 64 outstanding ones is far above normal use.
MAX_TERM_ENTRIES = 64

# Largest registry value in msgpack bytes. The whole value travels in one append message, which
# must fit in a 64 KiB control frame; the remaining 16 KiB cover the message fields and header.
MAX_REGISTRY_VALUE_BYTES = 48 * 1024

# Lease safety margin for clock-rate differences: lease_s <= LEASE_FRACTION * election_timeout_min_s.
LEASE_FRACTION = 0.9

MSG_PRE_VOTE = "pre_vote"
MSG_PRE_VOTE_REPLY = "pre_vote_reply"
MSG_VOTE = "vote"
MSG_VOTE_REPLY = "vote_reply"
MSG_APPEND = "append"
MSG_APPEND_REPLY = "append_reply"


class ElectionConfigError(ValueError):
    """Raised for an election configuration that cannot elect a coordinator safely."""


class NotLeaderError(RuntimeError):
    """Raised by `propose` on a node that is not the leader."""

    def __init__(self, node_id: str, leader_id: str | None, term: int) -> None:
        self.node_id = node_id
        self.leader_id = leader_id
        self.term = term
        hint = f"send it to {leader_id!r}" if leader_id else "no leader is known yet, retry later"
        super().__init__(
            f"node {node_id!r} is not the coordinator in term {term}; {hint}"
        )


class InvalidElectionMessage(ValueError):
    """Raised inside the core for a peer message with a missing or invalid field."""


class Role(str, enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class Outbound(NamedTuple):
    """One message for the caller to send: `(dest_node_id, msg)`."""

    dest: str
    msg: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BecameLeader:
    term: int


@dataclass(frozen=True, slots=True)
class SteppedDown:
    """This node stopped being leader of `term`; pending proposals may be lost."""

    term: int
    reason: str


@dataclass(frozen=True, slots=True)
class LeaderChanged:
    """A new leader became known: `leader_id` leads `term`."""

    term: int
    leader_id: str


@dataclass(frozen=True, slots=True)
class Committed:
    """A registry value stored by a majority of voters, at position `(value_term, index)`."""

    index: int
    value: dict[str, Any]
    value_term: int


ElectionEvent = BecameLeader | SteppedDown | LeaderChanged | Committed


@dataclass(frozen=True, slots=True)
class ElectionTiming:
    """Election timers in seconds; the module docstring gives the sources of the defaults."""

    heartbeat_interval_s: float = 0.2
    lease_s: float = 1.0
    election_timeout_min_s: float = 1.5
    election_timeout_max_s: float = 3.0

    def __post_init__(self) -> None:
        for name in ("heartbeat_interval_s", "lease_s", "election_timeout_min_s"):
            value = getattr(self, name)
            if not value > 0:
                raise ElectionConfigError(f"timing.{name} must be > 0 s, got {value!r}")
        if self.election_timeout_max_s <= self.election_timeout_min_s:
            raise ElectionConfigError(
                f"timing.election_timeout_max_s ({self.election_timeout_max_s}) must be greater "
                f"than timing.election_timeout_min_s ({self.election_timeout_min_s}) so that "
                "randomized timeouts separate the candidates"
            )
        if self.lease_s > LEASE_FRACTION * self.election_timeout_min_s:
            raise ElectionConfigError(
                f"timing.lease_s ({self.lease_s}) must be at most {LEASE_FRACTION} x "
                f"timing.election_timeout_min_s ({self.election_timeout_min_s}); otherwise a new "
                "coordinator can be elected while the old one's lease is still valid"
            )
        if self.heartbeat_interval_s * 2 > self.lease_s:
            raise ElectionConfigError(
                f"timing.heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half "
                f"of timing.lease_s ({self.lease_s}) so that one lost heartbeat does not end "
                "the lease"
            )

    @classmethod
    def for_profile(cls, profile: str) -> ElectionTiming:
        """Timing for the `lan` (default), `wan` or `test` profile."""
        try:
            return _PROFILES[profile]
        except KeyError:
            raise ElectionConfigError(
                f"unknown timing profile {profile!r}; expected one of {sorted(_PROFILES)}"
            ) from None

    @classmethod
    def from_config(cls, timing: Any) -> ElectionTiming:
        """Build from an object with `lease_s`, `election_timeout_min_s` and `_max_s` fields.

        An `election_heartbeat_interval_s` field is used when present, else lease_s / 5.
        """
        lease_s = float(timing.lease_s)
        heartbeat = getattr(timing, "election_heartbeat_interval_s", None)
        return cls(
            heartbeat_interval_s=float(heartbeat) if heartbeat is not None else lease_s / 5,
            lease_s=lease_s,
            election_timeout_min_s=float(timing.election_timeout_min_s),
            election_timeout_max_s=float(timing.election_timeout_max_s),
        )


_PROFILES: dict[str, ElectionTiming] = {
    "lan": ElectionTiming(),
    # Round trips of 100-300 ms between sites: heartbeat near the round trip, as etcd advises.
    "wan": ElectionTiming(
        heartbeat_interval_s=0.5,
        lease_s=3.0,
        election_timeout_min_s=4.5,
        election_timeout_max_s=9.0,
    ),
    # Loopback tests: fast failover, same ratios as `lan`.
    "test": ElectionTiming(
        heartbeat_interval_s=0.05,
        lease_s=0.3,
        election_timeout_min_s=0.45,
        election_timeout_max_s=0.9,
    ),
}


def validate_voters(
    voters: Iterable[str],
    *,
    witnesses: Iterable[str] = (),
    static_coordinator: str | None = None,
) -> tuple[str, ...]:
    """Check that the voter set can elect a coordinator safely; return the sorted voter ids.

    `witnesses` are voters that run no model; they count like any other voter. With
    `static_coordinator` set, nobody votes and the result is that one id.
    """
    if static_coordinator is not None:
        if not isinstance(static_coordinator, str) or not static_coordinator:
            raise ElectionConfigError(
                f"election.static_coordinator must be a node id, got {static_coordinator!r}"
            )
        return (static_coordinator,)

    listed = [*voters, *witnesses]
    for node_id in listed:
        if not isinstance(node_id, str) or not node_id:
            raise ElectionConfigError(
                f"election.voters contains {node_id!r}; each voter must be a non-empty node id"
            )
    duplicates = sorted({n for n in listed if listed.count(n) > 1})
    if duplicates:
        raise ElectionConfigError(
            f"election.voters lists {duplicates} more than once (voters and witnesses together); "
            "list each node once"
        )
    if not listed:
        raise ElectionConfigError(
            "election.voters is empty; list at least one voting node id, or set "
            "election.static_coordinator"
        )
    if len(listed) == 2:
        raise ElectionConfigError(
            f"election.voters has two voters {sorted(listed)}: a majority of two is both, so "
            "losing either node stops all elections. Add a witness voter (a third agent with "
            "election.voter = true and election.witness = true that runs no model), or set "
            "election.static_coordinator to one node id"
        )
    if len(listed) % 2 == 0:
        logger.warning(
            "%d voters tolerate no more failures than %d; an odd count is recommended",
            len(listed), len(listed) - 1,
        )
    return tuple(sorted(listed))


def _json_copy(value: Any) -> dict[str, Any]:
    """Return a deep copy of a registry value, which must survive JSON and msgpack unchanged."""
    if not isinstance(value, dict):
        raise TypeError(f"registry value must be a dict, got {type(value).__name__}")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"registry value is not JSON-compatible: {exc}") from exc
    copied = json.loads(encoded)
    if copied != value:
        raise TypeError(
            "registry value changes in a JSON round trip; use string keys and lists, not tuples"
        )
    wire_size = len(msgpack.packb(copied, use_bin_type=True))
    if wire_size > MAX_REGISTRY_VALUE_BYTES:
        raise ValueError(
            f"registry value is {wire_size} bytes in msgpack, above the limit of "
            f"{MAX_REGISTRY_VALUE_BYTES}; keep large data (model files, plans) out of the registry"
        )
    return copied


def _position(entry: RegistryEntry | None) -> tuple[int, int]:
    return entry.position if entry is not None else (0, 0)


def _field_int(msg: Mapping[str, Any], key: str) -> int:
    value = msg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TERM:
        raise InvalidElectionMessage(
            f"field {key!r} must be an integer in [0, {MAX_TERM}], got {value!r}"
        )
    return value


def _field_bool(msg: Mapping[str, Any], key: str) -> bool:
    value = msg.get(key)
    if not isinstance(value, bool):
        raise InvalidElectionMessage(f"field {key!r} must be a boolean, got {value!r}")
    return value


def _field_entry(msg: Mapping[str, Any]) -> RegistryEntry | None:
    raw = msg.get("entry")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidElectionMessage(f"field 'entry' must be a map, got {type(raw).__name__}")
    value = raw.get("value")
    if not isinstance(value, dict):
        raise InvalidElectionMessage(
            f"field 'entry.value' must be a map, got {type(value).__name__}"
        )
    return RegistryEntry(
        term=_field_int(raw, "term"), index=_field_int(raw, "index"), value=value
    )


class ElectionCore:
    """Raft-style election and registry replication for one node, without I/O.

    `voters` are the node ids that vote (this node is a learner when it is not among them).
    `learners` are extra non-voting members that receive the registry. With
    `static_coordinator` set, that node is coordinator without elections, at term
    `max(static_epoch, stored term)`, and every other listed node is a learner.

    NOTE: the voter set is fixed for the life of the core. Adding or removing a voter safely
    needs Raft's joint consensus, which is not implemented; restart every node with the new
    list while the cluster is healthy.
    """

    def __init__(
        self,
        node_id: str,
        voters: Iterable[str],
        storage: ElectionStorage,
        timing: ElectionTiming,
        rng: random.Random | None = None,
        *,
        learners: Iterable[str] = (),
        static_coordinator: str | None = None,
        static_epoch: int = 1,
    ) -> None:
        self.node_id = node_id
        self.timing = timing
        # Timeouts only need to differ between nodes; tests pass a seeded generator.
        self._rng = rng if rng is not None else random.Random()
        self._storage = storage
        self._static = static_coordinator
        listed = frozenset(voters)
        if static_coordinator is not None:
            if static_epoch < 1:
                raise ElectionConfigError(
                    f"static epoch must be >= 1, got {static_epoch!r}"
                )
            self._voters = frozenset({static_coordinator})
            self._learners = (listed | frozenset(learners)) - self._voters
        else:
            if not listed:
                raise ElectionConfigError("voters is empty; list at least one voting node id")
            self._voters = listed
            self._learners = frozenset(learners) - listed
        self._static_epoch = static_epoch
        self._majority = len(self._voters) // 2 + 1

        self._state: PersistentState = storage.load()
        self._role = Role.FOLLOWER
        self._leader_id: str | None = None
        self._events: list[ElectionEvent] = []

        self._started = False
        # A restarted node does not know when it last heard from a leader, so it refuses
        # votes until this time (see the lease argument in the module docstring).
        self._vote_hold_until = 0.0
        self._election_deadline = 0.0
        self._last_leader_contact: float | None = None
        self._pre_vote_grants: set[str] = set()
        self._vote_grants: set[str] = set()

        # Leader-only state, reset by _become_leader.
        self._round = 0
        self._round_sent_at: dict[int, float] = {}
        self._acked_round: dict[str, int] = {}
        self._match: dict[str, tuple[int, int]] = {}
        self._became_leader_at = 0.0
        self._lease_base: float | None = None
        self._next_heartbeat = 0.0
        self._noop_position = (0, 0)
        # Values this leader wrote in its term, by index, so that an older one can be reported
        # committed when a majority has it but not yet the newest.
        self._term_entries: dict[int, RegistryEntry] = {}
        self._broadcast_pending = False
        self._invalid_messages = 0

        logger.info(
            "node %s election core loaded: term %d, voted for %s, registry position %s, "
            "%d voters, %d learners%s",
            node_id, self._state.term, self._state.voted_for, _position(self._state.entry),
            len(self._voters), len(self._learners),
            f", static coordinator {static_coordinator}" if static_coordinator else "",
        )

    # ----------------------------------------------------------------- read-only state

    @property
    def role(self) -> Role:
        return self._role

    @property
    def term(self) -> int:
        """The current term, which is also the coordinator epoch."""
        return self._state.term

    @property
    def leader_id(self) -> str | None:
        return self._leader_id

    @property
    def is_voter(self) -> bool:
        return self.node_id in self._voters

    @property
    def voters(self) -> frozenset[str]:
        return self._voters

    @property
    def learners(self) -> frozenset[str]:
        return self._learners

    @property
    def committed_value(self) -> dict[str, Any] | None:
        """The newest registry value that this node has seen committed."""
        committed = self._state.committed
        return committed.value if committed is not None else None

    @property
    def committed_position(self) -> tuple[int, int]:
        return _position(self._state.committed)

    @property
    def registry_position(self) -> tuple[int, int]:
        """`(term, index)` of the newest registry entry stored here, committed or not."""
        return _position(self._state.entry)

    @property
    def registry_value(self) -> dict[str, Any] | None:
        """The newest registry value stored here; on a ready leader it is the current one."""
        entry = self._state.entry
        return entry.value if entry is not None else None

    @property
    def registry_ready(self) -> bool:
        """True on a leader once an entry of its own term is committed."""
        return (
            self._role is Role.LEADER
            and self._state.committed is not None
            and self._state.committed.position >= self._noop_position
        )

    def lease_valid(self, now: float) -> bool:
        """Return True when this node may act as coordinator at `now`.

        That is only the case on a leader whose registry is ready and whose lease (the send time of the
        newest heartbeat round acknowledged by a majority of voters, plus `lease_s`) has not
        expired.
        """
        if self._role is not Role.LEADER or not self.registry_ready:
            return False
        if len(self._voters) == 1:
            return True
        return self._lease_base is not None and now < self._lease_base + self.timing.lease_s

    def lease_expires_at(self) -> float | None:
        """End of the current lease in caller time, or None without a lease."""
        if self._role is not Role.LEADER or self._lease_base is None:
            return None
        return self._lease_base + self.timing.lease_s

    def next_deadline(self) -> float:
        """Return the earliest time at which `tick` has work to do."""
        if self._role is Role.LEADER:
            if self._broadcast_pending:
                return 0.0
            return min(self._next_heartbeat, self._last_quorum_contact() + self.timing.lease_s)
        if not self.is_voter or self._static is not None:
            return float("inf")
        return self._election_deadline

    def drain_events(self) -> list[ElectionEvent]:
        """Return and clear the events produced since the last call."""
        events, self._events = self._events, []
        return events

    def status(self, now: float) -> dict[str, Any]:
        """Return a JSON-friendly summary for status pages and logs."""
        return {
            "node_id": self.node_id,
            "role": self._role.value,
            "term": self._state.term,
            "leader_id": self._leader_id,
            "voter": self.is_voter,
            "lease_valid": self.lease_valid(now),
            "registry_position": list(_position(self._state.entry)),
            "committed_position": list(self.committed_position),
        }

    # ----------------------------------------------------------------- membership

    def set_learners(self, learners: Iterable[str]) -> None:
        """Replace the non-voting members that the leader replicates the registry to."""
        self._learners = frozenset(learners) - self._voters - {self.node_id}

    # ----------------------------------------------------------------- inputs

    def tick(self, now: float) -> list[Outbound]:
        """Advance timers to `now`: heartbeats, CheckQuorum, election timeouts."""
        out: list[Outbound] = []
        self._start(now, out)
        if self._role is Role.LEADER:
            self._refresh_lease(now)
            if self._quorum_lost(now):
                self._step_down(now, self._state.term, "lost contact with a majority of voters")
            elif self._broadcast_pending or now >= self._next_heartbeat:
                self._broadcast(now, out)
        elif self._static is None and self.is_voter and now >= self._election_deadline:
            self._start_pre_vote(now, out)
        return out

    def receive(self, now: float, sender_id: str, msg: Mapping[str, Any]) -> list[Outbound]:
        """Handle one election message from `sender_id` (the id from its TLS certificate).

        Invalid messages are logged and dropped instead of raising. A storage failure raises
        `ElectionStorageError`, since the node cannot continue safely without its state.
        """
        out: list[Outbound] = []
        self._start(now, out)
        if sender_id == self.node_id:
            logger.warning("node %s dropped an election message from itself", self.node_id)
            return out
        msg_type = msg.get("type") if isinstance(msg, Mapping) else None
        handler = self._handlers.get(msg_type) if isinstance(msg_type, str) else None
        if handler is None:
            self._note_invalid(sender_id, f"unknown message type {msg_type!r}")
            return out
        try:
            handler(self, now, sender_id, msg, out)
        except InvalidElectionMessage as exc:
            self._note_invalid(sender_id, f"invalid {msg_type} message: {exc}")
        return out

    def propose(self, value: dict[str, Any]) -> int:
        """Store a new registry value on the leader; return its index.

        The value is committed when a majority of voters has stored it, reported by a
        `Committed` event with this index or a later one (a later value replaces this one).
        The next `tick` sends it. Raises `NotLeaderError` on other nodes, `TypeError` for a
        value that JSON cannot store unchanged and `ValueError` for one above
        `MAX_REGISTRY_VALUE_BYTES`.
        """
        if self._role is not Role.LEADER:
            raise NotLeaderError(self.node_id, self._leader_id, self._state.term)
        entry = self._new_entry(_json_copy(value))
        self._save(entry=entry)
        self._remember_entry(entry)
        logger.info(
            "node %s proposed registry entry %s in term %d", self.node_id, entry.position,
            self._state.term,
        )
        self._broadcast_pending = True
        self._try_commit()
        return entry.index

    # ----------------------------------------------------------------- internals: state

    def _start(self, now: float, out: list[Outbound]) -> None:
        if self._started:
            return
        self._started = True
        self._vote_hold_until = now + self.timing.election_timeout_min_s
        self._reset_election_timer(now)
        if self._static is None:
            return
        if self.node_id == self._static:
            term = max(self._static_epoch, self._state.term)
            if term != self._state.term:
                self._save(term=term, voted_for=self.node_id)
            self._become_leader(now, out)

    def _save(self, **changes: Any) -> None:
        """Write changed persistent fields through the storage before any dependent send."""
        current = self._state
        merged = {
            "term": current.term,
            "voted_for": current.voted_for,
            "entry": current.entry,
            "committed": current.committed,
            **changes,
        }
        new_state = PersistentState(**merged)
        if new_state != current:
            self._storage.save(new_state)
            self._state = new_state

    def _reset_election_timer(self, now: float) -> None:
        timing = self.timing
        self._election_deadline = now + self._rng.uniform(
            timing.election_timeout_min_s, timing.election_timeout_max_s
        )

    def _in_lease(self, now: float) -> bool:
        """Return True when this node rejects votes: it leads, or heard from a leader recently."""
        if self._role is Role.LEADER or now < self._vote_hold_until:
            return True
        contact = self._last_leader_contact
        return contact is not None and now - contact < self.timing.election_timeout_min_s

    def _note_invalid(self, sender_id: str, reason: str) -> None:
        self._invalid_messages += 1
        # First few at WARNING, later ones at DEBUG so that a broken peer cannot flood the log.
        level = logging.WARNING if self._invalid_messages <= 10 else logging.DEBUG
        logger.log(level, "node %s dropped message from %s: %s", self.node_id, sender_id, reason)

    def _adopt_term(self, term: int) -> None:
        if term > self._state.term:
            self._save(term=term, voted_for=None)

    def _step_down(self, now: float, term: int, reason: str, leader_id: str | None = None) -> None:
        """Become a follower of `term` (not lower than the current term)."""
        if self._role is Role.LEADER:
            logger.warning(
                "node %s stepped down as leader of term %d: %s", self.node_id,
                self._state.term, reason,
            )
            self._events.append(SteppedDown(self._state.term, reason))
        elif self._role is not Role.FOLLOWER:
            logger.info(
                "node %s ended its candidacy in term %d: %s", self.node_id, self._state.term,
                reason,
            )
        self._adopt_term(term)
        self._role = Role.FOLLOWER
        self._lease_base = None
        self._broadcast_pending = False
        self._set_leader(leader_id)
        self._reset_election_timer(now)

    def _set_leader(self, leader_id: str | None) -> None:
        if leader_id is not None and leader_id != self._leader_id:
            if leader_id != self.node_id:
                logger.info(
                    "node %s follows leader %s in term %d", self.node_id, leader_id,
                    self._state.term,
                )
            self._events.append(LeaderChanged(self._state.term, leader_id))
        self._leader_id = leader_id

    def _new_entry(self, value: dict[str, Any]) -> RegistryEntry:
        last = self._state.entry
        index = last.index + 1 if last is not None else 1
        return RegistryEntry(term=self._state.term, index=index, value=value)

    # ----------------------------------------------------------------- internals: elections

    def _start_pre_vote(self, now: float, out: list[Outbound]) -> None:
        self._role = Role.PRE_CANDIDATE
        self._set_leader(None)
        self._pre_vote_grants = {self.node_id}
        self._reset_election_timer(now)
        logger.info(
            "node %s starts a pre-vote for term %d", self.node_id, self._state.term + 1
        )
        if len(self._pre_vote_grants) >= self._majority:
            self._become_candidate(now, out)
            return
        entry_term, entry_index = _position(self._state.entry)
        request = {
            "type": MSG_PRE_VOTE,
            "term": self._state.term + 1,
            "entry_term": entry_term,
            "entry_index": entry_index,
        }
        out.extend(Outbound(peer, request) for peer in self._other_voters())

    def _become_candidate(self, now: float, out: list[Outbound]) -> None:
        # The new term and the self-vote reach the disk before any vote request leaves.
        self._save(term=self._state.term + 1, voted_for=self.node_id)
        self._role = Role.CANDIDATE
        self._vote_grants = {self.node_id}
        self._reset_election_timer(now)
        logger.info("node %s is a candidate in term %d", self.node_id, self._state.term)
        if len(self._vote_grants) >= self._majority:
            self._become_leader(now, out)
            return
        entry_term, entry_index = _position(self._state.entry)
        request = {
            "type": MSG_VOTE,
            "term": self._state.term,
            "entry_term": entry_term,
            "entry_index": entry_index,
        }
        out.extend(Outbound(peer, request) for peer in self._other_voters())

    def _become_leader(self, now: float, out: list[Outbound]) -> None:
        self._role = Role.LEADER
        self._round = 0
        self._round_sent_at = {}
        self._acked_round = {}
        self._match = {}
        self._became_leader_at = now
        self._lease_base = None
        logger.info(
            "node %s became leader of term %d with votes from %s", self.node_id,
            self._state.term, sorted(self._vote_grants) or [self.node_id],
        )
        self._events.append(BecameLeader(self._state.term))
        self._set_leader(self.node_id)
        # Raft's no-op: re-propose the current value under this term. Once it is committed,
        # every older value stored on this leader is committed too, and none can be lost.
        current = self._state.entry
        noop = self._new_entry(current.value if current is not None else {})
        self._save(entry=noop)
        self._term_entries = {}
        self._remember_entry(noop)
        self._noop_position = noop.position
        self._try_commit()
        self._broadcast(now, out)

    def _other_voters(self) -> list[str]:
        return sorted(self._voters - {self.node_id})

    # ----------------------------------------------------------------- internals: leader

    def _broadcast(self, now: float, out: list[Outbound]) -> None:
        self._broadcast_pending = False
        self._round += 1
        self._round_sent_at[self._round] = now
        self._next_heartbeat = now + self.timing.heartbeat_interval_s
        # Rounds sent more than one lease ago cannot extend the lease any more.
        horizon = now - self.timing.lease_s
        for old in [r for r, sent in self._round_sent_at.items() if sent < horizon]:
            del self._round_sent_at[old]

        entry = self._state.entry
        position = _position(entry)
        committed = _position(self._state.committed)
        base = {
            "type": MSG_APPEND,
            "term": self._state.term,
            "round": self._round,
            "commit_term": committed[0],
            "commit_index": committed[1],
        }
        with_entry = dict(base)
        if entry is not None:
            with_entry["entry"] = {"term": entry.term, "index": entry.index, "value": entry.value}
        for peer in sorted((self._voters | self._learners) - {self.node_id}):
            match = self._match.get(peer)
            needs_entry = entry is not None and (match is None or match < position)
            out.append(Outbound(peer, with_entry if needs_entry else base))

    def _refresh_lease(self, now: float) -> None:
        """Recompute the lease base: the newest round time acknowledged by a majority."""
        times = [now]  # this node has everything it sent
        for peer in self._voters - {self.node_id}:
            sent_at = self._round_sent_at.get(self._acked_round.get(peer, 0))
            if sent_at is not None:
                times.append(sent_at)
        if len(times) < self._majority:
            return
        times.sort(reverse=True)
        candidate = times[self._majority - 1]
        if self._lease_base is None or candidate > self._lease_base:
            self._lease_base = candidate

    def _remember_entry(self, entry: RegistryEntry) -> None:
        self._term_entries[entry.index] = entry
        while len(self._term_entries) > MAX_TERM_ENTRIES:
            del self._term_entries[min(self._term_entries)]

    def _last_quorum_contact(self) -> float:
        if self._lease_base is None:
            return self._became_leader_at
        return max(self._became_leader_at, self._lease_base)

    def _quorum_lost(self, now: float) -> bool:
        # Same expression as next_deadline so that a tick at that deadline acts.
        return now >= self._last_quorum_contact() + self.timing.lease_s

    def _try_commit(self) -> None:
        """Commit the newest entry of this term that a majority of voters has stored."""
        own = self._state.entry
        if own is None or self._role is not Role.LEADER:
            return
        positions = [own.position]
        positions.extend(self._match.get(peer, (0, 0)) for peer in self._voters - {self.node_id})
        positions.sort(reverse=True)
        majority_position = positions[self._majority - 1]
        # Raft commits only entries of the leader's own term by counting; older ones follow.
        if majority_position[0] != self._state.term:
            return
        if majority_position <= _position(self._state.committed):
            return
        entry = self._term_entries.get(majority_position[1])
        if entry is None:
            # NOTE: only the newest MAX_TERM_ENTRIES values of this term are kept, so a
            # majority that lags further behind commits when it catches up with a newer one.
            return
        self._save(committed=entry)
        logger.info(
            "node %s committed registry entry %s in term %d", self.node_id, entry.position,
            self._state.term,
        )
        self._events.append(Committed(entry.index, entry.value, entry.term))

    # ----------------------------------------------------------------- handlers

    def _on_pre_vote(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        candidate_position = (_field_int(msg, "entry_term"), _field_int(msg, "entry_index"))
        if not self.is_voter or sender not in self._voters or self._static is not None:
            logger.debug("node %s ignored a pre-vote from non-voter %s", self.node_id, sender)
            return
        granted = (
            term > self._state.term
            and not self._in_lease(now)
            and candidate_position >= _position(self._state.entry)
        )
        logger.debug(
            "node %s %s pre-vote for %s in term %d", self.node_id,
            "granted" if granted else "rejected", sender, term,
        )
        reply_term = term if granted else self._state.term
        out.append(
            Outbound(sender, {"type": MSG_PRE_VOTE_REPLY, "term": reply_term, "granted": granted})
        )

    def _on_pre_vote_reply(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        granted = _field_bool(msg, "granted")
        if sender not in self._voters:
            return
        if not granted:
            if term > self._state.term:
                self._step_down(now, term, f"pre-vote rejected by {sender} at term {term}")
            return
        if self._role is Role.PRE_CANDIDATE and term == self._state.term + 1:
            self._pre_vote_grants.add(sender)
            if len(self._pre_vote_grants) >= self._majority:
                self._become_candidate(now, out)

    def _on_vote(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        candidate_position = (_field_int(msg, "entry_term"), _field_int(msg, "entry_index"))
        if not self.is_voter or sender not in self._voters or self._static is not None:
            logger.debug("node %s ignored a vote request from non-voter %s", self.node_id, sender)
            return
        if term < self._state.term or self._in_lease(now):
            # An in-lease node neither adopts the newer term nor votes: a leader it heard from
            # recently may still hold a lease.
            out.append(
                Outbound(sender, {"type": MSG_VOTE_REPLY, "term": self._state.term,
                                  "granted": False})
            )
            return
        if term > self._state.term:
            self._step_down(now, term, f"vote request from {sender} for term {term}")
        granted = (
            self._state.voted_for in (None, sender)
            and candidate_position >= _position(self._state.entry)
        )
        if granted:
            # The vote is durable before the reply leaves.
            self._save(voted_for=sender)
            self._reset_election_timer(now)
            logger.info("node %s voted for %s in term %d", self.node_id, sender, term)
        out.append(
            Outbound(sender, {"type": MSG_VOTE_REPLY, "term": self._state.term,
                              "granted": granted})
        )

    def _on_vote_reply(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        granted = _field_bool(msg, "granted")
        if sender not in self._voters:
            return
        if term > self._state.term:
            self._step_down(now, term, f"vote reply from {sender} carries term {term}")
            return
        if self._role is Role.CANDIDATE and term == self._state.term and granted:
            self._vote_grants.add(sender)
            if len(self._vote_grants) >= self._majority:
                self._become_leader(now, out)

    def _on_append(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        round_id = _field_int(msg, "round")
        commit_position = (_field_int(msg, "commit_term"), _field_int(msg, "commit_index"))
        entry = _field_entry(msg)
        if entry is not None and entry.term > term:
            raise InvalidElectionMessage(
                f"entry term {entry.term} is newer than the message term {term}"
            )
        if sender not in self._voters:
            logger.debug("node %s ignored an append from non-voter %s", self.node_id, sender)
            return
        if term < self._state.term:
            out.append(Outbound(sender, self._append_reply(round_id, success=False)))
            return
        if term == self._state.term and self._role is Role.LEADER:
            logger.error(
                "node %s received an append from %s for its own term %d; two leaders in one "
                "term would mean a node lost its stored vote", self.node_id, sender, term,
            )
            return
        if term > self._state.term or self._role is not Role.FOLLOWER:
            self._step_down(now, term, f"append from leader {sender} of term {term}", sender)
        self._set_leader(sender)
        self._last_leader_contact = now
        self._reset_election_timer(now)

        changes: dict[str, Any] = {}
        stored = self._state.entry
        if entry is not None and entry.position > _position(stored):
            changes["entry"] = entry
            stored = entry
        committed = self._state.committed
        newly_committed = (
            stored is not None
            and commit_position == stored.position
            and (committed is None or committed.position < stored.position)
        )
        if newly_committed:
            changes["committed"] = stored
        # The entry is durable before the acknowledgement leaves.
        self._save(**changes)
        if newly_committed and stored is not None:
            self._events.append(Committed(stored.index, stored.value, stored.term))
        out.append(Outbound(sender, self._append_reply(round_id, success=True)))

    def _append_reply(self, round_id: int, *, success: bool) -> dict[str, Any]:
        entry_term, entry_index = _position(self._state.entry)
        return {
            "type": MSG_APPEND_REPLY,
            "term": self._state.term,
            "round": round_id,
            "success": success,
            "entry_term": entry_term,
            "entry_index": entry_index,
        }

    def _on_append_reply(
        self, now: float, sender: str, msg: Mapping[str, Any], out: list[Outbound]
    ) -> None:
        term = _field_int(msg, "term")
        round_id = _field_int(msg, "round")
        success = _field_bool(msg, "success")
        position = (_field_int(msg, "entry_term"), _field_int(msg, "entry_index"))
        if sender not in self._voters and sender not in self._learners:
            return
        if term > self._state.term:
            if self._static is not None and self._role is Role.LEADER:
                # Only this node leads in static mode, so a higher stored term elsewhere comes
                # from an earlier configuration. Move up to it and stay coordinator.
                logger.warning(
                    "node %s raises its static epoch from %d to %d stored at %s",
                    self.node_id, self._state.term, term, sender,
                )
                self._adopt_term(term)
                self._become_leader(now, out)
                return
            self._step_down(now, term, f"append reply from {sender} carries term {term}")
            return
        if self._role is not Role.LEADER or term != self._state.term or not success:
            return
        if round_id > self._acked_round.get(sender, 0):
            self._acked_round[sender] = round_id
        if position > self._match.get(sender, (0, 0)):
            self._match[sender] = position
        if sender in self._voters:
            self._refresh_lease(now)
            self._try_commit()

    _handlers = {
        MSG_PRE_VOTE: _on_pre_vote,
        MSG_PRE_VOTE_REPLY: _on_pre_vote_reply,
        MSG_VOTE: _on_vote,
        MSG_VOTE_REPLY: _on_vote_reply,
        MSG_APPEND: _on_append,
        MSG_APPEND_REPLY: _on_append_reply,
    }
