"""Cost tables and certified lower bounds for the pipeline planner.

The planner's searches read every cost from the arrays built here, so a stage time or a link
time is computed by one expression everywhere and two searches never disagree on a tie. The
cost model itself is described at the top of ``coordinator.planner``; in short:

* stage time of device ``u`` over layers ``i..j-1`` (boundaries ``i`` and ``j``):
  ``prefix_time[u, j] - prefix_time[u, i]``;
* the stage fits when ``prefix_weight[j] - prefix_weight[i] <= memory[u]``;
* the link after layer ``k-1`` (boundary ``k``) from ``u`` to ``v``:
  ``max(latency[u], latency[v]) + output_bytes[k-1] * max(inv_bandwidth[u], inv_bandwidth[v])``.

Devices that share latency and bandwidth form one *link class*; the searches keep one state per
class instead of one per device, which is what makes 1000-device clusters cheap when they are
built from a few network kinds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from coordinator.planner import Device, Layer


@dataclass(frozen=True)
class CostTables:
    """Per-device and per-layer arrays for one planning problem (``n`` devices, ``L`` layers)."""

    times: np.ndarray  # (n, L) seconds of each layer on each device
    prefix_time: np.ndarray  # (n, L + 1) cumulative of ``times`` along layers
    prefix_weight: np.ndarray  # (L + 1,) int64 cumulative weight bytes
    weight: np.ndarray  # (L,) int64
    output: np.ndarray  # (L,) float64 output bytes of each layer
    memory: np.ndarray  # (n,) int64
    latency: np.ndarray  # (n,) float64
    inv_bandwidth: np.ndarray  # (n,) float64, 1 / bytes per second
    link_class: np.ndarray  # (n,) int index into class_latency / class_inv_bandwidth
    class_latency: np.ndarray  # (K,)
    class_inv_bandwidth: np.ndarray  # (K,)
    reference_seconds: np.ndarray  # (L,) the profile's seconds per layer
    stage_weight: np.ndarray  # (L, L) weight bytes of layers i..j (row i, column j), int64
    upper: np.ndarray  # (L, L) bool, True where j >= i

    @property
    def device_count(self) -> int:
        return int(self.times.shape[0])

    @property
    def layer_count(self) -> int:
        return int(self.times.shape[1])

    def stage_seconds(self, device: int, start: int, end: int) -> float:
        """Return the compute time of layers ``start..end-1`` on ``device``."""
        return float(self.prefix_time[device, end] - self.prefix_time[device, start])

    def stage_fits(self, device: int, start: int, end: int) -> bool:
        return int(self.prefix_weight[end] - self.prefix_weight[start]) <= int(self.memory[device])

    def link_seconds(self, sender: int, receiver: int, boundary: int) -> float:
        """Return the transfer time of the activation at ``boundary`` (after layer boundary-1)."""
        latency = max(self.latency[sender], self.latency[receiver])
        inv_bandwidth = max(self.inv_bandwidth[sender], self.inv_bandwidth[receiver])
        return float(latency + self.output[boundary - 1] * inv_bandwidth)

    def class_links_to(self, receiver: int) -> np.ndarray:
        """Return link times from every link class to ``receiver``: shape (K, L + 1).

        Column ``k`` is boundary ``k``; columns 0 and L are not links and hold ``inf``.
        """
        latency = np.maximum(self.class_latency, self.latency[receiver])
        inv_bandwidth = np.maximum(self.class_inv_bandwidth, self.inv_bandwidth[receiver])
        links = np.full((self.class_latency.shape[0], self.layer_count + 1), math.inf)
        links[:, 1:-1] = latency[:, None] + self.output[None, :-1] * inv_bandwidth[:, None]
        return links


def build_tables(devices: "list[Device]", layers: "list[Layer]") -> CostTables:
    """Build the cost arrays; inputs must already be validated."""
    layer_count = len(layers)
    reference = np.array([layer.seconds for layer in layers], dtype=np.float64)
    rows = []
    for device in devices:
        if device.layer_seconds is not None:
            rows.append(np.asarray(device.layer_seconds, dtype=np.float64))
        else:
            rows.append(reference / device.speed)
    times = np.vstack(rows) if rows else np.zeros((0, layer_count))
    prefix_time = np.zeros((len(devices), layer_count + 1))
    np.cumsum(times, axis=1, out=prefix_time[:, 1:])
    weight = np.array([layer.weight_bytes for layer in layers], dtype=np.int64)
    prefix_weight = np.zeros(layer_count + 1, dtype=np.int64)
    np.cumsum(weight, out=prefix_weight[1:])
    latency = np.array([device.latency_s for device in devices], dtype=np.float64)
    inv_bandwidth = np.array([1.0 / device.bandwidth_bytes_per_s for device in devices])
    pairs = np.stack([latency, inv_bandwidth], axis=1)
    unique_pairs, link_class = np.unique(pairs, axis=0, return_inverse=True)
    return CostTables(
        times=times,
        prefix_time=prefix_time,
        prefix_weight=prefix_weight,
        weight=weight,
        output=np.array([layer.output_bytes for layer in layers], dtype=np.float64),
        memory=np.array([device.memory_bytes for device in devices], dtype=np.int64),
        latency=latency,
        inv_bandwidth=inv_bandwidth,
        link_class=np.asarray(link_class, dtype=np.int64).reshape(-1),
        class_latency=unique_pairs[:, 0].copy(),
        class_inv_bandwidth=unique_pairs[:, 1].copy(),
        reference_seconds=reference,
        stage_weight=prefix_weight[None, 1:] - prefix_weight[:-1, None],
        upper=np.triu(np.ones((layer_count, layer_count), dtype=bool)),
    )


def effective_speeds(tables: CostTables) -> np.ndarray:
    """Return, per device, the largest ``s`` with ``time(l, u) >= seconds_l / s`` for every layer.

    For a device without per-layer overrides this is its speed. A layer measured faster than its
    reference makes ``s`` large, which keeps the work bounds below valid but weaker.
    """
    reference = tables.reference_seconds
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(reference[None, :] > 0, reference[None, :] / tables.times, 0.0)
    ratio = np.where(np.isnan(ratio), 0.0, ratio)
    return ratio.max(axis=1) if ratio.size else np.zeros(tables.device_count)


def _max_window_work(tables: CostTables) -> np.ndarray:
    """Return, per device, the most reference work in one layer window that fits its memory."""
    prefix_weight = tables.prefix_weight
    layer_count = tables.layer_count
    prefix_work = np.zeros(layer_count + 1)
    np.cumsum(tables.reference_seconds, out=prefix_work[1:])
    starts = prefix_weight[None, :layer_count] + tables.memory[:, None]
    ends = np.searchsorted(prefix_weight, starts.ravel(), side="right").reshape(starts.shape) - 1
    work = prefix_work[ends] - prefix_work[None, :layer_count]
    return np.maximum(work, 0.0).max(axis=1)


def min_self_link(tables: CostTables) -> np.ndarray:
    """Return, per device, its cheapest link time to itself over all boundaries.

    Any link that touches ``u`` costs at least this, since a link takes the larger latency and
    the smaller bandwidth of its two ends. ``inf`` when the model has a single layer.
    """
    if tables.layer_count < 2:
        return np.full(tables.device_count, math.inf)
    return tables.latency + float(tables.output[:-1].min()) * tables.inv_bandwidth


def _second_smallest(values: np.ndarray) -> float:
    if values.shape[0] < 2:
        return math.inf
    return float(np.partition(values, 1)[1])


def lower_bound_pipeline(tables: CostTables) -> float:
    """Return a period that no plan with one device per stage can beat.

    Three bounds, each valid on its own:

    * layer bound: every layer runs on some device that can hold it, so the period is at least
      the layer's fastest time over those devices;
    * capacity bound: a stage on ``u`` does at most ``P * s_u`` reference seconds of work (``s_u``
      from :func:`effective_speeds`) and at most the largest memory-fitting window of work, and
      at most ``min(n, L)`` stages exist, so the ``min(n, L)`` largest such capacities must sum
      to the model's work. Unless one device runs the whole model within ``P``, every stage
      device has a link, so a device whose cheapest possible link exceeds ``P`` contributes
      nothing. The smallest ``P`` where the capacities suffice is found by bisection;
    * link bound: unless one device runs the whole model within the bound, the plan has a link,
      and every link costs at least the second-smallest latency plus the smallest output times
      the second-smallest inverse bandwidth (a link joins two distinct devices).
    """
    device_count, layer_count = tables.device_count, tables.layer_count
    fits = tables.weight[None, :] <= tables.memory[:, None]
    layer_best = np.where(fits, tables.times, math.inf).min(axis=0)
    bound = float(layer_best.max())

    total_work = float(tables.reference_seconds.sum())
    speeds = effective_speeds(tables)
    window_work = _max_window_work(tables)
    slots = min(device_count, layer_count)
    whole = tables.prefix_weight[-1] <= tables.memory
    single_stage = float(tables.prefix_time[whole, -1].min()) if whole.any() else math.inf
    cheapest_own_link = min_self_link(tables)
    if total_work > 0 and np.all(np.isfinite(speeds)):

        def enough(period: float) -> bool:
            if period >= single_stage:
                return True
            linked = cheapest_own_link <= period
            capacity = np.where(linked, np.minimum(period * speeds, window_work), 0.0)
            top = np.partition(capacity, device_count - slots)[device_count - slots:]
            return float(top.sum()) >= total_work

        low, high = 0.0, max(bound, 1e-12)
        while not enough(high) and high < 1e30:
            low, high = high, high * 2.0
        if enough(high):
            for _ in range(60):
                middle = (low + high) / 2.0
                if enough(middle):
                    high = middle
                else:
                    low = middle
            bound = max(bound, low)

    if single_stage > bound and device_count >= 2 and layer_count >= 2:
        cheapest_link = _second_smallest(tables.latency) + float(tables.output[:-1].min()) * (
            _second_smallest(tables.inv_bandwidth)
        )
        bound = min(single_stage, max(bound, cheapest_link))
    return bound


def lower_bound_with_replicas(tables: CostTables) -> float:
    """Return a period that no plan can beat, replicas allowed.

    Round-robin replicas spread a stage's requests, so any layer's work may be shared by several
    devices; only the total remains: per request the cluster does the model's reference work at
    a rate of at most the sum of effective speeds. A link bound applies when no device can hold
    the whole model.
    """
    total_work = float(tables.reference_seconds.sum())
    speeds = effective_speeds(tables)
    speed_sum = float(speeds.sum())
    bound = total_work / speed_sum if speed_sum > 0 and math.isfinite(speed_sum) else 0.0
    if not np.any(tables.prefix_weight[-1] <= tables.memory) and tables.layer_count >= 2:
        cheapest_link = _second_smallest(tables.latency) + float(tables.output[:-1].min()) * (
            _second_smallest(tables.inv_bandwidth)
        )
        if math.isfinite(cheapest_link):
            bound = max(bound, cheapest_link)
    return bound
