"""Exact searches behind the pipeline planner: one device order, or every order of a small cluster.

Both searches run in two phases over layer boundaries (boundary ``k`` sits before layer ``k``;
boundary 0 is the model input and boundary ``L`` its output):

1. the smallest period ``P*`` (a min-max problem);
2. among plans whose every stage and link is at most ``P*``, the smallest key
   ``latency + tie_weight * moved_bytes`` (a min-sum problem), which is the lexicographic
   (latency, moved bytes) order as long as ``tie_weight * total_weight_bytes`` stays below any
   latency difference that matters; the caller picks ``tie_weight`` so that this term is at
   most 1e-9 of the period.

Phase 2 must not run with the phase-1 objective mixed in: the sum of a max is not a max of sums,
so one combined DP would miss plans whose latency is smaller but whose stages are tighter.

A stage of ``v`` that ends at boundary ``j`` can start at boundary ``i`` only when its compute
time and its weights fit; both grow as ``i`` falls, so the valid starts form a window
``[lo(j), j - 1]``. Phase 2 therefore reduces to a sliding-window minimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.planner_costs import CostTables

# Tolerance when comparing a recomputed cost with the period found in phase 1. The same float
# expressions are used in both phases, so this only absorbs the last bit of a sum.
PERIOD_TOLERANCE = 1e-12


@dataclass(frozen=True)
class Layout:
    """Stages as (device index, start boundary, end boundary), in pipeline order."""

    parts: tuple[tuple[int, int, int], ...]
    period_s: float


def _stage_matrices(tables: CostTables, device: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (compute, valid) for stages of ``device``: rows are start i, columns end j = 1..L."""
    prefix = tables.prefix_time[device]
    compute = prefix[None, 1:] - prefix[:-1, None]
    valid = tables.upper & (tables.stage_weight <= tables.memory[device])
    return compute, valid


def fixed_order_period(tables: CostTables, order: Sequence[int]) -> float:
    """Return the smallest period of plans whose stages use a subsequence of ``order``.

    ``best[c, k]`` is the smallest period over partial plans that cover layers ``0..k-1`` and
    end on a device of link class ``c``, among devices already scanned; a device can only follow
    devices scanned before it, which is what "fixed order" means.
    """
    layer_count = tables.layer_count
    class_count = tables.class_latency.shape[0]
    best = np.full((class_count, layer_count + 1), math.inf)
    for device in order:
        links = tables.class_links_to(device)
        start = np.min(np.maximum(best, links), axis=0)[:layer_count]
        start[0] = 0.0
        compute, valid = _stage_matrices(tables, device)
        candidates = np.where(valid, np.maximum(start[:, None], compute), math.inf)
        reached = candidates.min(axis=0)
        row = best[tables.link_class[device], 1:]
        np.minimum(row, reached, out=row)
    return float(best[:, layer_count].min())


def fixed_order_layout(
    tables: CostTables, order: Sequence[int], period: float, moved_key: np.ndarray, tie_weight: float
) -> Layout | None:
    """Return the plan of smallest latency key among subsequences of ``order`` within ``period``.

    ``moved_key[u, k]`` is the prefix sum of weight bytes among layers ``0..k-1`` that device
    ``u`` does not hold now.
    """
    layer_count = tables.layer_count
    class_count = tables.class_latency.shape[0]
    limit = period * (1.0 + PERIOD_TOLERANCE)
    best = np.full((class_count, layer_count + 1), math.inf)
    best_device = np.full((class_count, layer_count + 1), -1, dtype=np.int64)
    starts: dict[int, np.ndarray] = {}
    predecessors: dict[int, np.ndarray] = {}
    for device in order:
        links = tables.class_links_to(device)
        via = np.where(links <= limit, best + links, math.inf)
        chosen_class = via.argmin(axis=0)
        start = via[chosen_class, np.arange(layer_count + 1)][:layer_count]
        predecessor = best_device[chosen_class, np.arange(layer_count + 1)][:layer_count].copy()
        start[0] = 0.0
        predecessor[0] = -1
        compute, valid = _stage_matrices(tables, device)
        key = tables.prefix_time[device] + tie_weight * moved_key[device]
        stage_key = key[None, 1:] - key[:-1, None]
        allowed = valid & (compute <= limit)
        totals = np.where(allowed, start[:, None] + stage_key, math.inf)
        first = totals.argmin(axis=0)
        reached = totals[first, np.arange(layer_count)]
        starts[device] = first
        predecessors[device] = predecessor
        cls = tables.link_class[device]
        better = reached < best[cls, 1:]
        best[cls, 1:][better] = reached[better]
        best_device[cls, 1:][better] = device
    final_class = int(best[:, layer_count].argmin())
    if not math.isfinite(best[final_class, layer_count]):
        return None
    parts = []
    device = int(best_device[final_class, layer_count])
    end = layer_count
    while device >= 0:
        begin = int(starts[device][end - 1])
        parts.append((device, begin, end))
        device = int(predecessors[device][begin])
        end = begin
    parts.reverse()
    return Layout(tuple(parts), period)


def _reach(tables: CostTables, device: int, period: float) -> np.ndarray:
    """Return, per start boundary i < L, the furthest end boundary a stage of ``device`` reaches."""
    prefix = tables.prefix_time[device]
    layer_count = tables.layer_count
    by_time = np.searchsorted(prefix, prefix[:-1] + period, side="right") - 1
    by_memory = np.searchsorted(
        tables.prefix_weight, tables.prefix_weight[:-1] + tables.memory[device], side="right"
    ) - 1
    reach = np.minimum(by_time, by_memory)
    return np.minimum(reach, layer_count)


class SubsetSearch:
    """Exact search over every ordered subset of at most about a dozen devices.

    States are (set of devices used, last device, boundary reached), ``2^n * n * (L + 1)`` of
    them; the sets are processed by size so each step is one numpy operation over all sets of
    that size. Phase 1 bisects over candidate periods with a boolean reachability pass; phase 2
    runs the min-sum pass once at the chosen period and walks back through the stored table.
    """

    def __init__(self, tables: CostTables) -> None:
        self.tables = tables
        self.count = tables.device_count
        size = 1 << self.count
        popcount = np.array([bin(mask).count("1") for mask in range(size)])
        self.by_size = [np.flatnonzero(popcount == k) for k in range(self.count + 1)]
        layer_count = tables.layer_count
        self.links = np.full((self.count, self.count, layer_count + 1), math.inf)
        for receiver in range(self.count):
            for sender in range(self.count):
                if sender != receiver:
                    latency = max(tables.latency[sender], tables.latency[receiver])
                    inv_bandwidth = max(tables.inv_bandwidth[sender], tables.inv_bandwidth[receiver])
                    self.links[sender, receiver, 1:-1] = latency + tables.output[:-1] * inv_bandwidth

    def feasible(self, period: float) -> bool:
        """Return whether some plan over any ordered subset has every part within ``period``."""
        tables = self.tables
        layer_count = tables.layer_count
        limit = period * (1.0 + PERIOD_TOLERANCE)
        link_ok = self.links <= limit
        reach = [_reach(tables, device, limit) for device in range(self.count)]
        ends = np.zeros((1 << self.count, self.count, layer_count + 1), dtype=bool)
        boundaries = np.arange(1, layer_count + 1)
        for device in range(self.count):
            ends[1 << device, device, 1 : reach[device][0] + 1] = True
        if ends[:, :, layer_count].any():
            return True
        for size in range(1, self.count):
            masks = self.by_size[size]
            for device in range(self.count):
                bit = 1 << device
                group = masks[(masks & bit) == 0]
                if group.size == 0:
                    continue
                startable = (ends[group] & link_ok[None, :, device, :]).any(axis=1)[:, :layer_count]
                furthest = np.where(startable, reach[device][None, :], -1)
                np.maximum.accumulate(furthest, axis=1, out=furthest)
                ends[group | bit, device, 1:] = furthest >= boundaries[None, :]
            if ends[self.by_size[size + 1], :, layer_count].any():
                return True
        return False

    def candidate_periods(self, low: float, high: float) -> np.ndarray:
        """Return every stage and link time in ``[low, high]``, sorted: the optimum is one of them."""
        tables = self.tables
        values = [self.links[np.isfinite(self.links)]]
        for device in range(self.count):
            compute, valid = _stage_matrices(tables, device)
            values.append(compute[valid])
        merged = np.unique(np.concatenate(values))
        margin = 1.0 + 1e-9
        return merged[(merged >= low / margin) & (merged <= high * margin)]

    def best_period(self, low: float, high: float) -> float | None:
        """Bisect the candidates in ``[low, high]``; ``None`` when even ``high`` is infeasible."""
        candidates = self.candidate_periods(low, high)
        if candidates.size == 0 or not self.feasible(float(candidates[-1])):
            return None
        lo, hi = 0, candidates.size - 1
        while lo < hi:
            middle = (lo + hi) // 2
            if self.feasible(float(candidates[middle])):
                hi = middle
            else:
                lo = middle + 1
        return float(candidates[lo])

    def layout(self, period: float, moved_key: np.ndarray, tie_weight: float) -> Layout | None:
        """Return the plan of smallest latency key with every part within ``period``."""
        tables = self.tables
        layer_count = tables.layer_count
        limit = period * (1.0 + PERIOD_TOLERANCE)
        size_all = 1 << self.count
        table = np.full((size_all, self.count, layer_count + 1), math.inf)
        keys = [tables.prefix_time[d] + tie_weight * moved_key[d] for d in range(self.count)]
        windows = [self._window_starts(device, limit) for device in range(self.count)]
        link_cost = np.where(self.links <= limit, self.links, math.inf)
        for device in range(self.count):
            start = np.full((1, layer_count), math.inf)
            start[0, 0] = 0.0
            table[1 << device, device, 1:] = self._window_min(start, keys[device], windows[device])[0]
        for size in range(1, self.count):
            masks = self.by_size[size]
            for device in range(self.count):
                bit = 1 << device
                group = masks[(masks & bit) == 0]
                if group.size == 0:
                    continue
                via = table[group] + link_cost[None, :, device, :]
                start = via.min(axis=1)[:, :layer_count]
                table[group | bit, device, 1:] = self._window_min(start, keys[device], windows[device])
        finals = table[:, :, layer_count]
        if not np.isfinite(finals).any():
            return None
        mask, device = np.unravel_index(int(finals.argmin()), finals.shape)
        return Layout(self._walk_back(table, int(mask), int(device), keys, windows, link_cost), period)

    def _window_starts(self, device: int, limit: float) -> np.ndarray:
        """Return lo(j) for j = 1..L: the first start boundary whose stage ending at j fits."""
        tables = self.tables
        prefix = tables.prefix_time[device]
        by_time = np.searchsorted(prefix, prefix[1:] - limit, side="left")
        by_memory = np.searchsorted(
            tables.prefix_weight, tables.prefix_weight[1:] - tables.memory[device], side="left"
        )
        lo = np.maximum(by_time, by_memory)
        # Recheck the time bound with the exact expression the other phases use.
        ends = np.arange(1, tables.layer_count + 1)
        while True:
            safe = np.minimum(lo, ends - 1)
            over = (lo < ends) & (prefix[ends] - prefix[safe] > limit)
            if not over.any():
                break
            lo = lo + over
        return lo

    @staticmethod
    def _window_min(start: np.ndarray, key: np.ndarray, lo: np.ndarray) -> np.ndarray:
        """Return ``min over i in [lo(j), j-1] of start[:, i] - key[i]``, plus ``key[j]``, per j."""
        layer_count = start.shape[1]
        shifted = start - key[None, :layer_count]
        levels = [shifted]
        width = 1
        while width * 2 <= layer_count:
            previous = levels[-1]
            levels.append(np.minimum(previous[:, :-width], previous[:, width:]))
            width *= 2
        ends = np.arange(1, layer_count + 1)
        lengths = ends - lo
        result = np.full((start.shape[0], layer_count), math.inf)
        nonempty = lengths > 0
        level_of = np.zeros(layer_count, dtype=np.int64)
        level_of[nonempty] = np.floor(np.log2(lengths[nonempty])).astype(np.int64)
        for level in np.unique(level_of[nonempty]):
            columns = np.flatnonzero(nonempty & (level_of == level))
            span = 1 << int(level)
            left = levels[level][:, lo[columns]]
            right = levels[level][:, ends[columns] - span]
            result[:, columns] = np.minimum(left, right)
        return result + key[None, 1:]

    def _walk_back(
        self,
        table: np.ndarray,
        mask: int,
        device: int,
        keys: list[np.ndarray],
        windows: list[np.ndarray],
        link_cost: np.ndarray,
    ) -> tuple[tuple[int, int, int], ...]:
        layer_count = self.tables.layer_count
        parts = []
        end = layer_count
        while True:
            key = keys[device]
            lo = int(windows[device][end - 1])
            rest = mask & ~(1 << device)
            if rest == 0:
                parts.append((device, 0, end))
                break
            starts = np.arange(lo, end)
            via = table[rest][:, starts] + link_cost[:, device, starts]
            totals = via + (key[end] - key[starts])[None, :]
            sender, column = np.unravel_index(int(totals.argmin()), totals.shape)
            begin = int(starts[column])
            parts.append((device, begin, end))
            mask, device, end = rest, int(sender), begin
        parts.reverse()
        return tuple(parts)


def subset_search_fits(device_count: int, layer_count: int, max_cells: int = 16_000_000) -> bool:
    """Return whether the subset search's tables stay within ``max_cells`` float64 cells.

    16 million cells is 128 MB, reached near 12 devices and 300 layers.
    """
    return (1 << device_count) * device_count * (layer_count + 1) <= max_cells
