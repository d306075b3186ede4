"""Event-loop lag monitor: a lagging agent widens its own timeouts instead of accusing peers.

Problem: every timeout in the agent (heartbeat silence, election, hop acknowledgement) is measured
on this agent's event loop. When the loop is blocked (a long synchronous call, garbage
collection, CPU starvation from model compute on a small board), incoming heartbeats sit unread
in socket buffers and timers fire late. Without a correction, the blocked agent concludes that its
healthy peers went silent and declares them dead.

Rule chosen: a task sleeps a fixed interval and measures how late it wakes up (the overshoot is
the lag). `LagTracker`, a pure core, keeps the samples of the last `window_s` seconds and reports
the largest one as the recent lag, so that a single stall affects decisions for a while after it
ends (heartbeats that arrived during the stall are processed late, in a burst). From that lag:
- `is_lagging()` is true at or above `warn_s`; the failure detector must not declare anyone dead
  while it is true;
- `timeout_scale()` grows from 1.0 (lag at most half of `warn_s`) linearly to `max_scale`
  (capped), and callers multiply their timeouts by it: a lag of `warn_s` doubles them.

Options rejected: measuring with `loop.slow_callback_duration` (debug mode only, and it reports
single callbacks, not starvation); a thread watching the loop (it reports the stall while it
happens, but the decisions that matter are taken on the loop anyway, after the stall).

Defaults: a 0.1 s sampling interval (ten wakeups a second, negligible cost), a 5 s window (long
enough to cover the burst of delayed heartbeats after a stall at the default 0.5 s interval), and
at most one WARNING per 30 s with the count of suppressed ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from nodeagent.actors import Actor

logger = logging.getLogger(__name__)

__all__ = ["LagTracker", "LoopLagMonitor", "LagSnapshot"]


@dataclass(frozen=True)
class LagSnapshot:
    """Lag statistics for status output, in seconds."""

    current_lag_s: float
    recent_max_lag_s: float
    worst_lag_s: float
    samples: int
    timeout_scale: float
    lagging: bool


class LagTracker:
    """Pure record of lag samples over a sliding window; no I/O and no clock of its own."""

    def __init__(self, *, warn_s: float, window_s: float = 5.0, max_scale: float = 10.0) -> None:
        if warn_s <= 0:
            raise ValueError(f"warn_s is {warn_s}; it must be above 0")
        if window_s <= 0:
            raise ValueError(f"window_s is {window_s}; it must be above 0")
        if max_scale < 1.0:
            raise ValueError(f"max_scale is {max_scale}; it must be at least 1")
        self.warn_s = warn_s
        self.window_s = window_s
        self.max_scale = max_scale
        self._samples: collections.deque[tuple[float, float]] = collections.deque()
        self._current_s = 0.0
        self._worst_s = 0.0
        self._count = 0

    def record(self, now: float, lag_s: float) -> None:
        """Add one sample taken at monotonic time `now`; negative lags count as zero."""
        lag_s = max(0.0, lag_s)
        self._samples.append((now, lag_s))
        self._current_s = lag_s
        self._worst_s = max(self._worst_s, lag_s)
        self._count += 1
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def recent_lag_s(self, now: float) -> float:
        """Return the largest lag sampled within the window ending at `now`."""
        self._expire(now)
        return max((lag for _, lag in self._samples), default=0.0)

    def is_lagging(self, now: float) -> bool:
        """Return True while the recent lag is at or above `warn_s`."""
        return self.recent_lag_s(now) >= self.warn_s

    def timeout_scale(self, now: float) -> float:
        """Return the factor for timeouts: 1.0 up to a lag of warn_s/2, then 2 * lag / warn_s."""
        scale = 2.0 * self.recent_lag_s(now) / self.warn_s
        return min(self.max_scale, max(1.0, scale))

    def snapshot(self, now: float) -> LagSnapshot:
        """Return the statistics at `now`."""
        return LagSnapshot(
            current_lag_s=self._current_s,
            recent_max_lag_s=self.recent_lag_s(now),
            worst_lag_s=self._worst_s,
            samples=self._count,
            timeout_scale=self.timeout_scale(now),
            lagging=self.is_lagging(now),
        )


class LoopLagMonitor(Actor[object]):
    """Actor that samples its own event loop's lag; run it under the supervisor.

    Other components call `timeout_scale()` and `is_lagging()` at decision time.
    """

    def __init__(self, *, warn_s: float, interval_s: float = 0.1, window_s: float = 5.0,
                 max_scale: float = 10.0, warn_every_s: float = 30.0, node_id: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("looplag", mailbox_size=1)
        if interval_s <= 0:
            raise ValueError(f"interval_s is {interval_s}; it must be above 0")
        self.interval_s = interval_s
        self.warn_every_s = warn_every_s
        self.node_id = node_id
        self.tracker = LagTracker(warn_s=warn_s, window_s=window_s, max_scale=max_scale)
        self._clock = clock
        self._last_warning_at: float | None = None
        self._suppressed = 0

    async def run(self) -> None:
        """Sleep `interval_s` repeatedly and record how late each wakeup was."""
        while True:
            started = self._clock()
            await asyncio.sleep(self.interval_s)
            now = self._clock()
            lag_s = now - started - self.interval_s
            self.tracker.record(now, lag_s)
            if lag_s >= self.tracker.warn_s:
                self._warn(now, lag_s)

    def _warn(self, now: float, lag_s: float) -> None:
        if self._last_warning_at is not None and now - self._last_warning_at < self.warn_every_s:
            self._suppressed += 1
            logger.debug("node %s: event loop lagged %.3f s", self.node_id, lag_s)
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._last_warning_at = now
        logger.warning("node %s: event loop lagged %.3f s (warning threshold %.3f s, %d more "
                       "since the last warning); timeouts are widened x%.1f and no peer is "
                       "declared dead meanwhile", self.node_id, lag_s, self.tracker.warn_s,
                       suppressed, self.tracker.timeout_scale(now))

    @property
    def lag_s(self) -> float:
        """The most recent lag sample."""
        return self.tracker.snapshot(self._clock()).current_lag_s

    def timeout_scale(self) -> float:
        """Return the factor by which callers should multiply their timeouts now."""
        return self.tracker.timeout_scale(self._clock())

    def is_lagging(self) -> bool:
        """Return True while this agent must not accuse peers of being dead."""
        return self.tracker.is_lagging(self._clock())

    def snapshot(self) -> LagSnapshot:
        """Return the lag statistics now."""
        return self.tracker.snapshot(self._clock())
