"""Tests of the pipeline planner, its lower bounds, re-planning and the ``shardmesh plan`` CLI.

The brute force below prices plans with its own copy of the cost model's formulas, so a wrong
table or a wrong search in the planner cannot hide behind a shared helper.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.plan_cli import main as plan_main
from coordinator.planner import Device, Layer, Plan, PlanError, Stage, evaluate, plan, replan
from coordinator.planner_costs import build_tables, lower_bound_pipeline

MIB = 1 << 20


def price(devices: list[Device], layers: list[Layer], parts: list[tuple[int, int, int]]) -> tuple[float, float] | None:
    """Return (period, latency) of (device, start, end) parts, or None when a stage does not fit."""
    period = 0.0
    latency = 0.0
    for position, (row, start, end) in enumerate(parts):
        device = devices[row]
        if sum(layers[k].weight_bytes for k in range(start, end)) > device.memory_bytes:
            return None
        if device.layer_seconds is not None:
            compute = sum(device.layer_seconds[k] for k in range(start, end))
        else:
            compute = sum(layers[k].seconds / device.speed for k in range(start, end))
        period = max(period, compute)
        latency += compute
        if position > 0:
            sender = devices[parts[position - 1][0]]
            link = max(sender.latency_s, device.latency_s) + layers[start - 1].output_bytes / min(
                sender.bandwidth_bytes_per_s, device.bandwidth_bytes_per_s
            )
            period = max(period, link)
            latency += link
    return period, latency


def brute_force(
    devices: list[Device], layers: list[Layer], *, fixed_order: bool = False
) -> tuple[float, float] | None:
    """Return the lexicographically smallest (period, latency) over every order, subset and cut."""
    best: tuple[float, float] | None = None
    layer_count = len(layers)
    for count in range(1, min(len(devices), layer_count) + 1):
        if fixed_order:
            sequences = itertools.combinations(range(len(devices)), count)
        else:
            sequences = itertools.permutations(range(len(devices)), count)
        sequences = list(sequences)
        for cuts in itertools.combinations(range(1, layer_count), count - 1):
            bounds = (0, *cuts, layer_count)
            for sequence in sequences:
                parts = [(sequence[k], bounds[k], bounds[k + 1]) for k in range(count)]
                cost = price(devices, layers, parts)
                if cost is None:
                    continue
                if best is None or cost[0] < best[0] * (1 - 1e-9) or (
                    cost[0] <= best[0] * (1 + 1e-9) and cost[1] < best[1]
                ):
                    best = cost
    return best


@st.composite
def instances(draw: st.DrawFn, max_devices: int = 4, max_layers: int = 5) -> tuple[list[Device], list[Layer]]:
    layer_count = draw(st.integers(1, max_layers))
    layers = [
        Layer(
            name=f"layer{k}",
            seconds=draw(st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0])),
            weight_bytes=draw(st.integers(0, 10)),
            output_bytes=draw(st.sampled_from([0, 10, 100, 400])),
        )
        for k in range(layer_count)
    ]
    device_count = draw(st.integers(1, max_devices))
    devices = []
    for row in range(device_count):
        measured = draw(st.booleans()) and draw(st.booleans())
        devices.append(
            Device(
                id=f"dev{row}",
                speed=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
                memory_bytes=draw(st.integers(5, 40)),
                bandwidth_bytes_per_s=draw(st.sampled_from([50.0, 200.0, 1000.0])),
                latency_s=draw(st.sampled_from([0.0, 0.1, 0.5])),
                layer_seconds=(
                    tuple(draw(st.sampled_from([0.2, 0.5, 1.0, 2.0])) for _ in range(layer_count)) if measured else None
                ),
            )
        )
    return devices, layers


def assert_matches(result: Plan, expected: tuple[float, float], devices: list[Device], layers: list[Layer]) -> None:
    assert math.isclose(result.period_s, expected[0], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(result.latency_s, expected[1], rel_tol=1e-9, abs_tol=1e-12)
    index = {device.id: row for row, device in enumerate(devices)}
    parts = [(index[s.device], s.first_layer, s.last_layer + 1) for s in result.stages]
    repriced = price(devices, layers, parts)
    assert repriced is not None
    assert math.isclose(repriced[0], result.period_s, rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_plan_matches_brute_force(instance: tuple[list[Device], list[Layer]]) -> None:
    devices, layers = instance
    expected = brute_force(devices, layers)
    if expected is None:
        with pytest.raises(PlanError):
            plan(devices, layers, replicas=False)
        return
    result = plan(devices, layers, replicas=False)
    assert result.optimal
    assert_matches(result, expected, devices, layers)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_devices=5))
def test_plan_fixed_order_matches_brute_force(instance: tuple[list[Device], list[Layer]]) -> None:
    devices, layers = instance
    expected = brute_force(devices, layers, fixed_order=True)
    if expected is None:
        with pytest.raises(PlanError):
            plan(devices, layers, fixed_order=True, replicas=False)
        return
    result = plan(devices, layers, fixed_order=True, replicas=False)
    assert result.optimal
    assert_matches(result, expected, devices, layers)
    order = [int(stage.device.removeprefix("dev")) for stage in result.stages]
    assert order == sorted(order)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(max_devices=4))
def test_lower_bound_below_brute_force(instance: tuple[list[Device], list[Layer]]) -> None:
    devices, layers = instance
    expected = brute_force(devices, layers)
    if expected is None:
        return
    bound = lower_bound_pipeline(build_tables(devices, layers))
    assert bound <= expected[0] * (1 + 1e-9)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=2, max_size=5),
    st.lists(st.integers(2, 12), min_size=5, max_size=5),
    st.integers(2, 6),
)
def test_plan_identical_layers_order_free(speeds: list[float], memories: list[int], layer_count: int) -> None:
    # All layers equal and one network: exact without the subset search, so this also covers the
    # path used for large clusters of this kind.
    layers = [Layer(f"block{k}", 1.0, 3, 100) for k in range(layer_count)]
    devices = [Device(f"dev{k}", speed, memories[k], 1000.0, 0.05) for k, speed in enumerate(speeds)]
    expected = brute_force(devices, layers)
    if expected is None:
        with pytest.raises(PlanError):
            plan(devices, layers, replicas=False)
        return
    result = plan(devices, layers, replicas=False)
    assert result.method == "order-free"
    assert result.optimal
    assert_matches(result, expected, devices, layers)


def test_plan_layer_fits_nowhere() -> None:
    layers = [Layer("embed", 1.0, 10, 8), Layer("huge_head", 1.0, 500, 8)]
    devices = [Device("a", 1.0, 100, 1e6, 0.0), Device("b", 1.0, 200, 1e6, 0.0)]
    with pytest.raises(PlanError) as error:
        plan(devices, layers)
    message = str(error.value)
    assert "layer 1" in message
    assert "'huge_head'" in message
    assert "500" in message
    assert "200" in message


def test_plan_total_memory_too_small() -> None:
    layers = [Layer(f"block{k}", 1.0, 60, 8) for k in range(4)]
    devices = [Device("a", 1.0, 100, 1e6, 0.0), Device("b", 1.0, 100, 1e6, 0.0)]
    with pytest.raises(PlanError) as error:
        plan(devices, layers)
    assert "layer 2" in str(error.value)


def test_plan_memory_forces_split() -> None:
    layers = [Layer(f"block{k}", 1.0, 60, 8) for k in range(4)]
    devices = [Device("fast", 4.0, 130, 1e6, 0.0), Device("slow", 1.0, 130, 1e6, 0.0)]
    result = plan(devices, layers, replicas=False)
    assert [stage.device for stage in result.stages] == ["fast", "slow"] or len(result.stages) == 2
    assert math.isclose(result.period_s, 2.0)


def test_plan_slow_link_prefers_fewer_stages() -> None:
    layers = [Layer(f"block{k}", 1.0, 1, 10 * MIB) for k in range(4)]
    slow_link = [Device(f"board{k}", 1.0, 100, 1 * MIB, 0.01) for k in range(4)]
    result = plan(slow_link, layers, replicas=False)
    # A link costs 10 s, more than running all four layers (4 s) on one board.
    assert len(result.stages) == 1
    assert math.isclose(result.period_s, 4.0)
    fast_link = [Device(f"board{k}", 1.0, 100, 1000 * MIB, 0.001) for k in range(4)]
    result = plan(fast_link, layers, replicas=False)
    assert len(result.stages) == 4
    assert math.isclose(result.period_s, 1.0)


def test_plan_leaves_out_slow_device() -> None:
    layers = [Layer(f"block{k}", 1.0, 1, 10) for k in range(6)]
    devices = [Device("gpu0", 10.0, 100, 1e9, 0.0), Device("pi", 0.1, 100, 1e9, 0.0), Device("gpu1", 10.0, 100, 1e9, 0.0)]
    result = plan(devices, layers, replicas=False)
    assert "pi" not in [stage.device for stage in result.stages]
    assert math.isclose(result.period_s, 0.3)


def test_plan_replicates_bottleneck() -> None:
    layers = [Layer("single", 3.0, 1, 10)]
    devices = [Device(f"cpu{k}", 1.0, 100, 1e9, 0.0) for k in range(3)]
    result = plan(devices, layers)
    assert len(result.stages) == 1
    assert len(result.stages[0].replicas) == 2
    assert math.isclose(result.period_s, 1.0)
    assert math.isclose(result.pipeline_period_s, 3.0)
    assert result.lower_bound_s <= result.period_s
    assert result.optimal  # the work bound (3 s of work over total speed 3) is met


def test_plan_current_breaks_ties() -> None:
    layers = [Layer(f"block{k}", 1.0, 10, 10) for k in range(2)]
    devices = [Device("a", 1.0, 100, 1e9, 0.0), Device("b", 1.0, 100, 1e9, 0.0)]
    current = (Stage("b", 0, 0), Stage("a", 1, 1))
    result = plan(devices, layers, current=current, replicas=False)
    assert [stage.device for stage in result.stages] == ["b", "a"]
    assert result.moved_bytes == 0


def test_plan_to_json_keys() -> None:
    layers = [Layer("block0", 1.0, 10, 10), Layer("block1", 2.0, 10, 10)]
    devices = [Device("a", 1.0, 100, 1e9, 0.0), Device("b", 1.0, 100, 1e9, 0.0)]
    document = plan(devices, layers).to_json()
    assert set(document) == {"period_s", "latency_s", "stages", "lower_bound_s", "optimal", "planner_seconds"}
    assert document["stages"][0].keys() == {"device", "first_layer", "last_layer"}
    assert json.loads(json.dumps(document)) == document


def test_plan_large_cluster_certified_gap() -> None:
    layers = [Layer(f"block{k}", 0.01 * (1 + k % 3), 40 * MIB, MIB * (1 + 3 * (k % 2))) for k in range(40)]
    devices = []
    for row in range(60):
        if row % 10 == 0:
            devices.append(Device(f"gpu{row}", 30.0 + row % 7, 16 << 30, 12.5e9, 2e-5))
        elif row % 3 == 0:
            devices.append(Device(f"board{row}", 0.3, 1 << 30, 12e6, 3e-3))
        else:
            devices.append(Device(f"cpu{row}", 1.0 + (row % 5) / 10, 8 << 30, 1.25e9, 1e-4))
    result = plan(devices, layers, replicas=False)
    assert result.method == "ordered-heuristic"
    assert 0 < result.lower_bound_s <= result.period_s
    cost = evaluate(result.stages, devices, layers)
    assert math.isclose(cost.period_s, result.period_s)


def test_evaluate_rejects_gap_in_stages() -> None:
    layers = [Layer(f"block{k}", 1.0, 1, 1) for k in range(3)]
    devices = [Device("a", 1.0, 100, 1e9, 0.0), Device("b", 1.0, 100, 1e9, 0.0)]
    with pytest.raises(PlanError) as error:
        evaluate([Stage("a", 0, 0), Stage("b", 2, 2)], devices, layers)
    assert "layer 1 is next" in str(error.value)


def pipeline_cluster() -> tuple[list[Device], list[Layer]]:
    layers = [Layer(f"block{k}", 1.0, 10, 100) for k in range(8)]
    devices = [Device(f"node{k}", 1.0, 40, 1e6, 0.001) for k in range(4)]
    return devices, layers


def test_replan_join_within_hysteresis_keeps_plan() -> None:
    layers = [Layer("block0", 1.0, 10, 100)]
    devices = [Device("node0", 1.0, 40, 1e6, 0.001)]
    previous = plan(devices, layers, replicas=False)
    # The newcomer alone would lower the period by about 3 %, less than the 5 % hysteresis.
    joined = devices + [Device("newcomer", 1.0 / 0.97, 40, 1e6, 0.001)]
    fresh = plan(joined, layers, replicas=False)
    assert fresh.period_s < previous.period_s
    assert [stage.device for stage in fresh.stages] == ["newcomer"]
    kept = replan(previous, joined, layers, hysteresis=0.05, replicas=False)
    assert kept.stages == previous.stages
    assert kept.method == "kept"
    assert kept.moved_bytes == 0
    switched = replan(previous, joined, layers, hysteresis=0.01, replicas=False)
    assert switched.stages == fresh.stages


def test_replan_join_beyond_hysteresis_switches() -> None:
    devices, layers = pipeline_cluster()
    previous = plan(devices, layers, replicas=False)
    joined = devices + [Device(f"extra{k}", 1.0, 40, 1e6, 0.001) for k in range(4)]
    switched = replan(previous, joined, layers, hysteresis=0.05, replicas=False)
    assert math.isclose(switched.period_s, 1.0)
    assert switched.stages != previous.stages


def test_replan_death_repaired_locally() -> None:
    devices, layers = pipeline_cluster()
    spare = Device("spare", 1.0, 40, 1e6, 0.001)
    previous = plan(devices + [spare], layers, replicas=False)
    assert "spare" not in [stage.device for stage in previous.stages]
    victim = previous.stages[1]
    survivors = [device for device in devices + [spare] if device.id != victim.device]
    repaired = replan(previous, survivors, layers, replicas=False)
    assert repaired.method == "repair"
    moved_layers = victim.last_layer - victim.first_layer + 1
    assert repaired.moved_bytes == moved_layers * 10
    untouched = [stage for stage in previous.stages if stage.device != victim.device]
    assert all(stage in repaired.stages for stage in untouched)
    assert any(stage.device == "spare" for stage in repaired.stages)


def test_replan_death_promotes_replica() -> None:
    layers = [Layer("single", 3.0, 1, 10)]
    devices = [Device(f"cpu{k}", 1.0, 100, 1e9, 0.0) for k in range(3)]
    previous = plan(devices, layers)
    primary = previous.stages[0].device
    survivors = [device for device in devices if device.id != primary]
    repaired = replan(previous, survivors, layers)
    assert repaired.moved_bytes == 0
    assert math.isclose(repaired.period_s, 1.5)


def test_replan_death_replans_when_repair_is_poor() -> None:
    devices, layers = pipeline_cluster()
    previous = plan(devices, layers, replicas=False)
    assert [stage.device for stage in previous.stages] == ["node0", "node1", "node2", "node3"]
    # With no spare, the first stage can only merge into its one neighbour (period 4 s), while
    # re-planning on the three survivors gives 3 s.
    result = replan(previous, devices[1:], layers, replicas=False)
    assert result.method != "repair"
    assert math.isclose(result.period_s, 3.0)


def write_json(path: Path, document: object) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def cli_files(tmp_path: Path) -> tuple[Path, Path]:
    cluster = write_json(
        tmp_path / "cluster.json",
        {
            "devices": [
                {"id": "gpu", "speed": 4.0, "memory_bytes": 1000, "bandwidth_bytes_per_s": 1e9, "latency_s": 0.001},
                {
                    "id": "cpu",
                    "speed": 1.0,
                    "memory_bytes": 1000,
                    "bandwidth_bytes_per_s": 1e9,
                    "latency_s": 0.001,
                    "layer_seconds": [1.0, 1.0, 1.0, 1.0],
                },
            ]
        },
    )
    profile = write_json(
        tmp_path / "profile.json",
        {"layers": [{"name": f"block{k}", "seconds": 1.0, "weight_bytes": 100, "output_bytes": 1000} for k in range(4)]},
    )
    return cluster, profile


def test_plan_cli_json_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, profile = cli_files(tmp_path)
    status = plan_main(["plan", "--cluster", str(cluster), "--profile", str(profile), "--json"])
    assert status == 0
    document = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(document) == {"period_s", "latency_s", "stages", "lower_bound_s", "optimal", "planner_seconds"}
    assert document["stages"][0]["first_layer"] == 0
    assert document["stages"][-1]["last_layer"] == 3
    assert document["optimal"] is True
    # The GPU alone takes 1 s; splitting off a layer to the CPU also gives 1 s but adds latency.
    assert math.isclose(document["period_s"], 1.0, rel_tol=1e-9)
    assert document["stages"] == [{"device": "gpu", "first_layer": 0, "last_layer": 3}]


def test_plan_cli_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, profile = cli_files(tmp_path)
    assert plan_main(["--cluster", str(cluster), "--profile", str(profile), "--fixed-order"]) == 0
    output = capsys.readouterr().out
    assert output.splitlines()[0].split()[:3] == ["stage", "device", "layers"]
    assert "period_s" in output.splitlines()[-1]


def test_plan_cli_bad_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, profile = cli_files(tmp_path)
    broken = tmp_path / "broken.json"
    broken.write_text('{"devices": [', encoding="utf-8")
    assert plan_main(["--cluster", str(broken), "--profile", str(profile)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert "broken.json" in error
    assert "invalid JSON" in error


def test_plan_cli_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster, _ = cli_files(tmp_path)
    profile = write_json(tmp_path / "profile.json", {"layers": [{"name": "block0", "seconds": 1.0, "weight_bytes": 1}]})
    assert plan_main(["--cluster", str(cluster), "--profile", str(profile)]) == 2
    error = capsys.readouterr().err.strip()
    assert "profile.json" in error
    assert "layers[0].output_bytes" in error
    assert "expected an integer" in error


def test_plan_cli_wrong_type(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, profile = cli_files(tmp_path)
    cluster = write_json(
        tmp_path / "cluster.json",
        {"devices": [{"id": "a", "speed": "fast", "memory_bytes": 1, "bandwidth_bytes_per_s": 1.0, "latency_s": 0.0}]},
    )
    assert plan_main(["--cluster", str(cluster), "--profile", str(profile)]) == 2
    error = capsys.readouterr().err.strip()
    assert "devices[0].speed" in error
    assert "expected a number" in error


def test_plan_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, profile = cli_files(tmp_path)
    assert plan_main(["--cluster", str(tmp_path / "absent.json"), "--profile", str(profile)]) == 2
    assert "absent.json" in capsys.readouterr().err


def test_plan_cli_infeasible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cluster = write_json(
        tmp_path / "cluster.json",
        {"devices": [{"id": "a", "speed": 1.0, "memory_bytes": 1000, "bandwidth_bytes_per_s": 1.0, "latency_s": 0.0}]},
    )
    profile = write_json(
        tmp_path / "profile.json",
        {"layers": [{"name": "giant", "seconds": 1.0, "weight_bytes": 5000, "output_bytes": 1}]},
    )
    assert plan_main(["--cluster", str(cluster), "--profile", str(profile), "--json"]) == 1
    error = capsys.readouterr().err
    assert "'giant'" in error
    assert "5000" in error
