"""Re-planning decisions without processes: placement prices, join moves and repair checks.

Every case runs the real planner on small profiles. Units take 10 ms at speed 1.0 unless a test
sets another value, so "4 units on one agent" means a 40 ms period.
"""

from __future__ import annotations

import pytest

from coordinator.placement import placement_from_stages, segments_on_route
from coordinator.planner import Device, Layer, PlanError, Stage, evaluate
from coordinator.replanning import (
    ModelShape,
    best_placement,
    check_repair,
    keep_repair,
    move_after_join,
    placement_cost,
    plan_after_join,
    shape_from_entry,
    stages_of,
)

MIB = 1 << 20
UNIT_S = 0.01


def agent(index: int, speed: float = 1.0, memory: int = 1 << 30, latency_s: float = 1e-4) -> Device:
    return Device(f"agent-{index}", speed, memory, 1e9, latency_s)


def units(count: int, seconds: float = UNIT_S) -> tuple[Layer, ...]:
    return tuple(Layer(f"unit.{i}", seconds, 4 * MIB, MIB) for i in range(count))


def chain(count: int = 6, cuts: tuple[int, ...] | None = None) -> ModelShape:
    return ModelShape(units(count), tuple(range(count - 1)) if cuts is None else cuts, ())


def branch(count: int, required: tuple[int, ...]) -> ModelShape:
    return ModelShape(units(count), tuple(range(count - 1)), required)


def placement(count: int, stages: list) -> object:
    return placement_from_stages("m", "v1", 1, count, [(first, last, tuple(agents)) for first, last, agents in stages])


# ===================================================================== prices


def test_cost_matches_planner_on_chain() -> None:
    shape = ModelShape(
        tuple(Layer(f"u{i}", 0.002 * (i + 1), MIB, (i + 1) * 100_000) for i in range(5)), (0, 1, 2, 3), ())
    devices = [agent(0, 1.0, latency_s=2e-4), agent(1, 2.5), agent(2, 0.7, latency_s=1e-3)]
    stages = [(0, 1, ("agent-2",)), (2, 3, ("agent-0",)), (4, 4, ("agent-1",))]
    ours = placement_cost(shape, stages, devices)
    planner = evaluate([Stage(a[0], first, last, a[1:]) for first, last, a in stages], devices, list(shape.units))
    assert ours.period_s == pytest.approx(planner.period_s)
    assert ours.latency_s == pytest.approx(planner.latency_s)


def test_cost_matches_planner_with_replicas() -> None:
    shape = chain(4)
    devices = [agent(0), agent(1, 2.0), agent(2, 0.5)]
    stages = [(0, 1, ("agent-0",)), (2, 3, ("agent-1", "agent-2"))]
    ours = placement_cost(shape, stages, devices)
    planner = evaluate([Stage(a[0], first, last, a[1:]) for first, last, a in stages], devices, list(shape.units))
    assert ours.period_s == pytest.approx(planner.period_s)
    assert ours.latency_s == pytest.approx(planner.latency_s)


def test_cost_sums_agent_with_two_segments() -> None:
    # A local repair gave agent-0 the lost segment next to its own: its load is both segments.
    shape = chain(6)
    devices = [agent(0), agent(2)]
    stages = [(0, 1, ("agent-0",)), (2, 3, ("agent-0",)), (4, 5, ("agent-2",))]
    cost = placement_cost(shape, stages, devices)
    assert cost.period_s == pytest.approx(4 * UNIT_S)
    # One link (agent-0 -> agent-2), none between agent-0's two segments.
    link = 1e-4 + MIB / 1e9
    assert cost.latency_s == pytest.approx(6 * UNIT_S + link)


def test_cost_counts_moved_bytes() -> None:
    shape = chain(4)
    devices = [agent(0), agent(1)]
    current = [(0, 1, ("agent-0",)), (2, 3, ("agent-1",))]
    assert placement_cost(shape, current, devices, current=current).moved_bytes == 0
    shifted = [(0, 2, ("agent-0",)), (3, 3, ("agent-1",))]
    assert placement_cost(shape, shifted, devices, current=current).moved_bytes == 4 * MIB


def test_cost_branch_is_worst_task_mix() -> None:
    # Trunk 0..3, heads 4 and 5. agent-1 runs the trunk's end and head 4, and agent-2 runs head 5.
    shape = branch(6, (3, 4))
    devices = [agent(0), agent(1), agent(2)]
    stages = [(0, 1, ("agent-0",)), (2, 3, ("agent-1",)), (4, 4, ("agent-1",)), (5, 5, ("agent-2",))]
    cost = placement_cost(shape, stages, devices)
    # Route of head 4: agent-1 runs units 2, 3 and 4. Route of head 5: at most 2 units per agent.
    assert cost.period_s == pytest.approx(3 * UNIT_S)
    head_five_only = placement_cost(shape, stages, devices, routes=[(0, 1, 2, 3, 5)])
    assert head_five_only.period_s == pytest.approx(2 * UNIT_S)


def test_cost_rejects_segment_across_heads() -> None:
    shape = branch(6, (3, 4))
    devices = [agent(0), agent(1)]
    with pytest.raises(PlanError, match="partly on the route"):
        placement_cost(shape, [(0, 3, ("agent-0",)), (4, 5, ("agent-1",))], devices)


def test_cost_rejects_unknown_agent() -> None:
    with pytest.raises(PlanError, match="agent-9"):
        placement_cost(chain(2), [(0, 1, ("agent-9",))], [agent(0)])


# ===================================================================== stored shape


def test_shape_from_entry_reads_profile_and_cuts() -> None:
    profile = [{"name": f"u{i}", "seconds": 0.01, "weight_bytes": 10, "output_bytes": 4} for i in range(5)]
    shape = shape_from_entry({"profile": profile, "allowed_cuts": [1, 2], "required_cuts": [1, 2]}, 5)
    assert shape is not None
    assert shape.groups == [(0, 1), (2, 2), (3, 4)]
    assert shape.heads == [(2, 2), (3, 4)]
    assert shape.routes == [(0, 1, 2), (0, 1, 3, 4)]


def test_shape_from_entry_without_profile() -> None:
    # A deploy with max_stages stores no profile: the version is not re-planned.
    assert shape_from_entry({"profile": None, "allowed_cuts": [0]}, 2) is None


def test_shape_from_entry_rejects_bad_rows() -> None:
    profile = [{"name": "u", "seconds": 0.01, "weight_bytes": 10, "output_bytes": 4}] * 3
    with pytest.raises(PlanError, match="3 rows"):
        shape_from_entry({"profile": profile}, 4)
    with pytest.raises(PlanError, match="required cuts"):
        shape_from_entry({"profile": profile, "allowed_cuts": [0], "required_cuts": [1]}, 3)
    with pytest.raises(PlanError, match="out of range"):
        shape_from_entry({"profile": profile, "allowed_cuts": [2]}, 3)


# ===================================================================== decisions


@pytest.mark.parametrize(("repaired", "best", "keep"), [
    (0.0104, 0.0100, True),   # 4 % above the best: within 5 %
    (0.0105, 0.0100, True),   # exactly 5 % above: a tie at the tolerance keeps the repair
    (0.0106, 0.0100, False),  # 6 % above
    (0.0100, 0.0100, True),   # equal periods
    (0.0090, 0.0100, True),   # the repair beats the (heuristic) best
    (0.0, 0.0, True),
    (0.0400, 0.0300, False),
])
def test_keep_repair_cases(repaired: float, best: float, keep: bool) -> None:
    assert keep_repair(repaired, best, 0.05) is keep


def test_keep_repair_rejects_invalid_numbers() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        keep_repair(0.01, 0.01, -0.1)
    with pytest.raises(ValueError, match="repaired period"):
        keep_repair(float("nan"), 0.01)
    with pytest.raises(ValueError, match="best period"):
        keep_repair(0.01, -1.0)


@pytest.mark.parametrize(("current", "best", "move"), [
    (0.04, 0.02, True),
    (0.04, 0.037, False),  # 7.5 % lower: within the 10 % hysteresis
    (0.04, 0.036, False),  # exactly 10 % lower: not more than the hysteresis
    (0.04, 0.035, True),
    (0.04, 0.05, False),
])
def test_move_after_join_cases(current: float, best: float, move: bool) -> None:
    assert move_after_join(current, best, 0.1) is move


def test_move_after_join_rejects_invalid_hysteresis() -> None:
    with pytest.raises(ValueError, match="hysteresis"):
        move_after_join(0.04, 0.02, 1.0)


# ===================================================================== death repair


def test_repair_far_from_best_is_replaced() -> None:
    # Plan 2/2/2 on three agents; agent-1 died and its two units went to agent-0 (4 units).
    shape = chain(6)
    repaired = placement(6, [(0, 1, ["agent-0"]), (2, 3, ["agent-0"]), (4, 5, ["agent-2"])])
    check = check_repair(shape, repaired, [agent(0), agent(2)], replicas=False, plan_version=7)
    assert not check.keep
    assert check.repaired_cost.period_s == pytest.approx(4 * UNIT_S)
    assert check.best_cost.period_s == pytest.approx(3 * UNIT_S)
    assert [(s.first, s.last) for s in check.best.segments] == [(0, 2), (3, 5)]
    assert check.best.plan_version == 7
    assert check.best.optimal
    assert check.repaired.predicted_period_s == pytest.approx(4 * UNIT_S)


def test_repair_equal_to_best_is_kept() -> None:
    # Block cuts after units 1 and 3 leave three groups of two units: with two survivors the
    # best is also 4/2, so the repair moves nothing more.
    shape = chain(6, cuts=(1, 3))
    repaired = placement(6, [(0, 1, ["agent-0"]), (2, 3, ["agent-0"]), (4, 5, ["agent-2"])])
    check = check_repair(shape, repaired, [agent(0), agent(2)], replicas=False, plan_version=7)
    assert check.keep
    assert check.repaired_cost.period_s == pytest.approx(check.best_cost.period_s)


def test_repair_within_tolerance_is_kept() -> None:
    # 50 units of 1 ms on two survivors: the repair splits them 26/24, the best 25/25 (4 % less).
    shape = ModelShape(units(50, 0.001), tuple(range(49)), ())
    repaired = placement(50, [(0, 25, ["agent-0"]), (26, 49, ["agent-1"])])
    devices = [agent(0), agent(1)]
    check = check_repair(shape, repaired, devices, replicas=False, plan_version=3)
    assert check.repaired_cost.period_s == pytest.approx(0.026)
    assert check.best_cost.period_s == pytest.approx(0.025)
    assert check.keep
    strict = check_repair(shape, repaired, devices, replicas=False, plan_version=3, tolerance=0.03)
    assert not strict.keep
    assert [(s.first, s.last) for s in strict.best.segments] == [(0, 24), (25, 49)]


def test_repair_replaced_when_survivor_is_slow() -> None:
    # The lost segment went to a survivor at half speed; the best gives the slow agent less.
    shape = chain(4)
    repaired = placement(4, [(0, 1, ["agent-0"]), (2, 3, ["agent-1"])])
    check = check_repair(shape, repaired, [agent(0), agent(1, speed=0.5)], replicas=False, plan_version=3)
    assert check.repaired_cost.period_s == pytest.approx(4 * UNIT_S)
    assert check.best_cost.period_s == pytest.approx(3 * UNIT_S)
    assert not check.keep


# ===================================================================== joins


def test_join_block_model_takes_a_group() -> None:
    shape = chain(6, cuts=(1, 3))
    current = placement(6, [(0, 3, ["agent-0"]), (4, 5, ["agent-1"])])
    better, current_cost, best_cost = plan_after_join(
        shape, current, [agent(0), agent(1), agent(2)], hysteresis=0.1, replicas=False, plan_version=5)
    assert better is not None
    assert current_cost.period_s == pytest.approx(4 * UNIT_S)
    assert best_cost.period_s == pytest.approx(2 * UNIT_S)
    assert {s.first for s in better.segments} <= {0, 2, 4}
    assert "agent-2" in better.agents
    assert better.plan_version == 5


def test_join_block_model_without_gain_keeps_plan() -> None:
    # One allowed cut: a third agent cannot lower the period.
    shape = chain(6, cuts=(2,))
    current = placement(6, [(0, 2, ["agent-0"]), (3, 5, ["agent-1"])])
    better, current_cost, best_cost = plan_after_join(
        shape, current, [agent(0), agent(1), agent(2)], hysteresis=0.1, replicas=False, plan_version=5)
    assert better is None
    assert best_cost.period_s == pytest.approx(current_cost.period_s)


def test_join_branch_model_serves_every_task() -> None:
    # Trunk 0..3 and two one-unit heads. The deploy's chain plan on two agents put units 0..2
    # on agent-0: the worst task route has 3 units on one agent.
    shape = branch(6, (3, 4))
    current = placement(6, [(0, 2, ["agent-0"]), (3, 3, ["agent-1"]), (4, 4, ["agent-1"]), (5, 5, ["agent-1"])])
    devices = [agent(0), agent(1), agent(2)]
    better, current_cost, best_cost = plan_after_join(shape, current, devices, hysteresis=0.1, replicas=False,
                                                      plan_version=2)
    assert better is not None
    assert current_cost.period_s == pytest.approx(3 * UNIT_S)
    assert best_cost.period_s == pytest.approx(2 * UNIT_S)
    assert "agent-2" in better.agents
    assert not better.optimal
    for route in shape.routes:
        assert segments_on_route(better, route) is not None, (route, better.segments)


def test_branch_best_uses_heaviest_head_chain() -> None:
    # Trunk 0..1 and two two-unit heads on two agents. The chain over all units splits head 2..3
    # across both agents (30 ms); the trunk on agent-0 and both heads on agent-1 gives 20 ms.
    shape = branch(6, (1, 3))
    stages, cost, optimal = best_placement(shape, [agent(0), agent(1)], [], replicas=False)
    assert cost.period_s == pytest.approx(2 * UNIT_S)
    assert not optimal
    holders = {(first, last): agents for first, last, agents in stages}
    assert holders[(0, 1)] != holders[(2, 3)]
    assert holders[(2, 3)] == holders[(4, 5)]


def test_branch_head_too_large_falls_back_to_chain() -> None:
    # Head 2 needs 8 MiB; each agent has 6 MiB, so only plans that split it over both fit.
    shape = ModelShape((Layer("t", UNIT_S, MIB, MIB), Layer("h0", UNIT_S, 4 * MIB, MIB),
                        Layer("h1", UNIT_S, 4 * MIB, MIB), Layer("g", UNIT_S, MIB, MIB)), (0, 1, 2), (0, 2))
    devices = [agent(0, memory=6 * MIB), agent(1, memory=6 * MIB)]
    stages, cost, _ = best_placement(shape, devices, [], replicas=False)
    placed = placement_from_stages("m", "v1", 1, 4, stages)
    for route in shape.routes:
        assert segments_on_route(placed, route) is not None
    assert {agents for first, last, agents in stages if first in (1, 2)} == {("agent-0",), ("agent-1",)}
    assert cost.period_s > 0


def test_stages_of_round_trip() -> None:
    current = placement(4, [(0, 1, ["a", "b"]), (2, 3, ["c"])])
    assert stages_of(current) == [(0, 1, ("a", "b")), (2, 3, ("c",))]
