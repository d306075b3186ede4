"""Records and cost evaluation of the pipeline planner: devices, layers, stages and plans.

The cost model these records feed is described at the top of ``coordinator.planner``. This
module checks inputs (``validate``) and prices a given list of stages (``evaluate``), including
replicas and the weight bytes moved from a current plan; the searches price candidates with
the same arrays from ``coordinator.planner_costs``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.planner_costs import CostTables, build_tables


class PlanError(ValueError):
    """An invalid or infeasible planning input; the message names the value and the fix."""


@dataclass(frozen=True)
class Device:
    """One device of the cluster, in the planner's units (seconds, bytes, bytes per second)."""

    id: str
    speed: float
    memory_bytes: int
    bandwidth_bytes_per_s: float
    latency_s: float
    layer_seconds: tuple[float, ...] | None = None


@dataclass(frozen=True)
class Layer:
    """One layer of the profile: seconds at reference speed 1.0, weight and output bytes."""

    name: str
    seconds: float
    weight_bytes: int
    output_bytes: int


@dataclass(frozen=True)
class Stage:
    """Layers ``first_layer..last_layer`` (inclusive) on ``device``, plus round-robin replicas."""

    device: str
    first_layer: int
    last_layer: int
    replicas: tuple[str, ...] = ()

    @property
    def devices(self) -> tuple[str, ...]:
        return (self.device, *self.replicas)


@dataclass(frozen=True)
class Plan:
    """A placement and its cost; ``to_json`` gives the operator-facing summary."""

    period_s: float
    latency_s: float
    stages: tuple[Stage, ...]
    lower_bound_s: float
    optimal: bool
    planner_seconds: float
    moved_bytes: int = 0
    method: str = ""
    pipeline_period_s: float = 0.0  # period before replicas were added
    pipeline_lower_bound_s: float = 0.0  # bound for plans without replicas

    def to_json(self) -> dict:
        return {
            "period_s": self.period_s,
            "latency_s": self.latency_s,
            "stages": [
                {"device": stage.device, "first_layer": stage.first_layer, "last_layer": stage.last_layer}
                for stage in self.stages
            ],
            "lower_bound_s": self.lower_bound_s,
            "optimal": self.optimal,
            "planner_seconds": self.planner_seconds,
        }


@dataclass(frozen=True)
class Cost:
    """Period, latency and moved bytes of a list of stages under the cost model."""

    period_s: float
    latency_s: float
    moved_bytes: int


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(devices: Sequence[Device], layers: Sequence[Layer]) -> None:
    """Raise ``PlanError`` naming the first invalid field, then the first layer that fits nowhere."""
    if not layers:
        raise PlanError("the profile has no layers; give at least one layer")
    if not devices:
        raise PlanError("the cluster has no devices; give at least one device")
    for index, layer in enumerate(layers):
        where = f"layer {index} ({layer.name!r})"
        if not _finite(layer.seconds) or layer.seconds < 0:
            raise PlanError(f"{where}: seconds must be a finite number >= 0, got {layer.seconds!r}")
        for name in ("weight_bytes", "output_bytes"):
            value = getattr(layer, name)
            if not _finite(value) or value < 0:
                raise PlanError(f"{where}: {name} must be a number >= 0, got {value!r}")
    seen: set[str] = set()
    for device in devices:
        where = f"device {device.id!r}"
        if device.id in seen:
            raise PlanError(f"{where}: duplicate device id; give each device a unique id")
        seen.add(device.id)
        if not _finite(device.speed) or device.speed <= 0:
            raise PlanError(f"{where}: speed must be a finite number > 0, got {device.speed!r}")
        if not _finite(device.memory_bytes) or device.memory_bytes < 0:
            raise PlanError(f"{where}: memory_bytes must be a number >= 0, got {device.memory_bytes!r}")
        bandwidth = device.bandwidth_bytes_per_s
        if not _finite(bandwidth) or bandwidth <= 0:
            raise PlanError(f"{where}: bandwidth_bytes_per_s must be a finite number > 0, got {bandwidth!r}")
        if not _finite(device.latency_s) or device.latency_s < 0:
            raise PlanError(f"{where}: latency_s must be a finite number >= 0, got {device.latency_s!r}")
        if device.layer_seconds is not None:
            if len(device.layer_seconds) != len(layers):
                raise PlanError(
                    f"{where}: layer_seconds has {len(device.layer_seconds)} values but the profile "
                    f"has {len(layers)} layers; give one value per layer or leave it out"
                )
            for index, value in enumerate(device.layer_seconds):
                if not _finite(value) or value < 0:
                    raise PlanError(f"{where}: layer_seconds[{index}] must be a finite number >= 0, got {value!r}")
    largest = max(devices, key=lambda device: device.memory_bytes)
    for index, layer in enumerate(layers):
        if layer.weight_bytes > largest.memory_bytes:
            raise PlanError(
                f"layer {index} ({layer.name!r}) fits on no device: it needs {layer.weight_bytes} weight "
                f"bytes but the largest device memory is {largest.memory_bytes} bytes (device "
                f"{largest.id!r}); add a larger device or split the layer"
            )


def _stage_parts(
    stages: Sequence[Stage], index_of: dict[str, int], layer_count: int
) -> list[tuple[list[int], int, int]]:
    """Convert stages to (device indices, start boundary, end boundary), checking coverage."""
    parts = []
    expected = 0
    for stage in stages:
        if stage.first_layer != expected or stage.last_layer < stage.first_layer:
            raise PlanError(
                f"stage on {stage.device!r} covers layers {stage.first_layer}..{stage.last_layer} but "
                f"layer {expected} is next; stages must cover every layer once, in order"
            )
        members = []
        for device_id in stage.devices:
            if device_id not in index_of:
                raise PlanError(f"stage device {device_id!r} is not in the cluster")
            members.append(index_of[device_id])
        parts.append((members, stage.first_layer, stage.last_layer + 1))
        expected = stage.last_layer + 1
    if expected != layer_count:
        raise PlanError(f"the stages cover layers 0..{expected - 1} but the profile has {layer_count} layers")
    return parts


def held_layers(current: "Plan | Sequence[Stage] | None") -> dict[str, set[int]]:
    """Return, per device id, the layer indices whose weights it holds in ``current``."""
    if current is None:
        return {}
    stages = current.stages if isinstance(current, Plan) else current
    held: dict[str, set[int]] = {}
    for stage in stages:
        for device_id in stage.devices:
            held.setdefault(device_id, set()).update(range(stage.first_layer, stage.last_layer + 1))
    return held


def moved_bytes_prefix(tables: CostTables, devices: Sequence[Device], held: dict[str, set[int]]) -> np.ndarray:
    """Return prefix sums (n, L + 1) of the weight bytes each device would have to fetch."""
    layer_count = tables.layer_count
    missing = np.tile(tables.weight.astype(np.float64), (len(devices), 1))
    for row, device in enumerate(devices):
        for layer in held.get(device.id, ()):
            if 0 <= layer < layer_count:
                missing[row, layer] = 0.0
    prefix = np.zeros((len(devices), layer_count + 1))
    np.cumsum(missing, axis=1, out=prefix[:, 1:])
    return prefix


def group_link_seconds(tables: CostTables, senders: list[int], receivers: list[int], boundary: int) -> float:
    group = senders + receivers
    latency = float(tables.latency[group].max())
    inv_bandwidth = float(tables.inv_bandwidth[group].max())
    return latency + float(tables.output[boundary - 1]) * inv_bandwidth


def cost_of_parts(
    tables: CostTables, parts: list[tuple[list[int], int, int]], held_by_index: dict[int, set[int]]
) -> Cost:
    period = 0.0
    latency = 0.0
    moved = 0
    for position, (members, start, end) in enumerate(parts):
        compute = [tables.stage_seconds(member, start, end) for member in members]
        period = max(period, max(compute) / len(members))
        latency += max(compute)
        for member in members:
            held = held_by_index.get(member, set())
            moved += sum(int(tables.weight[layer]) for layer in range(start, end) if layer not in held)
        if position > 0:
            link = group_link_seconds(tables, parts[position - 1][0], members, start)
            period = max(period, link)
            latency += link
    return Cost(period, latency, moved)


def evaluate(
    stages: Sequence[Stage],
    devices: Sequence[Device],
    layers: Sequence[Layer],
    *,
    current: "Plan | Sequence[Stage] | None" = None,
) -> Cost:
    """Return the cost of ``stages`` under the cost model.

    Raises ``PlanError`` when the stages do not cover every layer once in order, name an unknown
    device, use a device twice, or put weights on a device that cannot hold them.
    """
    validate(devices, layers)
    tables = build_tables(list(devices), list(layers))
    index_of = {device.id: row for row, device in enumerate(devices)}
    parts = _stage_parts(stages, index_of, len(layers))
    used = [member for members, _, _ in parts for member in members]
    if len(used) != len(set(used)):
        raise PlanError("a device appears in more than one stage or replica slot; use each device once")
    for members, start, end in parts:
        for member in members:
            if not tables.stage_fits(member, start, end):
                raise PlanError(
                    f"device {devices[member].id!r} cannot hold layers {start}..{end - 1}: they need "
                    f"{int(tables.prefix_weight[end] - tables.prefix_weight[start])} bytes, it has "
                    f"{devices[member].memory_bytes}"
                )
    held = held_layers(current)
    held_by_index = {index_of[device_id]: layers_ for device_id, layers_ in held.items() if device_id in index_of}
    return cost_of_parts(tables, parts, held_by_index)
