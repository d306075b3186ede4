"""``shardmesh plan``: plan a placement offline from a cluster file and a profile file.

CLUSTER.json::

    {"devices": [{"id": "gpu-a", "speed": 8.0, "memory_bytes": 25769803776,
                  "bandwidth_bytes_per_s": 1.25e9, "latency_s": 0.0001,
                  "layer_seconds": [0.001, ...]}]}     # layer_seconds is optional

PROFILE.json::

    {"layers": [{"name": "block0", "seconds": 0.004, "weight_bytes": 41943040,
                 "output_bytes": 1048576}]}

Exit status: 0 with a plan, 1 when no plan fits (the message names the layer), 2 when a file is
missing, is not JSON, or lacks a key or has a value of the wrong type (the message names the
file, the key and the expected type).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from coordinator.planner import Device, Layer, Plan, PlanError, plan

logger = logging.getLogger(__name__)


class InputError(Exception):
    """A file that cannot be read, is not JSON, or does not have the expected shape."""


def _number(obj: dict, key: str, where: str, path: Path) -> float:
    if key not in obj:
        raise InputError(f"{path}: {where}.{key}: missing; expected a number")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{path}: {where}.{key}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _integer(obj: dict, key: str, where: str, path: Path) -> int:
    if key not in obj:
        raise InputError(f"{path}: {where}.{key}: missing; expected an integer")
    value = obj[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: {where}.{key}: expected an integer, got {type(value).__name__} {value!r}")
    return value


def _string(obj: dict, key: str, where: str, path: Path) -> str:
    if key not in obj:
        raise InputError(f"{path}: {where}.{key}: missing; expected a string")
    value = obj[key]
    if not isinstance(value, str):
        raise InputError(f"{path}: {where}.{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _load_list(path: Path, key: str) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read the file: {error}") from error
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from error
    if not isinstance(document, dict):
        raise InputError(f"{path}: top level: expected an object with key {key!r}, got {type(document).__name__}")
    if key not in document:
        raise InputError(f"{path}: {key}: missing; expected a list of objects")
    items = document[key]
    if not isinstance(items, list):
        raise InputError(f"{path}: {key}: expected a list of objects, got {type(items).__name__}")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"{path}: {key}[{index}]: expected an object, got {type(item).__name__}")
    return items


def load_cluster(path: Path) -> list[Device]:
    """Read CLUSTER.json into devices in registration order; raises ``InputError``."""
    devices = []
    for index, item in enumerate(_load_list(path, "devices")):
        where = f"devices[{index}]"
        layer_seconds = item.get("layer_seconds")
        if layer_seconds is not None:
            if not isinstance(layer_seconds, list):
                raise InputError(
                    f"{path}: {where}.layer_seconds: expected a list of numbers, got {type(layer_seconds).__name__}"
                )
            for position, value in enumerate(layer_seconds):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise InputError(
                        f"{path}: {where}.layer_seconds[{position}]: expected a number, got {type(value).__name__}"
                    )
            layer_seconds = tuple(float(value) for value in layer_seconds)
        devices.append(
            Device(
                id=_string(item, "id", where, path),
                speed=_number(item, "speed", where, path),
                memory_bytes=_integer(item, "memory_bytes", where, path),
                bandwidth_bytes_per_s=_number(item, "bandwidth_bytes_per_s", where, path),
                latency_s=_number(item, "latency_s", where, path),
                layer_seconds=layer_seconds,
            )
        )
    return devices


def load_profile(path: Path) -> list[Layer]:
    """Read PROFILE.json into layers; raises ``InputError``."""
    layers = []
    for index, item in enumerate(_load_list(path, "layers")):
        where = f"layers[{index}]"
        layers.append(
            Layer(
                name=_string(item, "name", where, path),
                seconds=_number(item, "seconds", where, path),
                weight_bytes=_integer(item, "weight_bytes", where, path),
                output_bytes=_integer(item, "output_bytes", where, path),
            )
        )
    return layers


def format_table(result: Plan, devices: list[Device], layers: list[Layer]) -> str:
    """Return a readable table of the plan's stages and a summary line."""
    by_id = {device.id: device for device in devices}
    rows = [("stage", "device", "layers", "count", "compute_s", "replicas")]
    for position, stage in enumerate(result.stages):
        device = by_id[stage.device]
        span = range(stage.first_layer, stage.last_layer + 1)
        if device.layer_seconds is not None:
            compute = sum(device.layer_seconds[layer] for layer in span)
        else:
            compute = sum(layers[layer].seconds for layer in span) / device.speed
        rows.append(
            (
                str(position),
                stage.device,
                f"{stage.first_layer}..{stage.last_layer}",
                str(len(span)),
                f"{compute:.6g}",
                ",".join(stage.replicas) or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if result.lower_bound_s > 0 and math.isfinite(result.lower_bound_s):
        gap = f"{(result.period_s / result.lower_bound_s - 1.0) * 100:.1f}%"
    else:
        gap = "n/a"
    lines.append(
        f"period_s {result.period_s:.6g}  latency_s {result.latency_s:.6g}  lower_bound_s "
        f"{result.lower_bound_s:.6g} (gap {gap})  optimal {'yes' if result.optimal else 'no'}  "
        f"method {result.method}  planner_seconds {result.planner_seconds:.3f}"
    )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardmesh plan",
        description="Plan which device runs which layers of a model, from a cluster and a profile file.",
    )
    parser.add_argument("--cluster", required=True, type=Path, help="CLUSTER.json: the devices, in registration order")
    parser.add_argument("--profile", required=True, type=Path, help="PROFILE.json: the model's layers")
    parser.add_argument(
        "--fixed-order", action="store_true", help="keep the devices in file order (devices may still be skipped)"
    )
    parser.add_argument("--no-replicas", action="store_true", help="do not give spare devices replica stages")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON line")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``shardmesh plan``; ``argv`` may start with the word ``plan``. Returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["plan"]:
        args_list = args_list[1:]
    try:
        args = _parser().parse_args(args_list)
    except SystemExit as exit_:
        # argparse has printed the usage line or the help text; hand its status back.
        return int(exit_.code or 0)
    try:
        devices = load_cluster(args.cluster)
        layers = load_profile(args.profile)
    except InputError as error:
        print(f"shardmesh plan: error: {error}", file=sys.stderr)
        return 2
    try:
        result = plan(devices, layers, fixed_order=args.fixed_order, replicas=not args.no_replicas)
    except PlanError as error:
        print(f"shardmesh plan: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        print(format_table(result, devices, layers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
