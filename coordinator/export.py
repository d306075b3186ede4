"""Per-unit torch.export artifacts, the model manifest, and segments built from them.

Problem
-------
An agent must run its segment without the model's Python code (it may not have transformers or
the EfficientNet package installed) and without unpickling anything it received from the network,
because unpickling runs arbitrary code.

What torch 2.13 offers, read from its source
--------------------------------------------
* ``torch.export.save`` writes a PT2 zip archive: the graph as JSON (``models/model.json``) and
  plain tensors as raw bytes, but tensor subclasses, sample inputs and custom objects through
  ``torch.save`` / ``pickle.dumps``.
* ``torch.export.load`` reads such weights with ``torch.load(..., weights_only=False)`` and
  custom objects with ``pickle.loads`` (``torch/export/pt2_archive/_package.py``), and its own
  docstring warns never to load untrusted files. It is not used on received bytes here.
* ``torch._export.serde.serialize.serialize(ep, serialize_state_dict=False,
  serialize_constants=False, serialize_example_inputs=False)`` returns the program as JSON bytes
  and pickles nothing. Its counterpart ``deserialize`` accepts the state dict and constants as
  ready dicts of tensors (then it calls no ``torch.load``), and empty example-input bytes.
* Parsing that JSON can still run code. Symbolic shape expressions (``expr_str``) go through
  ``sympy.sympify``, which evaluates Python. ``ExportedProgram.module()`` compiles the
  ``guards_code`` strings, and it generates Python source from node names and targets, which
  ``GraphModule`` then executes. A node target naming any ``torch.*`` attribute becomes the
  function the graph calls.

Format chosen
-------------
One unit is one **safetensors** file (safetensors stores a JSON header and raw little-endian
tensor bytes, and its loader has no code path that runs code). Its tensors are the unit's
parameters, buffers and constants; its ``__metadata__`` holds the unit's signature and the
exported program JSON. Before the JSON reaches the torch deserializer, :func:`check_program`
accepts only:

* node targets and operator arguments of the form ``torch.ops.aten.*``, ``torch.ops.prims.*``
  or ``_operator.*``; no graph arguments (higher-order control flow) and no custom objects;
* names that are Python identifiers, and attribute paths made of them (no ``__`` segments);
* shape expressions built only from sympy constructors on an allowlist, integers and quoted
  symbol names like ``'s12'``;
* an empty ``guards_code`` (export strips it; shape checks still run from the graph's
  placeholder metadata, and :func:`check_inputs` checks dtype and shape before every call);
* input and output tree specs equal to those of a plain positional call.

Node metadata (stack traces, module paths of the exporting machine) is dropped at export, which
also makes blobs about 40 % smaller for a BERT layer. This check is defense in depth: the primary
guarantee is that an agent loads only blobs whose sha256 a manifest names, and the manifest
arrives from the coordinator over mutual TLS.

Tied or shared parameters: each unit is exported on its own, so a weight used by two units is
stored in both blobs, and each segment gets its own copy. Inside one unit, tensors that alias
one another are stored once and the alias is recorded in the metadata.

Dynamic shapes: every dimension marked -1 in a model input's :class:`TensorSpec` is exported with
``Dim.DYNAMIC``; later units get their dynamic dimensions from the symbolic output shapes of the
unit that wrote the tensor. The batch dimension is therefore dynamic everywhere, and MiniLM also
keeps a dynamic sequence length (torch.export infers 2..512 from the position embeddings).

Blobs are content-addressed: the file name is the sha256 of its bytes. The manifest (JSON) names
the model, version, torch version, model inputs and outputs with their specs, every unit (name,
input and output names with dtypes and shapes, blob sha256 and size, weight bytes), the strategy
with its allowed cuts, and the heads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.export import Dim

from coordinator.micromodel import (
    NAME_RE,
    InputError,
    ModelSpec,
    SpecError,
    Strategy,
    TensorDict,
    TensorSpec,
    check_segment_range,
    check_strategy,
    dtype_name,
    example_tensors,
    live_names,
    name_outputs,
    route_for_task,
    segment_inputs,
    validate_graph,
)

logger = logging.getLogger(__name__)

UNIT_FORMAT = "shardmesh.unit.v1"
MANIFEST_FORMAT = "shardmesh.manifest.v1"
METADATA_KEY = "shardmesh"
MANIFEST_FILE = "manifest.json"
BLOB_DIR = "blobs"
# Upper bound on a unit file's safetensors header, checked before it is parsed. The program JSON
# of one BERT layer is about 55 KB; 64 MiB leaves room for units with thousands of nodes while
# keeping a hostile length field from allocating gigabytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
# Upper bound on a manifest file: a manifest lists units, not weights; 16 MiB fits ~20 000 units.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# A model has a handful of inputs with a few dimensions each, so 64 groups of up to 64 members
# cover any real model, and the bound keeps a hostile manifest from costing much to check.
MAX_EQUAL_DIM_GROUPS = 64

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN_RE = re.compile(r"^(?!__)[A-Za-z0-9_]+(\.(?!__)[A-Za-z0-9_]+)*$")
_OP_RE = re.compile(r"^(torch\.ops\.(aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.[a-z_]+)$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_SYM_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|'[^']*'|\d+(?:\.\d+)?|[(),=+\-*/ ]")
_SYM_QUOTED_RE = re.compile(r"^'[a-z]\d+'$")
_SYM_IDENTS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Mul", "Add", "Pow", "Max", "Min", "Mod",
        "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "ModularIndexing", "Where", "FloorToInt",
        "CeilToInt", "TruncToInt", "PowByNatural", "IntTrueDiv", "FloatTrueDiv", "Eq", "Ne", "Lt",
        "Le", "Gt", "Ge", "And", "Or", "Not", "True", "False", "positive", "negative",
        "nonnegative", "nonpositive", "integer", "real", "finite", "infinite", "zero",
    }
)  # fmt: skip
_NAME_KEYS = frozenset({"name", "as_name"})
_FQN_KEYS = frozenset({"parameter_name", "buffer_name", "tensor_constant_name", "fqn", "custom_obj_name"})


# torch's program deserializer keeps its state in one module global and raises "already set"
# when two threads rebuild programs at once (two segments loading in parallel did). Every
# deserialization in this process holds this lock.
DESERIALIZE_LOCK = threading.Lock()


class ArtifactError(ValueError):
    """A unit blob or manifest is malformed, unsafe, or does not match its hash."""


# --- manifest -----------------------------------------------------------------------------------


def _specs_to_json(specs: Mapping[str, TensorSpec]) -> dict[str, Any]:
    return {name: spec.to_json() for name, spec in specs.items()}


def _specs_from_json(obj: Any, where: str) -> dict[str, TensorSpec]:
    if not isinstance(obj, dict):
        raise ArtifactError(f"{where}: expected an object of tensor specs, got {type(obj).__name__}")
    try:
        return {name: TensorSpec.from_json(value, where=f"{where}.{name}") for name, value in obj.items()}
    except SpecError as exc:
        raise ArtifactError(str(exc)) from None


def _names(obj: Any, where: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(isinstance(n, str) and NAME_RE.match(n) for n in obj):
        raise ArtifactError(f"{where}: expected a list of tensor names, got {obj!r:.200}")
    return tuple(obj)


@dataclass(frozen=True)
class UnitEntry:
    """One unit in a manifest: its signature and the blob that holds it."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    sha256: str
    blob_bytes: int
    weight_bytes: int
    input_specs: dict[str, TensorSpec]
    output_specs: dict[str, TensorSpec]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "sha256": self.sha256,
            "blob_bytes": self.blob_bytes,
            "weight_bytes": self.weight_bytes,
            "input_specs": _specs_to_json(self.input_specs),
            "output_specs": _specs_to_json(self.output_specs),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> UnitEntry:
        if not isinstance(obj, dict):
            raise ArtifactError(f"{where}: expected an object, got {type(obj).__name__}")
        name = obj.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ArtifactError(f"{where}.name: invalid unit name {name!r}")
        sha = obj.get("sha256")
        if not isinstance(sha, str) or not _SHA_RE.match(sha):
            raise ArtifactError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        sizes = {}
        for key in ("blob_bytes", "weight_bytes"):
            value = obj.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ArtifactError(f"{where}.{key}: expected an int >= 0, got {value!r}")
            sizes[key] = value
        entry = cls(
            name=name,
            inputs=_names(obj.get("inputs"), f"{where}.inputs"),
            outputs=_names(obj.get("outputs"), f"{where}.outputs"),
            sha256=sha,
            blob_bytes=sizes["blob_bytes"],
            weight_bytes=sizes["weight_bytes"],
            input_specs=_specs_from_json(obj.get("input_specs"), f"{where}.input_specs"),
            output_specs=_specs_from_json(obj.get("output_specs"), f"{where}.output_specs"),
        )
        if set(entry.input_specs) != set(entry.inputs) or set(entry.output_specs) != set(entry.outputs):
            raise ArtifactError(f"{where}: input_specs/output_specs must name exactly the unit's inputs/outputs")
        return entry


@dataclass(frozen=True)
class Manifest:
    """Everything an agent or gateway needs to know about an exported model, without weights."""

    model: str
    version: str
    torch_version: str
    input_specs: dict[str, TensorSpec]
    outputs: tuple[str, ...]
    units: tuple[UnitEntry, ...]
    strategy: Strategy
    heads: dict[str, tuple[int, ...]] | None = None
    # Groups of model-input dimensions that the units need equal, such as the sequence length of
    # input_ids and of attention_mask. Export finds them (see ``equal_input_dims``), and the
    # gateway checks them so that a mismatch is reported with the model's own input names.
    equal_dims: tuple[tuple[tuple[str, int], ...], ...] = ()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.input_specs)

    def tensor_spec(self, name: str) -> TensorSpec:
        """Return the spec of a model input or of any unit output."""
        if name in self.input_specs:
            return self.input_specs[name]
        for unit in self.units:
            if name in unit.output_specs:
                return unit.output_specs[name]
        raise InputError(f"model {self.model!r} has no tensor named {name!r}")

    def to_json(self) -> str:
        obj = {
            "format": MANIFEST_FORMAT,
            "model": self.model,
            "version": self.version,
            "torch_version": self.torch_version,
            "inputs": _specs_to_json(self.input_specs),
            "outputs": list(self.outputs),
            "units": [unit.to_json() for unit in self.units],
            "strategy": self.strategy.to_json(),
            "heads": {task: list(indices) for task, indices in self.heads.items()} if self.heads else None,
            "equal_dims": [[[name, dim] for name, dim in group] for group in self.equal_dims],
        }
        return json.dumps(obj, indent=1, sort_keys=True)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse and validate a manifest; raise ArtifactError naming the bad field."""
        if len(text) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest is {len(text)} bytes, above the limit of {MAX_MANIFEST_BYTES}")
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise ArtifactError(f"manifest is not valid JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("format") != MANIFEST_FORMAT:
            raise ArtifactError(f"manifest format must be {MANIFEST_FORMAT!r}, got {obj.get('format') if isinstance(obj, dict) else obj!r:.100}")
        for key in ("model", "version", "torch_version"):
            if not isinstance(obj.get(key), str):
                raise ArtifactError(f"manifest.{key}: expected a string, got {obj.get(key)!r:.100}")
        units = obj.get("units")
        if not isinstance(units, list) or not units:
            raise ArtifactError("manifest.units: expected a non-empty list")
        heads = obj.get("heads")
        if heads is not None:
            if not isinstance(heads, dict) or not all(
                isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v) for v in heads.values()
            ):
                raise ArtifactError(f"manifest.heads: expected {{task: [unit index]}} or null, got {heads!r:.200}")
            heads = {task: tuple(indices) for task, indices in heads.items()}
        try:
            input_specs = _specs_from_json(obj.get("inputs"), "manifest.inputs")
            manifest = cls(
                model=obj["model"],
                version=obj["version"],
                torch_version=obj["torch_version"],
                input_specs=input_specs,
                outputs=_names(obj.get("outputs"), "manifest.outputs"),
                units=tuple(UnitEntry.from_json(u, f"manifest.units[{i}]") for i, u in enumerate(units)),
                strategy=Strategy.from_json(obj.get("strategy")),
                heads=heads,
                equal_dims=_equal_dims_from_json(obj.get("equal_dims", []), input_specs),
            )
            validate_graph(manifest)
            check_strategy(manifest, manifest.strategy)
        except (SpecError, InputError) as exc:
            raise ArtifactError(f"invalid manifest for model {obj['model']!r}: {exc}") from None
        return manifest


def _equal_dims_from_json(obj: Any, input_specs: Mapping[str, TensorSpec]) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Parse ``manifest.equal_dims``: a list of groups, each a list of [model input name, dimension]."""
    where = "manifest.equal_dims"
    if not isinstance(obj, list) or len(obj) > MAX_EQUAL_DIM_GROUPS:
        raise ArtifactError(f"{where}: expected a list of at most {MAX_EQUAL_DIM_GROUPS} groups, got {obj!r:.200}")
    groups = []
    for index, group in enumerate(obj):
        if not isinstance(group, list) or not 2 <= len(group) <= MAX_EQUAL_DIM_GROUPS:
            raise ArtifactError(f"{where}[{index}]: expected a list of 2 to {MAX_EQUAL_DIM_GROUPS} [input, dimension] "
                                f"pairs, got {group!r:.200}")
        members = []
        for pair in group:
            valid = (isinstance(pair, list) and len(pair) == 2 and pair[0] in input_specs and isinstance(pair[1], int)
                     and not isinstance(pair[1], bool) and 0 <= pair[1] < len(input_specs[pair[0]].shape))
            if not valid:
                raise ArtifactError(f"{where}[{index}]: {pair!r:.100} is not [model input name, dimension] for an "
                                    f"input in {sorted(input_specs)}")
            members.append((pair[0], pair[1]))
        groups.append(tuple(members))
    return tuple(groups)


def load_manifest(path: Path | str) -> Manifest:
    """Read and validate a manifest file."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"manifest {path} is {size} bytes, above the limit of {MAX_MANIFEST_BYTES}")
    return Manifest.from_json(path.read_bytes())


# --- export -------------------------------------------------------------------------------------


def _dynamic_shapes(names: Sequence[str], specs: Mapping[str, TensorSpec]) -> tuple[dict[int, Any] | None, ...]:
    shapes: list[dict[int, Any] | None] = []
    for name in names:
        dims = specs[name].dynamic_dims
        shapes.append({dim: Dim.DYNAMIC for dim in dims} if dims else None)
    return tuple(shapes)


def _output_specs(ep: torch.export.ExportedProgram, names: Sequence[str]) -> dict[str, TensorSpec]:
    output_node = next(node for node in ep.graph.nodes if node.op == "output")
    values = output_node.args[0]
    specs: dict[str, TensorSpec] = {}
    for name, node in zip(names, values):
        fake = node.meta["val"]
        shape = tuple(int(size) if isinstance(size, int) else -1 for size in fake.shape)
        specs[name] = TensorSpec(dtype_name(fake.dtype), shape)
    return specs


def _symbol_dims(ep: torch.export.ExportedProgram, inputs: Sequence[str],
                 outputs: Sequence[str]) -> dict[tuple[str, int], str]:
    """Map each (tensor name, dimension) of a unit that export made a bare symbol to that symbol."""
    by_name = {node.name: node for node in ep.graph.nodes if node.op == "placeholder"}
    input_nodes = [by_name[name] for name in ep.graph_signature.user_inputs]
    output_node = next(node for node in ep.graph.nodes if node.op == "output")
    output_nodes = list(output_node.args[0])[: len(outputs)]
    symbols: dict[tuple[str, int], str] = {}
    for names, nodes in ((inputs, input_nodes), (outputs, output_nodes)):
        for name, node in zip(names, nodes):
            value = getattr(node, "meta", {}).get("val")
            if not isinstance(value, torch.Tensor):
                continue
            for dim, size in enumerate(value.shape):
                if isinstance(size, torch.SymInt) and getattr(size.node.expr, "is_Symbol", False):
                    symbols[(name, dim)] = str(size.node.expr)
    return symbols


def equal_input_dims(unit_symbols: Sequence[Mapping[tuple[str, int], str]],
                     model_inputs: Sequence[str]) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Return the groups of model-input dimensions that must be equal, from each unit's symbols.

    Within one unit, dimensions with the same symbol are equal. A unit output carries its
    symbol's class to the units that read it, so attention_mask's length in an encoder layer is
    linked back to input_ids' length in the embeddings unit that produced the layer's input.
    """
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(key: tuple[str, int]) -> tuple[str, int]:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    for symbols in unit_symbols:
        first_by_symbol: dict[str, tuple[str, int]] = {}
        for key, symbol in symbols.items():
            other = first_by_symbol.setdefault(symbol, key)
            parent[root(key)] = root(other)
    groups: dict[tuple[str, int], list[tuple[str, int]]] = {}
    for key in list(parent):
        if key[0] in model_inputs:
            groups.setdefault(root(key), []).append(key)
    ordered = [tuple(sorted(group, key=lambda k: (model_inputs.index(k[0]), k[1]))) for group in groups.values()]
    return tuple(sorted((group for group in ordered if len(group) > 1),
                        key=lambda group: (model_inputs.index(group[0][0]), group[0][1])))


def export_unit(
    module: torch.nn.Module,
    inputs: Sequence[str],
    example: Mapping[str, torch.Tensor],
    specs: Mapping[str, TensorSpec],
) -> torch.export.ExportedProgram:
    """Export one unit with the dynamic dimensions its input specs mark."""
    args = tuple(example[name] for name in inputs)
    with torch.no_grad():
        return torch.export.export(module, args, dynamic_shapes=_dynamic_shapes(inputs, specs))


def _strip_program(program: dict[str, Any]) -> dict[str, Any]:
    """Drop node metadata and guard code, which the runtime does not need (see module docstring)."""
    graph_module = program["graph_module"]
    graph_module["metadata"] = {}
    for node in graph_module["graph"]["nodes"]:
        node["metadata"] = {}
    program["guards_code"] = []
    return program


def _artifact_tensors(ep: torch.export.ExportedProgram, unit_name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Collect weights and constants under unique keys, storing aliased tensors once."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    items = [("state_dict/" + k, v) for k, v in ep.state_dict.items()]
    items += [("constants/" + k, v) for k, v in ep.constants.items()]
    for key, value in items:
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise SpecError(
                f"unit {unit_name!r} holds {key} of type {type(value).__name__}; the unit format stores plain "
                "tensors only, so move custom objects and tensor subclasses out of the unit"
            )
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), tuple(value.stride()), value.device)
        if identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        # A fresh contiguous CPU copy: safetensors rejects tensors that share storage.
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def unit_artifact_bytes(
    ep: torch.export.ExportedProgram,
    name: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    input_specs: Mapping[str, TensorSpec],
    output_specs: Mapping[str, TensorSpec],
) -> bytes:
    """Serialize an exported unit into one self-contained safetensors blob."""
    from safetensors.torch import save

    from torch._export.serde.serialize import serialize

    artifact = serialize(ep, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    program = _strip_program(json.loads(artifact.exported_program))
    tensors, aliases = _artifact_tensors(ep, name)
    signature = {
        "name": name,
        "inputs": list(inputs),
        "outputs": list(outputs),
        "input_specs": _specs_to_json(input_specs),
        "output_specs": _specs_to_json(output_specs),
    }
    unit_record = {
        "format": UNIT_FORMAT,
        "torch_version": torch.__version__,
        "unit": signature,
        "aliases": aliases,
        "program": program,
    }
    # One metadata key only: safetensors writes __metadata__ from a hash map whose order varies
    # between processes, and the blob's sha256 must not.
    return save(tensors, metadata={METADATA_KEY: json.dumps(unit_record, sort_keys=True)})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_model(spec: ModelSpec, out_dir: Path | str) -> Manifest:
    """Export every unit of ``spec`` to ``out_dir/blobs/<sha256>`` and write ``out_dir/manifest.json``."""
    out_dir = Path(out_dir)
    assert spec.input_specs is not None and spec.strategy is not None
    started = time.perf_counter()
    tensors = example_tensors(spec)
    specs: dict[str, TensorSpec] = dict(spec.input_specs)
    entries: list[UnitEntry] = []
    unit_symbols: list[dict[tuple[str, int], str]] = []
    for unit in spec.units:
        ep = export_unit(unit.module, unit.inputs, tensors, specs)
        output_specs = _output_specs(ep, unit.outputs)
        unit_symbols.append(_symbol_dims(ep, unit.inputs, unit.outputs))
        fixed = {name: s for name, s in output_specs.items() if s.shape and s.shape[0] != -1}
        if fixed:
            # NOTE: an output with a fixed dimension 0 means export specialized the unit to the
            # example batch size; it then runs at that batch size only.
            logger.warning("unit %s of model %s has outputs with a fixed batch dimension: %s", unit.name, spec.name, fixed)
        specs.update(output_specs)
        input_specs = {name: specs[name] for name in unit.inputs}
        data = unit_artifact_bytes(ep, unit.name, unit.inputs, unit.outputs, input_specs, output_specs)
        sha = hashlib.sha256(data).hexdigest()
        blob_path = out_dir / BLOB_DIR / sha
        if not blob_path.exists():
            _write_atomic(blob_path, data)
        weights = _header_weight_bytes(read_header(data))
        entries.append(
            UnitEntry(
                name=unit.name,
                inputs=unit.inputs,
                outputs=unit.outputs,
                sha256=sha,
                blob_bytes=len(data),
                weight_bytes=weights,
                input_specs=input_specs,
                output_specs=output_specs,
            )
        )
        logger.debug("exported unit %s of model %s: %d bytes, sha256 %s", unit.name, spec.name, len(data), sha)
    manifest = Manifest(
        model=spec.name,
        version=spec.version,
        torch_version=torch.__version__,
        input_specs=dict(spec.input_specs),
        outputs=spec.outputs,
        units=tuple(entries),
        strategy=spec.strategy,
        heads=spec.heads,
        equal_dims=equal_input_dims(unit_symbols, list(spec.input_specs)),
    )
    _write_atomic(out_dir / MANIFEST_FILE, manifest.to_json().encode())
    logger.info(
        "exported model %s version %s: %d units in %.1f s to %s",
        spec.name, spec.version, len(entries), time.perf_counter() - started, out_dir,
    )  # fmt: skip
    return manifest


# --- loading ------------------------------------------------------------------------------------


def read_header(data: bytes | memoryview) -> dict[str, Any]:
    """Parse a safetensors header after checking its length field against the limits."""
    if len(data) < 8:
        raise ArtifactError(f"unit blob is {len(data)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack_from("<Q", data, 0)
    if header_len > MAX_HEADER_BYTES or header_len > len(data) - 8:
        raise ArtifactError(
            f"unit blob header length {header_len} exceeds the blob ({len(data)} bytes) or the limit {MAX_HEADER_BYTES}"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except ValueError as exc:
        raise ArtifactError(f"unit blob header is not valid JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ArtifactError("unit blob header has no __metadata__ object")
    return header


def _header_weight_bytes(header: Mapping[str, Any]) -> int:
    total = 0
    for key, entry in header.items():
        if key != "__metadata__":
            start, end = entry["data_offsets"]
            total += end - start
    return total


def _check_sym_expr(expr: str) -> None:
    tokens = _SYM_TOKEN_RE.findall(expr)
    if "".join(tokens) != expr:
        raise ArtifactError(f"shape expression {expr!r:.200} contains characters outside the allowed set")
    for token in tokens:
        if token[0] == "'":
            if not _SYM_QUOTED_RE.match(token):
                raise ArtifactError(f"shape expression {expr!r:.200} quotes {token!r}, which is not a symbol name")
        elif token[0].isalpha() or token[0] == "_":
            if token not in _SYM_IDENTS:
                raise ArtifactError(f"shape expression {expr!r:.200} uses {token!r}, which is not on the allowlist")


def check_program(program: Any) -> None:
    """Reject a program JSON that could run code when deserialized (rules in the module docstring)."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ArtifactError("program JSON has no graph_module")
    if program.get("guards_code"):
        raise ArtifactError("program JSON carries guards_code; units exported by shardmesh have none")
    if program["graph_module"].get("treespec_namedtuple_fields"):
        raise ArtifactError("program JSON uses namedtuple tree specs, which units never need")
    for key in program.get("range_constraints", {}) or {}:
        if not _IDENT_RE.match(key):
            raise ArtifactError(f"range constraint key {key!r:.100} is not a symbol name")

    stack: list[tuple[str | None, Any]] = [(None, program)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, dict):
            for child_key, child in value.items():
                if child_key in ("as_graph", "as_custom_obj") and child is not None:
                    raise ArtifactError(f"program JSON contains {child_key}; control-flow subgraphs and custom objects are not supported")
                if child_key == "metadata":
                    continue  # cleared before deserialization
                stack.append((child_key, child))
        elif isinstance(value, list):
            stack.extend((key, item) for item in value)
        elif isinstance(value, str):
            if key in ("target", "as_operator") and not _OP_RE.match(value):
                raise ArtifactError(f"operator {value!r:.200} is not an aten, prims or _operator function")
            if key in _NAME_KEYS and not _IDENT_RE.match(value):
                raise ArtifactError(f"name {value!r:.200} is not a Python identifier")
            if key in _FQN_KEYS and value and not _FQN_RE.match(value):
                raise ArtifactError(f"attribute path {value!r:.200} is not a dotted identifier")
            if key == "forward_arg_names" and not _IDENT_RE.match(value):
                raise ArtifactError(f"argument name {value!r:.200} is not a Python identifier")
            if key == "expr_str":
                _check_sym_expr(value)


def _parameter_names(program: Mapping[str, Any]) -> set[str]:
    specs = program["graph_module"].get("signature", {}).get("input_specs", [])
    return {spec["parameter"]["parameter_name"] for spec in specs if isinstance(spec, dict) and "parameter" in spec}


def _expected_specs(input_count: int, output_count: int) -> tuple[str, str]:
    from torch.utils import _pytree as pytree

    in_spec = pytree.treespec_dumps(pytree.tree_structure((tuple(range(input_count)), {})))
    out_value: Any = 0 if output_count == 1 else tuple(range(output_count))
    out_spec = pytree.treespec_dumps(pytree.tree_structure(out_value))
    return in_spec, out_spec


@dataclass(frozen=True)
class DimRule:
    """The sizes an exported program accepts in one dimension of one input.

    ``fixed`` is the only size allowed, or None for a dynamic dimension named ``symbol`` with the
    bounds export inferred. Sizes 0 and 1 pass a lower bound of 2, as in torch's own check: export
    specializes sizes 0 and 1 at trace time, but the graph runs with them.
    """

    input: str
    dim: int
    fixed: int | None
    symbol: str | None = None
    low: int = 0
    high: int | None = None


def dim_rules(module: torch.fx.GraphModule, inputs: Sequence[str]) -> list[DimRule] | None:
    """Compile the program's input shape constraints into plain rules, or None when they are not plain.

    ``ExportedProgram.module()`` checks every call's input shapes in a forward pre-hook that walks
    sympy expressions, which costs 0.2-0.3 ms per call on this CPU (an encoder layer computes for
    about 1.1 ms). When every dimension is a constant or a bare symbol, :func:`check_dims` does the
    same check with a few integer comparisons, and the unit calls ``forward`` directly.
    A dimension given by an expression of symbols returns None, and the unit keeps torch's check.
    """
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return None
    ranges = getattr(module, "range_constraints", None) or {}
    rules: list[DimRule] = []
    for name, node in zip(inputs, placeholders):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            return None
        for dim, size in enumerate(value.shape):
            if isinstance(size, int):
                rules.append(DimRule(name, dim, int(size)))
                continue
            expr = size.node.expr
            if not getattr(expr, "is_Symbol", False):
                return None
            bounds = ranges.get(expr)
            low, high = 0, None
            if bounds is not None:
                # float() maps torch's integer infinity (int_oo) to math.inf, which int() rejects.
                lower, upper = float(bounds.lower), float(bounds.upper)
                low = 0 if math.isinf(lower) else int(lower)
                high = None if math.isinf(upper) else int(upper)
            rules.append(DimRule(name, dim, None, str(expr), low, high))
    return rules


def check_dims(rules: Sequence[DimRule], tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise InputError unless the tensors' shapes satisfy ``rules`` (see :class:`DimRule`)."""
    seen: dict[str, tuple[str, int, int]] = {}
    for rule in rules:
        shape = tensors[rule.input].shape
        if rule.dim >= len(shape):
            raise InputError(f"{what}: input {rule.input!r} has {len(shape)} dimensions; the unit needs more than {rule.dim}")
        size = shape[rule.dim]
        if rule.fixed is not None:
            if size != rule.fixed:
                raise InputError(f"{what}: input {rule.input!r} dimension {rule.dim} is {size}; the unit accepts only {rule.fixed}")
            continue
        if rule.high is not None and size > rule.high:
            raise InputError(
                f"{what}: input {rule.input!r} dimension {rule.dim} is {size}, above the largest size the exported "
                f"model accepts ({rule.high}); shorten or split the input"
            )
        if rule.low > 2 and size < rule.low:
            raise InputError(f"{what}: input {rule.input!r} dimension {rule.dim} is {size}, below the smallest accepted ({rule.low})")
        other = seen.setdefault(rule.symbol, (rule.input, rule.dim, size))
        if other[2] != size:
            raise InputError(
                f"{what}: input {rule.input!r} dimension {rule.dim} is {size}, but input {other[0]!r} dimension "
                f"{other[1]} is {other[2]}; the unit needs them equal"
            )


def index_limits(module: torch.fx.GraphModule, inputs: Sequence[str]) -> dict[str, int]:
    """Return, for each unit input used directly as embedding indices, the table's row count.

    For an index outside the table, torch raises a bare "index out of range in self" that names
    neither the input nor the limit. So the unit checks these inputs itself.
    """
    placeholders = {node: name for node, name in zip((n for n in module.graph.nodes if n.op == "placeholder"), inputs)}
    limits: dict[str, int] = {}
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.embedding.default or len(node.args) < 2:
            continue
        weight, indices = node.args[0], node.args[1]
        if indices not in placeholders or getattr(weight, "op", None) != "get_attr":
            continue
        table = module
        for part in str(weight.target).split("."):
            table = getattr(table, part, None)
        if isinstance(table, torch.Tensor) and table.dim() == 2:
            name = placeholders[indices]
            limits[name] = min(limits.get(name, table.shape[0]), int(table.shape[0]))
    return limits


def check_indices(limits: Mapping[str, int], tensors: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Raise InputError when an input contains an index outside its embedding table (see index_limits)."""
    for name, rows in limits.items():
        tensor = tensors[name]
        if tensor.numel() == 0:
            continue
        low, high = int(tensor.min()), int(tensor.max())
        if low < 0 or high >= rows:
            bad = low if low < 0 else high
            raise InputError(
                f"{what}: input {name!r} contains the invalid index {bad}; its embedding table accepts 0..{rows - 1}. "
                f"For token ids, use the tokenizer that ships with the model"
            )


@dataclass(eq=False)
class LoadedUnit:
    """A unit loaded from its blob: call it with a dict of named tensors."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    input_specs: dict[str, TensorSpec]
    output_specs: dict[str, TensorSpec]
    weight_bytes: int
    sha256: str
    module: torch.nn.Module
    rules: list[DimRule] | None = None
    index_limits: dict[str, int] = field(default_factory=dict)

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> TensorDict:
        what = f"unit {self.name!r}"
        check_tensors(self.input_specs, tensors, what=what, only=self.inputs)
        if self.index_limits:
            check_indices(self.index_limits, tensors, what=what)
        args = [tensors[name] for name in self.inputs]
        with torch.inference_mode():
            if self.rules is None:
                result = self.module(*args)
            else:
                # The plain rules replace the module's pre-hooks (see dim_rules).
                check_dims(self.rules, tensors, what=what)
                result = self.module.forward(*args)
        return name_outputs(self.name, self.outputs, result)


def load_unit(source: Path | str | bytes | bytearray | memoryview, *, expected_sha256: str | None = None) -> LoadedUnit:
    """Load a unit blob (a path or its bytes) into a callable, without pickle and without model code.

    With ``expected_sha256`` the bytes are hashed first and a mismatch raises ArtifactError.
    """
    from safetensors.torch import load as load_tensors

    from torch._export.serde.serialize import SerializedArtifact, deserialize

    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    sha = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and sha != expected_sha256:
        raise ArtifactError(f"unit blob has sha256 {sha}, expected {expected_sha256}; fetch it again")
    try:
        record = json.loads(read_header(data)["__metadata__"][METADATA_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"unit blob has no valid {METADATA_KEY!r} metadata: {exc!r}") from None
    if not isinstance(record, dict) or record.get("format") != UNIT_FORMAT:
        found = record.get("format") if isinstance(record, dict) else record
        raise ArtifactError(f"unit blob format is {found!r:.100}, expected {UNIT_FORMAT!r}")
    signature, aliases, program = record.get("unit"), record.get("aliases"), record.get("program")
    name = signature.get("name") if isinstance(signature, dict) else None
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ArtifactError(f"unit blob names an invalid unit {name!r:.100}")
    inputs = _names(signature.get("inputs"), f"unit {name}.inputs")
    outputs = _names(signature.get("outputs"), f"unit {name}.outputs")
    input_specs = _specs_from_json(signature.get("input_specs"), f"unit {name}.input_specs")
    output_specs = _specs_from_json(signature.get("output_specs"), f"unit {name}.output_specs")

    check_program(program)
    signatures = program["graph_module"].get("module_call_graph") or []
    root = next((entry.get("signature") for entry in signatures if entry.get("fqn") == ""), None)
    expected_in, expected_out = _expected_specs(len(inputs), len(outputs))
    if not root or root.get("in_spec") != expected_in or root.get("out_spec") != expected_out:
        raise ArtifactError(f"unit {name!r}: program call signature does not match {len(inputs)} inputs and {len(outputs)} outputs")
    _strip_program(program)

    stored = load_tensors(data)
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in stored for v in aliases.values()):
        raise ArtifactError(f"unit {name!r}: alias table refers to tensors the blob does not contain")
    for alias, target in aliases.items():
        stored[alias] = stored[target]
    state_dict: dict[str, torch.Tensor] = {}
    parameter_names = _parameter_names(program)
    for key, tensor in stored.items():
        if key.startswith("state_dict/"):
            fqn = key.removeprefix("state_dict/")
            # The torch verifier requires parameters to be nn.Parameter instances.
            state_dict[fqn] = torch.nn.Parameter(tensor, requires_grad=False) if fqn in parameter_names else tensor
    constants = {k.removeprefix("constants/"): v for k, v in stored.items() if k.startswith("constants/")}
    artifact = SerializedArtifact(json.dumps(program).encode(), state_dict, constants, b"")
    try:
        with DESERIALIZE_LOCK:
            ep = deserialize(artifact)
        # NOTE: units are rebuilt on the CPU. The graph contains the export device in aten.to
        # calls, so running on a GPU needs a re-export there or a device rewrite of the graph.
        module = ep.module()
    except Exception as exc:  # noqa: BLE001 - the torch deserializer raises many types; all mean "bad blob"
        raise ArtifactError(f"unit {name!r}: torch could not rebuild the exported program: {exc}") from exc
    # The exported graph already fixed eval-mode behavior (dropout off, batch-norm statistics), and
    # the module returned by ExportedProgram.module() rejects .eval() calls.
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    weights = _header_weight_bytes(read_header(data))
    rules = dim_rules(module, inputs) if isinstance(module, torch.fx.GraphModule) else None
    limits = index_limits(module, inputs) if isinstance(module, torch.fx.GraphModule) else {}
    logger.debug("loaded unit %s (sha256 %s, %d weight bytes, %s shape check)", name, sha, weights,
                 "plain" if rules is not None else "torch")
    return LoadedUnit(name, inputs, outputs, input_specs, output_specs, weights, sha, module, rules, limits)


# --- input checks and segments ------------------------------------------------------------------


def check_tensors(
    specs: Mapping[str, TensorSpec],
    tensors: Mapping[str, Any],
    *,
    what: str,
    only: Sequence[str] | None = None,
    strict: bool = False,
) -> None:
    """Raise InputError unless each needed tensor is present with the spec's dtype and shape.

    ``only`` restricts the check to those names (others in ``tensors`` are ignored) unless
    ``strict``, which also rejects names that are not expected. All checked tensors must agree
    on dimension 0, the batch dimension.
    """
    # NOTE: values are not checked, so two inputs of equal dtype and shape whose contents were
    # swapped under correct names (ids given as the mask) still run and give a wrong answer.
    names = tuple(only) if only is not None else tuple(specs)
    missing = [name for name in names if name not in tensors]
    if missing:
        raise InputError(f"{what}: missing input {missing[0]!r}; expected {list(names)}, got {sorted(tensors)}")
    if strict:
        unexpected = sorted(set(tensors) - set(names))
        if unexpected:
            raise InputError(f"{what}: unexpected input {unexpected[0]!r}; expected {list(names)}")
    batch: tuple[str, int] | None = None
    for name in names:
        tensor = tensors[name]
        reason = specs[name].mismatch(tensor)
        if reason:
            raise InputError(f"{what}: input {name!r} {reason}")
        if tensor.dim() > 0 and specs[name].shape[0] == -1:
            if batch is None:
                batch = (name, tensor.shape[0])
            elif tensor.shape[0] != batch[1]:
                raise InputError(
                    f"{what}: input {name!r} has batch size {tensor.shape[0]} in dimension 0, but {batch[0]!r} has {batch[1]}"
                )


def check_inputs(manifest: Manifest, tensors: Mapping[str, Any], *, task: str | None = None) -> None:
    """Check a request's model inputs: every input present, none unexpected, dtype and shape right."""
    needed = segment_inputs(manifest, route_for_task(manifest, task)[0], task)
    check_tensors(manifest.input_specs, tensors, what=f"model {manifest.model!r}", only=needed, strict=True)
    check_equal_dims(manifest, tensors)


def check_equal_dims(manifest: Manifest, tensors: Mapping[str, Any]) -> None:
    """Raise InputError when model inputs differ in dimensions that ``manifest.equal_dims`` ties together."""
    unequal = first_unequal_dims(manifest.equal_dims, tensors)
    if unequal is not None:
        (name, dim, size), (other, other_dim, other_size) = unequal
        raise InputError(
            f"model {manifest.model!r}: input {name!r} dimension {dim} is {size}, but input {other!r} dimension "
            f"{other_dim} is {other_size}; the model needs them equal, so give both the same size"
        )


def first_unequal_dims(
    groups: Iterable[Sequence[Sequence[Any]]], tensors: Mapping[str, Any]
) -> tuple[tuple[str, int, int], tuple[str, int, int]] | None:
    """Return the first (input, dimension, size) that differs from an earlier one in its group, and that one.

    Inputs that are missing, or too short to have the dimension, are left to the other checks.
    """
    for group in groups:
        first: tuple[str, int, int] | None = None
        for name, dim in group:
            tensor = tensors.get(name)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim:
                continue
            size = int(tensor.shape[dim])
            if first is None:
                first = (name, dim, size)
            elif size != first[2]:
                return (name, dim, size), first
    return None


BlobSource = Mapping[str, Path | str] | Callable[[str], Path | str | bytes]


class Segment:
    """Units ``first..last`` of an exported model, loaded from their blobs.

    ``blobs`` maps a unit's sha256 to its file path (or is a function returning a path or the
    bytes). Each blob is verified against the manifest's sha256 when it is loaded.
    """

    def __init__(self, manifest: Manifest, first: int, last: int, blobs: BlobSource) -> None:
        check_segment_range(manifest, first, last)
        self.manifest = manifest
        self.first = first
        self.last = last
        self.units: list[LoadedUnit] = []
        for index in range(first, last + 1):
            entry = manifest.units[index]
            source = blobs(entry.sha256) if callable(blobs) else blobs.get(entry.sha256)
            if source is None:
                raise ArtifactError(f"no blob for unit {entry.name!r} (sha256 {entry.sha256})")
            unit = load_unit(source, expected_sha256=entry.sha256)
            if unit.name != entry.name or unit.inputs != entry.inputs or unit.outputs != entry.outputs:
                raise ArtifactError(
                    f"blob {entry.sha256} holds unit {unit.name!r} {unit.inputs}->{unit.outputs}, but the manifest "
                    f"expects {entry.name!r} {entry.inputs}->{entry.outputs}"
                )
            self.units.append(unit)
        self.input_specs = {name: manifest.tensor_spec(name) for name in segment_inputs(manifest, first)}
        # Per task: (names the segment needs, names it returns). Both walk the unit graph, so they
        # are computed once rather than on every run.
        self._names: dict[str | None, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        logger.info("loaded segment %d..%d of model %s (%d units)", first, last, manifest.model, len(self.units))

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.input_specs)

    def outputs(self, task: str | None = None) -> tuple[str, ...]:
        """Return the names this segment returns: those live after its last unit."""
        return self._route_names(task)[1]

    def _route_names(self, task: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
        names = self._names.get(task)
        if names is None:
            what = f"segment {self.first}..{self.last} of model {self.manifest.model!r}"
            if task is not None and self.first not in route_for_task(self.manifest, task):
                raise InputError(f"{what}: task {task!r} does not visit this segment")
            needed = segment_inputs(self.manifest, self.first, task) if task is not None else self.inputs
            names = (needed, live_names(self.manifest, self.last, task))
            self._names[task] = names
        return names

    @property
    def weight_bytes(self) -> int:
        return sum(unit.weight_bytes for unit in self.units)

    def run(self, tensors: Mapping[str, torch.Tensor], task: str | None = None) -> TensorDict:
        """Run the segment and return only the tensors live after its last unit."""
        needed, outputs = self._route_names(task)
        check_tensors(self.input_specs, tensors, what=f"segment {self.first}..{self.last} of model {self.manifest.model!r}",
                      only=needed)
        env: TensorDict = {name: tensors[name] for name in needed}
        for unit in self.units:
            env.update(unit(env))
        return {name: env[name] for name in outputs}
