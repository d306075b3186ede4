"""Tests of the actor runtime (mailboxes, supervisor restarts and shutdown) and the lag monitor."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import pytest

from nodeagent.actors import (
    Actor,
    ActorState,
    ActorStopped,
    EscalationError,
    MailboxFull,
    RestartPolicy,
    Supervisor,
)
from nodeagent.looplag import LagTracker, LoopLagMonitor

FAST = RestartPolicy(backoff_min_s=0.05, backoff_max_s=0.2, max_restarts=3, window_s=10.0)


@dataclass(frozen=True)
class Note:
    text: str


@dataclass(frozen=True)
class Other:
    value: int


class Recorder(Actor[Note]):
    """Records handled notes; raises on "boom"; blocks while `gate` is clear."""

    accepts = (Note,)

    def __init__(self, name: str, *, mailbox_size: int = 8, log: list[str] | None = None) -> None:
        super().__init__(name, mailbox_size=mailbox_size)
        self.handled: list[str] = []
        self.starts: list[float] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.log = log if log is not None else []

    async def on_start(self) -> None:
        self.starts.append(time.monotonic())
        self.log.append(f"start {self.name}")

    async def on_stop(self) -> None:
        self.log.append(f"stop {self.name}")

    async def handle(self, message: Note) -> None:
        await self.gate.wait()
        if message.text == "boom":
            raise RuntimeError(f"bad note in {self.name}")
        self.handled.append(message.text)


async def _wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.01)


async def test_actor_handles_messages_in_order() -> None:
    actor = Recorder("rec")
    async with Supervisor("t") as supervisor:
        supervisor.start(actor)
        for index in range(5):
            await actor.send(Note(str(index)))
        await _wait_for(lambda: len(actor.handled) == 5)
    assert actor.handled == ["0", "1", "2", "3", "4"]
    assert actor.state is ActorState.STOPPED


async def test_actor_rejects_wrong_message_type() -> None:
    actor = Recorder("rec")
    with pytest.raises(TypeError) as caught:
        actor.send_nowait(Other(1))  # type: ignore[arg-type]
    assert "'rec' does not accept Other" in str(caught.value)
    assert "Note" in str(caught.value)


async def test_mailbox_full_raises_on_send_nowait() -> None:
    actor = Recorder("slow", mailbox_size=2)
    actor.send_nowait(Note("a"))
    actor.send_nowait(Note("b"))
    with pytest.raises(MailboxFull) as caught:
        actor.send_nowait(Note("c"))
    assert "'slow'" in str(caught.value)
    assert "(2 messages)" in str(caught.value)
    assert actor.queued == 2


async def test_mailbox_send_applies_backpressure() -> None:
    actor = Recorder("slow", mailbox_size=1)
    actor.gate.clear()
    async with Supervisor("t") as supervisor:
        supervisor.start(actor)
        await actor.send(Note("first"))
        await _wait_for(lambda: actor.queued == 0)  # taken by handle(), which blocks on the gate
        await actor.send(Note("second"))  # fills the mailbox
        with pytest.raises(MailboxFull) as caught:
            await actor.send(Note("third"), timeout_s=0.05)
        assert "after waiting 0.05 s" in str(caught.value)

        waiting = asyncio.ensure_future(actor.send(Note("fourth")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        actor.gate.set()
        await asyncio.wait_for(waiting, 2.0)
        await _wait_for(lambda: len(actor.handled) == 3)
    assert actor.handled == ["first", "second", "fourth"]


async def test_supervisor_restarts_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="nodeagent.actors")
    actor = Recorder("flaky")
    async with Supervisor("node-a", policy=FAST) as supervisor:
        supervisor.start(actor)
        actor.send_nowait(Note("boom"))
        actor.send_nowait(Note("boom"))
        actor.send_nowait(Note("after"))
        await _wait_for(lambda: actor.handled == ["after"])
        status = supervisor.status()[0]

    assert len(actor.starts) == 3
    first_gap = actor.starts[1] - actor.starts[0]
    second_gap = actor.starts[2] - actor.starts[1]
    assert first_gap >= 0.05
    assert second_gap >= 0.10  # doubled
    assert status.restarts == 2
    assert status.last_error == "RuntimeError: bad note in flaky"
    crash_lines = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crash_lines) == 2
    assert "actor flaky crashed (RuntimeError: bad note in flaky); restart 1 in 0.05 s" in \
        crash_lines[0].getMessage()
    assert "node-a" in crash_lines[0].getMessage()
    assert crash_lines[0].exc_info is not None


def test_restart_policy_backoff_is_capped() -> None:
    policy = RestartPolicy(backoff_min_s=0.1, backoff_max_s=1.0)
    delays = [policy.delay_s(n) for n in range(1, 8)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert policy.delay_s(10_000) == 1.0


async def test_supervisor_escalates_after_max_crashes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="nodeagent.actors")
    escalations: list[EscalationError] = []
    policy = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.02, max_restarts=2, window_s=30)
    actor = Recorder("doomed", mailbox_size=8)
    healthy = Recorder("healthy")
    async with Supervisor("node-a", policy=policy, on_escalate=escalations.append) as supervisor:
        supervisor.start(healthy)
        supervisor.start(actor)
        for _ in range(3):
            actor.send_nowait(Note("boom"))
        with pytest.raises(EscalationError) as caught:
            await asyncio.wait_for(supervisor.wait(), 5.0)
        assert actor.state is ActorState.FAILED
        # The other actor keeps running; escalation is the owner's decision.
        await healthy.send(Note("still here"))
        await _wait_for(lambda: healthy.handled == ["still here"])

    assert "'doomed' crashed 3 times within 30 s" in str(caught.value)
    assert escalations == [caught.value]
    with pytest.raises(ActorStopped):
        actor.send_nowait(Note("late"))
    assert any("giving up" in r.getMessage() for r in caplog.records)


async def test_supervisor_stops_in_reverse_order() -> None:
    log: list[str] = []
    actors = [Recorder(name, log=log) for name in ("links", "membership", "http")]
    supervisor = Supervisor("t")
    for actor in actors:
        supervisor.start(actor)
    await _wait_for(lambda: len(log) == 3)
    await supervisor.stop()
    assert log[3:] == ["stop http", "stop membership", "stop links"]
    assert all(actor.state is ActorState.STOPPED for actor in actors)
    await supervisor.stop()  # a second call is a no-op
    assert len(log) == 6


async def test_supervisor_leaves_no_tasks() -> None:
    before = asyncio.all_tasks()
    async with Supervisor("t") as supervisor:
        for index in range(4):
            supervisor.start(Recorder(f"a{index}"))
        await asyncio.sleep(0.01)
        assert len(asyncio.all_tasks() - before) == 4
    assert asyncio.all_tasks() - before == set()


class StubbornStop(Actor[Note]):
    accepts = (Note,)

    def __init__(self) -> None:
        super().__init__("stubborn")
        self.cleanup_cut = False

    async def on_stop(self) -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cleanup_cut = True
            raise


async def test_supervisor_bounds_slow_cleanup(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.actors")
    actor = StubbornStop()
    supervisor = Supervisor("t", stop_timeout_s=0.1)
    supervisor.start(actor)
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await supervisor.stop()
    assert time.monotonic() - started < 2.0
    assert actor.cleanup_cut
    assert any("did not stop within 0.1 s" in r.getMessage() for r in caplog.records)


class FailingStart(Actor[Note]):
    accepts = (Note,)

    def __init__(self) -> None:
        super().__init__("failing-start")
        self.stops = 0

    async def on_start(self) -> None:
        raise OSError("port in use")

    async def on_stop(self) -> None:
        self.stops += 1


async def test_supervisor_runs_on_stop_after_failed_start() -> None:
    actor = FailingStart()
    policy = RestartPolicy(backoff_min_s=0.01, backoff_max_s=0.01, max_restarts=1, window_s=30)
    async with Supervisor("t", policy=policy) as supervisor:
        supervisor.start(actor)
        with pytest.raises(EscalationError):
            await asyncio.wait_for(supervisor.wait(), 5.0)
    assert actor.stops == 2
    assert supervisor.escalation is not None
    assert isinstance(supervisor.escalation.last_error, OSError)


class OneShot(Actor[Note]):
    accepts = (Note,)

    async def run(self) -> None:
        return None


async def test_supervisor_does_not_restart_finished_actor() -> None:
    actor = OneShot("one-shot")
    async with Supervisor("t") as supervisor:
        supervisor.start(actor)
        await _wait_for(lambda: actor.state is ActorState.FINISHED)
        await asyncio.sleep(0.05)
        assert supervisor.status()[0].restarts == 0
        assert supervisor.status()[0].state == "finished"


async def test_supervisor_rejects_start_twice() -> None:
    actor = Recorder("rec")
    async with Supervisor("t") as supervisor:
        supervisor.start(actor)
        with pytest.raises(RuntimeError) as caught:
            supervisor.start(actor)
        assert "already supervised" in str(caught.value)


# -- loop lag ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("lag_s", "scale"), [
    (0.0, 1.0), (0.1, 1.0), (0.125, 1.0), (0.25, 2.0), (0.5, 4.0), (1.0, 8.0), (10.0, 10.0),
])
def test_lag_tracker_scale_table(lag_s: float, scale: float) -> None:
    tracker = LagTracker(warn_s=0.25, window_s=5.0, max_scale=10.0)
    tracker.record(100.0, lag_s)
    assert tracker.timeout_scale(100.0) == pytest.approx(scale)
    assert tracker.is_lagging(100.0) is (lag_s >= 0.25)


def test_lag_tracker_window_expires_old_stalls() -> None:
    tracker = LagTracker(warn_s=0.25, window_s=5.0)
    tracker.record(0.0, 1.0)
    tracker.record(1.0, 0.01)
    assert tracker.recent_lag_s(4.9) == 1.0
    assert tracker.is_lagging(4.9)
    assert tracker.recent_lag_s(5.5) == 0.01
    assert not tracker.is_lagging(5.5)
    snapshot = tracker.snapshot(5.5)
    assert snapshot.worst_lag_s == 1.0
    assert snapshot.current_lag_s == 0.01
    assert snapshot.samples == 2


def test_lag_tracker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        LagTracker(warn_s=0.0)
    with pytest.raises(ValueError):
        LagTracker(warn_s=0.1, max_scale=0.5)


async def test_loop_lag_monitor_detects_blocked_loop(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.looplag")
    monitor = LoopLagMonitor(warn_s=0.05, interval_s=0.02, window_s=5.0, warn_every_s=30.0,
                             node_id="node-a")
    async with Supervisor("t") as supervisor:
        supervisor.start(monitor)
        await asyncio.sleep(0.1)
        assert not monitor.is_lagging()
        assert monitor.timeout_scale() == 1.0

        time.sleep(0.2)  # blocks the event loop on purpose
        await asyncio.sleep(0.05)
        snapshot = monitor.snapshot()
        assert snapshot.recent_max_lag_s >= 0.15
        assert monitor.is_lagging()
        assert monitor.timeout_scale() > 2.0

        time.sleep(0.2)  # a second stall within warn_every_s is not logged again
        await asyncio.sleep(0.05)

    warnings = [r.getMessage() for r in caplog.records if "event loop lagged" in r.getMessage()]
    assert len(warnings) == 1
    assert "node node-a" in warnings[0]
