"""Pipeline placement: which device runs which contiguous range of a model's layers.

Problem
-------
A model is a chain of ``L`` layers with a measured profile (seconds at reference speed, weight
bytes, output activation bytes). A cluster is a set of devices with a speed (or measured
per-layer seconds), usable memory, a network bandwidth and a latency. A plan is an ordered list
of stages; stage ``s`` runs layers ``first..last`` (inclusive) on one device, and consecutive
stages pass the last layer's output over the network. The plan is judged by, in this order:

1. its period: the largest of every stage's compute time and every link's transfer time
   (transfers overlap compute, so the slowest part sets the request rate);
2. its end-to-end latency: the sum of every stage's compute time and every link's time;
3. the weight bytes that devices must fetch to move from the current plan to this one.

Cost model
----------
* Layer ``l`` on device ``u`` takes ``u.layer_seconds[l]`` when measured, else
  ``layer.seconds / u.speed``.
* A stage fits when the weight bytes of its layers are at most the device's ``memory_bytes``.
* The link from stage device ``u`` to the next stage device ``v`` after layer ``j`` takes
  ``max(u.latency_s, v.latency_s) + output_bytes[j] / min(u.bandwidth, v.bandwidth)``.
* The request's input to the first stage and the last stage's output are *not* links: the
  gateway that feeds the pipeline is not a device of the plan, and counting a fixed transfer in
  every plan would not change which plan is best, only the numbers. A caller that wants them
  can add them to ``latency_s``.
* Replicas: a stage may have extra devices that hold the same layers. Requests go round-robin,
  so each of the stage's ``k`` devices serves every ``k``-th request and the stage's period is
  ``max over its devices of compute / k``. Every replica must fit the stage's weights. A link
  into or out of a replicated stage is charged at its worst device pair (largest latency,
  smallest bandwidth), and latency counts the slowest replica.

Options rejected
----------------
* Even split (same layer count per device, registration order): one slow board or one small
  memory sets the period for everyone, and memory limits are ignored.
* Memory-proportional split (what several peer-to-peer runners do): memory says nothing about
  speed, so a large-memory CPU host gets most of the work; it also ignores links.
* An integer linear program: exact, but it needs a solver dependency, its run time is hard to
  bound for 1000 devices, and the structure below already gives exact answers for the cases that
  matter with plain dynamic programming.

Algorithm
---------
The searches live in ``coordinator.planner_search``; the bounds in ``coordinator.planner_costs``.

* Fixed device order (``fixed_order=True``, and the inner step of everything else): the plan's
  devices are a subsequence of the given order. A dynamic program over (layer boundary, link
  class of the last device) scans the devices once; each device costs one ``L x L`` numpy step
  plus ``K x L`` for its links (``K`` = number of distinct latency/bandwidth pairs). Phase 1
  finds the smallest period, phase 2 the smallest latency (moved bytes as a tie-break) among
  plans within that period. Time ``O(n * (L^2 + K * L))``; exact.
* Any order, up to 12 devices: a dynamic program over (set of devices used, last device,
  boundary). Phase 1 bisects over the candidate periods (every stage and link time between the
  lower and upper bound) with a boolean pass; phase 2 is a sliding-window min-sum pass. Time
  ``O(2^n * n^2 * L)`` per bisection step; exact.
* Any order when order cannot matter: all devices interchangeable, or all layers identical with
  one link class (a plan is then a multiset of (device, layer count), so every permutation of it
  is a subsequence of registration order). The fixed-order search is exact for period and
  latency; the moved-bytes tie-break is then a heuristic, since it depends on which device gets
  which indices.
* Larger heterogeneous clusters: the fixed-order search over a few device orders (registration;
  grouped by network class, fast first; fastest first), keeping the best. The reported
  ``lower_bound_s`` combines a per-layer bound, a capacity bound over speed and memory, and a link
  bound (see ``lower_bound_pipeline``), so ``period_s / lower_bound_s - 1`` is a certified gap.
  ``optimal`` is true only when an exact search produced the plan.

Devices that would slow the pipeline are left out by construction: every search may skip a
device. Left-out devices then become replicas of the bottleneck stage, one at a time, while that
strictly lowers the period (a greedy pass, not part of the exactness claim). When the final plan
has replicas, ``lower_bound_s`` is the weaker replica-aware bound and ``optimal`` is true only when
the period meets it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np

from coordinator.planner_costs import (
    CostTables,
    build_tables,
    effective_speeds,
    lower_bound_pipeline,
    lower_bound_with_replicas,
    min_self_link,
)
from coordinator.planner_model import (
    Cost,
    Device,
    Layer,
    Plan,
    PlanError,
    Stage,
    cost_of_parts,
    group_link_seconds,
    moved_bytes_prefix,
    evaluate,
    held_layers,
    validate,
)
from coordinator.planner_search import (
    Layout,
    SubsetSearch,
    fixed_order_layout,
    fixed_order_period,
    subset_search_fits,
)

__all__ = ["Cost", "Device", "Layer", "Plan", "PlanError", "Stage", "evaluate", "plan", "replan", "validate"]

logger = logging.getLogger(__name__)

# The largest cluster searched over every device order. Its tables hold 2^12 * 12 * (L + 1)
# states, about 80 MB for 200 layers, and the search took 0.6-1.1 s on a 2-core VM
# (bench/planner.py, scenario exact-12x200).
EXACT_ORDER_MAX_DEVICES = 12

# Relative period difference below which two plans count as equal and latency decides.
EQUAL_PERIOD_TOLERANCE = 1e-9

# A local repair after a device death is kept when its period is within this fraction of the
# new optimum's. 5 % trades a slightly slower pipeline for not moving every stage's weights.
REPAIR_TOLERANCE = 0.05


def _order_is_irrelevant(tables: CostTables) -> bool:
    """Return whether every permutation of a plan's devices is as good as the plan itself."""
    same_devices = (
        np.all(tables.times == tables.times[0])
        and np.all(tables.memory == tables.memory[0])
        and tables.class_latency.shape[0] == 1
    )
    if same_devices:
        return True
    same_layers = (
        np.all(tables.times == tables.times[:, :1])
        and np.all(tables.weight == tables.weight[0])
        and np.all(tables.output == tables.output[0])
    )
    return bool(same_layers and tables.class_latency.shape[0] == 1)


def _heuristic_orders(tables: CostTables, devices: Sequence[Device]) -> list[list[int]]:
    """Return a few device orders for the fixed-order search on large heterogeneous clusters."""
    # TODO: a local search that swaps stage devices between orders would narrow the 15 % gap
    # to the lower bound measured on the 1000-device benchmark scenario.
    count = len(devices)
    speeds = effective_speeds(tables)
    registration = list(range(count))
    fastest = sorted(registration, key=lambda row: (-speeds[row], row))
    mean_output = float(tables.output.mean())
    class_cost = tables.class_latency + mean_output * tables.class_inv_bandwidth
    by_network = sorted(registration, key=lambda row: (class_cost[tables.link_class[row]], -speeds[row], row))
    orders = [registration, by_network, fastest]
    unique: list[list[int]] = []
    for order in orders:
        if order not in unique:
            unique.append(order)
    return unique


def _best_layout(tables: CostTables, layouts: list[Layout]) -> Layout | None:
    """Return the layout with the smallest period, then the smallest latency."""
    best: tuple[float, float] | None = None
    chosen = None
    for layout in layouts:
        parts = [([device], start, end) for device, start, end in layout.parts]
        cost = cost_of_parts(tables, parts, {})
        key = (cost.period_s, cost.latency_s)
        if best is None or key[0] < best[0] * (1.0 - EQUAL_PERIOD_TOLERANCE) or (
            key[0] <= best[0] * (1.0 + EQUAL_PERIOD_TOLERANCE) and key[1] < best[1]
        ):
            best, chosen = key, layout
    return chosen


def _useful_devices(tables: CostTables, period: float) -> np.ndarray:
    """Return a mask of devices that can be part of some plan with period at most ``period``."""
    limit = period * (1.0 + EQUAL_PERIOD_TOLERANCE)
    fits = tables.weight[None, :] <= tables.memory[:, None]
    runs_a_layer = np.any(fits & (tables.times <= limit), axis=1)
    alone = (tables.prefix_weight[-1] <= tables.memory) & (tables.prefix_time[:, -1] <= limit)
    return runs_a_layer & ((min_self_link(tables) <= limit) | alone)


def _infeasible_message(tables: CostTables, devices: Sequence[Device], layers: Sequence[Layer]) -> str:
    """Explain why no plan exists although every single layer fits some device."""
    total = int(tables.prefix_weight[-1])
    memory = int(tables.memory.sum())
    # Greedy cover from the front with the largest memories shows where placement runs out.
    boundary = 0
    for row in np.argsort(-tables.memory, kind="stable"):
        end = int(np.searchsorted(tables.prefix_weight, tables.prefix_weight[boundary] + tables.memory[row], side="right")) - 1
        boundary = max(boundary, end)
        if boundary >= len(layers):
            break
    if boundary < len(layers):
        layer = layers[boundary]
        return (
            f"no plan fits: the cluster's memory ({memory} bytes over {len(devices)} devices) runs out "
            f"at layer {boundary} ({layer.name!r}); the model needs {total} weight bytes in contiguous "
            f"stages; add devices or memory"
        )
    return "no plan fits the cost model; check device memory against the layer weights"


def _search(
    tables: CostTables,
    devices: Sequence[Device],
    layers: Sequence[Layer],
    fixed_order: bool,
    moved_key: np.ndarray,
    bound: float,
    current_order: list[int],
) -> tuple[Layout, bool, str]:
    """Return (layout, proven optimal, method name) for the replica-free problem.

    ``current_order`` lists the devices of the current plan in stage order, then the others in
    registration order; searches that must pick one order use it, so that ties in period and
    latency fall to the plan that moves the fewest weights.
    """
    count = len(devices)

    def solve_order(order: list[int]) -> Layout | None:
        period = fixed_order_period(tables, order)
        if not math.isfinite(period):
            return None
        tie_weight = 1e-9 * period / (float(tables.prefix_weight[-1]) + 1.0)
        return fixed_order_layout(tables, order, period, moved_key, tie_weight)

    if fixed_order:
        layout = solve_order(list(range(count)))
        if layout is None:
            raise PlanError(
                "no plan fits with the devices in their given order: " + _infeasible_message(tables, devices, layers)
            )
        return layout, True, "fixed-order"
    if _order_is_irrelevant(tables):
        layout = solve_order(current_order)
        if layout is None:
            raise PlanError(_infeasible_message(tables, devices, layers))
        return layout, True, "order-free"

    orders = _heuristic_orders(tables, devices)
    if current_order != orders[0]:
        orders.insert(0, current_order)
    # A first solve over the fastest devices gives an upper bound, and with it a cheap, exact
    # pruning: a device that can run no layer, or join no link, within that bound cannot appear
    # in any better plan.
    fastest = orders[-1][: min(count, tables.layer_count + 32)]
    first = solve_order(fastest)
    candidates = [first] if first is not None else []
    if first is not None:
        keep = _useful_devices(tables, first.period_s)
        orders = [[row for row in order if keep[row]] for order in orders]
    # Phase 1 on every order, phase 2 only on the orders that reach the smallest period.
    periods = [fixed_order_period(tables, order) for order in orders]
    smallest = min(periods, default=math.inf)
    if first is not None and first.period_s <= smallest * (1.0 + EQUAL_PERIOD_TOLERANCE):
        smallest = min(smallest, first.period_s)
    for order, period in zip(orders, periods):
        if math.isfinite(period) and period <= smallest * (1.0 + EQUAL_PERIOD_TOLERANCE):
            tie_weight = 1e-9 * period / (float(tables.prefix_weight[-1]) + 1.0)
            layout = fixed_order_layout(tables, order, period, moved_key, tie_weight)
            if layout is not None:
                candidates.append(layout)
    best = _best_layout(tables, candidates)
    if count <= EXACT_ORDER_MAX_DEVICES and subset_search_fits(count, tables.layer_count):
        search = SubsetSearch(tables)
        high = best.period_s if best is not None else math.inf
        if not math.isfinite(high):
            high = float(search.candidate_periods(0.0, math.inf)[-1])
        period = search.best_period(bound, high)
        if period is None:
            raise PlanError(_infeasible_message(tables, devices, layers))
        tie_weight = 1e-9 * period / (float(tables.prefix_weight[-1]) + 1.0)
        layout = search.layout(period, moved_key, tie_weight)
        if layout is None:
            raise PlanError(_infeasible_message(tables, devices, layers))
        return layout, True, "subset-dp"
    if best is None:
        # NOTE: with more than 12 heterogeneous devices, a plan may exist that none of the tried
        # orders reaches; this error then reports infeasibility that is only heuristic.
        raise PlanError(_infeasible_message(tables, devices, layers))
    return best, False, "ordered-heuristic"


def _add_replicas(
    tables: CostTables, parts: list[tuple[list[int], int, int]]
) -> list[tuple[list[int], int, int]]:
    """Give spare devices to the bottleneck stage while that strictly lowers the period."""
    used = {member for members, _, _ in parts for member in members}
    spare = np.array(sorted(set(range(tables.device_count)) - used), dtype=np.int64)
    if spare.size == 0:
        return parts
    parts = [(list(members), start, end) for members, start, end in parts]
    while spare.size:
        stage_times = [
            max(tables.stage_seconds(member, start, end) for member in members) / len(members)
            for members, start, end in parts
        ]
        links = [group_link_seconds(tables, parts[k - 1][0], parts[k][0], parts[k][1]) for k in range(1, len(parts))]
        period = max(stage_times + links)
        bottleneck = int(np.argmax(stage_times))
        if stage_times[bottleneck] < period:
            break  # a link sets the period; a replica cannot help
        members, start, end = parts[bottleneck]
        fits = tables.prefix_weight[end] - tables.prefix_weight[start] <= tables.memory[spare]
        if not fits.any():
            break
        pool = spare[fits]
        group_max = max(tables.stage_seconds(member, start, end) for member in members)
        candidate_time = tables.prefix_time[pool, end] - tables.prefix_time[pool, start]
        new_stage = np.maximum(candidate_time, group_max) / (len(members) + 1)
        others = [time_ for k, time_ in enumerate(stage_times) if k != bottleneck]
        others += [link for k, link in enumerate(links) if k not in (bottleneck - 1, bottleneck)]
        rest = max(others) if others else 0.0
        new_period = np.maximum(new_stage, rest)
        group_latency = float(tables.latency[members].max())
        group_inv_bandwidth = float(tables.inv_bandwidth[members].max())
        for neighbour, boundary in ((bottleneck - 1, start), (bottleneck + 1, end)):
            if 0 <= neighbour < len(parts):
                other = parts[neighbour][0]
                latency = np.maximum(np.maximum(tables.latency[pool], group_latency), tables.latency[other].max())
                inv_bandwidth = np.maximum(
                    np.maximum(tables.inv_bandwidth[pool], group_inv_bandwidth), tables.inv_bandwidth[other].max()
                )
                new_period = np.maximum(new_period, latency + tables.output[boundary - 1] * inv_bandwidth)
        choice = int(np.lexsort((candidate_time, new_period))[0])
        if not new_period[choice] < period * (1.0 - EQUAL_PERIOD_TOLERANCE):
            break
        chosen = int(pool[choice])
        members.append(chosen)
        spare = spare[spare != chosen]
    return parts


def plan(
    devices: Sequence[Device],
    layers: Sequence[Layer],
    *,
    fixed_order: bool = False,
    current: "Plan | Sequence[Stage] | None" = None,
    replicas: bool = True,
) -> Plan:
    """Compute the best placement of ``layers`` on ``devices`` under the cost model.

    ``fixed_order`` keeps the devices in the given order (some may still be skipped).
    ``current`` breaks ties toward plans that move fewer weight bytes. ``replicas`` lets spare
    devices replicate the bottleneck stage. Raises ``PlanError`` on invalid or infeasible input.
    """
    started = time.perf_counter()
    devices = list(devices)
    layers = list(layers)
    validate(devices, layers)
    tables = build_tables(devices, layers)
    held = held_layers(current)
    moved_key = moved_bytes_prefix(tables, devices, held)
    bound = lower_bound_pipeline(tables)
    index_of = {device.id: row for row, device in enumerate(devices)}
    current_order = []
    if current is not None:
        for stage in current.stages if isinstance(current, Plan) else current:
            row = index_of.get(stage.device)
            if row is not None and row not in current_order:
                current_order.append(row)
    current_order += [row for row in range(len(devices)) if row not in set(current_order)]
    layout, proven, method = _search(tables, devices, layers, fixed_order, moved_key, bound, current_order)

    parts = [([device], start, end) for device, start, end in layout.parts]
    held_by_index = {index_of[device_id]: value for device_id, value in held.items() if device_id in index_of}
    pipeline_cost = cost_of_parts(tables, parts, held_by_index)
    pipeline_bound = pipeline_cost.period_s if proven else min(bound, pipeline_cost.period_s)
    lower_bound = pipeline_bound
    optimal = proven
    if replicas:
        replicated = _add_replicas(tables, parts)
        if any(len(members) > 1 for members, _, _ in replicated):
            parts = replicated
            lower_bound = min(lower_bound, lower_bound_with_replicas(tables))
    cost = cost_of_parts(tables, parts, held_by_index)
    if any(len(members) > 1 for members, _, _ in parts):
        optimal = cost.period_s <= lower_bound * (1.0 + EQUAL_PERIOD_TOLERANCE)
    stages = tuple(
        Stage(
            device=devices[members[0]].id,
            first_layer=start,
            last_layer=end - 1,
            replicas=tuple(devices[member].id for member in members[1:]),
        )
        for members, start, end in parts
    )
    elapsed = time.perf_counter() - started
    logger.debug(
        "planned %d layers on %d devices: method=%s period_s=%.6g lower_bound_s=%.6g stages=%d in %.3f s",
        len(layers), len(devices), method, cost.period_s, lower_bound, len(stages), elapsed,
    )
    return Plan(
        period_s=cost.period_s,
        latency_s=cost.latency_s,
        stages=stages,
        lower_bound_s=lower_bound,
        optimal=bool(optimal),
        planner_seconds=elapsed,
        moved_bytes=cost.moved_bytes,
        method=method,
        pipeline_period_s=pipeline_cost.period_s,
        pipeline_lower_bound_s=pipeline_bound,
    )


def _local_period(tables: CostTables, parts: list[tuple[list[int], int, int]], changed: set[int]) -> float:
    """Return the largest stage or link time among ``changed`` stages and their links."""
    worst = 0.0
    for position in changed:
        members, start, end = parts[position]
        worst = max(worst, max(tables.stage_seconds(member, start, end) for member in members) / len(members))
        for neighbour in (position - 1, position + 1):
            if 0 <= neighbour < len(parts) and parts[neighbour][0]:
                low, high = min(position, neighbour), max(position, neighbour)
                worst = max(worst, group_link_seconds(tables, parts[low][0], parts[high][0], parts[high][1]))
    return worst


def _fits_group(tables: CostTables, members: list[int], start: int, end: int) -> bool:
    return all(tables.stage_fits(member, start, end) for member in members)


def _repair(previous: Plan, devices: Sequence[Device], layers: Sequence[Layer]) -> list[Stage] | None:
    """Re-place only the stages whose every device is gone; ``None`` when that is impossible.

    A stage that keeps a live replica promotes it and moves nothing. A stage with no live device
    goes to a spare device, or is merged into or split between its neighbours, whichever has
    the smallest local period (the stage's and its links' times); only its layers move.
    """
    tables = build_tables(list(devices), list(layers))
    index_of = {device.id: row for row, device in enumerate(devices)}
    try:
        parts = [
            ([index_of[d] for d in stage.devices if d in index_of], stage.first_layer, stage.last_layer + 1)
            for stage in previous.stages
        ]
    except KeyError:
        return None
    if parts[-1][2] != len(layers):
        return None
    while True:
        position = next((k for k, (members, _, _) in enumerate(parts) if not members), None)
        if position is None:
            break
        parts = _resolve_lost_stage(tables, parts, position)
        if parts is None:
            return None
    return [
        Stage(devices[members[0]].id, start, end - 1, tuple(devices[m].id for m in members[1:]))
        for members, start, end in parts
    ]


def _resolve_lost_stage(
    tables: CostTables, parts: list[tuple[list[int], int, int]], position: int
) -> list[tuple[list[int], int, int]] | None:
    """Return ``parts`` with the device-less stage at ``position`` placed at the least local cost."""
    members, start, end = parts[position]
    used = {member for group, _, _ in parts for member in group}
    options: list[tuple[float, list[tuple[list[int], int, int]]]] = []
    for spare in sorted(set(range(tables.device_count)) - used):
        if tables.stage_fits(spare, start, end):
            trial = parts[:position] + [([spare], start, end)] + parts[position + 1:]
            options.append((_local_period(tables, trial, {position}), trial))
    left = position - 1 if position > 0 and parts[position - 1][0] else None
    right = position + 1 if position + 1 < len(parts) and parts[position + 1][0] else None
    for cut in range(start, end + 1):
        # Layers start..cut-1 join the left neighbour and layers cut..end-1 the right one.
        if (cut > start and left is None) or (cut < end and right is None):
            continue
        trial = list(parts)
        changed = set()
        if cut > start:
            trial[left] = (trial[left][0], trial[left][1], cut)
            changed.add(left)
        if cut < end:
            trial[right] = (trial[right][0], cut, trial[right][2])
            changed.add(right)
        if all(_fits_group(tables, trial[k][0], trial[k][1], trial[k][2]) for k in changed):
            trial = trial[:position] + trial[position + 1:]
            shifted = {k - 1 if k > position else k for k in changed}
            options.append((_local_period(tables, trial, shifted), trial))
    if not options:
        return None
    return min(options, key=lambda option: option[0])[1]


def replan(
    previous: Plan,
    devices: Sequence[Device],
    layers: Sequence[Layer],
    *,
    hysteresis: float = 0.05,
    repair_tolerance: float = REPAIR_TOLERANCE,
    replicas: bool = True,
) -> Plan:
    """Return the plan to run after devices joined, left or changed.

    With every device of ``previous`` still present, ``previous`` is kept unless the new
    optimum's period is lower by more than ``hysteresis`` (a fraction), so a small gain does not
    move weights around the cluster. When devices of ``previous`` are gone, a local repair that
    moves only the lost stages' layers is kept if its period is within ``repair_tolerance`` of
    the new optimum's; otherwise the new optimum is returned.
    """
    if not (0.0 <= hysteresis < 1.0):
        raise PlanError(f"hysteresis must be in [0, 1), got {hysteresis!r}")
    started = time.perf_counter()
    devices = list(devices)
    layers = list(layers)
    present = {device.id for device in devices}
    lost = sorted({device_id for stage in previous.stages for device_id in stage.devices} - present)
    fresh = plan(devices, layers, current=previous, replicas=replicas)
    if not lost:
        try:
            kept = evaluate(previous.stages, devices, layers)
        except PlanError as error:
            logger.info("replan: previous plan no longer valid (%s); switching to the new optimum", error)
            return fresh
        if fresh.period_s < kept.period_s * (1.0 - hysteresis):
            logger.info(
                "replan: new optimum period_s=%.6g beats kept period_s=%.6g by more than %.1f%%; switching",
                fresh.period_s, kept.period_s, hysteresis * 100,
            )
            return fresh
        same = abs(kept.period_s - fresh.period_s) <= EQUAL_PERIOD_TOLERANCE * max(fresh.period_s, 1e-300)
        return Plan(
            period_s=kept.period_s,
            latency_s=kept.latency_s,
            stages=tuple(previous.stages),
            lower_bound_s=min(fresh.lower_bound_s, kept.period_s),
            optimal=fresh.optimal and same and kept.latency_s <= fresh.latency_s * (1.0 + EQUAL_PERIOD_TOLERANCE),
            planner_seconds=time.perf_counter() - started,
            moved_bytes=0,
            method="kept",
            pipeline_period_s=kept.period_s,
            pipeline_lower_bound_s=fresh.pipeline_lower_bound_s,
        )

    repaired = _repair(previous, devices, layers)
    if repaired is not None:
        cost = evaluate(repaired, devices, layers, current=previous)
        if cost.period_s <= fresh.period_s * (1.0 + repair_tolerance):
            logger.info(
                "replan: devices %s lost; local repair period_s=%.6g within %.1f%% of optimum %.6g, moving %d bytes",
                lost, cost.period_s, repair_tolerance * 100, fresh.period_s, cost.moved_bytes,
            )
            same = cost.period_s <= fresh.period_s * (1.0 + EQUAL_PERIOD_TOLERANCE)
            return Plan(
                period_s=cost.period_s,
                latency_s=cost.latency_s,
                stages=tuple(repaired),
                lower_bound_s=min(fresh.lower_bound_s, cost.period_s),
                optimal=fresh.optimal and same and cost.latency_s <= fresh.latency_s * (1.0 + EQUAL_PERIOD_TOLERANCE),
                planner_seconds=time.perf_counter() - started,
                moved_bytes=cost.moved_bytes,
                method="repair",
                pipeline_period_s=cost.period_s,
                pipeline_lower_bound_s=fresh.pipeline_lower_bound_s,
            )
    logger.info(
        "replan: devices %s lost; no local repair within %.1f%% of optimum period_s=%.6g; re-planning fully",
        lost, repair_tolerance * 100, fresh.period_s,
    )
    return fresh
