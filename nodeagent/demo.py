"""``shardmesh demo``: a whole cluster on this machine, serving a real packaged model.

Steps: make throwaway cluster credentials in a temporary directory; start N agent processes on
loopback (mDNS bound to 127.0.0.1 only); wait for discovery and the election; deploy the packaged
model through the planner; send K real requests (sentences for MiniLM, generated images for
EfficientNet) through one agent's gateway; compare every output with the whole model run in this
process. With ``--chaos``, one segment-holding agent is killed with SIGKILL in the middle of the
run, and the demo shows the detection, the re-placement and that no request failed.

It exits 1 when an output differs by more than ``MAX_ABS_DIFF`` or a request failed, and it
stops every process it started and removes its temporary directory, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nodeagent.localcluster import LocalCluster

logger = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4
# Each agent is a Python process with torch loaded (about 400 MB); more than this on one machine
# only measures contention.
MAX_AGENTS = 16
STARTUP_TIMEOUT_S = 90.0
DEPLOY_TIMEOUT_S = 300.0
REQUEST_DEADLINE_MS = 20_000

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "A woman is playing the violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "The cat sits outside the house.",
    "Agents pass activations to one another over mutual TLS.",
    "It is raining heavily in the mountains tonight.",
    "Shardmesh splits a model into segments across small machines.",
]


@dataclass
class DemoResult:
    latencies_ms: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    wall_s: float = 0.0


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


# ===================================================================== requests and reference


def _make_inputs(model: str, count: int) -> list[dict[str, torch.Tensor]]:
    """Real inputs: tokenized sentences for MiniLM, seeded random images for EfficientNet."""
    inputs = []
    if model == "minilm":
        from coordinator.zoo import minilm_tokenize

        for i in range(count):
            inputs.append(dict(minilm_tokenize([SENTENCES[i % len(SENTENCES)]])))
    else:
        generator = torch.Generator().manual_seed(1234)
        for _ in range(count):
            inputs.append({"image": torch.rand(1, 3, 224, 224, generator=generator)})
    return inputs


def _reference_outputs(model: str, inputs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    from coordinator import zoo

    spec = zoo.build_minilm() if model == "minilm" else zoo.build_efficientnet()
    with torch.no_grad():
        return [spec.reference(item) for item in inputs]


async def _send_requests(args, gateway_url: str, inputs, session, on_progress) -> tuple[list, DemoResult]:
    from protocol.tensors import decode_tensors, encode_tensors
    from protocol.limits import Limits
    import msgpack

    result = DemoResult()
    outputs: list = [None] * len(inputs)
    semaphore = asyncio.Semaphore(args.concurrency)
    url = gateway_url + f"/v1/models/{args.model}/infer"
    limits = Limits()
    done = 0

    async def one(index: int) -> None:
        nonlocal done
        meta, buffers = encode_tensors(inputs[index])
        body = msgpack.packb({"inputs": meta, "payload": b"".join(bytes(b) for b in buffers),
                              "deadline_ms": REQUEST_DEADLINE_MS, "request_key": f"req-{index}"})
        async with semaphore:
            started = time.monotonic()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/msgpack",
                                                                 "Accept": "application/msgpack"}) as response:
                    raw = await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}: {raw[:300].decode(errors='replace')}")
                reply = msgpack.unpackb(raw)
                outputs[index] = decode_tensors(reply["outputs"], bytearray(reply["payload"]), limits=limits, peer="gateway")
                result.latencies_ms.append((time.monotonic() - started) * 1000)
            except Exception as exc:  # every failure is counted and reported
                result.failed += 1
                result.errors.append(f"request {index}: {exc}")
            done += 1
            await on_progress(done)

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(len(inputs))))
    result.wall_s = time.monotonic() - started
    return outputs, result


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[index]


# ===================================================================== main


def _print_segments(args: argparse.Namespace, segments: list[dict]) -> None:
    for segment in segments:
        _say(args, f"  segment {segment['index']}: units {segment['first_unit']}..{segment['last_unit']}"
                   f" on {', '.join(segment['agents'])}")


def _demo(args: argparse.Namespace, cluster: LocalCluster) -> dict:
    _say(args, f"shardmesh demo: {args.agents} agents, model {args.model}, {args.requests} requests"
               f"{', chaos' if args.chaos else ''}; work directory {cluster.root}")
    cluster.create()
    cluster.start()
    _say(args, f"started {args.agents} agent processes; waiting for mDNS discovery and the election")
    status = cluster.wait_formed(STARTUP_TIMEOUT_S)
    coordinator = status["coordinator"]["node_id"]
    _say(args, f"members: {', '.join(m['node_id'] for m in status['members'])}; "
               f"coordinator: {coordinator} (epoch {status['epoch']})")

    _say(args, f"deploying {args.model} through the planner")
    model_info = cluster.deploy(
        args.model, "v1", args.model, timeout_s=DEPLOY_TIMEOUT_S,
        progress=lambda p: _say(args, f"  deploy {p['state']:>12} {p['percent']:5.1f}%  {p['message']}"))
    version = model_info["versions"][0]
    _print_segments(args, version["segments"])
    predicted = version.get("predicted", {})

    inputs = _make_inputs(args.model, args.requests)
    _say(args, "computing reference outputs with the whole model in this process")
    reference = _reference_outputs(args.model, inputs)

    gateway = cluster.agents[0]
    victim = _choose_victim(version["segments"], gateway.node_id, coordinator) if args.chaos else None
    kill_at = max(1, args.requests // 3)
    killed: dict = {}

    async def on_progress(done: int) -> None:
        if victim and not killed and done >= kill_at:
            index = cluster.index_of(victim)
            pid = cluster.agents[index].process.pid
            cluster.signal_agent(index, signal.SIGKILL)
            killed.update(node_id=victim, at_request=done, at=time.monotonic())
            _say(args, f"chaos: sent SIGKILL to {victim} (pid {pid}) after {done} requests")

    async def send_all():
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=REQUEST_DEADLINE_MS / 1000 + 10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await _send_requests(args, gateway.admin_url, inputs, session, on_progress)

    _say(args, f"sending {args.requests} requests through the gateway on {gateway.node_id}")
    outputs, result = asyncio.run(send_all())
    result.max_abs_diff = _compare(outputs, reference, result)

    if killed:
        detected_s = _wait_declared_dead(cluster, victim, killed["at"])
        if detected_s is not None:
            _say(args, f"chaos: the failure detector declared {victim} dead {detected_s:.1f} s after the kill "
                       f"(its links had dropped at once, so requests resumed before that)")
    final = cluster.get(0, "/v1/cluster")
    final_segments = cluster.get(0, f"/v1/models/{args.model}")["versions"][0]["segments"]
    if killed:
        _say(args, f"chaos: {victim} is now {_member_state(final, victim)!r}; placement after re-placement:")
        _print_segments(args, final_segments)
        _say(args, f"chaos: the gateway resumed {final['dataplane'].get('failovers', 0)} request attempt(s); "
                   f"failed requests: {result.failed}")

    p50 = statistics.median(result.latencies_ms) if result.latencies_ms else 0.0
    p99 = _percentile(result.latencies_ms, 0.99)
    throughput = (args.requests - result.failed) / result.wall_s if result.wall_s else 0.0
    period = predicted.get("period_s")
    predicted_rps = (predicted.get("profile_batch") or 1) / period if period else None
    _say(args, f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; measured throughput {throughput:.1f} requests/s "
               f"of one item each at concurrency {args.concurrency}")
    if predicted_rps:
        _say(args, f"the planner's bound for this placement is {predicted_rps:.1f} items/s: model compute and "
                   f"transfers only, from unit profiles at a batch of {predicted.get('profile_batch')}. The measured "
                   f"rate also pays for the HTTP client, the gateway and framing on this machine's shared cores")
    _say(args, f"max abs difference against the whole model: {result.max_abs_diff:.2e} (limit {MAX_ABS_DIFF:g})")
    for error in result.errors[:5]:
        _say(args, f"  error: {error}")
    return {
        "agents": args.agents,
        "coordinator": final["coordinator"]["node_id"] if final.get("coordinator") else None,
        "epoch": final["epoch"],
        "segments": [
            {"segment": s["index"], "agent": s["agents"][0], "first_layer": s["first_unit"], "last_layer": s["last_unit"]}
            for s in final_segments
        ],
        "requests": args.requests,
        "failed": result.failed,
        "max_abs_diff": result.max_abs_diff,
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "throughput_rps": round(throughput, 3),
        "predicted_throughput_rps": round(predicted_rps, 3) if predicted_rps else None,
        "killed_agent": killed.get("node_id"),
    }


def _compare(outputs: list, reference: list, result: DemoResult) -> float:
    max_diff = 0.0
    for index, (got, want) in enumerate(zip(outputs, reference)):
        if got is None:
            continue
        for name, tensor in want.items():
            if name not in got or got[name].shape != tensor.shape:
                result.failed += 1
                result.errors.append(f"request {index}: output {name} missing or of the wrong shape")
                continue
            max_diff = max(max_diff, float((got[name].float() - tensor.float()).abs().max()))
    return max_diff


def _choose_victim(segments: list[dict], gateway: str, coordinator: str) -> str | None:
    """Pick a segment holder to kill, avoiding the gateway and, when possible, the coordinator."""
    holders = [agent for segment in segments for agent in segment["agents"]]
    for avoid in ({gateway, coordinator}, {gateway}):
        candidates = [agent for agent in holders if agent not in avoid]
        if candidates:
            return candidates[len(candidates) // 2]
    return None


def _wait_declared_dead(cluster: LocalCluster, node_id: str, killed_at: float, timeout_s: float = 15.0) -> float | None:
    """Return seconds from the kill until the gateway's view shows ``node_id`` dead, or None."""
    deadline = killed_at + timeout_s
    while time.monotonic() < deadline:
        if _member_state(cluster.get(0, "/v1/cluster"), node_id) == "dead":
            return time.monotonic() - killed_at
        time.sleep(0.1)
    return None


def _member_state(status: dict, node_id: str) -> str:
    for member in status["members"]:
        if member["node_id"] == node_id:
            return member["state"]
    return "gone"


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_demo(args: argparse.Namespace) -> int:
    for option, value, low, high in (("--agents", args.agents, 1, MAX_AGENTS),
                                     ("--requests", args.requests, 1, 100_000),
                                     ("--concurrency", args.concurrency, 1, 1024)):
        if not low <= value <= high:
            print(f"shardmesh demo: {option} {value} is out of range; use {low} to {high}", file=sys.stderr)
            return 2
    # SIGTERM (from `timeout`, CI or a service manager) cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix="shardmesh-demo-")), args.agents)
    summary = None
    code = 1
    try:
        summary = _demo(args, cluster)
        code = 0 if summary["failed"] == 0 and summary["max_abs_diff"] <= MAX_ABS_DIFF else 1
    except KeyboardInterrupt:
        print("shardmesh demo: interrupted; stopping agents", file=sys.stderr)
        code = 130
    except Exception as exc:  # reported with each agent's last log lines, then cleaned up
        print(f"shardmesh demo: failed: {exc}", file=sys.stderr)
        for index, agent in enumerate(cluster.agents):
            print(f"--- last lines of {agent.node_id}'s log:\n{cluster.log_tail(index)}", file=sys.stderr)
    finally:
        cluster.stop()
        if args.keep:
            print(f"shardmesh demo: kept {cluster.root}", file=sys.stderr)
        else:
            shutil.rmtree(cluster.root, ignore_errors=True)
    if summary is not None:
        verdict = "PASS" if code == 0 else "FAIL"
        # With --json, stdout carries only the JSON summary, so the verdict goes to stderr.
        print(f"{verdict}: {summary['requests'] - summary['failed']} of {summary['requests']} requests answered, "
              f"max abs difference {summary['max_abs_diff']:.2e} against the whole model (limit {MAX_ABS_DIFF:g})",
              file=sys.stderr if args.json else sys.stdout, flush=True)
    if summary is not None and args.json:
        print(json.dumps(summary), flush=True)
    return code
