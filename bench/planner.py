"""Compare the planner's period with an even split and a memory-proportional split.

Run: ``.venv/bin/python bench/planner.py [--seed N] [--repeats N]``

Each scenario is a synthetic cluster and profile built from a seed. For each, the script prints
the planner's period, each baseline's period and the ratio baseline / planner (above 1 means the
planner's pipeline runs that many times faster), the certified gap to the lower bound, and the
planning time (median over ``--repeats`` runs). The last line is a JSON summary.

Baselines, both in registration order with one stage per device:
* even: the same number of layers on each device (the first ``L`` devices when there are more
  devices than layers);
* memory: layer counts proportional to device memory, as peer-to-peer runners that split by
  free memory do.
A baseline whose stages overflow a device's memory is reported as infeasible.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.planner import Device, Layer, PlanError, Stage, evaluate, plan  # noqa: E402

GIB = 1 << 30
MIB = 1 << 20


def transformer_profile(blocks: int, block_seconds: float) -> list[Layer]:
    """Return an embedding, ``blocks`` equal transformer blocks and a head."""
    layers = [Layer("embed", block_seconds * 0.2, 260 * MIB, 8 * MIB)]
    layers += [Layer(f"block{k}", block_seconds, 400 * MIB, 8 * MIB) for k in range(blocks)]
    layers.append(Layer("head", block_seconds * 1.5, 260 * MIB, 1 * MIB))
    return layers


def cnn_profile(rng: random.Random) -> list[Layer]:
    """Return a CNN-like profile: large early activations and cheap early layers, heavy late ones."""
    layers = []
    for k in range(18):
        resolution = 112 >> min(k // 4, 4)
        channels = 16 << min(k // 3, 5)
        layers.append(
            Layer(
                name=f"conv{k}",
                seconds=0.004 * (1 + k / 6) * rng.uniform(0.8, 1.2),
                weight_bytes=int(channels * channels * 9 * 4 * rng.uniform(0.8, 1.2)),
                output_bytes=resolution * resolution * channels * 4,
            )
        )
    layers.append(Layer("classifier", 0.002, 5 * MIB, 4000))
    return layers


def mixed_gpu_cpu(rng: random.Random) -> tuple[list[Device], list[Layer]]:
    """Two GPUs, two laptops and six CPU servers on 1 Gb/s and 10 Gb/s Ethernet."""
    devices = [
        Device("cpu-a", 1.0, 64 * GIB, 125e6, 2e-4),
        Device("cpu-b", 1.0, 64 * GIB, 125e6, 2e-4),
        Device("gpu-small", 12.0, 8 * GIB, 1.25e9, 5e-5),
        Device("laptop-a", 2.0, 16 * GIB, 125e6, 5e-4),
        Device("cpu-c", 0.8, 128 * GIB, 125e6, 2e-4),
        Device("gpu-big", 30.0, 24 * GIB, 1.25e9, 5e-5),
        Device("cpu-d", 1.0, 64 * GIB, 125e6, 2e-4),
        Device("laptop-b", 2.5, 16 * GIB, 125e6, 5e-4),
        Device("cpu-e", 1.2, 32 * GIB, 125e6, 2e-4),
        Device("cpu-f", 1.2, 32 * GIB, 125e6, 2e-4),
    ]
    return devices, transformer_profile(32, 0.05)


def edge_wifi(rng: random.Random) -> tuple[list[Device], list[Layer]]:
    """Eight single-board computers and a laptop on Wi-Fi, one board wired."""
    devices = []
    for k in range(8):
        speed = rng.choice([0.15, 0.25, 0.4])
        memory = rng.choice([1, 2, 4]) * GIB
        devices.append(Device(f"board{k}", speed, memory, rng.uniform(2e6, 6e6), rng.uniform(3e-3, 8e-3)))
    devices.append(Device("laptop", 1.0, 8 * GIB, 8e6, 4e-3))
    devices.append(Device("board-wired", 0.4, 4 * GIB, 100e6, 3e-4))
    return devices, cnn_profile(rng)


def big_cluster(rng: random.Random, count: int = 1000, layer_count: int = 200) -> tuple[list[Device], list[Layer]]:
    """1000 devices of four kinds on three network kinds, and a 200-block profile."""
    kinds = [
        # speed, memory, bandwidth, latency, weight
        (40.0, 80 * GIB, 12.5e9, 2e-5, 2),
        (8.0, 24 * GIB, 1.25e9, 1e-4, 12),
        (1.0, 32 * GIB, 1.25e9, 1e-4, 40),
        (0.3, 4 * GIB, 6e6, 4e-3, 46),
    ]
    devices = []
    for row in range(count):
        speed, memory, bandwidth, latency, _ = rng.choices(kinds, weights=[kind[4] for kind in kinds])[0]
        devices.append(Device(f"node{row}", speed * rng.uniform(0.8, 1.2), memory, bandwidth, latency))
    layers = [
        Layer(f"block{k}", 0.004 * rng.uniform(0.5, 1.5), rng.randint(20, 60) * MIB, rng.choice([MIB, 4 * MIB]))
        for k in range(layer_count)
    ]
    return devices, layers


def exact_twelve(rng: random.Random) -> tuple[list[Device], list[Layer]]:
    """Twelve mixed devices and 200 layers: the largest case searched over every device order."""
    devices, layers = big_cluster(rng, count=12, layer_count=200)
    return devices, layers


def even_split(devices: list[Device], layer_count: int) -> list[Stage]:
    used = devices[: min(len(devices), layer_count)]
    stages, start = [], 0
    for position, device in enumerate(used):
        end = round(layer_count * (position + 1) / len(used))
        stages.append(Stage(device.id, start, end - 1))
        start = end
    return stages


def memory_split(devices: list[Device], layer_count: int) -> list[Stage]:
    total = sum(device.memory_bytes for device in devices)
    stages, start, running = [], 0, 0
    for device in devices:
        running += device.memory_bytes
        end = round(layer_count * running / total)
        if end > start:
            stages.append(Stage(device.id, start, end - 1))
            start = end
    return stages


def baseline_period(stages: list[Stage], devices: list[Device], layers: list[Layer]) -> float | None:
    try:
        return evaluate(stages, devices, layers).period_s
    except PlanError:
        return None


def run_scenario(name: str, devices: list[Device], layers: list[Layer], repeats: int) -> dict:
    times = []
    result = None
    for _ in range(repeats):
        started = time.perf_counter()
        result = plan(devices, layers)
        times.append(time.perf_counter() - started)
    assert result is not None
    even = baseline_period(even_split(devices, len(layers)), devices, layers)
    memory = baseline_period(memory_split(devices, len(layers)), devices, layers)
    row = {
        "scenario": name,
        "devices": len(devices),
        "layers": len(layers),
        "method": result.method,
        "optimal": result.optimal,
        "period_s": result.period_s,
        "pipeline_period_s": result.pipeline_period_s,
        "lower_bound_s": result.lower_bound_s,
        "gap": result.period_s / result.lower_bound_s - 1.0 if result.lower_bound_s > 0 else None,
        "pipeline_lower_bound_s": result.pipeline_lower_bound_s,
        "pipeline_gap": (
            result.pipeline_period_s / result.pipeline_lower_bound_s - 1.0 if result.pipeline_lower_bound_s > 0 else None
        ),
        "stages": len(result.stages),
        "replicas": sum(len(stage.replicas) for stage in result.stages),
        "even_period_s": even,
        "memory_period_s": memory,
        "even_ratio": even / result.period_s if even is not None else None,
        "memory_ratio": memory / result.period_s if memory is not None else None,
        "planner_seconds_median": statistics.median(times),
        "planner_seconds_max": max(times),
    }
    return row


def describe(value: float | None, digits: int = 3) -> str:
    return "infeasible" if value is None else f"{value:.{digits}g}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11, help="seed for the synthetic clusters")
    parser.add_argument("--repeats", type=int, default=3, help="planner runs per scenario (median is reported)")
    args = parser.parse_args()
    scenarios = [
        ("mixed-gpu-cpu", mixed_gpu_cpu),
        ("edge-wifi", edge_wifi),
        ("exact-12x200", exact_twelve),
        ("cluster-1000x200", big_cluster),
    ]
    rows = []
    for name, build in scenarios:
        devices, layers = build(random.Random(args.seed))
        row = run_scenario(name, devices, layers, args.repeats)
        rows.append(row)
        print(
            f"{name:18s} {row['devices']:4d} dev x {row['layers']:3d} layers  {row['method']:18s} "
            f"period {row['period_s']:.4g} s (bound {row['lower_bound_s']:.4g}, gap {describe(row['gap'])}, "
            f"optimal {row['optimal']}, gap without replicas {describe(row['pipeline_gap'])})  even/planner {describe(row['even_ratio'])}  "
            f"memory/planner {describe(row['memory_ratio'])}  stages {row['stages']} replicas {row['replicas']}  "
            f"planning {row['planner_seconds_median']:.3f} s (max {row['planner_seconds_max']:.3f})"
        )
    summary = {
        "bench": "planner",
        "seed": args.seed,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "scenarios": rows,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
