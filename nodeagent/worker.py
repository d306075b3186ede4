"""Segment worker: runs micro-batches of one segment on a thread, off the event loop.

Problem
-------
A segment's forward pass takes milliseconds to seconds of CPU. Run on the event loop, it would stall
heartbeats, acknowledgements and every other request of the agent. Run one request at a time, it
would waste the throughput that batching gives (see `nodeagent.batching`). The worker accepts
requests from asyncio tasks, batches the compatible ones, runs each batch on its own OS thread and
hands every request its own slice of the outputs.

Why a thread and not a process
------------------------------
torch releases the GIL inside its kernels, so a thread computes in parallel with the event loop.
A thread also shares the model weights and the activation tensors with the agent, so nothing is
copied or serialized on the way in or out. A worker process would isolate crashes and could be
killed when wedged, but it would hold a second copy of the weights and copy every activation
through a pipe or shared memory on each hop. The cost of the thread: a wedged `run_fn` cannot be
killed. The worker reports it (`is_wedged`), `close` fails the stuck requests at once, and the
agent is expected to mark itself degraded so that its segments are drained and placed elsewhere.
Python code in `run_fn` (hooks, control flow) does hold the GIL, so the loop can lag by about the
interpreter's switch interval (5 ms by default). Running MiniLM in batches of 8 on the worker, a 5 ms
ticker on the loop saw at most 4.3 ms of lag (torch 2.13.0 CPU, 2-core host, measured once).

Torch threads
-------------
Checked with torch 2.13.0 (CPU build, OpenMP backend) by reading `torch.get_num_threads()` on
several threads: `torch.set_num_threads(n)` called on a thread sets the intra-op thread count for that calling thread and the default for threads that
start later, while threads that already ran torch code keep their count. Each worker therefore calls
it first thing on its own thread, and each worker's kernels run on a separate OpenMP team of
`torch_threads` threads. One agent process runs one such team per worker, so the agent should size
`torch_threads` times the number of workers to fit its cores (the agent's `runtime.torch_threads`
setting, 1 by default). The call also changes the default for threads started afterwards, so every
worker of one agent should use the same value. The worker logs the previous and the new value.

Batching and splitting
----------------------
Requests of one batch share a batch key: name, dtype, device and non-batch shape of every input.
The worker concatenates every input on dim 0, calls `run_fn` once under `torch.no_grad()`,
and splits every output whose dim 0 equals the batch's total rows by each request's row count.
An output with no batch dimension (0-d, or dim 0 of another size) is cloned to every request. Names
listed in `unbatched_outputs` are always cloned, for an output whose dim 0 equals the row count by
chance. Each request gets views into the batch's output storage, not copies.

Failures
--------
When a batch of several requests raises, the worker logs the error and runs each request of that
batch alone, so one bad input fails only its own request (`SegmentRunError`). The retry costs one
extra run per request of the failed batch. A request completes exactly once: with its outputs, a
`SegmentRunError`, `DeadlineExceeded` (its deadline passed while queued or running),
`WorkerClosed`, or the `QueueFull` raised at submit time. Cancelling the awaiting task removes the
request from the queue.

Deadlines are in `time.monotonic()` seconds of this process. A caller that receives a deadline from
another machine converts the remaining time to this clock first.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch

from nodeagent.batching import (
    DEFAULT_AGING_S,
    DEFAULT_CAPACITY,
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_WAIT_S,
    BatchQueue,
    Priority,
    QueueFull,
)

logger = logging.getLogger(__name__)

RunFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

__all__ = [
    "DeadlineExceeded",
    "QueueFull",
    "RunFn",
    "SegmentRunError",
    "SegmentWorker",
    "WorkerClosed",
    "WorkerError",
    "WorkerStats",
]


class WorkerError(Exception):
    """Base class of the errors that `SegmentWorker.submit` raises for one request."""


class SegmentRunError(WorkerError):
    """`run_fn` raised, or returned something other than a dict of tensors, for this request."""

    def __init__(self, segment: str, request_id: str, cause: BaseException) -> None:
        self.segment = segment
        self.request_id = request_id
        super().__init__(
            f"segment {segment!r} failed on request {request_id!r}: "
            f"{type(cause).__name__}: {cause}"
        )


class DeadlineExceeded(WorkerError, TimeoutError):
    """The request's deadline passed before its outputs were ready."""

    def __init__(self, segment: str, request_id: str, where: str) -> None:
        self.segment = segment
        self.request_id = request_id
        super().__init__(
            f"request {request_id!r} passed its deadline {where} in segment {segment!r}; "
            "retry with a longer deadline or on a less loaded replica"
        )


class WorkerClosed(WorkerError):
    """The worker was closed before the request completed."""

    def __init__(self, segment: str, request_id: str) -> None:
        self.segment = segment
        self.request_id = request_id
        super().__init__(
            f"worker of segment {segment!r} is closed; request {request_id!r} was not completed "
            "here, so send it to another replica"
        )


@dataclass(frozen=True, slots=True)
class WorkerStats:
    """Snapshot of one worker's counters, read by the metrics layer."""

    segment: str
    queue_depth: int
    queue_depth_by_priority: dict[str, int]
    running: int  # requests in the batch being run now
    processed: int  # requests completed with outputs
    errors: int  # requests failed with SegmentRunError
    expired: int  # requests failed with DeadlineExceeded
    rejected: int  # submits refused with QueueFull
    cancelled: int  # requests whose awaiting task was cancelled
    batches: int  # batches taken from the queue and run
    split_retries: int  # failed batches rerun one request at a time
    busy_s: float  # seconds spent running batches since the worker started
    batch_size_histogram: dict[int, int]  # requests per batch -> number of batches
    oldest_inflight_age_s: float
    current_run_age_s: float


@dataclass(slots=True, eq=False)
class _Request:
    request_id: str
    tensors: dict[str, torch.Tensor]
    rows: int
    submitted_at: float
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    # Exactly one of the two receives the result: the future of `submit`, or the callback of
    # `submit_nowait`, called on `loop` with (outputs, None) or (None, error).
    future: asyncio.Future[dict[str, torch.Tensor]] | None
    callback: Callable[[dict[str, torch.Tensor] | None, BaseException | None], None] | None = None
    timer: asyncio.TimerHandle | None = None
    completed: bool = False
    delivered: bool = False


@dataclass(slots=True)
class _Counters:
    processed: int = 0
    errors: int = 0
    expired: int = 0
    rejected: int = 0
    cancelled: int = 0
    batches: int = 0
    split_retries: int = 0
    busy_s: float = 0.0
    histogram: dict[int, int] = field(default_factory=dict)


class SegmentWorker:
    """Runs batches of one segment's `run_fn` on a dedicated thread.

    Create and `start` it, `await submit(...)` from asyncio tasks (any loop, any number of them),
    and `close` it when the segment is unloaded.
    """

    def __init__(
        self,
        name: str,
        run_fn: RunFn,
        *,
        torch_threads: int = 1,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        capacity: int = DEFAULT_CAPACITY,
        aging_s: float = DEFAULT_AGING_S,
        unbatched_outputs: frozenset[str] = frozenset(),
        on_batch: Callable[[int, float], None] | None = None,
        start: bool = True,
    ) -> None:
        if not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1:
            raise ValueError(f"invalid torch_threads {torch_threads!r}: expected an integer >= 1")
        self.name = name
        self._run_fn = run_fn
        self._torch_threads = torch_threads
        self._unbatched_outputs = frozenset(unbatched_outputs)
        # Called on the worker thread after each batch with (requests, seconds); metrics use it.
        self._on_batch = on_batch
        self._queue: BatchQueue[_Request] = BatchQueue(
            max_batch_size, max_wait_s, capacity, aging_s, name=name
        )
        # One lock guards the queue, the pending table, the counters and the closing flags. It is
        # never held while run_fn runs, so submit() on the event loop waits microseconds at most.
        self._cond = threading.Condition(threading.Lock())
        self._pending: dict[int, _Request] = {}  # id(request) -> request, in submit order
        self._running: list[_Request] = []
        self._run_started_at: float | None = None
        self._counters = _Counters()
        self._closed = False
        self._drain = False
        self._thread = threading.Thread(
            target=self._thread_main, name=f"segment-worker-{name}", daemon=True
        )
        if start:
            self.start()

    def start(self) -> None:
        """Start the worker thread (done by the constructor unless `start=False`)."""
        self._thread.start()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._closed

    async def submit(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        priority: str | Priority = "normal",
        deadline: float | None = None,
        request_id: str,
    ) -> dict[str, torch.Tensor]:
        """Queue one request, wait for its batch to run and return its own outputs.

        Every input must have the same size on dim 0 (the request's rows). `deadline` is in
        `time.monotonic()` seconds. Raises `QueueFull`, `DeadlineExceeded`, `SegmentRunError`,
        `WorkerClosed`, or `ValueError`/`TypeError` for invalid inputs.
        """
        loop = asyncio.get_running_loop()
        request = self._enqueue(tensors, priority, deadline, request_id, loop.create_future(), None)
        # A timer, not asyncio.wait: the result then wakes this task directly, one loop pass
        # sooner, which is a measurable part of a hop on a small segment.
        self._arm_deadline(request)
        try:
            assert request.future is not None
            return await request.future
        except asyncio.CancelledError:
            # Cancelled by the caller, not by _deliver or _expire, which set a result or an error.
            self._abandon(request, cancelled=True)
            raise
        finally:
            if request.timer is not None:
                request.timer.cancel()

    def submit_nowait(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        priority: str | Priority = "normal",
        deadline: float | None = None,
        request_id: str,
        on_done: Callable[[dict[str, torch.Tensor] | None, BaseException | None], None],
    ) -> None:
        """Queue one request and return at once; ``on_done(outputs, error)`` runs later on this loop.

        ``on_done`` runs exactly once, with the outputs or with the error that `submit` would
        raise after queueing. Errors found before queueing (`QueueFull`, `WorkerClosed`, an
        expired deadline, invalid inputs) are raised here instead. A hop uses this form: it needs
        no task of its own, and the result reaches it one loop pass sooner.
        """
        request = self._enqueue(tensors, priority, deadline, request_id, None, on_done)
        self._arm_deadline(request)

    def _enqueue(
        self,
        tensors: Mapping[str, torch.Tensor],
        priority: str | Priority,
        deadline: float | None,
        request_id: str,
        future: asyncio.Future | None,
        callback: Callable[[dict[str, torch.Tensor] | None, BaseException | None], None] | None,
    ) -> _Request:
        """Check and queue one request (the shared part of `submit` and `submit_nowait`)."""
        prio = Priority.parse(priority)
        rows, key = self._describe_inputs(tensors, request_id)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            with self._cond:
                self._counters.expired += 1
            raise DeadlineExceeded(self.name, request_id, "before it was queued")

        request = _Request(request_id, dict(tensors), rows, now, deadline, loop, future, callback)
        with self._cond:
            if self._closed:
                raise WorkerClosed(self.name, request_id)
            try:
                self._queue.push(request, prio, now, key=key, rows=rows, deadline=deadline)
            except QueueFull:
                self._counters.rejected += 1
                logger.warning(
                    "segment %s: queue full (%d requests), rejected request %s",
                    self.name, self._queue.capacity, request_id,
                )
                raise
            self._pending[id(request)] = request
            self._cond.notify()
        return request

    def _arm_deadline(self, request: _Request) -> None:
        if request.deadline is not None:
            delay = max(0.0, request.deadline - time.monotonic())
            request.timer = request.loop.call_later(delay, self._expire, request)

    def _expire(self, request: _Request) -> None:
        """Fail a request whose deadline passed while it was queued or running (on its loop)."""
        if self._abandon(request, cancelled=False):
            _deliver(request, None, DeadlineExceeded(self.name, request.request_id, "while queued or running"))
        # Otherwise the worker thread completed it just in time and _deliver is already scheduled.

    def close(self, *, drain: bool = False) -> None:
        """Stop accepting requests and stop the thread once its current batch ends.

        With `drain`, queued requests still run first. Without it, every pending request,
        queued or running, fails with `WorkerClosed` now, and outputs of a batch still
        running are dropped. Calling it again is harmless, and it does not block.
        """
        # NOTE: a run_fn that never returns keeps its thread and its batch's tensors alive after
        # close, because Python cannot stop a thread. The thread is a daemon, so it ends with the
        # process.
        with self._cond:
            if self._closed and (drain or not self._drain):
                return
            self._closed = True
            self._drain = drain
            pending = [] if drain else self._queue.drain() + self._running
            cancelled = [r for r in pending if not r.completed]
            self._cond.notify_all()
        for request in cancelled:
            self._complete(request, error=WorkerClosed(self.name, request.request_id))
        logger.info(
            "segment %s: worker closing (%s), %d requests failed with WorkerClosed",
            self.name, "drain" if drain else "cancel", len(cancelled),
        )

    async def wait_closed(self, timeout_s: float | None = None) -> bool:
        """Wait up to `timeout_s` for the thread to exit; return whether it did.

        A `run_fn` that never returns keeps the thread alive, so pass a timeout.
        """
        if not self._thread.is_alive():
            return True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._thread.join, timeout_s)
        return not self._thread.is_alive()

    def oldest_inflight_age(self, now: float | None = None) -> float:
        """Return seconds since the oldest pending request (queued or running) was submitted,
        or 0.0 when there is none. `now` is `time.monotonic()` when omitted."""
        now = time.monotonic() if now is None else now
        with self._cond:
            oldest = next(iter(self._pending.values()), None)
            return 0.0 if oldest is None else max(0.0, now - oldest.submitted_at)

    def current_run_age(self, now: float | None = None) -> float:
        """Return seconds the batch being run now has been running, or 0.0 when idle."""
        now = time.monotonic() if now is None else now
        with self._cond:
            started = self._run_started_at
        return 0.0 if started is None else max(0.0, now - started)

    def is_wedged(self, now: float | None, threshold_s: float) -> bool:
        """Return whether the worker stopped making progress on pending work.

        True when one batch has run for more than `threshold_s`, or when the thread has exited
        (crashed or closed) while requests are still pending. A long queue behind a worker that
        keeps finishing batches is overload, not a wedge: see `oldest_inflight_age` for that.
        """
        now = time.monotonic() if now is None else now
        if self.current_run_age(now) > threshold_s:
            return True
        with self._cond:
            has_pending = bool(self._pending)
        return has_pending and self._thread.ident is not None and not self._thread.is_alive()

    def stats(self, now: float | None = None) -> WorkerStats:
        """Return a snapshot of the queue and the counters."""
        now = time.monotonic() if now is None else now
        inflight_age = self.oldest_inflight_age(now)
        run_age = self.current_run_age(now)
        with self._cond:
            c = self._counters
            return WorkerStats(
                segment=self.name,
                queue_depth=len(self._queue),
                queue_depth_by_priority=self._queue.depth_by_priority(),
                running=len(self._running),
                processed=c.processed,
                errors=c.errors,
                expired=c.expired,
                rejected=c.rejected,
                cancelled=c.cancelled,
                batches=c.batches,
                split_retries=c.split_retries,
                busy_s=c.busy_s,
                batch_size_histogram=dict(c.histogram),
                oldest_inflight_age_s=inflight_age,
                current_run_age_s=run_age,
            )

    # ---- event loop side helpers ----

    def _describe_inputs(
        self, tensors: Mapping[str, torch.Tensor], request_id: str
    ) -> tuple[int, Hashable]:
        """Return the request's row count and its batch key, or raise for invalid inputs."""
        if not isinstance(tensors, Mapping) or not tensors:
            raise ValueError(
                f"request {request_id!r} to segment {self.name!r}: inputs must be a non-empty "
                f"dict of tensors, got {type(tensors).__name__}"
            )
        rows: int | None = None
        key_parts = []
        for input_name, tensor in tensors.items():
            if not isinstance(input_name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"request {request_id!r} to segment {self.name!r}: input {input_name!r} must "
                    f"be a torch.Tensor under a str name, got {type(tensor).__name__}"
                )
            if tensor.dim() == 0:
                raise ValueError(
                    f"request {request_id!r} to segment {self.name!r}: input {input_name!r} is "
                    "0-d; every input needs a batch dimension (dim 0)"
                )
            if rows is None:
                rows = tensor.shape[0]
            elif tensor.shape[0] != rows:
                raise ValueError(
                    f"request {request_id!r} to segment {self.name!r}: input {input_name!r} has "
                    f"{tensor.shape[0]} rows on dim 0, but other inputs have {rows}; all inputs "
                    "must share the batch size"
                )
            key_parts.append((input_name, tensor.dtype, tensor.device, tuple(tensor.shape[1:])))
        if not rows:
            raise ValueError(
                f"request {request_id!r} to segment {self.name!r}: inputs have 0 rows on dim 0"
            )
        return rows, tuple(sorted(key_parts, key=lambda part: part[0]))

    def _abandon(self, request: _Request, *, cancelled: bool) -> bool:
        """Fail a request whose caller stopped waiting (cancelled or deadline passed).

        Return False when the worker thread had already completed it.
        """
        with self._cond:
            if request.completed:
                return False
            self._queue.discard(request)
            self._finish(request)
            if cancelled:
                self._counters.cancelled += 1
            else:
                self._counters.expired += 1
        logger.info(
            "segment %s: request %s %s",
            self.name, request.request_id,
            "cancelled by its caller" if cancelled else "passed its deadline",
        )
        return True

    # ---- worker thread ----

    def _thread_main(self) -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(self._torch_threads)
        logger.info(
            "segment %s: worker thread started, torch intra-op threads %d (was %d; threads "
            "started later default to the new value)", self.name, self._torch_threads, previous,
        )
        try:
            while True:
                batch, expired = self._next_work()
                for request in expired:
                    self._complete(request, error=DeadlineExceeded(
                        self.name, request.request_id, "while queued"))
                if batch is None:
                    if not expired:
                        break
                    continue
                started = time.perf_counter()
                try:
                    self._run_batch(batch)
                finally:
                    seconds = time.perf_counter() - started
                    with self._cond:
                        self._running = []
                        self._run_started_at = None
                        self._counters.busy_s += seconds
                if self._on_batch is not None:
                    try:
                        self._on_batch(len(batch), seconds)
                    except Exception:  # a metrics hook must not stop the worker
                        logger.exception("segment %s: batch hook failed", self.name)
        except Exception:
            logger.exception("segment %s: worker thread crashed; failing pending requests",
                             self.name)
            with self._cond:
                self._closed = True
                leftover = self._queue.drain() + list(self._pending.values())
            for request in leftover:
                self._complete(request, error=WorkerClosed(self.name, request.request_id))
        logger.info("segment %s: worker thread stopped", self.name)

    def _next_work(self) -> tuple[list[_Request] | None, list[_Request]]:
        """Block until a batch is ready or requests expired. Return (None, []) to stop."""
        with self._cond:
            while True:
                if self._closed and not (self._drain and len(self._queue)):
                    return None, self._queue.take_expired()
                now = time.monotonic()
                batch = self._queue.pop_batch(now, force=self._closed)
                expired = self._queue.take_expired()
                # A completed request leaves the queue when it completes, so this filter is only a guard.
                live = [r for r in batch or () if not r.completed] or None
                if live:
                    self._running = live
                    self._run_started_at = now
                    self._counters.batches += 1
                    size = len(live)
                    self._counters.histogram[size] = self._counters.histogram.get(size, 0) + 1
                if live or expired:
                    return live, expired
                if batch:
                    continue
                wake_at = self._queue.next_deadline(now)
                self._cond.wait(None if wake_at is None else max(0.0, wake_at - now))

    def _run_batch(self, batch: list[_Request]) -> None:
        ids = [r.request_id for r in batch]
        try:
            results = self._execute(batch)
        except Exception as exc:  # run_fn is foreign code, so any error it raises fails the request
            if len(batch) == 1:
                logger.warning("segment %s: request %s failed: %r", self.name, ids[0], exc)
                self._complete(batch[0], error=SegmentRunError(self.name, ids[0], exc))
                return
            logger.warning(
                "segment %s: batch of %d requests %s failed (%r); running each alone",
                self.name, len(batch), ids, exc,
            )
            with self._cond:
                self._counters.split_retries += 1
            for request in batch:
                self._run_batch([request])
            return
        for request, outputs in zip(batch, results):
            self._complete(request, outputs=outputs)

    def _execute(self, batch: list[_Request]) -> list[dict[str, torch.Tensor]]:
        """Concatenate the batch's inputs, run `run_fn` once and split the outputs per request."""
        if len(batch) == 1:
            inputs = batch[0].tensors
        else:
            inputs = {
                input_name: torch.cat([r.tensors[input_name] for r in batch], dim=0)
                for input_name in batch[0].tensors
            }
        # no_grad rather than inference_mode: inference tensors would reject in-place updates by
        # the caller outside inference mode.
        with torch.no_grad():
            outputs = self._run_fn(inputs)
        if not isinstance(outputs, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in outputs.items()
        ):
            raise TypeError(
                f"run_fn of segment {self.name!r} returned {type(outputs).__name__}; "
                "expected a dict of str -> torch.Tensor"
            )
        if len(batch) == 1:
            return [dict(outputs)]

        row_counts = [r.rows for r in batch]
        total_rows = sum(row_counts)
        per_request: list[dict[str, torch.Tensor]] = [{} for _ in batch]
        for output_name, tensor in outputs.items():
            batched = (
                output_name not in self._unbatched_outputs
                and tensor.dim() > 0
                and tensor.shape[0] == total_rows
            )
            if batched:
                # Each piece is a view into the batch output with its own storage offset. Encoders
                # must send the view's bytes, not its whole storage (protocol.tensors does).
                for target, piece in zip(per_request, torch.split(tensor, row_counts, dim=0)):
                    target[output_name] = piece
            else:
                for target in per_request:
                    target[output_name] = tensor.clone()
        return per_request

    # ---- both sides ----

    def _complete(
        self,
        request: _Request,
        *,
        outputs: dict[str, torch.Tensor] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Deliver the one result or error of `request` to its event loop, unless already done."""
        with self._cond:
            if request.completed:
                return
            self._finish(request)
            if error is None:
                self._counters.processed += 1
            elif isinstance(error, SegmentRunError):
                self._counters.errors += 1
            elif isinstance(error, DeadlineExceeded):
                self._counters.expired += 1
        try:
            request.loop.call_soon_threadsafe(_deliver, request, outputs, error)
        except RuntimeError:
            # The caller's loop is closed, so no caller waits for this result.
            logger.debug("segment %s: loop of request %s is closed; result dropped",
                         self.name, request.request_id)

    def _finish(self, request: _Request) -> None:
        """Mark `request` completed. The caller holds the lock."""
        request.completed = True
        self._pending.pop(id(request), None)


def _deliver(request: _Request, outputs: dict[str, torch.Tensor] | None, error: BaseException | None) -> None:
    """Hand a request its one result on its own loop, through its future or its callback."""
    if request.delivered:
        return
    request.delivered = True
    if request.timer is not None:
        request.timer.cancel()
    if request.callback is not None:
        try:
            request.callback(outputs, error)
        except Exception:  # the callback is the caller's code; the worker must not die of it
            logger.exception("result callback of request %s failed", request.request_id)
        return
    future = request.future
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif outputs is not None:
        future.set_result(outputs)
