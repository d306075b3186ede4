"""Per-unit compute time, weight bytes and cut bytes, in the planner's PROFILE.json layer format.

The planner needs, for each unit ("layer" in its terms): ``seconds`` on a reference device,
``weight_bytes`` (what a device must hold to run it) and ``output_bytes`` (what a link carries
when the pipeline is cut after it). Here ``output_bytes`` is the size of every tensor live after
the unit, not only the unit's own output: a cut after an encoder layer of MiniLM also carries the
attention mask, and the planner's link cost must include it.

Timing rule: the unit runs on fixed inputs (from one eager pass over the example or given inputs)
``warmup`` times untimed, then ``repeats`` times; the median of the repeats is reported, since a
median ignores the odd slow run caused by another process on a shared machine. Runs use
``torch.inference_mode`` and the current ``torch.get_num_threads()``.

Results are cached as JSON under ``cache_dir`` with a key made of the model fingerprint (unit
names, signatures and the bytes of every parameter and buffer), the device class, the torch
version, the thread count, the input shapes and the timing settings; any change in those
measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from coordinator.micromodel import (
    ModelSpec,
    TensorDict,
    call_unit,
    graph_routes,
    live_names,
    weight_bytes,
)

logger = logging.getLogger(__name__)

MIN_REPEATS = 5


def default_device_class() -> str:
    """Return a label for this machine's CPU, e.g. ``cpu:x86_64:<model name>``."""
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu:{platform.machine()}:{model}"


def spec_fingerprint(spec: ModelSpec) -> str:
    """Return a sha256 over the units' names, signatures, module types and weight bytes."""
    digest = hashlib.sha256()
    digest.update(spec.name.encode())
    for unit in spec.units:
        digest.update(json.dumps([unit.name, list(unit.inputs), list(unit.outputs), type(unit.module).__qualname__]).encode())
        for name, tensor in list(unit.module.named_parameters()) + list(unit.module.named_buffers()):
            digest.update(name.encode())
            digest.update(str(tensor.dtype).encode())
            digest.update(str(tuple(tensor.shape)).encode())
            # reshape(-1) first: a 0-d tensor (BatchNorm's num_batches_tracked) cannot be viewed
            # as bytes of another element size.
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _cache_key(spec: ModelSpec, inputs: Mapping[str, torch.Tensor], device_class: str, repeats: int, warmup: int) -> str:
    fields = {
        "model": spec_fingerprint(spec),
        "device_class": device_class,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "inputs": {name: [str(t.dtype), list(t.shape)] for name, t in sorted(inputs.items())},
        "repeats": repeats,
        "warmup": warmup,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _time_unit(spec: ModelSpec, index: int, env: TensorDict, repeats: int, warmup: int) -> float:
    unit = spec.units[index]
    samples: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            call_unit(unit, env)
        for _ in range(repeats):
            started = time.perf_counter()
            call_unit(unit, env)
            samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def profile_units(
    spec: ModelSpec,
    inputs: Mapping[str, torch.Tensor] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    cache_dir: Path | str | None = None,
    device_class: str | None = None,
    refresh: bool = False,
) -> list[dict[str, Any]]:
    """Measure every unit and return rows ``{"name", "seconds", "weight_bytes", "output_bytes"}``.

    ``inputs`` defaults to the model's example inputs. With ``cache_dir``, a cached result with
    the same key is returned without running anything unless ``refresh``.
    """
    if repeats < MIN_REPEATS:
        raise ValueError(f"repeats={repeats} is too few for a stable median: use at least {MIN_REPEATS}")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} is invalid: use 0 or more")
    inputs = dict(inputs if inputs is not None else spec.example_inputs)
    device_class = device_class or default_device_class()
    cache_path: Path | None = None
    if cache_dir is not None:
        key = _cache_key(spec, inputs, device_class, repeats, warmup)
        cache_path = Path(cache_dir) / f"profile-{key}.json"
        if cache_path.exists() and not refresh:
            cached = json.loads(cache_path.read_text())
            logger.info("profile of model %s read from cache %s", spec.name, cache_path)
            return list(cached["layers"])

    env: TensorDict = dict(inputs)
    done: set[int] = set()
    with torch.inference_mode():
        for route in graph_routes(spec).values():
            for index in route:
                if index not in done:
                    env.update(call_unit(spec.units[index], env))
                    done.add(index)

    started = time.perf_counter()
    layers: list[dict[str, Any]] = []
    for index, unit in enumerate(spec.units):
        seconds = _time_unit(spec, index, env, repeats, warmup)
        crossing = live_names(spec, index)
        layers.append(
            {
                "name": unit.name,
                "seconds": seconds,
                "weight_bytes": weight_bytes(unit.module),
                "output_bytes": sum(_tensor_bytes(env[name]) for name in crossing),
            }
        )
    logger.info(
        "profiled model %s: %d units in %.2f s on %s with %d threads",
        spec.name, len(layers), time.perf_counter() - started, device_class, torch.get_num_threads(),
    )  # fmt: skip

    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": spec.name, "device_class": device_class, "threads": torch.get_num_threads(), "layers": layers}
        fd, tmp = tempfile.mkstemp(dir=cache_path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1)
        os.replace(tmp, cache_path)
    return layers


def write_profile(layers: list[dict[str, Any]], path: Path | str) -> None:
    """Write rows as a PROFILE.json file for ``shardmesh plan --profile``."""
    Path(path).write_text(json.dumps({"layers": layers}, indent=1))
