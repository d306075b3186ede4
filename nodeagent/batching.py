"""Micro-batching queue for one segment: a pure core with no I/O and no clock of its own.

Problem
-------
Concurrent requests for one segment run faster together than one by one. MiniLM on one torch
thread costs 15.7 ms per row alone and 8.8 ms per row in a batch of 8, with no further gain at 16
(torch 2.13.0 CPU, 2-core x86-64 host, 32 tokens, measured once). Batching needs a queue that decides *when* a batch
leaves and *which* requests go in it, while meeting overload with backpressure and keeping
priorities without starving anyone. This module makes those decisions. The worker thread in
`nodeagent.worker` does the waiting and the running, and passes the current time in, so tests drive
this core with a virtual clock.

When a batch leaves: max batch size against max wait
---------------------------------------------------
A batch leaves as soon as `max_batch_size` rows of compatible requests are queued, or when the
oldest of them has waited `max_wait_s`. A larger batch raises throughput up to the knee of the
per-row cost curve (8 rows for MiniLM, above). A longer wait collects bigger batches at low load but
adds up to `max_wait_s` of latency to a lone request at every hop. The wait matters only while the
worker is idle. While it runs a batch, new requests queue anyway, and once the run ends every group
whose oldest request has waited `max_wait_s` leaves at once. `max_wait_s = 0` therefore gives the
greedy rule: an idle worker takes whatever is queued. That suits segments whose run time is close to
the wait. One MiniLM encoder layer takes about 2 ms for one sequence, so a 2 ms wait can double a
lone request's time in a one-layer segment.

Rejected: a fixed batch size (a lone request would wait forever), and a timer per request (the queue
would need I/O).

Which requests go together: batch keys
--------------------------------------
Requests are concatenated on dim 0, so every other dim and the dtype of every input must match. Each
request carries a hashable batch key (the worker uses the name, dtype, device and non-batch shape of
every input tensor), and all requests of a batch have the same key. MiniLM requests with different sequence lengths
therefore never meet in one batch. Padding to the longest sequence with the attention mask was
rejected for now, because exact equality with the unbatched output is not shown for it.

Order: priority classes with aging
----------------------------------
Classes are high (0), normal (1) and low (2). An entry's effective class is
``max(0, class - floor(waited / aging_s))``: it rises one class for every `aging_s` it waits. Entries
are ranked by (effective class, enqueue time, sequence number), lowest first. Strict priority
without aging would starve low requests under a steady stream of high ones. Aging bounds the wait:

    Bound. Let entry L be pushed at t0. From t0 + max(2 * aging_s, max_wait_s) on, L has effective
    class 0 and its group is ready. An entry ranks ahead of L only if it also has class 0 and was
    pushed before L. At most `capacity - 1` such entries exist, and none can join later. Each pop
    takes the ready group with the best-ranked head, so it removes either L or one entry pushed
    before L. So L leaves within `capacity` pops after t0 + max(2 * aging_s, max_wait_s).

`tests/test_batching.py` checks this bound under a constant stream of high entries.

When several groups are ready, the one whose head ranks best leaves first. A group that is not
ready yet does not hold back a ready one, so a full low batch may run while a lone high request
waits out its `max_wait_s`. That inversion lasts at most one run.

Backpressure and deadlines
--------------------------
`push` raises `QueueFull` at `capacity` entries, so the caller can refuse the hop at once and the
sender can try a replica. An entry whose deadline has passed is removed at the next `push`,
`pop_batch` or `next_deadline` call and kept for `take_expired`, so that the caller can fail it
with a timeout error. `next_deadline` also covers the earliest deadline, so a shell that sleeps
until then wakes up to report it.

Defaults and their sources
--------------------------
- `DEFAULT_MAX_BATCH_SIZE = 8`: the knee of MiniLM's per-row cost (measured above).
- `DEFAULT_MAX_WAIT_S = 0.002`: small next to a full MiniLM forward (16 ms for one sequence); use 0
  for segments of one or two layers (see above).
- `DEFAULT_CAPACITY = 256`: 32 full batches of 8. At about 70 ms per MiniLM batch of 8 that is
  about 2.2 s of queued work, a fifth of a 10 s deadline.
- `DEFAULT_AGING_S = 1.0`: more than ten MiniLM batch runs, so that classes decide the order under
  normal load. A low request is ranked with high ones after 2 s, well inside a 10 s deadline.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_WAIT_S = 0.002
DEFAULT_CAPACITY = 256
DEFAULT_AGING_S = 1.0


class Priority(enum.IntEnum):
    """Priority class of a request. A lower value is served first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, value: str | int | Priority) -> Priority:
        """Convert "high", "normal", "low" (any case), a member or its int value to a member."""
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(
            f"invalid priority {value!r}: expected one of 'high', 'normal', 'low'"
        )


class QueueFull(Exception):
    """Raised by `BatchQueue.push` when the queue contains `capacity` entries."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        super().__init__(
            f"queue of segment {name!r} is full ({capacity} requests queued, its capacity); "
            "retry later, send to another replica or lower the request rate"
        )


@dataclass(slots=True, eq=False)
class QueueEntry(Generic[T]):
    """One queued item with what the queue needs to order, group and expire it."""

    item: T
    priority: Priority
    key: Hashable
    rows: int
    enqueued_at: float
    deadline: float | None
    seq: int


@dataclass(slots=True)
class _Group(Generic[T]):
    """Entries of one batch key: one FIFO deque per priority class."""

    by_class: tuple[deque[QueueEntry[T]], ...] = field(
        default_factory=lambda: tuple(deque() for _ in Priority)
    )
    rows: int = 0
    count: int = 0


class BatchQueue(Generic[T]):
    """Bounded priority queue that hands out batches of compatible items.

    Times are in seconds on any monotonic clock, passed in by the caller. Not thread-safe: the
    caller holds a lock around every call.
    """

    def __init__(
        self,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        capacity: int = DEFAULT_CAPACITY,
        aging_s: float = DEFAULT_AGING_S,
        *,
        name: str = "segment",
    ) -> None:
        _check_int("max_batch_size", max_batch_size, minimum=1)
        _check_int("capacity", capacity, minimum=1)
        if not (isinstance(max_wait_s, (int, float)) and 0 <= max_wait_s < math.inf):
            raise ValueError(
                f"invalid max_wait_s {max_wait_s!r}: expected a finite number of seconds >= 0"
            )
        if not (isinstance(aging_s, (int, float)) and aging_s > 0):
            raise ValueError(
                f"invalid aging_s {aging_s!r}: expected seconds > 0 (math.inf turns aging off)"
            )
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait_s = float(max_wait_s)
        self.capacity = capacity
        self.aging_s = float(aging_s)
        self._groups: dict[Hashable, _Group[T]] = {}
        self._entries: dict[int, QueueEntry[T]] = {}  # id(item) -> entry
        self._expired: list[T] = []
        self._seq = 0

    def __len__(self) -> int:
        return len(self._entries)

    def depth_by_priority(self) -> dict[str, int]:
        """Count queued entries per base priority class, by lowercase class name."""
        counts = {p.name.lower(): 0 for p in Priority}
        for entry in self._entries.values():
            counts[entry.priority.name.lower()] += 1
        return counts

    def push(
        self,
        item: T,
        priority: str | int | Priority,
        now: float,
        *,
        key: Hashable = None,
        rows: int = 1,
        deadline: float | None = None,
    ) -> None:
        """Queue `item`, or raise `QueueFull` when `capacity` entries are queued.

        `rows` is the item's size on the batch dim, counted against `max_batch_size`. An item with
        more rows than `max_batch_size` is accepted and leaves in a batch of its own.
        """
        prio = Priority.parse(priority)
        _check_int("rows", rows, minimum=1)
        if id(item) in self._entries:
            raise ValueError(f"item {item!r} is already queued in segment {self.name!r}")
        if len(self._entries) >= self.capacity:
            self._expire(now)
            if len(self._entries) >= self.capacity:
                raise QueueFull(self.name, self.capacity)

        entry = QueueEntry(item, prio, key, rows, now, deadline, self._seq)
        self._seq += 1
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group()
        group.by_class[prio].append(entry)
        group.rows += rows
        group.count += 1
        self._entries[id(item)] = entry

    def discard(self, item: T) -> bool:
        """Remove `item` if queued (a cancelled request). Return whether it was queued."""
        entry = self._entries.pop(id(item), None)
        if entry is None:
            return False
        group = self._groups[entry.key]
        group.by_class[entry.priority].remove(entry)
        self._forget(entry, group)
        return True

    def pop_batch(self, now: float, *, force: bool = False) -> list[T] | None:
        """Remove and return the next batch, or None when no group is ready.

        A group is ready when it contains `max_batch_size` rows or its oldest entry has waited
        `max_wait_s`. With `force`, any non-empty group counts as ready (used to drain on close).
        Expired entries are removed first and kept for `take_expired`.
        """
        self._expire(now)
        best: tuple[tuple[int, float, int], _Group[T]] | None = None
        for group in self._groups.values():
            if not (force or self._is_ready(group, now)):
                continue
            rank = self._rank(self._head(group, now), now)
            if best is None or rank < best[0]:
                best = (rank, group)
        if best is None:
            return None
        return self._take(best[1], now)

    def next_deadline(self, now: float) -> float | None:
        """Return when the caller should next call `pop_batch`: `now` if a batch or an expired
        entry is waiting, else the earliest wait trigger or deadline, or None when empty."""
        self._expire(now)
        if self._expired:
            return now
        earliest: float | None = None
        for group in self._groups.values():
            if group.rows >= self.max_batch_size:
                return now
            oldest = min(q[0].enqueued_at for q in group.by_class if q)
            ready_at = oldest + self.max_wait_s
            if ready_at <= now:
                return now
            earliest = ready_at if earliest is None else min(earliest, ready_at)
        for entry in self._entries.values():
            if entry.deadline is not None:
                earliest = entry.deadline if earliest is None else min(earliest, entry.deadline)
        return earliest

    def take_expired(self) -> list[T]:
        """Return and clear the items whose deadline passed while queued, oldest first."""
        expired, self._expired = self._expired, []
        return expired

    def drain(self) -> list[T]:
        """Remove and return every queued item (the caller must complete or fail each one), in push order."""
        items = [e.item for e in sorted(self._entries.values(), key=lambda e: e.seq)]
        self._groups.clear()
        self._entries.clear()
        return items

    def effective_class(self, entry: QueueEntry[T], now: float) -> int:
        """Return the class of `entry` after aging: one class up for every `aging_s` waited."""
        waited = max(0.0, now - entry.enqueued_at)
        return max(0, int(entry.priority) - int(waited // self.aging_s))

    def _rank(self, entry: QueueEntry[T], now: float) -> tuple[int, float, int]:
        return (self.effective_class(entry, now), entry.enqueued_at, entry.seq)

    def _head(self, group: _Group[T], now: float) -> QueueEntry[T]:
        # Each class deque is FIFO and aging is monotone in waiting time, so the best entry of
        # a class is at its front.
        heads = [q[0] for q in group.by_class if q]
        return min(heads, key=lambda e: self._rank(e, now))

    def _is_ready(self, group: _Group[T], now: float) -> bool:
        if group.rows >= self.max_batch_size:
            return True
        oldest = min(q[0].enqueued_at for q in group.by_class if q)
        return now - oldest >= self.max_wait_s

    def _take(self, group: _Group[T], now: float) -> list[T]:
        """Remove the best-ranked entries of `group` up to `max_batch_size` rows."""
        batch: list[T] = []
        taken_rows = 0
        while group.count:
            head = self._head(group, now)
            if batch and taken_rows + head.rows > self.max_batch_size:
                break
            group.by_class[head.priority].popleft()
            del self._entries[id(head.item)]
            self._forget(head, group)
            batch.append(head.item)
            taken_rows += head.rows
            if taken_rows >= self.max_batch_size:
                break
        return batch

    def _forget(self, entry: QueueEntry[T], group: _Group[T]) -> None:
        group.rows -= entry.rows
        group.count -= 1
        if group.count == 0:
            del self._groups[entry.key]

    def _expire(self, now: float) -> None:
        expired = [
            e for e in self._entries.values() if e.deadline is not None and e.deadline <= now
        ]
        for entry in sorted(expired, key=lambda e: e.seq):
            self.discard(entry.item)
            self._expired.append(entry.item)


def _check_int(field_name: str, value: object, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"invalid {field_name} {value!r}: expected an integer >= {minimum}")
