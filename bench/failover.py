"""Measure failure detection and coordinator re-election after kill -9 of real agent processes.

Run: ``.venv/bin/python bench/failover.py [--rounds N] [--agents N] [--timing local|lan]``

The script starts a cluster of agent processes on 127.0.0.1 (static peers, mDNS off) and runs
``--rounds`` rounds of each kind, alternating: kill -9 of the coordinator, and kill -9 of a random
agent that is not the coordinator. Each round it polls every survivor's ``GET /v1/cluster`` and
records, from the kill:

* link drop: every survivor shows the victim as not alive (its TCP connections closed);
* detection: every survivor shows the victim as "dead" (the failure detector's verdict);
* re-election (coordinator kills only): every survivor names one new coordinator.

Then it restarts the victim and waits until the cluster has formed again. It prints p50/p99 per
measure and kind, the ratio of each p99 to its configured bound (``timing.dead_after_s`` for
detection, 5 s for re-election), and a JSON summary as the last line. ``--max-wall-s`` caps the
whole run; rounds not started by then are skipped and counted.

Timings: ``local`` is ``LOCAL_TIMING`` (the demo's and the tests' timings, dead after 2 s);
``lan`` is the agent's defaults (dead after 5 s, election timeout 1.5 to 3 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nodeagent.config import TimingConfig  # noqa: E402
from nodeagent.localcluster import LOCAL_TIMING, ClusterError, LocalCluster  # noqa: E402

REELECTION_TARGET_S = 5.0
POLL_S = 0.02
ROUND_SLACK_S = 15.0


@dataclasses.dataclass
class RoundResult:
    """Seconds from the kill to each observation, or None when it was not seen within the round."""

    kind: str
    victim: str
    link_drop_s: float | None
    detect_s: float | None
    reelect_s: float | None
    new_coordinator: str | None
    epoch_before: int
    epoch_after: int | None


def lan_timing() -> dict[str, float]:
    defaults = TimingConfig()
    return {field.name: getattr(defaults, field.name) for field in dataclasses.fields(TimingConfig)}


def percentile(values: list[float], fraction: float) -> float | None:
    """Return the nearest-rank percentile (with 5 samples, p99 is the maximum)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def cluster_view(cluster: LocalCluster, index: int) -> dict | None:
    try:
        status, body = cluster.request(index, "GET", "/v1/cluster", timeout_s=2.0)
    except OSError:
        return None
    return body if status == 200 else None


def wait_all_formed(cluster: LocalCluster, timeout_s: float) -> None:
    """Wait until every agent reports every other as alive and names a coordinator."""
    for index in range(len(cluster.agents)):
        cluster.wait_formed(timeout_s=timeout_s, via=index)


def run_round(cluster: LocalCluster, kind: str, rng: random.Random, timeout_s: float) -> RoundResult:
    view = cluster.get(0, "/v1/cluster")
    coordinator = view["coordinator"]["node_id"]
    epoch_before = int(view["epoch"])
    if kind == "coordinator":
        victim = cluster.index_of(coordinator)
    else:
        victim = rng.choice([i for i, node_id in enumerate(cluster.node_ids) if node_id != coordinator])
    victim_id = cluster.node_ids[victim]
    survivors = [i for i in range(len(cluster.agents)) if i != victim]

    killed_at = time.monotonic()
    cluster.kill(victim)
    not_alive: dict[int, float] = {}
    dead: dict[int, float] = {}
    reelect_s: float | None = None
    new_coordinator: str | None = None
    epoch_after: int | None = None
    while time.monotonic() - killed_at < timeout_s:
        views = {index: cluster_view(cluster, index) for index in survivors}
        now = time.monotonic() - killed_at
        for index, survivor_view in views.items():
            if survivor_view is None:
                continue
            state = {m["node_id"]: m["state"] for m in survivor_view["members"]}.get(victim_id)
            if state != "alive":
                not_alive.setdefault(index, now)
            if state == "dead":
                dead.setdefault(index, now)
        if kind == "coordinator" and reelect_s is None and all(v is not None for v in views.values()):
            leaders = {(v.get("coordinator") or {}).get("node_id") for v in views.values()}
            if len(leaders) == 1 and None not in leaders and victim_id not in leaders:
                reelect_s, new_coordinator = now, leaders.pop()
                epoch_after = min(int(v["epoch"]) for v in views.values())
        if len(dead) == len(survivors) and (kind != "coordinator" or reelect_s is not None):
            break
        time.sleep(POLL_S)

    cluster.start_agent(victim)
    return RoundResult(
        kind=kind,
        victim=victim_id,
        link_drop_s=max(not_alive.values()) if len(not_alive) == len(survivors) else None,
        detect_s=max(dead.values()) if len(dead) == len(survivors) else None,
        reelect_s=reelect_s,
        new_coordinator=new_coordinator,
        epoch_before=epoch_before,
        epoch_after=epoch_after,
    )


def summarize(values: list[float | None]) -> dict:
    seen = [v for v in values if v is not None]
    p50, p99 = percentile(seen, 0.50), percentile(seen, 0.99)
    return {
        "n": len(seen),
        "missed": len(values) - len(seen),
        "p50_s": round(p50, 3) if p50 is not None else None,
        "p99_s": round(p99, 3) if p99 is not None else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind (coordinator kill, agent kill)")
    parser.add_argument("--agents", type=int, default=3, help="agent processes in the cluster (at least 3)")
    parser.add_argument("--timing", choices=("local", "lan"), default="local", help="timing profile of the agents")
    parser.add_argument("--max-wall-s", type=float, default=300.0, help="stop starting rounds after this many seconds")
    parser.add_argument("--seed", type=int, default=1, help="seed for the choice of non-coordinator victims")
    parser.add_argument("--root", type=Path, default=None, help="directory for data dirs and logs (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.agents < 3:
        parser.error(f"--agents must be at least 3 so that a majority survives a kill, got {args.agents}")
    if not 1 <= args.rounds <= 100:
        parser.error(f"--rounds must be between 1 and 100, got {args.rounds}")

    timing = dict(LOCAL_TIMING) if args.timing == "local" else lan_timing()
    rng = random.Random(args.seed)
    started = time.monotonic()
    workdir = tempfile.TemporaryDirectory(prefix="shardmesh-failover-") if args.root is None else None
    root = Path(workdir.name) if workdir is not None else args.root
    cluster = LocalCluster(root, args.agents, mdns=False, static_peers=True, timing=timing)
    round_timeout_s = timing["dead_after_s"] + timing["election_timeout_max_s"] + ROUND_SLACK_S
    results: list[RoundResult] = []
    skipped = 0
    errors: list[str] = []
    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python {platform.python_version()}; timing={args.timing} dead_after_s={timing['dead_after_s']} "
          f"election_timeout_s={timing['election_timeout_min_s']}-{timing['election_timeout_max_s']}")
    try:
        cluster.create()
        cluster.start()
        wait_all_formed(cluster, 60.0)
        schedule = [kind for _ in range(args.rounds) for kind in ("coordinator", "agent")]
        for number, kind in enumerate(schedule, 1):
            if time.monotonic() - started > args.max_wall_s:
                skipped = len(schedule) - number + 1
                break
            try:
                result = run_round(cluster, kind, rng, round_timeout_s)
                wait_all_formed(cluster, 60.0)
            except ClusterError as exc:
                errors.append(f"round {number} ({kind}): {exc}")
                print(f"round {number:2d} {kind:<11} failed: {exc}")
                break
            results.append(result)
            print(f"round {number:2d} {kind:<11} victim={result.victim} link_drop={_fmt(result.link_drop_s)} "
                  f"detect={_fmt(result.detect_s)} reelect={_fmt(result.reelect_s)} "
                  f"epoch {result.epoch_before}->{result.epoch_after if result.epoch_after is not None else '-'}")
    finally:
        cluster.stop()
        if workdir is not None:
            workdir.cleanup()

    detect_all = summarize([r.detect_s for r in results])
    summary = {
        "bench": "failover",
        "timing": args.timing,
        "agents": args.agents,
        "rounds_per_kind": args.rounds,
        "dead_after_s": timing["dead_after_s"],
        "election_timeout_s": [timing["election_timeout_min_s"], timing["election_timeout_max_s"]],
        "detect": detect_all,
        "detect_coordinator_kill": summarize([r.detect_s for r in results if r.kind == "coordinator"]),
        "detect_agent_kill": summarize([r.detect_s for r in results if r.kind == "agent"]),
        "link_drop": summarize([r.link_drop_s for r in results]),
        "reelect": summarize([r.reelect_s for r in results if r.kind == "coordinator"]),
        "epoch_rose": all(r.epoch_after is not None and r.epoch_after > r.epoch_before
                          for r in results if r.kind == "coordinator"),
        "skipped_rounds": skipped,
        "errors": errors,
        "wall_s": round(time.monotonic() - started, 1),
    }
    reelect = summary["reelect"]
    summary["detect_p99_ratio_to_dead_after"] = (
        round(detect_all["p99_s"] / timing["dead_after_s"], 3) if detect_all["p99_s"] is not None else None)
    summary["reelect_p99_ratio_to_target"] = (
        round(reelect["p99_s"] / REELECTION_TARGET_S, 3) if reelect["p99_s"] is not None else None)
    summary["reelect_goal_met"] = bool(reelect["n"]) and not reelect["missed"] and reelect["p99_s"] <= REELECTION_TARGET_S

    print(f"{'measure':<26} {'n':>3} {'p50 s':>7} {'p99 s':>7}")
    for name in ("link_drop", "detect_coordinator_kill", "detect_agent_kill", "detect", "reelect"):
        row = summary[name]
        print(f"{name:<26} {row['n']:>3} {_fmt(row['p50_s']):>7} {_fmt(row['p99_s']):>7}")
    print(f"detection p99 / dead_after_s = {_fmt(summary['detect_p99_ratio_to_dead_after'])}; "
          f"re-election p99 / {REELECTION_TARGET_S:.0f} s target = {_fmt(summary['reelect_p99_ratio_to_target'])}")
    print(json.dumps(summary))
    return 0 if not errors else 1


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
