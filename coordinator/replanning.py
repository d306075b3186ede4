"""Re-planning a deployed version: pricing a placement, finding the best one, and deciding to move.

The coordinator re-plans a version in two situations. When an agent joins, it moves to the best
placement over the grown cluster if that lowers the period by more than a hysteresis. After an
agent dies, it first repairs the placement locally (only the lost segments move) and then
compares that repair with the best placement over the survivors. Everything here is pure: it
takes the version's stored profile and cut rules, the current placement and the planner's
device records, and returns placements and numbers. The coordinator commits what it decides.

Cost of a placement
-------------------
A placement is a list of segments (inclusive unit ranges) with the agents that hold them. It is
priced with the planner's cost model (``coordinator.planner``) on every route of the model:

* a chain model (layer or block strategy) has one route over every unit;
* a branch model has one route per task, the trunk followed by that task's head.

On a route, an agent's load is the sum of the seconds of its segments on that route, divided by
the holder count of each replicated segment. A link is charged between two consecutive segments
of the route whose holder tuples differ. The route's period is the largest load or link time.
The placement's period is the largest route period. For a branch model this is the period
under the worst task mix: an agent's load is linear in the task fractions, so its maximum over
every mix lies at a mix of one task. For a chain whose stages are on distinct agents, this is
the planner's own period. It also prices a local repair that gave one agent two segments: that
agent's load is the sum of both, with no link between them.

Best placement
--------------
The planner places unit groups (the units between two allowed cuts), so every cut it picks is
an allowed cut. A required cut (trunk end, head end) inside a stage splits it into two segments
on the same agents. That is the deploy's path, and the only candidate for a chain. A branch model gets two more candidates:
the trunk alone, or the trunk followed by its heaviest head, is planned as a chain, and each
remaining head, heaviest first, goes whole to the agent that keeps the worst-mix period lowest.
The candidate with the lowest period, then latency, then moved bytes wins. Only a chain's plan
from an exact planner search is marked optimal.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from coordinator.micromodel import merge_profile, unit_groups
from coordinator.placement import Placement, expand_stages, placement_from_stages
from coordinator.planner import (
    EQUAL_PERIOD_TOLERANCE,
    REPAIR_TOLERANCE,
    Device,
    Layer,
    PlanError,
    Stage,
    plan as make_plan,
)
from coordinator.planner_costs import build_tables
from coordinator.planner_model import group_link_seconds

logger = logging.getLogger(__name__)

# A stage of a placement: first unit, last unit (inclusive) and the agents that hold it.
UnitStage = tuple[int, int, tuple[str, ...]]


@dataclass(frozen=True)
class ModelShape:
    """The stored facts the planner needs about a deployed version: per-unit profile and cuts."""

    units: tuple[Layer, ...]
    allowed_cuts: tuple[int, ...]
    required_cuts: tuple[int, ...]

    @property
    def unit_count(self) -> int:
        return len(self.units)

    @property
    def groups(self) -> list[tuple[int, int]]:
        return unit_groups(self.unit_count, self.allowed_cuts)

    @property
    def group_layers(self) -> list[Layer]:
        rows = [{"name": u.name, "seconds": u.seconds, "weight_bytes": u.weight_bytes, "output_bytes": u.output_bytes}
                for u in self.units]
        return [Layer(row["name"], float(row["seconds"]), int(row["weight_bytes"]), int(row["output_bytes"]))
                for row in merge_profile(rows, self.allowed_cuts)]

    @property
    def is_branch(self) -> bool:
        return bool(self.required_cuts)

    @property
    def trunk_end(self) -> int:
        """Last unit of the trunk (of the whole model for a chain)."""
        return self.required_cuts[0] if self.required_cuts else self.unit_count - 1

    @property
    def heads(self) -> list[tuple[int, int]]:
        """Inclusive unit ranges of the heads in unit order; empty for a chain."""
        if not self.required_cuts:
            return []
        ends = [*self.required_cuts[1:], self.unit_count - 1]
        starts = [cut + 1 for cut in self.required_cuts]
        return list(zip(starts, ends))

    @property
    def routes(self) -> list[tuple[int, ...]]:
        """Unit indices each request visits: one route for a chain, one per head for a branch model."""
        trunk = tuple(range(self.trunk_end + 1))
        if not self.is_branch:
            return [trunk]
        return [trunk + tuple(range(first, last + 1)) for first, last in self.heads]

    def weight_bytes(self, first: int, last: int) -> int:
        return sum(unit.weight_bytes for unit in self.units[first:last + 1])

    def seconds(self, first: int, last: int) -> float:
        return sum(unit.seconds for unit in self.units[first:last + 1])


@dataclass(frozen=True)
class PlacementCost:
    """Period and latency of a placement on its worst route, and the weight bytes agents must fetch."""

    period_s: float
    latency_s: float
    moved_bytes: int


@dataclass(frozen=True)
class RepairCheck:
    """A local repair priced against the best placement over the survivors."""

    repaired: Placement  # the repair, with its predicted period and latency filled in
    repaired_cost: PlacementCost
    best: Placement
    best_cost: PlacementCost
    keep: bool


def shape_from_entry(entry: Mapping, unit_count: int) -> ModelShape | None:
    """Build the shape of a registry version entry; None when the deploy stored no profile.

    Deploys made before profiles were kept for ``max_stages`` versions stored none, and such a
    version is never re-planned. Raises ``PlanError`` when the stored rows do not match the model.
    """
    profile = entry.get("profile")
    if not profile:
        return None
    if len(profile) != unit_count:
        raise PlanError(f"the stored profile has {len(profile)} rows but the placement covers {unit_count} units; "
                        f"deploy the version again to store a matching profile")
    units = tuple(Layer(str(row["name"]), float(row["seconds"]), int(row["weight_bytes"]), int(row["output_bytes"]))
                  for row in profile)
    stored = entry.get("allowed_cuts")
    allowed = tuple(range(unit_count - 1)) if stored is None else tuple(sorted({int(cut) for cut in stored}))
    required = tuple(sorted({int(cut) for cut in entry.get("required_cuts") or ()}))
    invalid = [cut for cut in (*allowed, *required) if not 0 <= cut < unit_count - 1]
    if invalid:
        raise PlanError(f"stored cuts {invalid} are out of range 0..{unit_count - 2}; deploy the version again")
    missing = sorted(set(required) - set(allowed))
    if missing:
        raise PlanError(f"required cuts {missing} are not among the allowed cuts {list(allowed)}; "
                        f"deploy the version again")
    return ModelShape(units, allowed, required)


def stages_of(placement: Placement) -> list[UnitStage]:
    return [(segment.first, segment.last, tuple(segment.agents)) for segment in placement.segments]


def placement_cost(
    shape: ModelShape,
    stages: Sequence[UnitStage],
    devices: Sequence[Device],
    *,
    current: Sequence[UnitStage] = (),
    routes: Sequence[Sequence[int]] | None = None,
) -> PlacementCost:
    """Price ``stages`` on every route (or on ``routes``) as the module docstring describes.

    ``current`` gives the stages agents hold now, for the moved bytes. Raises ``PlanError`` when a
    stage names an agent missing from ``devices`` or lies partly on a route.
    """
    tables = build_tables(list(devices), list(shape.units))
    index_of = {device.id: row for row, device in enumerate(devices)}
    for first, last, agents in stages:
        for agent in agents:
            if agent not in index_of:
                raise PlanError(f"segment {first}..{last} names agent {agent!r}, which is not among the "
                                f"{len(index_of)} agents being priced")
    period = 0.0
    latency = 0.0
    for route in shape.routes if routes is None else routes:
        load: dict[str, float] = {}
        route_latency = 0.0
        previous: UnitStage | None = None
        for stage in _stages_on_route(stages, route):
            first, last, agents = stage
            seconds = [tables.stage_seconds(index_of[agent], first, last + 1) for agent in agents]
            for agent, agent_seconds in zip(agents, seconds):
                load[agent] = load.get(agent, 0.0) + agent_seconds / len(agents)
            route_latency += max(seconds)
            if previous is not None and tuple(previous[2]) != tuple(agents):
                link = group_link_seconds(tables, [index_of[a] for a in previous[2]],
                                          [index_of[a] for a in agents], previous[1] + 1)
                period = max(period, link)
                route_latency += link
            previous = stage
        period = max(period, max(load.values(), default=0.0))
        latency = max(latency, route_latency)
    held_units = _held_units(current)
    moved = sum(shape.units[unit].weight_bytes
                for first, last, agents in stages for agent in agents
                for unit in range(first, last + 1) if unit not in held_units.get(agent, set()))
    return PlacementCost(period, latency, moved)


def _stages_on_route(stages: Sequence[UnitStage], route: Sequence[int]) -> list[UnitStage]:
    """Return the stages a request on ``route`` visits, in unit order."""
    on_route = set(route)
    visited = []
    covered: list[int] = []
    for stage in sorted(stages, key=lambda stage: stage[0]):
        units = range(stage[0], stage[1] + 1)
        inside = sum(1 for unit in units if unit in on_route)
        if inside == 0:
            continue
        if inside != len(units):
            raise PlanError(f"segment {stage[0]}..{stage[1]} lies partly on the route over units "
                            f"{list(route)}; a plan must cut at the trunk end and at every head end")
        visited.append(stage)
        covered.extend(units)
    if covered != list(route):
        raise PlanError(f"the segments cover units {covered} of the route over units {list(route)}; "
                        f"a placement needs exactly one segment for every unit")
    return visited


def _held_units(stages: Sequence[UnitStage]) -> dict[str, set[int]]:
    units_by_agent: dict[str, set[int]] = {}
    for first, last, agents in stages:
        for agent in agents:
            units_by_agent.setdefault(agent, set()).update(range(first, last + 1))
    return units_by_agent


def _group_stages(stages: Sequence[UnitStage], groups: Sequence[tuple[int, int]]) -> list[Stage]:
    """Express ``stages`` over group indices for the planner's tie-break toward fewer moved bytes.

    Stages that do not start and end on group boundaries of ``groups`` are left out.
    """
    first_group = {first: index for index, (first, _) in enumerate(groups)}
    last_group = {last: index for index, (_, last) in enumerate(groups)}
    result = []
    for first, last, agents in stages:
        if first in first_group and last in last_group and agents:
            result.append(Stage(agents[0], first_group[first], last_group[last], tuple(agents[1:])))
    return result


def _chain_candidate(shape: ModelShape, devices: Sequence[Device], current: Sequence[UnitStage],
                     replicas: bool) -> tuple[list[UnitStage], bool]:
    """Plan every unit as one chain of groups, as a deploy does; return (stages, proven optimal)."""
    groups = shape.groups
    result = make_plan(devices, shape.group_layers, current=_group_stages(current, groups), replicas=replicas)
    stages = [(stage.first_layer, stage.last_layer, stage.devices) for stage in result.stages]
    return expand_stages(stages, groups, shape.required_cuts), result.optimal


def _route_chain_candidate(shape: ModelShape, devices: Sequence[Device], current: Sequence[UnitStage],
                           replicas: bool, lead: tuple[int, int] | None) -> list[UnitStage] | None:
    """Plan the trunk and the ``lead`` head (None: the trunk alone) as one chain, then give each
    other head, heaviest first, to the agent that keeps the worst-mix period lowest.

    Returns None when some head fits on no agent.
    """
    trunk_groups = [group for group in shape.groups if group[1] <= shape.trunk_end]
    lead_groups = [group for group in shape.groups if lead is not None and lead[0] <= group[0] <= lead[1]]
    route_groups = trunk_groups + lead_groups
    layers = shape.group_layers
    group_index = {group: index for index, group in enumerate(shape.groups)}
    result = make_plan(devices, [layers[group_index[group]] for group in route_groups],
                       current=_group_stages(current, route_groups), replicas=replicas)
    stages: list[UnitStage] = []
    for stage in result.stages:
        covered = route_groups[stage.first_layer:stage.last_layer + 1]
        # A stage that runs from the trunk into the lead head becomes two segments on the same
        # agents, because the head's units do not follow the trunk's in unit order.
        split = [group for group in covered if group[1] <= shape.trunk_end], [
            group for group in covered if group[1] > shape.trunk_end]
        for part in split:
            if part:
                stages.append((part[0][0], part[-1][1], stage.devices))
    free = {device.id: device.memory_bytes for device in devices}
    for first, last, agents in stages:
        for agent in agents:
            free[agent] -= shape.weight_bytes(first, last)
    held_units = _held_units(current)
    trunk = tuple(range(shape.trunk_end + 1))
    routes: list[tuple[int, ...]] = [trunk + tuple(range(lead[0], lead[1] + 1))] if lead is not None else []
    others = [head for head in shape.heads if head != lead]
    # NOTE: each of these heads stays whole on one agent, even where allowed cuts inside it would
    # let two agents share it. Only the other candidates can split a head.
    for first, last in sorted(others, key=lambda head: (-shape.seconds(*head), head[0])):
        need = shape.weight_bytes(first, last)
        route = trunk + tuple(range(first, last + 1))
        options = []
        for order, device in enumerate(devices):
            if free[device.id] < need:
                continue
            trial = [*stages, (first, last, (device.id,))]
            cost = placement_cost(shape, trial, devices, routes=[*routes, route])
            already_held = set(range(first, last + 1)) <= held_units.get(device.id, set())
            options.append(((cost.period_s, cost.latency_s, not already_held, order), device.id))
        if not options:
            logger.info("branch candidate dropped: head %d..%d needs %d bytes and fits on no agent", first, last, need)
            return None
        chosen = min(options)[1]
        stages.append((first, last, (chosen,)))
        free[chosen] -= need
        routes.append(route)
    return sorted(stages)


def best_placement(
    shape: ModelShape,
    devices: Sequence[Device],
    current: Sequence[UnitStage],
    *,
    replicas: bool,
) -> tuple[list[UnitStage], PlacementCost, bool]:
    """Return (stages, cost, proven optimal) of the best placement the planner finds on ``devices``.

    ``current`` breaks ties toward placements that move fewer weight bytes. Raises ``PlanError``
    when nothing fits. Only a chain's plan from an exact search counts as proven optimal.
    """
    chain, chain_optimal = _chain_candidate(shape, devices, current, replicas)
    # The planner's optimality holds for the chain cost model, which is not the worst-mix period
    # of a branch model.
    candidates = [(chain, chain_optimal and not shape.is_branch)]
    if shape.is_branch:
        heaviest = max(shape.heads, key=lambda head: (shape.seconds(*head), -head[0]))
        for lead in (None, heaviest):
            try:
                other = _route_chain_candidate(shape, devices, current, replicas, lead)
            except PlanError as exc:
                logger.info("branch candidate with lead head %s dropped: %s", lead, exc)
                continue
            if other is not None:
                candidates.append((other, False))
    priced = [(placement_cost(shape, stages, devices, current=current), stages, optimal)
              for stages, optimal in candidates]
    cost, stages, optimal = min(priced, key=lambda item: (item[0].period_s, item[0].latency_s, item[0].moved_bytes))
    return stages, cost, optimal


def move_after_join(current_period_s: float, best_period_s: float, hysteresis: float) -> bool:
    """Return whether a join should move to the best placement: only when it lowers the period
    by more than ``hysteresis`` (a fraction of the current period)."""
    _check_fraction("hysteresis", hysteresis, upper=1.0)
    _check_period("current period", current_period_s)
    _check_period("best period", best_period_s)
    # The relative slack keeps a gain of exactly ``hysteresis`` from moving on rounding error.
    return best_period_s < current_period_s * (1.0 - hysteresis) * (1.0 - EQUAL_PERIOD_TOLERANCE)


def keep_repair(repaired_period_s: float, best_period_s: float, tolerance: float = REPAIR_TOLERANCE) -> bool:
    """Return whether a local repair stays: its period is at most ``1 + tolerance`` times the best.

    A tie keeps the repair, and so does a repair that beats the best placement (the branch
    search is heuristic), because staying moves no weights.
    """
    _check_fraction("tolerance", tolerance, upper=math.inf)
    _check_period("repaired period", repaired_period_s)
    _check_period("best period", best_period_s)
    return repaired_period_s <= best_period_s * (1.0 + tolerance) * (1.0 + EQUAL_PERIOD_TOLERANCE)


def _check_fraction(name: str, value: float, *, upper: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < upper:
        raise ValueError(f"{name} is {value!r}; use a fraction >= 0 and < {upper}")


def _check_period(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} is {value!r} s; a period is a finite number of seconds >= 0")


def plan_after_join(
    shape: ModelShape,
    current: Placement,
    devices: Sequence[Device],
    *,
    hysteresis: float,
    replicas: bool,
    plan_version: int,
) -> tuple[Placement | None, PlacementCost, PlacementCost]:
    """Return (placement to load, current cost, best cost) after agents joined.

    The placement is None when the best one does not lower the period by more than
    ``hysteresis`` or equals the current one.
    """
    current_stages = stages_of(current)
    current_cost = placement_cost(shape, current_stages, devices, current=current_stages)
    stages, best_cost, optimal = best_placement(shape, devices, current_stages, replicas=replicas)
    if stages == current_stages or not move_after_join(current_cost.period_s, best_cost.period_s, hysteresis):
        return None, current_cost, best_cost
    placement = placement_from_stages(
        current.model, current.version, plan_version, current.unit_count, stages,
        predicted_period_s=best_cost.period_s, predicted_latency_s=best_cost.latency_s, optimal=optimal)
    return placement, current_cost, best_cost


def check_repair(
    shape: ModelShape,
    repaired: Placement,
    survivors: Sequence[Device],
    *,
    replicas: bool,
    plan_version: int,
    tolerance: float = REPAIR_TOLERANCE,
) -> RepairCheck:
    """Price a local repair and the best placement over ``survivors``, and decide which to keep.

    ``plan_version`` stamps the best placement, which the caller loads next to the repair
    (make-before-break) when ``keep`` is false.
    """
    repaired_stages = stages_of(repaired)
    repaired_cost = placement_cost(shape, repaired_stages, survivors, current=repaired_stages)
    stages, best_cost, optimal = best_placement(shape, survivors, repaired_stages, replicas=replicas)
    keep = stages == repaired_stages or keep_repair(repaired_cost.period_s, best_cost.period_s, tolerance)
    priced = Placement(repaired.model, repaired.version, repaired.plan_version, repaired.unit_count,
                       repaired.segments, repaired_cost.period_s, repaired_cost.latency_s, False)
    best = placement_from_stages(
        repaired.model, repaired.version, plan_version, repaired.unit_count, stages,
        predicted_period_s=best_cost.period_s, predicted_latency_s=best_cost.latency_s, optimal=optimal)
    return RepairCheck(priced, repaired_cost, best, best_cost, keep)
