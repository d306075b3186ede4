"""Pipeline benchmark: MiniLM through 1, 2 and 3 local agent processes against the whole model.

Every number is measured in one run on this machine, and every ratio is taken against a baseline
measured in that same run:

  latency      one request at a time, p50 over ``--latency-requests``, through the gateway on
               agent-0 for versions deployed with 1, 2 and 3 stages (``options.max_stages``),
               against the whole model called in this process with one torch thread. Three
               shapes: 1 x 16 tokens (the goal's shape), 4 x 10 tokens, and 1 x 128 tokens of
               real text. Goal: 3 stages <= 1.15x at 1 x 16 tokens.
  per hop      for each shape (activations of 24 KiB, 60 KiB and 192 KiB: rows x tokens x hidden
               size 384 x float32): (p50 with 3 stages - p50 with 1 stage) divided by the number of
               extra agent-to-agent transfers on the 3-stage route (gateway to first stage, between
               stages, last stage back to the gateway; 0 for the 1-stage version, which runs on the
               gateway). Two more queue passes are included. Goal: <= 1 ms up to 64 KiB.
  throughput   ``--throughput-requests`` requests of the profiled shape (the two example
               sentences the planner profiled) at concurrency ``--concurrency`` through the
               2-stage version (agent-0 and agent-1, one torch thread each), in items per
               second, against the whole model with one thread on batches of 2 and of 8 (the
               worker's largest micro-batch), the best of three 2 s rounds each. Goal: >= 1.7x
               over the batch-8 baseline. The same number of items is then sent again as
               requests of 8 items each, which shows the part of the cost that comes per request.
               Both are also given as a share of two whole-model processes (batch 8, one thread
               each) run at the same time: what this machine's cores give with no data plane.
  prediction   the 2-item throughput against the planner's prediction for the 2-stage placement
               (profiled batch / predicted period). Goal: >= 0.9.

The bench client, the gateway's HTTP handling and all three agents share the machine's cores,
so the throughput figure is what one 2-core machine gives, not what two machines would.

Usage: .venv/bin/python bench/pipeline.py [--latency-requests 100] [--throughput-requests 1000]
       [--concurrency 16] [--batch-wait-ms MS]
The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator import zoo  # noqa: E402
from nodeagent.localcluster import LocalCluster  # noqa: E402

STAGE_COUNTS = (1, 2, 3)
DEPLOY_TIMEOUT_S = 300.0
REQUEST_DEADLINE_MS = 30_000
BASELINE_SECONDS = 2.0
BASELINE_ROUNDS = 3
LATENCY_GOAL = 1.15
THROUGHPUT_GOAL = 1.7
PER_HOP_GOAL_MS = 1.0
PREDICTION_GOAL = 0.9
SENTENCE = "Shardmesh splits a model into segments across small machines."
SMALL_SHAPE = (1, 16)
LARGE_SHAPE = (4, 10)
LONG_SHAPE = (1, 128)
WIDE_REQUEST_ROWS = 8


# ===================================================================== inputs and baselines


def shaped_input(rows: int, tokens: int, *, fill: bool = False) -> dict[str, torch.Tensor]:
    """Tokenize short sentences padded to ``tokens``, or with ``fill`` a long text truncated to ``tokens``."""
    if fill:
        sentences = [" ".join([SENTENCE] * (tokens // 8 + 1))] * rows
    else:
        sentences = [SENTENCE.split(".")[0][: 20 + row] for row in range(rows)]
    return dict(zoo.minilm_tokenize(sentences, max_length=tokens, pad_to=tokens))


def profiled_input() -> dict[str, torch.Tensor]:
    """Tokenize the example sentences, on which the export job profiles units for the planner."""
    return dict(zoo.minilm_tokenize(list(zoo.EXAMPLE_SENTENCES)))


def activation_bytes(inputs: Mapping[str, torch.Tensor]) -> int:
    rows, tokens = inputs["input_ids"].shape
    return rows * tokens * 384 * 4


def transfers(placement: list) -> int:
    """Agent-to-agent transfers on the route from the gateway (agent-0) and back to it."""
    agents = ["agent-0"] + [segment[2][0] for segment in placement] + ["agent-0"]
    return sum(1 for before, after in zip(agents, agents[1:]) if before != after)


def time_calls(fn: Callable[[], object], *, count: int) -> list[float]:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def whole_model_items_per_s(spec, inputs: Mapping[str, torch.Tensor]) -> float:
    """Return the best of BASELINE_ROUNDS rounds, because single rounds read 242-278 items/s here."""
    for _ in range(2):
        spec.reference(inputs)
    return max(timed_round(spec, inputs) for _ in range(BASELINE_ROUNDS))


def timed_round(spec, inputs: Mapping[str, torch.Tensor]) -> float:
    """Run the whole model on ``inputs`` for BASELINE_SECONDS and return the items per second."""
    rows = inputs["input_ids"].shape[0]
    done = 0
    started = time.perf_counter()
    while time.perf_counter() - started < BASELINE_SECONDS:
        spec.reference(inputs)
        done += rows
    return done / (time.perf_counter() - started)


def _ceiling_worker(conn, rows: int) -> None:
    """Time the whole model at batch ``rows`` in a child process, once per "go" message from the parent."""
    torch.set_num_threads(1)
    spec = zoo.build_minilm()
    profiled = profiled_input()
    inputs = {k: v.repeat(rows // 2, 1) for k, v in profiled.items()}
    with torch.no_grad():
        for _ in range(2):
            spec.reference(inputs)
        conn.send("ready")
        while conn.recv() == "go":
            conn.send(timed_round(spec, inputs))


def parallel_ceiling_items_per_s(processes: int = 2, rows: int = 8) -> float:
    """Return the summed items/s of ``processes`` whole-model processes run at once (best of BASELINE_ROUNDS).

    This is what the machine's cores give to independent copies of the model, with no data plane
    at all, so the 2-stage throughput can be read against the real ceiling of this machine.
    """
    context = multiprocessing.get_context("spawn")
    pipes, children = [], []
    try:
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            child = context.Process(target=_ceiling_worker, args=(child_end, rows), daemon=True)
            child.start()
            pipes.append(parent_end)
            children.append(child)
        for pipe in pipes:
            if not pipe.poll(120.0) or pipe.recv() != "ready":
                raise RuntimeError("a whole-model process did not load the model within 120 s; check its error above")
        sums = []
        for _ in range(BASELINE_ROUNDS):
            for pipe in pipes:
                pipe.send("go")
            sums.append(sum(pipe.recv() for pipe in pipes))
        return max(sums)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for child in children:
            child.join(10.0)
            if child.is_alive():
                child.kill()


# ===================================================================== cluster


def deploy(cluster: LocalCluster, version: str, stages: int) -> dict:
    """Deploy MiniLM with ``stages`` pipeline stages; wait until every agent routes to it."""
    body = {"name": "minilm", "version": version, "source": "minilm", "options": {"max_stages": stages}}
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    status, reply = cluster.request(0, "POST", "/v1/models", body)
    while status == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
        status, reply = cluster.request(0, "POST", "/v1/models", body)
    if status != 202:
        raise RuntimeError(f"deploy of {version} returned {status}: {reply}")
    while time.monotonic() < deadline:
        code, progress = cluster.request(0, "GET", f"/v1/deployments/{reply['id']}")
        if code == 200 and progress["state"] == "failed":
            raise RuntimeError(f"deploy of {version} failed: {progress['message']}")
        if code == 200 and progress["state"] == "ready":
            break
        time.sleep(0.2)
    while time.monotonic() < deadline:
        views = [cluster.get(i, "/v1/models/minilm") for i in range(len(cluster.agents))]
        entries = [next((v for v in view["versions"] if v["version"] == version), None) for view in views]
        if all(entry is not None and entry["state"] == "ready" for entry in entries):
            return entries[0]
        time.sleep(0.1)
    raise RuntimeError(f"version {version} not ready on every agent within {DEPLOY_TIMEOUT_S:.0f} s")


async def post_many(session, url: str, bodies: list[bytes], concurrency: int) -> list[float]:
    """Send every body with at most ``concurrency`` in flight; return each latency in seconds."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    headers = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}

    async def one(body: bytes) -> None:
        async with semaphore:
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                raw = await response.read()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {raw[:300].decode(errors='replace')}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one(body) for body in bodies))
    return latencies


def request_body(inputs: Mapping[str, torch.Tensor], version: str) -> bytes:
    from nodeagent.http_infer import encode_msgpack_request

    return encode_msgpack_request(dict(inputs), version=version, deadline_ms=REQUEST_DEADLINE_MS)


async def measure_cluster(args, url: str, versions: dict[int, str]) -> dict:
    import aiohttp

    shapes = {"small": shaped_input(*SMALL_SHAPE), "large": shaped_input(*LARGE_SHAPE),
              "long": shaped_input(*LONG_SHAPE, fill=True)}
    results: dict = {f"latency_{name}_p50_ms": {} for name in shapes}
    timeout = aiohttp.ClientTimeout(total=REQUEST_DEADLINE_MS / 1000 + 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for stages, version in versions.items():
            for name, inputs in shapes.items():
                body = request_body(inputs, version)
                await post_many(session, url, [body] * 5, 1)  # warm-up
                latencies = await post_many(session, url, [body] * args.latency_requests, 1)
                results[f"latency_{name}_p50_ms"][stages] = statistics.median(latencies) * 1000
        profiled = profiled_input()
        wide = {k: v.repeat(WIDE_REQUEST_ROWS // 2, 1) for k, v in profiled.items()}
        for key, inputs in (("throughput_items_per_s", profiled), ("throughput_wide_items_per_s", wide)):
            rows = inputs["input_ids"].shape[0]
            count = max(1, args.throughput_requests * 2 // rows)
            body = request_body(inputs, versions[2])
            await post_many(session, url, [body] * 20, args.concurrency)  # warm-up
            started = time.perf_counter()
            await post_many(session, url, [body] * count, args.concurrency)
            results[key] = count * rows / (time.perf_counter() - started)
    return results


# ===================================================================== main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-requests", type=int, default=100, help="sequential requests per version and size")
    parser.add_argument("--throughput-requests", type=int, default=1000, help="requests in the throughput run")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight in the throughput run")
    parser.add_argument("--batch-wait-ms", type=float, default=None,
                        help="runtime.batch_max_wait_ms for the agents (default: the config default)")
    args = parser.parse_args(argv)
    for name in ("latency_requests", "throughput_requests", "concurrency"):
        if not 1 <= getattr(args, name) <= 10_000:
            parser.error(f"--{name.replace('_', '-')} must be from 1 to 10000")

    torch.set_num_threads(1)
    spec = zoo.build_minilm()
    shapes = {"small": SMALL_SHAPE, "large": LARGE_SHAPE, "long": LONG_SHAPE}
    base_ms: dict[str, float] = {}
    with torch.no_grad():
        for name, shape in shapes.items():
            inputs = shaped_input(*shape, fill=name == "long")
            samples = time_calls(lambda inputs=inputs: spec.reference(inputs), count=args.latency_requests)
            base_ms[name] = statistics.median(samples) * 1000
        profiled = profiled_input()
        batch8 = {k: v.repeat(4, 1) for k, v in profiled.items()}
        base_items_2 = whole_model_items_per_s(spec, profiled)
        base_items_8 = whole_model_items_per_s(spec, batch8)
    ceiling_items_8 = parallel_ceiling_items_per_s(2, 8)
    print("whole model, 1 thread: " + ", ".join(f"{base_ms[n]:.2f} ms for {shapes[n]}" for n in shapes)
          + f"; {base_items_2:.1f} items/s at batch 2, {base_items_8:.1f} items/s at batch 8; two processes at"
          f" once: {ceiling_items_8:.1f} items/s at batch 8", flush=True)

    runtime = {} if args.batch_wait_ms is None else {"batch_max_wait_ms": args.batch_wait_ms}
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="shardmesh-bench-pipeline-")), 3, mdns=False,
                           static_peers=True, runtime=runtime)
    try:
        cluster.create()
        cluster.start()
        cluster.wait_formed(90.0)
        versions: dict[int, str] = {}
        placements: dict[int, list] = {}
        predicted: dict = {}
        for stages in STAGE_COUNTS:
            version = f"s{stages}"
            entry = deploy(cluster, version, stages)
            versions[stages] = version
            placements[stages] = [[s["first_unit"], s["last_unit"], s["agents"]] for s in entry["segments"]]
            if stages == 2:
                predicted = entry.get("predicted") or {}
            print(f"deployed {version}: {placements[stages]}", flush=True)
        url = cluster.agents[0].admin_url + "/v1/models/minilm/infer"
        measured = asyncio.run(measure_cluster(args, url, versions))
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)

    latency = {name: measured[f"latency_{name}_p50_ms"] for name in shapes}
    extra_transfers = max(1, transfers(placements[3]) - transfers(placements[1]))
    per_hop = {name: (latency[name][3] - latency[name][1]) / extra_transfers for name in shapes}
    kib = {name: activation_bytes(shaped_input(*shapes[name])) // 1024 for name in shapes}
    throughput = measured["throughput_items_per_s"]
    wide = measured["throughput_wide_items_per_s"]
    period = predicted.get("period_s")
    predicted_items = (predicted.get("profile_batch") or 1) / period if period else None
    for stages in STAGE_COUNTS:
        print(f"{stages} stage(s): " + ", ".join(
            f"{shapes[n]} p50 {latency[n][stages]:.2f} ms ({latency[n][stages] / base_ms[n]:.2f}x)" for n in shapes))
    print(f"per hop ({extra_transfers} extra transfers): "
          + ", ".join(f"{per_hop[n]:.2f} ms at {kib[n]} KiB" for n in shapes))
    print(f"2 stages, requests of 2 items: {throughput:.1f} items/s; {throughput / base_items_8:.2f}x the whole"
          f" model at batch 8, {throughput / base_items_2:.2f}x at batch 2, {throughput / ceiling_items_8:.2f} of two"
          f" whole-model processes; planner predicted {predicted_items or 0:.1f} items/s")
    print(f"2 stages, requests of {WIDE_REQUEST_ROWS} items: {wide:.1f} items/s; {wide / base_items_8:.2f}x the"
          f" whole model at batch 8, {wide / ceiling_items_8:.2f} of two whole-model processes")
    summary = {
        "bench": "pipeline",
        "batch_max_wait_ms": args.batch_wait_ms,
        "whole_model_ms": {n: round(base_ms[n], 3) for n in shapes},
        "shapes": {n: list(shapes[n]) for n in shapes},
        "latency_p50_ms": {n: {str(k): round(v, 3) for k, v in latency[n].items()} for n in shapes},
        "latency_ratio": {n: {str(k): round(v / base_ms[n], 3) for k, v in latency[n].items()} for n in shapes},
        "extra_transfers": extra_transfers,
        "per_hop_ms": {f"{kib[n]}KiB": round(per_hop[n], 3) for n in shapes},
        "throughput_items_per_s": round(throughput, 2),
        "throughput_wide_items_per_s": round(wide, 2),
        "whole_model_items_per_s": {"batch2": round(base_items_2, 2), "batch8": round(base_items_8, 2),
                                    "two_processes_batch8": round(ceiling_items_8, 2)},
        "throughput_ratio_vs_batch8": round(throughput / base_items_8, 3),
        "throughput_wide_ratio_vs_batch8": round(wide / base_items_8, 3),
        "throughput_share_of_two_processes": round(throughput / ceiling_items_8, 3),
        "predicted_items_per_s": round(predicted_items, 2) if predicted_items else None,
        "measured_vs_predicted": round(throughput / predicted_items, 3) if predicted_items else None,
        "placements": {str(k): v for k, v in placements.items()},
        "goals": {
            "latency_3_stages_le_1.15x": latency["small"][3] / base_ms["small"] <= LATENCY_GOAL,
            "throughput_ge_1.7x": throughput / base_items_8 >= THROUGHPUT_GOAL,
            "per_hop_le_1ms": max(per_hop["small"], per_hop["large"]) <= PER_HOP_GOAL_MS,
            "prediction_ge_0.9": bool(predicted_items) and throughput / predicted_items >= PREDICTION_GOAL,
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
