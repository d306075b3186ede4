"""Tests of the segment worker with real torch models on its real thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable

import pytest
import torch
from torch import nn

from nodeagent.batching import QueueFull
from nodeagent.worker import (
    DeadlineExceeded,
    RunFn,
    SegmentRunError,
    SegmentWorker,
    WorkerClosed,
)

pytestmark = pytest.mark.timeout(60)

WorkerFactory = Callable[..., SegmentWorker]


@pytest.fixture
async def make_worker() -> AsyncIterator[WorkerFactory]:
    """Build workers that are closed, and whose blocking run_fns are released, at test end."""
    workers: list[SegmentWorker] = []
    gates: list[threading.Event] = []

    def factory(run_fn: RunFn, *, gate: threading.Event | None = None, **params: object) -> SegmentWorker:
        defaults: dict[str, object] = {
            "max_batch_size": 8, "max_wait_s": 0.002, "capacity": 256, "aging_s": 1.0,
        }
        defaults.update(params)
        worker = SegmentWorker(f"seg-{len(workers)}", run_fn, **defaults)  # type: ignore[arg-type]
        workers.append(worker)
        if gate is not None:
            gates.append(gate)
        return worker

    yield factory
    for gate in gates:
        gate.set()
    for worker in workers:
        worker.close()
    for worker in workers:
        assert await worker.wait_closed(timeout_s=5.0), f"worker {worker.name} did not stop"


def model_run_fn(model: nn.Module, input_name: str = "x") -> RunFn:
    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": model(tensors[input_name])}

    return run


def gated_run_fn(gate: threading.Event) -> RunFn:
    """Return a run_fn that blocks until `gate` is set (10 s at most), then adds one."""

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        gate.wait(timeout=10.0)
        return {"y": tensors["x"] + 1}

    return run


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def make_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 8)).eval()


def make_transformer_layer() -> nn.Module:
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(
        d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True
    )
    return layer.eval()


async def test_worker_mlp_batched_equals_unbatched(make_worker: WorkerFactory) -> None:
    model = make_mlp()
    worker = make_worker(model_run_fn(model), max_batch_size=8, max_wait_s=0.05)
    generator = torch.Generator().manual_seed(3)
    inputs = [torch.randn(1 + i % 3, 16, generator=generator) for i in range(16)]

    results = await asyncio.gather(
        *(worker.submit({"x": x}, request_id=f"r{i}") for i, x in enumerate(inputs))
    )

    with torch.no_grad():
        for x, outputs in zip(inputs, results):
            torch.testing.assert_close(outputs["y"], model(x), atol=1e-6, rtol=0.0)
    stats = worker.stats()
    assert stats.processed == 16
    assert max(stats.batch_size_histogram) > 1, stats.batch_size_histogram


async def test_worker_transformer_batched_equals_unbatched(make_worker: WorkerFactory) -> None:
    layer = make_transformer_layer()
    seen_shapes: list[tuple[int, ...]] = []

    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen_shapes.append(tuple(tensors["x"].shape))
        return {"y": layer(tensors["x"])}

    worker = make_worker(run, max_batch_size=8, max_wait_s=0.05)
    generator = torch.Generator().manual_seed(4)
    seq_lengths = [5, 7, 5, 7, 5, 5, 7, 5]
    inputs = [torch.randn(1, seq, 32, generator=generator) for seq in seq_lengths]

    results = await asyncio.gather(
        *(worker.submit({"x": x}, request_id=f"t{i}") for i, x in enumerate(inputs))
    )

    with torch.no_grad():
        for x, outputs in zip(inputs, results):
            torch.testing.assert_close(outputs["y"], layer(x), atol=1e-6, rtol=0.0)
    # Requests of different sequence lengths were grouped apart, never mixed or failed.
    assert sorted(shape[1] for shape in seen_shapes) == [5, 7]
    assert sum(shape[0] for shape in seen_shapes) == len(inputs)
    assert worker.stats().errors == 0
    assert worker.stats().split_retries == 0


async def test_worker_many_tasks(make_worker: WorkerFactory) -> None:
    model = make_mlp()
    worker = make_worker(model_run_fn(model), max_batch_size=8, max_wait_s=0.002)
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(1, 16, generator=generator) for _ in range(200)]

    async def one(i: int) -> torch.Tensor:
        priority = ("high", "normal", "low")[i % 3]
        outputs = await worker.submit({"x": inputs[i]}, priority=priority, request_id=f"m{i}")
        return outputs["y"]

    results = await asyncio.gather(*(one(i) for i in range(200)))

    with torch.no_grad():
        expected = [model(x) for x in inputs]
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0.0)
    stats = worker.stats()
    assert stats.processed == 200
    assert stats.queue_depth == 0
    assert sum(size * count for size, count in stats.batch_size_histogram.items()) == 200
    assert max(stats.batch_size_histogram) <= 8
    assert worker.oldest_inflight_age() == 0.0


def busy_torch(duration_s: float) -> torch.Tensor:
    """Run matrix products for `duration_s` seconds of wall time."""
    a = torch.randn(256, 256)
    started = time.perf_counter()
    while time.perf_counter() - started < duration_s:
        a = torch.tanh(a @ a)
    return a


async def max_loop_lag(until: asyncio.Future[object], interval_s: float = 0.005) -> float:
    """Tick every `interval_s` until `until` is done (2000 ticks at most); return the max lag."""
    worst = 0.0
    for _ in range(2000):
        if until.done():
            break
        started = time.perf_counter()
        await asyncio.sleep(interval_s)
        worst = max(worst, time.perf_counter() - started - interval_s)
    return worst


async def test_worker_loop_stays_responsive(make_worker: WorkerFactory) -> None:
    def slow(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        busy_torch(0.4)
        return {"y": tensors["x"] * 2}

    worker = make_worker(slow, torch_threads=1)
    job = asyncio.ensure_future(worker.submit({"x": torch.ones(1, 4)}, request_id="slow-1"))
    lag_s = await max_loop_lag(job)
    outputs = await job
    assert torch.equal(outputs["y"], torch.full((1, 4), 2.0))
    assert lag_s < 0.1, f"event loop lagged {lag_s:.3f} s while the worker ran"

    # The same work run on the loop itself shows up as lag, so the ticker can see a blockage.
    blocker = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(lambda: (busy_torch(0.3), blocker.set_result(None)))
    assert await max_loop_lag(blocker) > 0.2


async def test_worker_failing_input_isolated(make_worker: WorkerFactory) -> None:
    def strict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = tensors["x"]
        if torch.isnan(x).any():
            raise ValueError("input contains NaN")
        return {"y": x * 3}

    worker = make_worker(strict, max_batch_size=4, max_wait_s=1.0)
    inputs = [torch.full((1, 2), float(i)) for i in range(4)]
    inputs[2] = torch.full((1, 2), float("nan"))

    results = await asyncio.gather(
        *(worker.submit({"x": x}, request_id=f"f{i}") for i, x in enumerate(inputs)),
        return_exceptions=True,
    )

    for i in (0, 1, 3):
        assert isinstance(results[i], dict), results[i]
        assert torch.equal(results[i]["y"], inputs[i] * 3)
    assert isinstance(results[2], SegmentRunError)
    assert "f2" in str(results[2])
    assert "NaN" in str(results[2])
    stats = worker.stats()
    assert stats.batch_size_histogram == {4: 1}
    assert stats.split_retries == 1
    assert stats.errors == 1
    assert stats.processed == 3


async def test_worker_unbatched_output_cloned(make_worker: WorkerFactory) -> None:
    def run(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": tensors["x"] + 1, "scale": torch.tensor(0.5), "table": torch.arange(3)}

    worker = make_worker(run, max_batch_size=2, max_wait_s=1.0)
    first, second = await asyncio.gather(
        worker.submit({"x": torch.zeros(1, 2)}, request_id="u0"),
        worker.submit({"x": torch.ones(1, 2)}, request_id="u1"),
    )
    assert worker.stats().batch_size_histogram == {2: 1}
    assert torch.equal(first["y"], torch.ones(1, 2))
    assert torch.equal(second["y"], torch.full((1, 2), 2.0))
    for outputs in (first, second):
        assert torch.equal(outputs["scale"], torch.tensor(0.5))
        assert torch.equal(outputs["table"], torch.arange(3))
    assert first["table"].data_ptr() != second["table"].data_ptr()


async def test_worker_wedge_detection(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate)
    job = asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id="w1"))
    await wait_until(lambda: worker.stats().running == 1)
    await asyncio.sleep(0.25)

    now = time.monotonic()
    assert worker.oldest_inflight_age(now) >= 0.25
    assert worker.is_wedged(now, threshold_s=0.2)
    assert not worker.is_wedged(now, threshold_s=30.0)

    gate.set()
    outputs = await job
    assert torch.equal(outputs["y"], torch.ones(1, 1))
    await wait_until(lambda: worker.stats().running == 0)
    assert worker.oldest_inflight_age() == 0.0
    assert not worker.is_wedged(time.monotonic(), threshold_s=0.2)


async def test_worker_close_cancels_pending(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1)
    jobs = [
        asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id=f"c{i}"))
        for i in range(4)
    ]
    await wait_until(lambda: worker.stats().running == 1 and worker.stats().queue_depth == 3)

    worker.close()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    for i, result in enumerate(results):
        assert isinstance(result, WorkerClosed), result
        assert f"c{i}" in str(result)
    with pytest.raises(WorkerClosed):
        await worker.submit({"x": torch.zeros(1, 1)}, request_id="late")

    gate.set()
    assert await worker.wait_closed(timeout_s=5.0)
    assert worker.stats().processed == 0


async def test_worker_close_drain_runs_pending(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1, max_wait_s=5.0)
    jobs = [
        asyncio.ensure_future(worker.submit({"x": torch.full((1, 1), float(i))}, request_id=f"d{i}"))
        for i in range(3)
    ]
    await wait_until(lambda: worker.stats().running == 1 and worker.stats().queue_depth == 2)

    worker.close(drain=True)
    gate.set()
    results = await asyncio.gather(*jobs)
    for i, outputs in enumerate(results):
        assert torch.equal(outputs["y"], torch.full((1, 1), float(i + 1)))
    assert await worker.wait_closed(timeout_s=5.0)


async def test_worker_queue_full(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1, capacity=2)
    running = asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id="q0"))
    await wait_until(lambda: worker.stats().running == 1)
    queued = [
        asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id=f"q{i}"))
        for i in (1, 2)
    ]
    await wait_until(lambda: worker.stats().queue_depth == 2)

    with pytest.raises(QueueFull, match="capacity"):
        await worker.submit({"x": torch.zeros(1, 1)}, request_id="q3")
    assert worker.stats().rejected == 1

    gate.set()
    await asyncio.gather(running, *queued)
    assert worker.stats().processed == 3


async def test_worker_deadline_while_queued(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1)
    running = asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id="e0"))
    await wait_until(lambda: worker.stats().running == 1)

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="e1"):
        await worker.submit({"x": torch.zeros(1, 1)}, deadline=started + 0.1, request_id="e1")
    waited = time.monotonic() - started
    assert 0.09 <= waited < 1.0
    assert worker.stats().queue_depth == 0
    assert worker.stats().expired == 1

    with pytest.raises(DeadlineExceeded):
        await worker.submit({"x": torch.zeros(1, 1)}, deadline=started, request_id="e2")

    gate.set()
    await running


async def test_worker_submit_nowait_callbacks(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1)
    results: dict[str, tuple] = {}

    def recorder(request_id: str):
        def on_done(outputs, error) -> None:
            assert threading.get_ident() == loop_thread, "callback ran off the event loop thread"
            assert request_id not in results, f"callback of {request_id} ran twice"
            results[request_id] = (outputs, error)

        return on_done

    loop_thread = threading.get_ident()
    worker.submit_nowait({"x": torch.zeros(1, 1)}, request_id="n0", on_done=recorder("n0"))
    await wait_until(lambda: worker.stats().running == 1)
    started = time.monotonic()
    worker.submit_nowait({"x": torch.ones(1, 1)}, deadline=started + 0.1, request_id="n1", on_done=recorder("n1"))
    await wait_until(lambda: "n1" in results)
    assert time.monotonic() - started >= 0.09
    assert results["n1"][0] is None
    assert isinstance(results["n1"][1], DeadlineExceeded)

    gate.set()
    await wait_until(lambda: "n0" in results)
    outputs, error = results["n0"]
    assert error is None
    assert torch.equal(outputs["y"], torch.ones(1, 1))
    # Errors found before queueing are raised at once, and the callback never runs.
    with pytest.raises(DeadlineExceeded):
        worker.submit_nowait({"x": torch.zeros(1, 1)}, deadline=time.monotonic() - 1, request_id="n2",
                             on_done=recorder("n2"))
    await asyncio.sleep(0.05)
    assert "n2" not in results


async def test_worker_cancel_removes_request(make_worker: WorkerFactory) -> None:
    gate = threading.Event()
    worker = make_worker(gated_run_fn(gate), gate=gate, max_batch_size=1)
    running = asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id="k0"))
    await wait_until(lambda: worker.stats().running == 1)
    waiting = asyncio.ensure_future(worker.submit({"x": torch.zeros(1, 1)}, request_id="k1"))
    await wait_until(lambda: worker.stats().queue_depth == 1)

    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert worker.stats().queue_depth == 0
    assert worker.stats().cancelled == 1

    gate.set()
    await running
    assert worker.stats().processed == 1


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ({}, ValueError, "non-empty"),
        ({"x": torch.tensor(1.0)}, ValueError, "0-d"),
        ({"x": torch.zeros(2, 3), "m": torch.zeros(3, 3)}, ValueError, "share the batch size"),
        ({"x": [1, 2]}, TypeError, "torch.Tensor"),
        ({"x": torch.zeros(0, 3)}, ValueError, "0 rows"),
    ],
)
async def test_worker_rejects_bad_inputs(
    make_worker: WorkerFactory, tensors: dict[str, object], error: type[Exception], match: str
) -> None:
    worker = make_worker(model_run_fn(nn.Identity()))
    with pytest.raises(error, match=match):
        await worker.submit(tensors, request_id="bad")  # type: ignore[arg-type]
    assert worker.stats().queue_depth == 0


async def test_worker_bad_priority(make_worker: WorkerFactory) -> None:
    worker = make_worker(model_run_fn(nn.Identity()))
    with pytest.raises(ValueError, match="priority"):
        await worker.submit({"x": torch.zeros(1, 1)}, priority="urgent", request_id="p")


async def test_worker_bad_run_fn_output(make_worker: WorkerFactory) -> None:
    def returns_tensor(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["x"]

    worker = make_worker(returns_tensor)  # type: ignore[arg-type]
    with pytest.raises(SegmentRunError, match="dict of str"):
        await worker.submit({"x": torch.zeros(1, 1)}, request_id="o1")
    assert worker.stats().errors == 1


async def test_worker_sets_torch_threads(make_worker: WorkerFactory) -> None:
    def report_threads(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"threads": torch.tensor([torch.get_num_threads()])}

    worker = make_worker(report_threads, torch_threads=1)
    outputs = await worker.submit({"x": torch.zeros(1, 1)}, request_id="n1")
    assert outputs["threads"].item() == 1
