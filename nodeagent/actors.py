"""A small actor runtime: bounded mailboxes, typed messages and a restarting supervisor.

Problem: the agent runs a dozen concurrent components (discovery, peer links, membership,
heartbeats, election, segment runners, the admin endpoint) for months. A component that raises
must be noticed, logged and restarted, never lost silently. A slow component must push back on
its senders instead of queueing without bound. Shutdown must stop components in a known order.

Options rejected:
- bare `asyncio.create_task` per component: an exception surfaces only when the task is garbage
  collected, and nothing bounds or stops the tasks in order;
- one `asyncio.TaskGroup` for all components: the first crash cancels every sibling, which turns
  one bad peer message into a full agent restart;
- unbounded `asyncio.Queue` mailboxes: a stalled consumer grows memory until the kernel kills the
  process.

Rule chosen:
- An `Actor` owns a bounded mailbox (`asyncio.Queue(maxsize)`) and declares the message types it
  accepts. `send` waits for space (backpressure, optionally with a timeout); `send_nowait` raises
  `MailboxFull` at once, for callers that must not block (protocol callbacks, timers).
- A `Supervisor` creates and owns one runner task per actor and awaits all of them on `stop`.
  A runner calls `on_start`, `run` and `on_stop`; when `run` raises, the runner logs the error with
  its traceback and restarts the actor after an exponential backoff (`backoff_min_s` doubled per
  recent crash, capped at `backoff_max_s`). More than `max_restarts` crashes within `window_s`
  marks the actor failed and escalates: the supervisor's `wait()` raises `EscalationError`, so the
  agent can exit non-zero and let systemd restart the whole process.
- Restarts keep the mailbox, so queued messages survive; the message being handled at the crash
  is dropped (its handler raised on it, and retrying a poison message would crash again).
- `stop()` stops actors in reverse start order, so an actor started after its dependencies stops
  before them. Each actor gets `stop_timeout_s` to finish `on_stop` after its cancellation.

Defaults: backoff 0.1 s to 10 s, five crashes in 60 s. The first restart is fast enough that a
transient error is invisible to peers (below the 2 s default suspicion time), and five crashes a
minute is far above what a healthy component does.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "Actor", "ActorState", "ActorStatus", "ActorStopped", "EscalationError", "MailboxFull",
    "RestartPolicy", "Supervisor",
]

MessageT = TypeVar("MessageT")


class MailboxFull(RuntimeError):
    """A message was not delivered because the actor's mailbox stayed full."""

    def __init__(self, actor_name: str, capacity: int, message: object,
                 timeout_s: float | None = None) -> None:
        self.actor_name = actor_name
        self.capacity = capacity
        waited = f" after waiting {timeout_s} s" if timeout_s is not None else ""
        super().__init__(f"mailbox of actor {actor_name!r} is full ({capacity} messages){waited}; "
                         f"dropped {type(message).__name__}. The actor is slower than its "
                         "senders: raise its mailbox size or slow the senders down")


class ActorStopped(RuntimeError):
    """A message was sent to an actor that is stopped or has failed permanently."""


class EscalationError(RuntimeError):
    """An actor crashed more often than its restart policy allows."""

    def __init__(self, actor_name: str, crashes: int, window_s: float,
                 last_error: BaseException) -> None:
        self.actor_name = actor_name
        self.last_error = last_error
        super().__init__(f"actor {actor_name!r} crashed {crashes} times within {window_s} s; "
                         f"last error: {type(last_error).__name__}: {last_error}")


class ActorState(enum.Enum):
    """Lifecycle state of a supervised actor."""

    NEW = "new"
    RUNNING = "running"
    BACKOFF = "backoff"
    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class RestartPolicy:
    """Restart rules that a supervisor applies to a crashed actor."""

    backoff_min_s: float = 0.1
    """Delay before the first restart after a crash."""
    backoff_max_s: float = 10.0
    """Cap of the delay, which doubles with each crash inside the window."""
    max_restarts: int = 5
    """Crashes tolerated within `window_s`; one more escalates."""
    window_s: float = 60.0
    """Sliding window, in seconds of monotonic time, over which crashes are counted."""

    def delay_s(self, recent_crashes: int) -> float:
        """Return the backoff before restarting after the `recent_crashes`-th crash (1-based)."""
        exponent = max(0, recent_crashes - 1)
        return min(self.backoff_max_s, self.backoff_min_s * (2.0 ** min(exponent, 62)))


@dataclass(frozen=True)
class ActorStatus:
    """A snapshot of one actor for status output."""

    name: str
    state: str
    restarts: int
    mailbox_size: int
    mailbox_capacity: int
    last_error: str | None


class Actor(Generic[MessageT]):
    """Base class of a component with a bounded mailbox.

    Subclasses set `accepts` to the message classes they handle and override `handle`, or
    override `run` for a component that is driven by something other than its mailbox (a timer or
    a socket). `on_start` and `on_stop` run around every (re)start of `run`. `on_stop` runs after a
    crash or cancellation too, including one inside `on_start`, so it must release whatever part
    of its resources `on_start` acquired.
    """

    accepts: ClassVar[tuple[type, ...]] = (object,)
    """Message classes this actor handles; `send` raises TypeError for any other."""

    def __init__(self, name: str, *, mailbox_size: int = 64) -> None:
        if mailbox_size < 1:
            raise ValueError(f"mailbox_size of actor {name!r} is {mailbox_size}; "
                             "it must be at least 1")
        self.name = name
        self.mailbox_size = mailbox_size
        self._mailbox: asyncio.Queue[MessageT] = asyncio.Queue(maxsize=mailbox_size)
        self._state = ActorState.NEW

    # -- sending ------------------------------------------------------------------------------

    def send_nowait(self, message: MessageT) -> None:
        """Queue `message` without waiting; raise `MailboxFull` when the mailbox is full."""
        self._check_message(message)
        try:
            self._mailbox.put_nowait(message)
        except asyncio.QueueFull:
            raise MailboxFull(self.name, self.mailbox_size, message) from None

    async def send(self, message: MessageT, *, timeout_s: float | None = None) -> None:
        """Queue `message`, waiting for space (backpressure).

        With `timeout_s`, raise `MailboxFull` when no space opened within that time.
        """
        self._check_message(message)
        if timeout_s is None:
            await self._mailbox.put(message)
            return
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation of
        # the caller that arrives just as the put completes.
        try:
            async with asyncio.timeout(timeout_s):
                await self._mailbox.put(message)
        except TimeoutError:
            raise MailboxFull(self.name, self.mailbox_size, message, timeout_s) from None

    def _check_message(self, message: object) -> None:
        if self._state in (ActorState.FAILED, ActorState.STOPPED):
            raise ActorStopped(f"actor {self.name!r} is {self._state.value}; "
                               f"{type(message).__name__} was not delivered")
        if not isinstance(message, self.accepts):
            accepted = ", ".join(cls.__name__ for cls in self.accepts)
            raise TypeError(f"actor {self.name!r} does not accept {type(message).__name__}; "
                            f"accepted: {accepted}")

    # -- behaviour, overridden by subclasses --------------------------------------------------

    async def on_start(self) -> None:
        """Acquire resources before `run`; called on every (re)start."""

    async def on_stop(self) -> None:
        """Release resources after `run` ends, crashes or is cancelled."""

    async def handle(self, message: MessageT) -> None:
        """Process one message. The default raises, so a subclass must override it or `run`."""
        raise NotImplementedError(f"actor {self.name!r} has no handler for "
                                  f"{type(message).__name__}")

    async def run(self) -> None:
        """Take messages from the mailbox and handle them one at a time, forever."""
        while True:
            message = await self._mailbox.get()
            await self.handle(message)

    # -- introspection ------------------------------------------------------------------------

    @property
    def state(self) -> ActorState:
        """Lifecycle state, maintained by the supervisor."""
        return self._state

    @property
    def queued(self) -> int:
        """Number of messages waiting in the mailbox."""
        return self._mailbox.qsize()


class _Supervised:
    """Bookkeeping for one actor under a supervisor."""

    def __init__(self, actor: Actor[Any], policy: RestartPolicy) -> None:
        self.actor = actor
        self.policy = policy
        self.task: asyncio.Task[None] | None = None
        self.crash_times: collections.deque[float] = collections.deque()
        self.restarts = 0
        self.last_error: BaseException | None = None


class Supervisor:
    """Owner of every actor task: restarts crashed actors and stops all in reverse order.

    Use it as an async context manager; leaving the block stops every actor::

        async with Supervisor("agent node-a") as supervisor:
            supervisor.start(discovery)
            supervisor.start(membership)
            await supervisor.wait()   # returns on stop(), raises EscalationError on escalation
    """

    def __init__(self, name: str, *, policy: RestartPolicy | None = None,
                 stop_timeout_s: float = 5.0,
                 on_escalate: Callable[[EscalationError], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.policy = policy or RestartPolicy()
        self.stop_timeout_s = stop_timeout_s
        self._on_escalate = on_escalate
        self._clock = clock
        self._children: list[_Supervised] = []
        self._escalation: EscalationError | None = None
        self._done = asyncio.Event()
        self._stopping = False

    async def __aenter__(self) -> Supervisor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- starting -----------------------------------------------------------------------------

    def start(self, actor: Actor[Any], *, policy: RestartPolicy | None = None) -> None:
        """Start `actor` under this supervisor. Must be called from the running event loop."""
        if self._stopping:
            raise RuntimeError(f"supervisor {self.name!r} is stopping; cannot start actor "
                               f"{actor.name!r}")
        if any(child.actor is actor for child in self._children):
            raise RuntimeError(f"actor {actor.name!r} is already supervised by {self.name!r}")
        child = _Supervised(actor, policy or self.policy)
        # The task is stored in `child.task` and awaited by stop(); it is never left unowned.
        child.task = asyncio.get_running_loop().create_task(
            self._run_child(child), name=f"{self.name}/{actor.name}")
        self._children.append(child)
        logger.info("supervisor %s: started actor %s", self.name, actor.name)

    async def _run_child(self, child: _Supervised) -> None:
        actor = child.actor
        while True:
            actor._state = ActorState.RUNNING
            try:
                await self._run_once(actor)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay_s = self._record_crash(child, exc)
                if delay_s is None:
                    return
                # A stop() during the backoff cancels this sleep, which ends the runner.
                await asyncio.sleep(delay_s)
                continue
            actor._state = ActorState.FINISHED
            logger.info("supervisor %s: actor %s finished", self.name, actor.name)
            return

    async def _run_once(self, actor: Actor[Any]) -> None:
        try:
            await actor.on_start()
            await actor.run()
        finally:
            # on_stop runs on normal return, on a crash and on cancellation. A cancellation is
            # delivered once, so the cleanup runs to its end unless stop() cancels a second time
            # after stop_timeout_s.
            await actor.on_stop()

    def _record_crash(self, child: _Supervised, exc: Exception) -> float | None:
        """Log a crash and return the backoff before the restart, or None when it escalated."""
        actor = child.actor
        now = self._clock()
        child.last_error = exc
        child.crash_times.append(now)
        while child.crash_times and now - child.crash_times[0] > child.policy.window_s:
            child.crash_times.popleft()
        recent = len(child.crash_times)

        if recent > child.policy.max_restarts:
            actor._state = ActorState.FAILED
            escalation = EscalationError(actor.name, recent, child.policy.window_s, exc)
            logger.error("supervisor %s: actor %s crashed %d times within %.0f s; giving up and "
                         "escalating", self.name, actor.name, recent, child.policy.window_s,
                         exc_info=exc)
            self._escalate(escalation)
            return None

        delay = child.policy.delay_s(recent)
        child.restarts += 1
        actor._state = ActorState.BACKOFF
        logger.error("supervisor %s: actor %s crashed (%s: %s); restart %d in %.2f s",
                     self.name, actor.name, type(exc).__name__, exc, child.restarts, delay,
                     exc_info=exc)
        return delay

    def _escalate(self, escalation: EscalationError) -> None:
        if self._escalation is None:
            self._escalation = escalation
        self._done.set()
        if self._on_escalate is not None:
            try:
                self._on_escalate(escalation)
            except Exception:
                logger.exception("supervisor %s: escalation callback failed", self.name)

    # -- waiting and stopping -----------------------------------------------------------------

    async def wait(self) -> None:
        """Wait until `stop()` is called or an actor escalates; raise `EscalationError` then."""
        await self._done.wait()
        if self._escalation is not None:
            raise self._escalation

    @property
    def escalation(self) -> EscalationError | None:
        """The first escalation, or None while every actor is within its restart policy."""
        return self._escalation

    async def stop(self) -> None:
        """Stop every actor in reverse start order and await its task. Safe to call twice."""
        if self._stopping:
            return
        self._stopping = True
        logger.info("supervisor %s: stopping %d actors", self.name, len(self._children))
        for child in reversed(self._children):
            await self._stop_child(child)
        self._done.set()
        logger.info("supervisor %s: stopped", self.name)

    async def _stop_child(self, child: _Supervised) -> None:
        task = child.task
        actor = child.actor
        if task is None:
            return
        if not task.done():
            task.cancel(f"supervisor {self.name} is stopping")
            done, _ = await asyncio.wait({task}, timeout=self.stop_timeout_s)
            if not done:
                logger.warning("supervisor %s: actor %s did not stop within %.1f s; cancelling "
                               "again and waiting", self.name, actor.name, self.stop_timeout_s)
                task.cancel(f"supervisor {self.name} is stopping (second request)")
                await asyncio.wait({task})
        # Retrieve the outcome so that asyncio never reports it as unretrieved.
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervisor %s: runner of actor %s ended with an error", self.name,
                         actor.name, exc_info=task.exception())
        if actor._state is not ActorState.FAILED:
            actor._state = ActorState.STOPPED
        logger.info("supervisor %s: stopped actor %s", self.name, actor.name)

    # -- introspection ------------------------------------------------------------------------

    def status(self) -> list[ActorStatus]:
        """Return one snapshot per actor, in start order."""
        return [
            ActorStatus(
                name=child.actor.name,
                state=child.actor.state.value,
                restarts=child.restarts,
                mailbox_size=child.actor.queued,
                mailbox_capacity=child.actor.mailbox_size,
                last_error=(f"{type(child.last_error).__name__}: {child.last_error}"
                            if child.last_error is not None else None),
            )
            for child in self._children
        ]
