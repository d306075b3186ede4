"""Tests of the micro-batching core, driven with a virtual clock (plain floats)."""

from __future__ import annotations

import math

import pytest

from nodeagent.batching import BatchQueue, Priority, QueueFull


def make_queue(**overrides: float | int) -> BatchQueue[str]:
    params: dict[str, float | int] = {
        "max_batch_size": 4, "max_wait_s": 0.010, "capacity": 64, "aging_s": 1.0,
    }
    params.update(overrides)
    return BatchQueue(name="seg-a", **params)  # type: ignore[arg-type]


def test_batching_size_trigger() -> None:
    queue = make_queue()
    for i in range(3):
        queue.push(f"r{i}", "normal", 0.0)
    assert queue.pop_batch(0.0) is None
    queue.push("r3", "normal", 0.0)
    assert queue.pop_batch(0.0) == ["r0", "r1", "r2", "r3"]
    assert len(queue) == 0


def test_batching_size_trigger_caps_batch() -> None:
    queue = make_queue()
    for i in range(6):
        queue.push(f"r{i}", "normal", 0.0)
    assert queue.pop_batch(0.0) == ["r0", "r1", "r2", "r3"]
    assert queue.pop_batch(0.0) is None
    assert queue.pop_batch(0.010) == ["r4", "r5"]


def test_batching_rows_count_toward_size() -> None:
    queue = make_queue()
    queue.push("three", "normal", 0.0, rows=3)
    queue.push("two", "normal", 0.0, rows=2)
    assert queue.pop_batch(0.0) == ["three"]
    assert queue.pop_batch(0.0) is None
    queue.push("big", "normal", 0.0, rows=9)
    batch = queue.pop_batch(0.0)
    assert batch == ["two"]
    assert queue.pop_batch(0.0) == ["big"]


def test_batching_wait_trigger() -> None:
    queue = make_queue()
    queue.push("a", "normal", 1.000)
    queue.push("b", "normal", 1.004)
    assert queue.next_deadline(1.004) == pytest.approx(1.010)
    assert queue.pop_batch(1.009) is None
    assert queue.pop_batch(1.010) == ["a", "b"]
    assert queue.next_deadline(1.010) is None


def test_batching_zero_wait_is_greedy() -> None:
    queue = make_queue(max_wait_s=0.0)
    queue.push("a", "normal", 5.0)
    assert queue.next_deadline(5.0) == 5.0
    assert queue.pop_batch(5.0) == ["a"]


def test_batching_priority_order() -> None:
    queue = make_queue(max_batch_size=1)
    queue.push("low", "low", 0.0)
    queue.push("normal", "normal", 0.0)
    queue.push("high-1", "high", 0.0)
    queue.push("high-2", Priority.HIGH, 0.0)
    popped = [queue.pop_batch(0.0) for _ in range(4)]
    assert popped == [["high-1"], ["high-2"], ["normal"], ["low"]]


def test_batching_priority_order_within_batch() -> None:
    queue = make_queue(max_batch_size=2)
    queue.push("low", "low", 0.0)
    queue.push("normal", "normal", 0.0)
    queue.push("high", "high", 0.0)
    assert queue.pop_batch(0.0) == ["high", "normal"]
    assert queue.pop_batch(0.010) == ["low"]


def test_batching_aging_raises_class() -> None:
    queue = make_queue(aging_s=1.0, max_batch_size=1)
    queue.push("old-low", "low", 0.0)
    queue.push("new-normal", "normal", 1.5)
    # At 1.5 s the low entry has aged one class, to normal, and it is older.
    assert queue.pop_batch(1.5) == ["old-low"]


def run_starvation(aging_s: float, horizon_ticks: int) -> int | None:
    """Return the tick at which a low entry leaves under one new high entry per tick, or None."""
    tick_s = 0.010
    capacity = 16
    queue = make_queue(max_batch_size=1, max_wait_s=0.0, capacity=capacity, aging_s=aging_s)
    # A backlog of high entries fills the queue except for the low entry and one arrival slot.
    for i in range(capacity - 2):
        queue.push(f"backlog-{i}", "high", 0.0)
    queue.push("low", "low", 0.0)
    for tick in range(horizon_ticks):
        now = tick * tick_s
        queue.push(f"high-{tick}", "high", now)
        batch = queue.pop_batch(now)
        assert batch is not None and len(batch) == 1
        if batch == ["low"]:
            return tick
    return None


def test_batching_aging_bounds_low_wait() -> None:
    aging_s = 0.1
    tick_s = 0.010
    capacity = 16
    served_at = run_starvation(aging_s, horizon_ticks=1000)
    assert served_at is not None
    # Bound: after max(2 * aging_s, max_wait_s) the low entry leaves within `capacity` pops, and
    # this loop pops one entry per tick.
    bound_ticks = math.ceil(2 * aging_s / tick_s) + capacity
    assert served_at <= bound_ticks
    # It cannot leave before it ranks with high entries, because high entries always wait.
    assert served_at >= math.floor(2 * aging_s / tick_s)


def test_batching_without_aging_starves_low() -> None:
    # The same stream with aging turned off never serves the low entry, so the bound above is the
    # work of aging.
    assert run_starvation(math.inf, horizon_ticks=1000) is None


def test_batching_capacity_backpressure() -> None:
    queue = make_queue(capacity=3)
    for i in range(3):
        queue.push(f"r{i}", "normal", 0.0)
    with pytest.raises(QueueFull) as excinfo:
        queue.push("r3", "high", 0.0)
    message = str(excinfo.value)
    assert "seg-a" in message
    assert "3" in message
    assert "retry" in message
    assert excinfo.value.capacity == 3
    assert len(queue) == 3
    queue.pop_batch(0.010)
    queue.push("r3", "high", 0.010)
    assert len(queue) == 1


def test_batching_capacity_frees_expired() -> None:
    queue = make_queue(capacity=2)
    queue.push("short", "normal", 0.0, deadline=0.5)
    queue.push("long", "normal", 0.0, deadline=9.0)
    queue.push("next", "normal", 0.6)
    assert queue.take_expired() == ["short"]
    assert len(queue) == 2


def test_batching_key_grouping() -> None:
    queue = make_queue(max_batch_size=3)
    queue.push("seq8-a", "normal", 0.0, key=("ids", 8))
    queue.push("seq16-a", "normal", 0.0, key=("ids", 16))
    queue.push("seq8-b", "normal", 0.0, key=("ids", 8))
    queue.push("seq16-b", "normal", 0.0, key=("ids", 16))
    queue.push("seq8-c", "normal", 0.0, key=("ids", 8))
    assert queue.pop_batch(0.0) == ["seq8-a", "seq8-b", "seq8-c"]
    assert queue.pop_batch(0.0) is None
    assert queue.pop_batch(0.010) == ["seq16-a", "seq16-b"]


def test_batching_ready_group_by_best_head() -> None:
    queue = make_queue(max_batch_size=2)
    queue.push("low-x", "low", 0.0, key="x")
    queue.push("high-y", "high", 0.001, key="y")
    queue.push("low-x2", "low", 0.002, key="x")
    # Group x is full and ready, group y waits for max_wait_s, so x runs first.
    assert queue.pop_batch(0.002) == ["low-x", "low-x2"]
    queue.push("low-x3", "low", 0.005, key="x")
    # Both ready at 0.016: the high head of y ranks first.
    assert queue.pop_batch(0.016) == ["high-y"]
    assert queue.pop_batch(0.016) == ["low-x3"]


def test_batching_expiry_reported() -> None:
    queue = make_queue()
    queue.push("keeps", "normal", 0.0, deadline=10.0)
    queue.push("expires", "normal", 0.0, deadline=0.005)
    assert queue.next_deadline(0.0) == pytest.approx(0.005)
    assert queue.pop_batch(0.006) is None
    assert queue.take_expired() == ["expires"]
    assert queue.take_expired() == []
    assert queue.pop_batch(0.010) == ["keeps"]


def test_batching_next_deadline_wakes_for_expiry() -> None:
    queue = make_queue(max_wait_s=1.0)
    queue.push("a", "normal", 0.0, deadline=0.3)
    assert queue.next_deadline(0.0) == pytest.approx(0.3)
    assert queue.next_deadline(0.3) == 0.3
    assert queue.take_expired() == ["a"]
    assert queue.next_deadline(0.3) is None


def test_batching_discard() -> None:
    queue = make_queue()
    queue.push("a", "normal", 0.0)
    queue.push("b", "normal", 0.0)
    assert queue.discard("a") is True
    assert queue.discard("a") is False
    assert queue.pop_batch(0.010) == ["b"]


def test_batching_force_pops_unready() -> None:
    queue = make_queue(max_wait_s=5.0)
    queue.push("a", "normal", 0.0)
    assert queue.pop_batch(0.0) is None
    assert queue.pop_batch(0.0, force=True) == ["a"]


def test_batching_drain_returns_all() -> None:
    queue = make_queue()
    queue.push("a", "low", 0.0, key=1)
    queue.push("b", "high", 0.0, key=2)
    assert queue.drain() == ["a", "b"]
    assert len(queue) == 0
    assert queue.next_deadline(0.0) is None


def test_batching_depth_by_priority() -> None:
    queue = make_queue()
    queue.push("a", "low", 0.0)
    queue.push("b", "high", 0.0)
    queue.push("c", "high", 0.0)
    assert queue.depth_by_priority() == {"high": 2, "normal": 0, "low": 1}


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_batch_size", 0), ("capacity", -1), ("max_wait_s", -0.1), ("aging_s", 0.0)],
)
def test_batching_rejects_bad_params(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        make_queue(**{field: value})


def test_batching_rejects_bad_priority() -> None:
    queue = make_queue()
    with pytest.raises(ValueError, match="urgent"):
        queue.push("a", "urgent", 0.0)
    assert len(queue) == 0
