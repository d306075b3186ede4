"""Models as chains of named units, and the segmentation strategies that cut them.

Problem
-------
shardmesh runs one model across several agents, so the coordinator cuts the model into
contiguous segments ("micromodels"). A cut is only correct when the receiving segment gets every
tensor it will ever read, under the meaning it expects. The obvious tool,
``torch.distributed.pipelining``, splits one traced graph at split points and hands tensors from
stage to stage positionally. With a BERT encoder in torch 2.13 that shows four traps:

* stage 0 takes its inputs in the order the graph first uses them, not in the order of the
  signature, so ``(input_ids, attention_mask, token_type_ids)`` can be swapped silently;
* a later stage that needs an original input (the attention mask, for mean pooling) fails with a
  metadata error, because only the previous stage's outputs flow forward;
* a stage only accepts the micro-batch size it was traced with;
* calling ``pipeline()`` twice on one module adds split points to it.

Options rejected
----------------
* Split one exported graph by node ranges: the cut can fall inside an attention block, where the
  live set is large and changes with every transformers release, and tensors still travel by
  position.
* Positional tuples between stages: reordering is invisible, which is the first trap above.

Rule chosen
-----------
A model is a list of **units**. A unit is an ``nn.Module`` with a name, the names of the tensors it
reads (``inputs``, passed to ``forward`` positionally in that order) and the names of the tensors
it writes (``outputs``). Units are the atoms a planner cuts between: a segment is a contiguous
range ``[first, last]`` of unit indices. Every tensor is passed by name in a ``dict``, so the
order of a dict never matters and a misspelled or missing name is an error, never a shifted
argument.

Tensor names follow single assignment: each name is written by exactly one unit, and no unit writes
a model input. Because of that, :func:`live_names` can compute exactly which tensors cross a cut:
those already produced (or given as model inputs) that a later unit on the same route reads, plus
model outputs produced so far. A late reader of an original input (pooling reading
``attention_mask``) simply names it, and the mask is carried across every cut before it.

Dynamic dimensions are declared per model input in :class:`TensorSpec` with ``-1``. Dimension 0
is the batch dimension of every model input and must be dynamic, so no micro-batch size is baked
into a unit. torch.export specializes sizes 0 and 1, so example inputs must have size >= 2 in
every dynamic dimension; :class:`ModelSpec` checks this when it is built.

Branch models have a shared **trunk** (a prefix of the units) and named **heads** (contiguous unit
ranges after the trunk, one per task). A request names its task and visits the trunk and that head
only (:func:`route_for_task`). Head outputs may only read trunk tensors and their own.

Strategies decide where cuts may fall (:class:`Strategy`, ``allowed_cuts``; a cut ``b`` lies
between unit ``b`` and unit ``b + 1``):

* ``layer``: every unit boundary; the planner decides.
* ``block``: only boundaries the user names: after every ``every``-th block of a repeated run of
  units sharing a name prefix, or after named units.
* ``branch``: a trunk with heads; cuts at the end of the trunk and between heads are required,
  other boundaries are allowed.

For a planner that has no notion of allowed cuts, :func:`unit_groups` merges the units between
allowed cuts into atoms, and :func:`merge_profile` merges their profile rows to match.

The same graph functions (routes, live names, segment inputs) work on anything with ``units``
(each with ``name``, ``inputs``, ``outputs``), ``input_names``, ``outputs`` and ``heads``: both
:class:`ModelSpec` and the exported manifest in ``coordinator.export``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Names of unit and tensor names: printable, no whitespace, no path separators. Dots and dashes
# are allowed so names can mirror module paths such as "encoder.layer.0".
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")

DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
NAME_BY_DTYPE: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPE_BY_NAME.items()}

STRATEGY_KINDS = ("layer", "block", "branch")


class SpecError(ValueError):
    """A model description is invalid: the message names the unit or tensor and the fix."""


class InputError(ValueError):
    """A tensor handed to a unit or segment is missing, unexpected, or of the wrong dtype or shape."""


def dtype_name(dtype: torch.dtype) -> str:
    """Return the manifest name of a torch dtype, or raise SpecError for unsupported ones."""
    try:
        return NAME_BY_DTYPE[dtype]
    except KeyError:
        raise SpecError(
            f"dtype {dtype} is not supported in unit signatures; supported: {sorted(DTYPE_BY_NAME)}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """Dtype and shape of a named tensor; -1 marks a dynamic dimension."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BY_NAME:
            raise SpecError(f"unknown dtype {self.dtype!r}; supported: {sorted(DTYPE_BY_NAME)}")
        for dim in self.shape:
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < -1:
                raise SpecError(f"invalid dimension {dim!r} in shape {self.shape}: use an int >= 0, or -1 for dynamic")

    @classmethod
    def of(cls, tensor: torch.Tensor, dynamic_dims: Sequence[int] = (0,)) -> TensorSpec:
        """Describe ``tensor`` with the given dimensions marked dynamic."""
        shape = [-1 if i in dynamic_dims else int(size) for i, size in enumerate(tensor.shape)]
        return cls(dtype_name(tensor.dtype), tuple(shape))

    @property
    def dynamic_dims(self) -> tuple[int, ...]:
        return tuple(i for i, dim in enumerate(self.shape) if dim == -1)

    def mismatch(self, tensor: Any) -> str | None:
        """Return why ``tensor`` does not fit this spec, or None when it fits."""
        if not isinstance(tensor, torch.Tensor):
            return f"got {type(tensor).__name__}, expected a torch.Tensor"
        got = NAME_BY_DTYPE.get(tensor.dtype, str(tensor.dtype))
        got_shape = list(tensor.shape)
        if got != self.dtype:
            return f"got dtype {got} shape {got_shape}, expected dtype {self.dtype} shape {self.describe_shape()}"
        if len(got_shape) != len(self.shape) or any(
            want != -1 and want != have for want, have in zip(self.shape, got_shape)
        ):
            return f"got shape {got_shape}, expected {self.describe_shape()} (dtype {self.dtype})"
        return None

    def describe_shape(self) -> str:
        return "[" + ", ".join("*" if dim == -1 else str(dim) for dim in self.shape) + "]"

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> TensorSpec:
        if not isinstance(obj, dict) or not isinstance(obj.get("dtype"), str) or not isinstance(obj.get("shape"), list):
            raise SpecError(f"{where}: expected {{'dtype': str, 'shape': [int]}}, got {obj!r:.200}")
        return cls(obj["dtype"], tuple(obj["shape"]))


@dataclass(frozen=True, eq=False)
class Unit:
    """One cuttable piece of a model.

    ``module.forward`` takes the tensors named in ``inputs`` positionally, in that order, and
    returns one tensor (when ``outputs`` has one name) or a tuple with one tensor per output name.
    """

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class Strategy:
    """Where a model may be cut: ``allowed_cuts`` are boundaries b between unit b and unit b + 1."""

    kind: str
    allowed_cuts: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "allowed_cuts": list(self.allowed_cuts)}

    @classmethod
    def from_json(cls, obj: Any) -> Strategy:
        if not isinstance(obj, dict) or obj.get("kind") not in STRATEGY_KINDS:
            raise SpecError(f"strategy: expected {{'kind': one of {STRATEGY_KINDS}, 'allowed_cuts': [int]}}, got {obj!r:.200}")
        cuts = obj.get("allowed_cuts")
        if not isinstance(cuts, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
            raise SpecError(f"strategy.allowed_cuts: expected a list of ints, got {cuts!r:.200}")
        return cls(obj["kind"], tuple(cuts))


class UnitGraph(Protocol):
    """What the graph functions need: ModelSpec and the exported Manifest both provide it."""

    @property
    def units(self) -> Sequence[Any]: ...

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def outputs(self) -> tuple[str, ...]: ...

    @property
    def heads(self) -> Mapping[str, Sequence[int]] | None: ...


TensorDict = dict[str, torch.Tensor]
ReferenceFn = Callable[[Mapping[str, torch.Tensor]], TensorDict]


@dataclass(eq=False)
class ModelSpec:
    """A model as units with named tensors, plus what export and tests need to run it.

    ``heads`` maps a task name to the indices of that head's own units (not the trunk).
    ``input_specs`` defaults to "dimension 0 dynamic, the rest fixed" for every example input.
    ``reference`` runs the original, unsplit model and returns the model outputs by name; tests
    compare segmented runs with it.
    """

    name: str
    units: tuple[Unit, ...]
    example_inputs: dict[str, torch.Tensor]
    outputs: tuple[str, ...]
    heads: dict[str, tuple[int, ...]] | None = None
    input_specs: dict[str, TensorSpec] | None = None
    strategy: Strategy | None = None
    version: str = "1"
    reference: ReferenceFn | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.units = tuple(self.units)
        self.outputs = tuple(self.outputs)
        if self.heads is not None:
            self.heads = {task: tuple(indices) for task, indices in self.heads.items()}
        if self.input_specs is None:
            self.input_specs = {name: TensorSpec.of(t) for name, t in self.example_inputs.items()}
        for unit in self.units:
            unit.module.eval()
        validate_graph(self)
        self._check_examples()
        if self.strategy is None:
            self.strategy = layer_strategy(self)
        else:
            check_strategy(self, self.strategy)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.example_inputs)

    def _check_examples(self) -> None:
        assert self.input_specs is not None
        if set(self.input_specs) != set(self.example_inputs):
            raise SpecError(
                f"model {self.name!r}: input_specs names {sorted(self.input_specs)} differ from "
                f"example_inputs names {sorted(self.example_inputs)}"
            )
        for name, spec in self.input_specs.items():
            example = self.example_inputs[name]
            reason = spec.mismatch(example)
            if reason:
                raise SpecError(f"model {self.name!r}: example input {name!r} does not fit its spec: {reason}")
            if 0 not in spec.dynamic_dims:
                raise SpecError(
                    f"model {self.name!r}: input {name!r} has a fixed batch dimension {spec.shape[0]}; "
                    "dimension 0 must be dynamic (-1) so no batch size is baked into a unit"
                )
            for dim in spec.dynamic_dims:
                if example.shape[dim] < 2:
                    raise SpecError(
                        f"model {self.name!r}: example input {name!r} has size {example.shape[dim]} in dynamic "
                        f"dimension {dim}; use size >= 2 because torch.export specializes sizes 0 and 1"
                    )


def validate_graph(graph: UnitGraph) -> None:
    """Check names, single assignment, reachability of every read, and the head layout."""
    units = graph.units
    if not units:
        raise SpecError("a model needs at least one unit")
    inputs = set(graph.input_names)
    for name in inputs:
        if not NAME_RE.match(name):
            raise SpecError(f"invalid input name {name!r}: use letters, digits, '_', '.', '-' (max 128)")
    seen_units: set[str] = set()
    producer: dict[str, int] = {}
    for index, unit in enumerate(units):
        if not NAME_RE.match(unit.name):
            raise SpecError(f"invalid unit name {unit.name!r}: use letters, digits, '_', '.', '-' (max 128)")
        if unit.name in seen_units:
            raise SpecError(f"unit name {unit.name!r} is used twice; unit names must be unique")
        seen_units.add(unit.name)
        if not unit.outputs:
            raise SpecError(f"unit {unit.name!r} has no outputs")
        if len(set(unit.inputs)) != len(unit.inputs):
            raise SpecError(f"unit {unit.name!r} lists an input twice: {unit.inputs}")
        for name in unit.outputs:
            if not NAME_RE.match(name):
                raise SpecError(f"unit {unit.name!r}: invalid tensor name {name!r}")
            if name in inputs:
                raise SpecError(f"unit {unit.name!r} writes {name!r}, which is a model input; give it a new name")
            if name in producer:
                raise SpecError(
                    f"tensor {name!r} is written by unit {units[producer[name]].name!r} and again by "
                    f"{unit.name!r}; every tensor name must be written once"
                )
            producer[name] = index

    routes = graph_routes(graph)
    used: set[str] = set()
    for task, route in routes.items():
        available = set(inputs)
        for index in route:
            unit = units[index]
            for name in unit.inputs:
                if name not in available:
                    where = f" on the route of task {task!r}" if task is not None else ""
                    raise SpecError(
                        f"unit {unit.name!r} reads {name!r}, which is neither a model input nor written by an "
                        f"earlier unit{where}"
                    )
                used.add(name)
            available.update(unit.outputs)
    unused = inputs - used
    if unused:
        raise SpecError(f"model inputs {sorted(unused)} are read by no unit; remove them")
    if not graph.outputs:
        raise SpecError("a model needs at least one output name")
    for name in graph.outputs:
        if name not in producer:
            raise SpecError(f"model output {name!r} is written by no unit")


def graph_routes(graph: UnitGraph) -> dict[str | None, tuple[int, ...]]:
    """Return each task's route (unit indices in order); a linear model has one route, key None."""
    count = len(graph.units)
    if not graph.heads:
        return {None: tuple(range(count))}
    head_indices: list[int] = []
    ranges: list[tuple[int, int, str]] = []
    for task, indices in graph.heads.items():
        if not NAME_RE.match(task):
            raise SpecError(f"invalid task name {task!r}")
        indices = tuple(indices)
        if not indices:
            raise SpecError(f"head {task!r} has no units")
        if indices != tuple(range(indices[0], indices[0] + len(indices))):
            raise SpecError(f"head {task!r} units {list(indices)} are not a contiguous ascending range")
        ranges.append((indices[0], indices[-1], task))
        head_indices.extend(indices)
    if len(set(head_indices)) != len(head_indices):
        raise SpecError("heads share units; each unit belongs to the trunk or to exactly one head")
    if any(i < 0 or i >= count for i in head_indices):
        raise SpecError(f"head unit indices must lie in 0..{count - 1}")
    ranges.sort()
    trunk_end = ranges[0][0] - 1
    if trunk_end < 0:
        raise SpecError("a branch model needs a trunk: the first unit must not belong to a head")
    expected = trunk_end + 1
    for first, last, task in ranges:
        if first != expected:
            raise SpecError(
                f"units {expected}..{first - 1} lie between heads; heads must cover every unit after the "
                f"trunk (head {task!r} starts at {first})"
            )
        expected = last + 1
    if expected != count:
        raise SpecError(f"units {expected}..{count - 1} follow the last head and belong to no head")
    trunk = tuple(range(trunk_end + 1))
    return {task: trunk + tuple(range(first, last + 1)) for first, last, task in ranges}


def route_for_task(graph: UnitGraph, task: str | None = None) -> tuple[int, ...]:
    """Return the unit indices a request for ``task`` visits, in order."""
    routes = graph_routes(graph)
    if None in routes:
        if task is not None:
            raise InputError(f"task {task!r} given, but this model has no heads; omit the task")
        return routes[None]
    if task is None:
        raise InputError(f"this model has heads; name a task, one of {sorted(t for t in routes if t)}")
    try:
        return routes[task]
    except KeyError:
        raise InputError(f"unknown task {task!r}; tasks: {sorted(t for t in routes if t)}") from None


def _live_on_route(graph: UnitGraph, route: Sequence[int], position: int) -> list[str]:
    """Names live after ``route[position]`` (position -1: before the route starts)."""
    units = graph.units
    available = list(graph.input_names)
    for index in route[: position + 1]:
        available.extend(units[index].outputs)
    needed: set[str] = set()
    for index in route[position + 1 :]:
        needed.update(units[index].inputs)
    produced_here = set(available)
    outputs_so_far = {name for name in graph.outputs if name in produced_here}
    return [name for name in available if name in needed or name in outputs_so_far]


def _ordered_union(graph: UnitGraph, lists: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Merge name lists in production order: model inputs first, then unit outputs by unit index."""
    order = {name: i for i, name in enumerate(graph.input_names)}
    for unit in graph.units:
        for name in unit.outputs:
            order.setdefault(name, len(order))
    merged = {name for names in lists for name in names}
    return tuple(sorted(merged, key=order.__getitem__))


def _check_index(graph: UnitGraph, index: int, what: str) -> None:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(graph.units):
        raise InputError(f"{what} {index!r} is out of range 0..{len(graph.units) - 1}")


def live_names(graph: UnitGraph, boundary: int, task: str | None = None) -> tuple[str, ...]:
    """Return the tensor names that must cross the cut after unit ``boundary``.

    These are the names already available (model inputs and outputs of units up to ``boundary``)
    that a later unit on the same route reads, plus the model outputs produced so far. After the
    last unit of a route, that is the route's model outputs. With heads and no task, the result is
    the union over every route through ``boundary``.
    """
    _check_index(graph, boundary, "boundary")
    routes = graph_routes(graph)
    selected = [route_for_task(graph, task)] if task is not None else list(routes.values())
    lists = [_live_on_route(graph, route, route.index(boundary)) for route in selected if boundary in route]
    return _ordered_union(graph, lists)


def segment_inputs(graph: UnitGraph, first: int, task: str | None = None) -> tuple[str, ...]:
    """Return the tensor names a segment starting at unit ``first`` must receive."""
    _check_index(graph, first, "first unit")
    routes = graph_routes(graph)
    selected = [route_for_task(graph, task)] if task is not None else list(routes.values())
    lists = [_live_on_route(graph, route, route.index(first) - 1) for route in selected if first in route]
    return _ordered_union(graph, lists)


def check_segment_range(graph: UnitGraph, first: int, last: int) -> None:
    """Raise InputError unless [first, last] is a non-empty range that lies on one route."""
    _check_index(graph, first, "first unit")
    _check_index(graph, last, "last unit")
    if first > last:
        raise InputError(f"segment first unit {first} is after its last unit {last}")
    for route in graph_routes(graph).values():
        if first in route and last in route and route.index(last) - route.index(first) == last - first:
            return
    raise InputError(f"units {first}..{last} cross from one head into another; cut at the head boundary")


def model_outputs_for_task(graph: UnitGraph, task: str | None = None) -> tuple[str, ...]:
    """Return the model outputs a request for ``task`` produces."""
    route = route_for_task(graph, task)
    produced = {name for index in route for name in graph.units[index].outputs}
    return tuple(name for name in graph.outputs if name in produced)


# --- strategies -------------------------------------------------------------------------------


def required_cuts(graph: UnitGraph) -> tuple[int, ...]:
    """Return the cuts every plan must contain: the end of the trunk and the ends of heads."""
    routes = graph_routes(graph)
    if None in routes:
        return ()
    assert graph.heads is not None
    cuts = {route[-1] for route in routes.values()}
    trunk_end = min(min(indices) for indices in graph.heads.values()) - 1
    cuts.add(trunk_end)
    cuts.discard(len(graph.units) - 1)
    return tuple(sorted(cuts))


def layer_strategy(graph: UnitGraph) -> Strategy:
    """Allow a cut at every unit boundary (``branch`` kind when the model has heads)."""
    kind = "branch" if graph.heads else "layer"
    return Strategy(kind, tuple(range(len(graph.units) - 1)))


def block_strategy(
    graph: UnitGraph,
    *,
    prefix: str | None = None,
    every: int = 1,
    after: Sequence[str] = (),
) -> Strategy:
    """Allow cuts only at boundaries the user names.

    ``prefix`` selects the repeated blocks (units whose name starts with it, for example
    ``"encoder.layer."``): a cut is allowed before the first block, after every ``every``-th
    block and after the last block. ``after`` names further units after which a cut is allowed.
    Required cuts of a branch model are always included.
    """
    if every < 1:
        raise SpecError(f"every={every} is invalid: use a block count >= 1")
    names = [unit.name for unit in graph.units]
    cuts: set[int] = set(required_cuts(graph))
    if prefix is not None:
        blocks = [i for i, name in enumerate(names) if name.startswith(prefix)]
        if not blocks:
            raise SpecError(f"no unit name starts with {prefix!r}; unit names: {names}")
        if blocks != list(range(blocks[0], blocks[-1] + 1)):
            raise SpecError(f"units starting with {prefix!r} are not contiguous: indices {blocks}")
        cuts.add(blocks[0] - 1)
        for position, index in enumerate(blocks):
            if (position + 1) % every == 0:
                cuts.add(index)
        cuts.add(blocks[-1])
    for name in after:
        if name not in names:
            raise SpecError(f"after={name!r} names no unit; unit names: {names}")
        cuts.add(names.index(name))
    last = len(names) - 1
    allowed = tuple(sorted(c for c in cuts if 0 <= c < last))
    kind = "branch" if graph.heads else "block"
    return Strategy(kind, allowed)


def check_strategy(graph: UnitGraph, strategy: Strategy) -> None:
    """Raise SpecError when the strategy's cuts are out of range or miss a required cut."""
    if strategy.kind not in STRATEGY_KINDS:
        raise SpecError(f"unknown strategy kind {strategy.kind!r}; use one of {STRATEGY_KINDS}")
    last = len(graph.units) - 1
    bad = [c for c in strategy.allowed_cuts if not 0 <= c < last]
    if bad:
        raise SpecError(f"allowed cuts {bad} are out of range 0..{last - 1} (cut b lies after unit b)")
    if list(strategy.allowed_cuts) != sorted(set(strategy.allowed_cuts)):
        raise SpecError(f"allowed cuts must be ascending without repeats, got {list(strategy.allowed_cuts)}")
    missing = sorted(set(required_cuts(graph)) - set(strategy.allowed_cuts))
    if missing:
        raise SpecError(f"strategy misses the required cuts {missing} at the trunk end and between heads")
    if graph.heads and strategy.kind != "branch":
        raise SpecError(f"a model with heads needs strategy kind 'branch', got {strategy.kind!r}")


def unit_groups(unit_count: int, allowed_cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Return the inclusive unit ranges between allowed cuts: the atoms a planner may place."""
    groups: list[tuple[int, int]] = []
    start = 0
    for cut in sorted(allowed_cuts):
        groups.append((start, cut))
        start = cut + 1
    groups.append((start, unit_count - 1))
    return groups


def merge_profile(layers: Sequence[Mapping[str, Any]], allowed_cuts: Sequence[int]) -> list[dict[str, Any]]:
    """Merge per-unit profile rows into one row per unit group.

    Seconds and weight bytes add up; the output bytes are those of the group's last unit, because
    that is what crosses the cut after the group.
    """
    merged: list[dict[str, Any]] = []
    for first, last in unit_groups(len(layers), allowed_cuts):
        rows = layers[first : last + 1]
        name = rows[0]["name"] if first == last else f"{rows[0]['name']}..{rows[-1]['name']}"
        merged.append(
            {
                "name": name,
                "seconds": sum(float(row["seconds"]) for row in rows),
                "weight_bytes": sum(int(row["weight_bytes"]) for row in rows),
                "output_bytes": int(rows[-1]["output_bytes"]),
            }
        )
    return merged


def segments_for_cuts(unit_count: int, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """Return the inclusive segments [first, last] that the given cuts produce."""
    return unit_groups(unit_count, cuts)


# --- eager execution --------------------------------------------------------------------------


def call_unit(unit: Unit, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
    """Run one unit eagerly, reading its inputs by name and naming its outputs."""
    missing = [name for name in unit.inputs if name not in tensors]
    if missing:
        raise InputError(f"unit {unit.name!r} is missing inputs {missing}; got {sorted(tensors)}")
    result = unit.module(*(tensors[name] for name in unit.inputs))
    return name_outputs(unit.name, unit.outputs, result)


def name_outputs(unit_name: str, names: Sequence[str], result: Any) -> TensorDict:
    """Pair a unit's returned tensor or tuple with its output names, checking the count."""
    values = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    if len(values) != len(names):
        raise SpecError(f"unit {unit_name!r} returned {len(values)} tensors, but declares outputs {list(names)}")
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise SpecError(f"unit {unit_name!r} returned {type(value).__name__} for output {name!r}, expected a tensor")
    return dict(zip(names, values))


def run_units(
    spec: ModelSpec,
    tensors: Mapping[str, torch.Tensor],
    first: int = 0,
    last: int | None = None,
    task: str | None = None,
) -> TensorDict:
    """Run units ``first..last`` eagerly and return the names live after ``last``."""
    if last is None:
        last = route_for_task(spec, task)[-1]
    check_segment_range(spec, first, last)
    env: TensorDict = dict(tensors)
    with torch.inference_mode():
        for index in range(first, last + 1):
            env.update(call_unit(spec.units[index], env))
    return {name: env[name] for name in live_names(spec, last, task)}


def reference_forward(spec: ModelSpec, inputs: Mapping[str, torch.Tensor]) -> TensorDict:
    """Run the original, unsplit model behind ``spec`` and return its outputs by name."""
    if spec.reference is None:
        raise SpecError(f"model {spec.name!r} has no reference function; build it with one to compare against")
    with torch.inference_mode():
        return spec.reference(inputs)


def example_tensors(spec: ModelSpec, task: str | None = None) -> TensorDict:
    """Return every named tensor of one eager run on the example inputs (inputs included)."""
    env: TensorDict = dict(spec.example_inputs)
    routes = graph_routes(spec)
    selected = [route_for_task(spec, task)] if task is not None else list(routes.values())
    done: set[int] = set()
    with torch.inference_mode():
        for route in selected:
            for index in route:
                if index not in done:
                    env.update(call_unit(spec.units[index], env))
                    done.add(index)
    return env


def sequential_spec(
    name: str,
    model: nn.Sequential,
    example_input: torch.Tensor,
    *,
    input_name: str = "input",
    input_spec: TensorSpec | None = None,
) -> ModelSpec:
    """Describe an ``nn.Sequential`` as one unit per child, each reading the previous output."""
    units: list[Unit] = []
    previous = input_name
    for child_name, child in model.named_children():
        output = f"{child_name}.out"
        units.append(Unit(child_name, child, (previous,), (output,)))
        previous = output

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        return {previous: model(inputs[input_name])}

    specs = {input_name: input_spec} if input_spec is not None else None
    return ModelSpec(
        name=name,
        units=tuple(units),
        example_inputs={input_name: example_input},
        outputs=(previous,),
        input_specs=specs,
        reference=reference,
    )


def weight_bytes(module: nn.Module) -> int:
    """Return the bytes of the module's parameters and buffers, counting shared storage once."""
    seen: set[tuple[int, tuple[int, ...], torch.dtype]] = set()
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total
