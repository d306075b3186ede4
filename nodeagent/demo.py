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
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4
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
class AgentProcess:
    """One agent started by the demo."""

    node_id: str
    data_dir: Path
    process: subprocess.Popen
    log_path: Path
    admin_url: str = ""
    killed: bool = False


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


# ===================================================================== cluster set-up


def _write_config(path: Path, *, data_dir: Path, voters: list[str]) -> None:
    voters_toml = ", ".join(f'"{voter}"' for voter in voters)
    # The `test` profile keeps failure detection and elections fast; mDNS stays on loopback.
    path.write_text(
        f'profile = "test"\n'
        f'data_dir = "{data_dir}"\n'
        f'cluster_name = "demo"\n'
        f'log_level = "INFO"\n'
        f"[network]\n"
        f'bind_host = "127.0.0.1"\n'
        f'admin_host = "127.0.0.1"\n'
        f"mdns_enabled = true\n"
        f'mdns_interfaces = ["127.0.0.1"]\n'
        f"[timing]\n"
        f"heartbeat_interval_s = 0.2\n"
        f"suspect_after_s = 1.0\n"
        f"dead_after_s = 2.0\n"
        f"election_timeout_min_s = 1.0\n"
        f"election_timeout_max_s = 2.0\n"
        f"lease_s = 0.8\n"
        f"hop_timeout_s = 5.0\n"
        f"[election]\n"
        f"voters = [{voters_toml}]\n"
        f"[runtime]\n"
        f"torch_threads = 1\n"
    )


def _start_agents(args: argparse.Namespace, root: Path) -> list[AgentProcess]:
    from protocol.tls import init_cluster, issue_node

    node_ids = [f"agent-{i}" for i in range(args.agents)]
    first_dir = root / node_ids[0]
    init_cluster(first_dir, node_id=node_ids[0], cluster_id=f"demo-{os.getpid()}")
    for node_id in node_ids[1:]:
        issue_node(first_dir, root / node_id, node_id)
    agents = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for node_id in node_ids:
        data_dir = root / node_id
        config = data_dir / "agent.toml"
        _write_config(config, data_dir=data_dir, voters=node_ids)
        log_path = root / f"{node_id}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "nodeagent.cli", "agent", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        agents.append(AgentProcess(node_id, data_dir, process, log_path))
    return agents


def _stop_agents(agents: list[AgentProcess]) -> None:
    for agent in agents:
        if agent.process.poll() is None:
            agent.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for agent in agents:
        try:
            agent.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            agent.process.kill()
            agent.process.wait(5)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _wait_ready(args: argparse.Namespace, agents: list[AgentProcess], session) -> dict:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for agent in agents:
        ready_file = agent.data_dir / "agent.json"
        while not ready_file.exists():
            if agent.process.poll() is not None:
                raise RuntimeError(f"agent {agent.node_id} exited with {agent.process.returncode}:\n{_tail(agent.log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"agent {agent.node_id} did not start within {STARTUP_TIMEOUT_S:.0f} s")
            await asyncio.sleep(0.1)
        info = json.loads(ready_file.read_text())
        agent.admin_url = f"http://{info['admin_host']}:{info['admin_port']}"
    _say(args, f"started {len(agents)} agents; waiting for mDNS discovery and the election")
    while True:
        status = await _get(session, agents[0].admin_url + "/v1/cluster")
        alive = [m for m in status["members"] if m["state"] == "alive"]
        if status.get("coordinator") and len(alive) == len(agents):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"cluster not formed within {STARTUP_TIMEOUT_S:.0f} s: members "
                f"{[(m['node_id'], m['state']) for m in status['members']]}, coordinator {status.get('coordinator')}")
        await asyncio.sleep(0.2)


async def _get(session, url: str) -> dict:
    async with session.get(url) as response:
        body = await response.json()
        if response.status >= 400:
            raise RuntimeError(f"GET {url} returned {response.status}: {body}")
        return body


async def _deploy(args: argparse.Namespace, agents: list[AgentProcess], session) -> dict:
    url = agents[0].admin_url
    request = {"name": args.model, "version": "v1", "source": args.model}
    async with session.post(url + "/v1/models", json=request) as response:
        body = await response.json()
        if response.status != 202:
            raise RuntimeError(f"deploy returned {response.status}: {body}")
    progress_url = url + f"/v1/deployments/{body['id']}"
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    last_message = ""
    while True:
        progress = await _get(session, progress_url)
        if progress["message"] != last_message:
            _say(args, f"  deploy {progress['state']:>12} {progress['percent']:5.1f}%  {progress['message']}")
            last_message = progress["message"]
        if progress["state"] == "ready":
            return await _get(session, url + f"/v1/models/{args.model}")
        if progress["state"] == "failed":
            raise RuntimeError(f"deployment failed: {progress['message']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment not ready within {DEPLOY_TIMEOUT_S:.0f} s: {progress}")
        await asyncio.sleep(0.25)


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


async def _send_requests(args, gateway: AgentProcess, inputs, session, on_progress) -> tuple[list, DemoResult]:
    from protocol.tensors import decode_tensors, encode_tensors
    from protocol.limits import Limits
    import msgpack

    result = DemoResult()
    outputs: list = [None] * len(inputs)
    semaphore = asyncio.Semaphore(args.concurrency)
    url = gateway.admin_url + f"/v1/models/{args.model}/infer"
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


async def _demo(args: argparse.Namespace, root: Path, agents_out: list[AgentProcess]) -> dict:
    import aiohttp

    _say(args, f"shardmesh demo: {args.agents} agents, model {args.model}, {args.requests} requests"
               f"{', chaos' if args.chaos else ''}; work directory {root}")
    agents = _start_agents(args, root)
    agents_out.extend(agents)
    timeout = aiohttp.ClientTimeout(total=REQUEST_DEADLINE_MS / 1000 + 10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        status = await _wait_ready(args, agents, session)
        coordinator = status["coordinator"]["node_id"]
        _say(args, f"members: {', '.join(m['node_id'] for m in status['members'])}; "
                   f"coordinator: {coordinator} (epoch {status['epoch']})")

        _say(args, f"deploying {args.model} through the planner")
        model_info = await _deploy(args, agents, session)
        version = model_info["versions"][0]
        segments = version["segments"]
        for segment in segments:
            _say(args, f"  segment {segment['index']}: units {segment['first_unit']}..{segment['last_unit']}"
                       f" on {', '.join(segment['agents'])}")
        predicted = version.get("predicted", {})

        inputs = _make_inputs(args.model, args.requests)
        _say(args, "computing reference outputs with the whole model in this process")
        reference = await asyncio.to_thread(_reference_outputs, args.model, inputs)

        gateway = agents[0]
        killed: dict = {}
        victim = _choose_victim(segments, gateway.node_id, coordinator) if args.chaos else None
        kill_at = max(1, args.requests // 3)

        async def on_progress(done: int) -> None:
            if victim and not killed and done >= kill_at:
                agent = next(a for a in agents if a.node_id == victim)
                agent.process.send_signal(signal.SIGKILL)
                agent.killed = True
                killed.update(node_id=victim, at_request=done, at=time.monotonic())
                _say(args, f"chaos: sent SIGKILL to {victim} (pid {agent.process.pid}) after {done} requests")

        _say(args, f"sending {args.requests} requests through the gateway on {gateway.node_id}")
        outputs, result = await _send_requests(args, gateway, inputs, session, on_progress)

        max_diff = 0.0
        for index, (got, want) in enumerate(zip(outputs, reference)):
            if got is None:
                continue
            for name, tensor in want.items():
                if name not in got or got[name].shape != tensor.shape:
                    result.failed += 1
                    result.errors.append(f"request {index}: output {name} missing or wrong shape")
                    continue
                max_diff = max(max_diff, float((got[name].float() - tensor.float()).abs().max()))
        result.max_abs_diff = max_diff

        final = await _get(session, gateway.admin_url + "/v1/cluster")
        final_model = await _get(session, gateway.admin_url + f"/v1/models/{args.model}")
        final_segments = final_model["versions"][0]["segments"]
        if killed:
            _say(args, f"chaos: {victim} is now '{_member_state(final, victim)}'; placement after re-placement:")
            for segment in final_segments:
                _say(args, f"  segment {segment['index']}: units {segment['first_unit']}..{segment['last_unit']}"
                           f" on {', '.join(segment['agents'])}")
            _say(args, f"chaos: gateway failovers {final['dataplane'].get('failovers', 0)}, failed requests {result.failed}")

    p50 = statistics.median(result.latencies_ms) if result.latencies_ms else 0.0
    p99 = _percentile(result.latencies_ms, 0.99)
    throughput = (args.requests - result.failed) / result.wall_s if result.wall_s else 0.0
    period = predicted.get("period_s")
    predicted_rps = (predicted.get("profile_batch") or 1) / period if period else None
    summary = {
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
    _say(args, f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms; throughput {throughput:.1f} requests/s "
               f"(planner predicted {predicted_rps or 0:.1f} items/s at its profiled batch)")
    _say(args, f"max abs difference against the whole model: {result.max_abs_diff:.2e} (limit {MAX_ABS_DIFF:g})")
    for error in result.errors[:5]:
        _say(args, f"  error: {error}")
    return summary


def _choose_victim(segments: list[dict], gateway: str, coordinator: str) -> str | None:
    holders = [agent for segment in segments for agent in segment["agents"]]
    for avoid in ({gateway, coordinator}, {gateway}):
        candidates = [agent for agent in holders if agent not in avoid]
        if candidates:
            return candidates[len(candidates) // 2]
    return None


def _member_state(status: dict, node_id: str) -> str:
    for member in status["members"]:
        if member["node_id"] == node_id:
            return member["state"]
    return "gone"


def run_demo(args: argparse.Namespace) -> int:
    if args.agents < 1 or args.requests < 1:
        print("shardmesh demo: --agents and --requests must be at least 1", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="shardmesh-demo-"))
    agents: list[AgentProcess] = []
    summary = None
    code = 1
    try:
        summary = asyncio.run(_demo(args, root, agents))
        code = 0 if summary["failed"] == 0 and summary["max_abs_diff"] <= MAX_ABS_DIFF else 1
    except KeyboardInterrupt:
        print("shardmesh demo: interrupted; stopping agents", file=sys.stderr)
        code = 130
    except Exception as exc:
        print(f"shardmesh demo: failed: {exc}", file=sys.stderr)
        for agent in agents:
            print(f"--- last lines of {agent.node_id}'s log:\n{_tail(agent.log_path)}", file=sys.stderr)
    finally:
        _stop_agents(agents)
        if args.keep:
            print(f"shardmesh demo: kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    if summary is not None and args.json:
        print(json.dumps(summary), flush=True)
    return code
