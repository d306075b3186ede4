"""Saved ExportedProgram files as models of units (deploy source ``exported:/abs/path/model.pt2``).

Problem
-------
An operator who already has a model as a ``torch.export.save`` archive should be able to deploy
it without writing a factory. The rest of the pipeline expects a :class:`ModelSpec`: a chain of
units that take and return tensors by name, each re-exported on its own into the safe unit format
of ``coordinator.export``. The saved program is one flat graph of aten operators, so it has to be
cut into such units here.

Reading the file
----------------
The file is read on the coordinator with ``torch.export.load``. In torch 2.13 that loader reads
some weights with ``torch.load(weights_only=False)`` and custom objects with ``pickle.loads``
(``torch/export/pt2_archive/_package.py``), so it runs only on a file the operator names on the
coordinator's own disk. Bytes received from the network never reach it, and agents never see the
archive, only the re-exported unit blobs.

Where the cuts go
-----------------
Every node of an exported graph records the stack of modules that were running when it was
traced (``nn_module_stack``). The deepest entry is the node's module path, such as
``layers.2.mlp.fc1``. Units are built from those paths in graph order, which is a topological
order, so a unit never reads a tensor that a later unit writes:

* By default, and with the deploy option ``split_prefix``, the units are the numbered children
  of one module (``layers.0``, ``layers.1``, ...). A unit ``prologue`` contains what runs before
  the first of them, and a unit ``epilogue`` what runs after the last. Without the option, the
  module with the max number of numbered children is chosen, so block segmentation then finds
  the same run of units by name.
* With ``split_depth`` N, every module path cut to its first N parts names a unit.

A node whose path names no unit, such as arithmetic in the root module's ``forward``, joins the
unit that is running when it appears (or the first unit when it appears before any). A module
that runs again after another unit started does not go back to its old unit, because that unit
has already handed its tensors on. It joins the running unit instead.

``torch.fx.passes.split_module`` then turns each unit into a GraphModule. Four things about an
exported graph need care around that:

* Symbolic sizes (``sym_size`` and arithmetic on it) are not tensors, so they cannot cross a cut.
  Each unit that reads one gets its own copy of the computation, which reads the size from a
  tensor that does cross the cut.
* An operator that returns a tuple (``native_layer_norm``, ``split``) stays in one unit with the
  ``getitem`` nodes that unpack it.
* The ``_guards_fn`` call that ``ExportedProgram.module()`` adds to check input shapes is dropped.
  The gateway and every segment check dtypes and shapes against the input specs instead.
* ``split_module`` passes weights into each partition as arguments. Each unit gets them back as
  its own attributes, so a weight tied between two units is stored in both blobs.

Every unit reads and writes tensors by name. Model inputs keep the saved program's input names.
Model outputs are named after their place in its output tree: ``output`` for a single tensor,
dictionary keys and positions otherwise. Other tensors that cross a cut are ``<unit>.<node>``.

What is rejected
----------------
Each of these is an error that names the file and what to change:

* a file that is missing, a directory, or not a PT2 archive;
* a program with control-flow subgraphs (``torch.cond``, ``while_loop``), custom objects, or
  operators outside aten, prims and ``_operator`` (the rules of
  ``coordinator.export.check_program``);
* buffer mutation, inputs that are not tensors, or a fixed batch dimension;
* a split that yields fewer than two units.

The whole saved program, ``ep.module()``, is the model's reference function, so tests compare
the segmented run with it.
"""

from __future__ import annotations

import json
import logging
import operator
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from coordinator.export import DESERIALIZE_LOCK
from coordinator.micromodel import NAME_RE, ModelSpec, SpecError, TensorDict, TensorSpec, Unit, dtype_name

logger = logging.getLogger(__name__)

SOURCE_PREFIX = "exported:"
PROLOGUE = "prologue"
EPILOGUE = "epilogue"
# The name of the one unit of a graph in which no node ran inside a module.
WHOLE_MODEL = "model"
# Size given to each dynamic dimension when the file carries no example inputs: torch.export
# specializes sizes 0 and 1, so 2 is the smallest size that keeps a dimension dynamic.
GENERATED_DYNAMIC_SIZE = 2
# The module path torch 2.13 records, after a save and load, for nodes traced outside any module.
_NO_MODULE_MARKER = "_empty_nn_module_stack_from_metadata_hook"


# --- options --------------------------------------------------------------------------------------


def split_arguments(source: str, options: Mapping[str, Any]) -> list[str]:
    """Check the deploy options ``split_prefix`` and ``split_depth`` and return export job arguments."""
    prefix = options.get("split_prefix")
    depth = options.get("split_depth")
    if prefix is None and depth is None:
        return []
    if not source.startswith(SOURCE_PREFIX):
        name = "split_prefix" if prefix is not None else "split_depth"
        raise ValueError(f"options.{name} applies only to {SOURCE_PREFIX} sources, but the source is {source!r}; "
                         f"remove the option")
    if prefix is not None and depth is not None:
        raise ValueError(f"options.split_prefix ({prefix!r}) and options.split_depth ({depth!r}) exclude each "
                         f"other; give one of them")
    if prefix is not None:
        if not isinstance(prefix, str):
            raise ValueError(f"options.split_prefix is {prefix!r}; use the module path whose numbered children "
                             f"become units, such as \"layers\" or \"encoder.layer\"")
        return ["--split-prefix", prefix]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"options.split_depth is {depth!r}; use an integer >= 1 (the number of module path "
                         f"parts that name a unit)")
    return ["--split-depth", str(depth)]


# --- loading and checks ---------------------------------------------------------------------------


def load_program(path_text: str) -> torch.export.ExportedProgram:
    """Load a ``torch.export.save`` archive from an absolute path on this machine."""
    path = Path(path_text)
    if not path.is_absolute():
        raise SpecError(f"exported model path {path_text!r} is relative; give an absolute path "
                        f"({SOURCE_PREFIX}/abs/path/model.pt2) because the export job runs in another directory")
    if path.is_dir():
        raise SpecError(f"exported model path {path} is a directory; give the .pt2 file that torch.export.save wrote "
                        f"(a Hugging Face directory deploys as hf:{path})")
    if not path.is_file():
        raise SpecError(f"exported model file {path} not found; write it with torch.export.save and give its path")
    if not zipfile.is_zipfile(path):
        raise SpecError(f"exported model file {path} is not a PT2 archive (not a zip file); "
                        f"write it with torch.export.save")
    causes = _LoadErrors()
    torch_export_logger = logging.getLogger("torch.export")
    torch_export_logger.addHandler(causes)
    try:
        # The operator named this file on the coordinator's disk; bytes from the network never get here.
        with DESERIALIZE_LOCK:  # see coordinator.export
            program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - the PT2 reader raises many types; all mean "not a usable archive"
        reason = causes.errors[-1] if causes.errors else f"{type(exc).__name__}: {exc}"
        raise SpecError(f"exported model file {path} is not a readable PT2 archive ({reason}); write it with "
                        f"torch.export.save from torch {torch.__version__}, with inputs and outputs made of "
                        f"tensors, tuples, lists and dicts") from exc
    finally:
        torch_export_logger.removeHandler(causes)
    logger.info("loaded exported program %s (%d graph nodes)", path, len(program.graph.nodes))
    return program


class _LoadErrors(logging.Handler):
    """Collect the errors ``torch.export.load`` logs as warnings before it raises a generic error."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            self.errors.append(f"{type(error).__name__}: {error}")


def check_supported(program: torch.export.ExportedProgram, path: str) -> None:
    """Raise SpecError when the program contains something the unit format cannot store."""
    from torch._export.serde.serialize import serialize

    from coordinator.export import ArtifactError, check_program

    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator):
            raise SpecError(f"exported program {path}: node {node.name!r} calls {node.target.name()}, a control-flow "
                            f"operator; units hold straight-line graphs only, so export the model without it")
    custom = sorted(name for name, value in program.constants.items() if not isinstance(value, torch.Tensor))
    if custom:
        raise SpecError(f"exported program {path} contains custom objects {custom}; units store plain tensors only, "
                        f"so export the model without them")
    signature = program.graph_signature
    mutated = sorted({*signature.buffers_to_mutate.values(), *signature.user_inputs_to_mutate.values()})
    if mutated:
        raise SpecError(f"exported program {path} mutates {mutated}; export the model in eval mode without "
                        f"in-place updates of buffers or inputs")
    try:
        artifact = serialize(program, serialize_state_dict=False, serialize_constants=False,
                             serialize_example_inputs=False)
        document = json.loads(artifact.exported_program)
        # Guards are dropped from every unit (see coordinator.export), so they are not judged here.
        document["guards_code"] = []
        check_program(document)
    except ArtifactError as exc:
        raise SpecError(f"exported program {path} cannot become shardmesh units: {exc}") from None


def _user_input_nodes(program: torch.export.ExportedProgram) -> list[fx.Node]:
    by_name = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    return [by_name[name] for name in program.graph_signature.user_inputs]


def read_input_specs(program: torch.export.ExportedProgram, path: str) -> dict[str, TensorSpec]:
    """Describe each model input of the program, marking symbolic dimensions dynamic (-1)."""
    specs: dict[str, TensorSpec] = {}
    for node in _user_input_nodes(program):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise SpecError(f"exported program {path}: input {node.name!r} is {type(value).__name__}, not a tensor; "
                            f"shardmesh models take tensors only, so export with tensor inputs")
        if not NAME_RE.match(node.name):
            raise SpecError(f"exported program {path}: input name {node.name!r} is invalid; name the forward "
                            f"arguments with letters, digits and '_'")
        shape = tuple(-1 if _is_symbolic(size) else int(size) for size in value.shape)
        if not shape or shape[0] != -1:
            raise SpecError(
                f"exported program {path}: input {node.name!r} has shape {list(value.shape)} with no dynamic batch "
                f"dimension; export with dynamic_shapes marking dimension 0 (torch.export.Dim) so any batch size runs"
            )
        specs[node.name] = TensorSpec(dtype_name(value.dtype), shape)
    if not specs:
        raise SpecError(f"exported program {path} takes no inputs; a model needs at least one input tensor")
    return specs


def _is_symbolic(size: Any) -> bool:
    return isinstance(size, torch.SymInt) and not size.node.expr.is_number


def choose_example_inputs(
    program: torch.export.ExportedProgram, specs: Mapping[str, TensorSpec], path: str
) -> dict[str, torch.Tensor]:
    """Return the file's example inputs by name, or generated ones when the file has none."""
    if program.example_inputs is None:
        logger.info("exported program %s has no example inputs; generating them from the input shapes", path)
        return _generated_examples(program)
    leaves = pytree.tree_leaves(program.example_inputs)
    names = list(specs)
    if len(leaves) != len(names) or not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise SpecError(
            f"exported program {path}: its example inputs hold {len(leaves)} values for inputs {names}; save the "
            f"program with one example tensor per input, or without example inputs so they are generated"
        )
    examples = dict(zip(names, leaves))
    for name, spec in specs.items():
        reason = spec.mismatch(examples[name])
        small = [dim for dim in spec.dynamic_dims if examples[name].dim() > dim and examples[name].shape[dim] < 2]
        if reason or small:
            problem = reason or f"size {examples[name].shape[small[0]]} in dynamic dimension {small[0]}"
            raise SpecError(f"exported program {path}: example input {name!r} is unusable ({problem}); export with "
                            f"example tensors of size >= 2 in every dynamic dimension")
    return examples


def _generated_examples(program: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Make example inputs from the placeholder shapes: dynamic sizes at their minimum, at least 2."""
    generator = torch.Generator().manual_seed(0)
    sizes: dict[Any, int] = {}
    examples: dict[str, torch.Tensor] = {}
    for node in _user_input_nodes(program):
        fake = node.meta["val"]
        shape = [_example_size(program, size, sizes) for size in fake.shape]
        if fake.dtype.is_floating_point:
            examples[node.name] = torch.randn(shape, generator=generator).to(fake.dtype)
        else:
            # Ones are a valid token id, a valid index and an all-visible attention mask.
            examples[node.name] = torch.ones(shape, dtype=fake.dtype)
    return examples


def _example_size(program: torch.export.ExportedProgram, size: Any, chosen: dict[Any, int]) -> int:
    if not _is_symbolic(size):
        return int(size)
    expr = size.node.expr
    for symbol in expr.free_symbols:
        if symbol not in chosen:
            bounds = program.range_constraints.get(symbol)
            lower = int(bounds.lower) if bounds is not None else 0
            chosen[symbol] = max(GENERATED_DYNAMIC_SIZE, lower)
    return int(expr.xreplace(chosen))


# --- unit assignment ------------------------------------------------------------------------------


def _module_path(node: fx.Node) -> tuple[str, ...]:
    """Return the parts of the deepest module path that was running when ``node`` was traced."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ()
    path = next(reversed(stack.values()))[0]
    if path == _NO_MODULE_MARKER:
        return ()
    return tuple(part for part in path.split(".") if part)


def _compute_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [node for node in graph.nodes if node.op not in ("placeholder", "get_attr", "output")]


def numbered_parents(graph: fx.Graph) -> dict[str, list[str]]:
    """Map each module path that has numbered children to those children, in graph order."""
    parents: dict[str, list[str]] = {}
    for node in _compute_nodes(graph):
        parts = _module_path(node)
        for depth, part in enumerate(parts):
            if part.isdigit():
                children = parents.setdefault(".".join(parts[:depth]), [])
                if part not in children:
                    children.append(part)
    return parents


def _default_prefix(graph: fx.Graph, path: str) -> str:
    parents = numbered_parents(graph)
    best = max(parents, key=lambda parent: len(parents[parent]), default=None)
    if best is None or len(parents[best]) < 2:
        raise SpecError(f"exported program {path} has no module with two or more numbered children (such as "
                        f"layers.0, layers.1) to split at; set the deploy option split_depth, for example 1 for "
                        f"one unit per top-level module")
    return best


def _prefix_keys(graph: fx.Graph, prefix: str, path: str) -> list[str | None]:
    """Return each compute node's unit: a numbered child of ``prefix``, or the prologue or epilogue."""
    parts = tuple(part for part in prefix.split(".") if part)
    parents = numbered_parents(graph)
    if ".".join(parts) not in parents:
        known = sorted(parents)
        raise SpecError(f"split_prefix {prefix!r} names no module with numbered children in exported program "
                        f"{path}; modules with numbered children: {known}")
    nodes = _compute_nodes(graph)
    blocks: list[str | None] = []
    for node in nodes:
        node_parts = _module_path(node)
        inside = node_parts[: len(parts)] == parts and len(node_parts) > len(parts) and node_parts[len(parts)].isdigit()
        blocks.append(".".join(node_parts[: len(parts) + 1]) if inside else None)
    last_block = max(i for i, key in enumerate(blocks) if key is not None)
    keys: list[str | None] = []
    started = False
    for index, key in enumerate(blocks):
        if key is not None:
            started = True
            keys.append(key)
        elif not started:
            keys.append(PROLOGUE)
        elif index > last_block:
            keys.append(EPILOGUE)
        else:
            keys.append(None)  # between blocks: joins the running block
    return keys


def _depth_keys(graph: fx.Graph, depth: int) -> list[str | None]:
    return [".".join(_module_path(node)[:depth]) or None for node in _compute_nodes(graph)]


def assign_units(graph: fx.Graph, keys: Sequence[str | None]) -> tuple[dict[fx.Node, int], list[str]]:
    """Group compute nodes into units in graph order; return each node's unit index and the unit names.

    A node without a key joins the running unit. So does a node whose key names a unit that was
    already closed, because that unit has already handed its tensors on.
    """
    nodes = _compute_nodes(graph)
    unit_of: dict[fx.Node, int] = {}
    names: list[str] = []
    pending: list[fx.Node] = []
    for node, key in zip(nodes, keys):
        source = node.args[0] if node.target is operator.getitem and node.args else None
        if isinstance(source, fx.Node) and source in unit_of and not isinstance(source.meta.get("val"), torch.Tensor):
            # Unpacking a tuple result stays with the operator that returned the tuple.
            unit_of[node] = unit_of[source]
            continue
        if key is not None and key not in names:
            names.append(key)
        if not names:
            pending.append(node)
            continue
        unit_of[node] = len(names) - 1
    if pending and not names:
        names.append(WHOLE_MODEL)
    for node in pending:
        unit_of[node] = 0
    return unit_of, names


def _is_tensor_node(node: fx.Node) -> bool:
    return node.op in ("placeholder", "get_attr") or isinstance(node.meta.get("val"), torch.Tensor)


def localize_scalars(graph: fx.Graph, unit_of: dict[fx.Node, int]) -> int:
    """Copy non-tensor values (symbolic sizes) into each later unit that reads them; return the copy count."""
    first_node: dict[int, fx.Node] = {}
    for node in _compute_nodes(graph):
        first_node.setdefault(unit_of[node], node)
    copies: dict[tuple[fx.Node, int], fx.Node] = {}

    def copy_into(node: fx.Node, unit: int) -> fx.Node:
        if (node, unit) in copies:
            return copies[(node, unit)]

        def map_arg(arg: fx.Node) -> fx.Node:
            if arg in unit_of and unit_of[arg] != unit and not _is_tensor_node(arg):
                return copy_into(arg, unit)
            return arg

        # The copy goes before the unit's first node: everything it reads comes from earlier units.
        with graph.inserting_before(first_node[unit]):
            copy = graph.node_copy(node, map_arg)
        unit_of[copy] = unit
        copies[(node, unit)] = copy
        return copy

    for node in _compute_nodes(graph):
        if _is_tensor_node(node):
            continue
        for user in list(node.users):
            if user in unit_of and unit_of[user] != unit_of[node]:
                if isinstance(node.meta.get("val"), (tuple, list)):
                    raise SpecError(f"node {user.name!r} reads the tuple result of {node.name!r} from another unit; "
                                    f"choose another split_prefix or split_depth")
                user.replace_input_with(node, copy_into(node, unit_of[user]))
    return len(copies)


def check_unit_order(graph: fx.Graph, unit_of: Mapping[fx.Node, int], names: Sequence[str]) -> None:
    """Raise SpecError when a node reads a value that a later unit computes."""
    for node in _compute_nodes(graph):
        for arg in node.all_input_nodes:
            if arg in unit_of and unit_of[arg] > unit_of[node]:
                raise SpecError(f"node {node.name!r} in unit {names[unit_of[node]]!r} reads {arg.name!r} from the "
                                f"later unit {names[unit_of[arg]]!r}; choose another split_prefix or split_depth")


# --- building the spec ----------------------------------------------------------------------------


def output_names(out_spec: Any, count: int) -> list[str]:
    """Name the model outputs after their place in the output tree: ``output``, keys or positions."""
    if count == 1 and out_spec.is_leaf():
        return ["output"]
    positions = pytree.tree_unflatten(list(range(count)), out_spec)
    leaves_with_paths, _ = pytree.tree_flatten_with_path(positions)
    names: list[str] = []
    for position, (key_path, _) in enumerate(leaves_with_paths):
        parts = [str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", "")))) for entry in key_path]
        name = ".".join(parts)
        if not name or name[0].isdigit():
            name = f"output.{name}"  # a position in a returned tuple or list
        names.append(name if NAME_RE.match(name) else f"output.{position}")
    if len(set(names)) != len(names):
        return [f"output.{position}" for position in range(count)]
    return names


def _reference(program: torch.export.ExportedProgram, input_names: Sequence[str], names: Sequence[str]):
    module = program.module()
    in_spec = program.call_spec.in_spec

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        args, kwargs = pytree.tree_unflatten([inputs[name] for name in input_names], in_spec)
        return dict(zip(names, pytree.tree_leaves(module(*args, **kwargs))))

    return reference


def _drop_guards(module: fx.GraphModule) -> None:
    """Remove the input-shape guard call that ``ExportedProgram.module()`` adds."""
    for node in list(module.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            module.graph.erase_node(node)
    if hasattr(module, "_guards_fn"):
        delattr(module, "_guards_fn")
    module.recompile()


def _unit_keys(graph: fx.Graph, split_prefix: str | None, split_depth: int | None, path: str) -> list[str | None]:
    if split_depth is not None:
        if isinstance(split_depth, bool) or not isinstance(split_depth, int) or split_depth < 1:
            raise SpecError(f"split_depth {split_depth!r} is invalid; use an integer >= 1")
        return _depth_keys(graph, split_depth)
    prefix = split_prefix.rstrip(".") if split_prefix is not None else _default_prefix(graph, path)
    return _prefix_keys(graph, prefix, path)


def build_exported_spec(path: str, *, split_prefix: str | None = None, split_depth: int | None = None) -> ModelSpec:
    """Load a ``torch.export.save`` archive and cut it into units (rules in the module docstring)."""
    from torch.fx.passes.split_module import split_module

    if split_prefix is not None and split_depth is not None:
        raise SpecError(f"split_prefix {split_prefix!r} and split_depth {split_depth!r} exclude each other; give one")
    program = load_program(path)
    check_supported(program, path)
    specs = read_input_specs(program, path)
    examples = choose_example_inputs(program, specs, path)

    module = program.module()
    _drop_guards(module)
    graph = module.graph
    keys = _unit_keys(graph, split_prefix, split_depth, path)
    unit_of, unit_names = assign_units(graph, keys)
    if not unit_names:
        raise SpecError(f"exported program {path} computes nothing: its graph has no operator nodes")
    if len(unit_names) < 2:
        raise SpecError(f"exported program {path} splits into the single unit {unit_names[0]!r}, so there is "
                        f"nothing to place on several agents; choose another split_prefix or a larger split_depth")
    copied = localize_scalars(graph, unit_of)
    check_unit_order(graph, unit_of, unit_names)
    graph.lint()
    module.recompile()
    split = split_module(module, module, lambda node: unit_of[node])

    units, outputs = _units_from_split(split, unit_names, list(specs), program.call_spec.out_spec, path)
    spec_name = Path(path).stem if NAME_RE.match(Path(path).stem) else "exported"
    try:
        spec = ModelSpec(
            name=spec_name,
            units=tuple(units),
            example_inputs=examples,
            outputs=tuple(outputs),
            input_specs=specs,
            reference=_reference(program, list(specs), outputs),
        )
    except SpecError as exc:
        raise SpecError(f"exported program {path}: {exc}") from None
    _check_examples_run(spec, path)
    logger.info("split exported program %s into %d units %s (%d size computations copied across cuts)",
                path, len(units), unit_names, copied)
    return spec


def _units_from_split(
    split: fx.GraphModule, unit_names: Sequence[str], input_names: Sequence[str], out_spec: Any, path: str
) -> tuple[list[Unit], list[str]]:
    """Turn the split module's ``submod_<i>`` calls into units that read and write tensors by name."""
    top_nodes = list(split.graph.nodes)
    placeholders = [node for node in top_nodes if node.op == "placeholder"]
    names_by_node: dict[fx.Node, str] = dict(zip(placeholders, input_names))
    output_node = next(node for node in top_nodes if node.op == "output")
    returned = pytree.tree_leaves(output_node.args[0])
    if not all(isinstance(value, fx.Node) for value in returned):
        raise SpecError(f"exported program {path} returns non-tensor values; return tensors only")
    model_outputs = output_names(out_spec, len(returned))
    output_by_node: dict[fx.Node, str] = {}
    for node, name in zip(returned, model_outputs):
        if node in names_by_node:
            raise SpecError(f"exported program {path} returns its input {names_by_node[node]!r} unchanged; "
                            f"return only computed tensors")
        if node in output_by_node:
            raise SpecError(f"exported program {path} returns one tensor twice (outputs {output_by_node[node]!r} "
                            f"and {name!r}); return it once")
        output_by_node[node] = name

    units: list[Unit] = []
    for call in (node for node in top_nodes if node.op == "call_module"):
        index = int(str(call.target).removeprefix("submod_"))
        unit_name = unit_names[index]
        submodule = getattr(split, str(call.target))
        inner_output = next(node for node in submodule.graph.nodes if node.op == "output").args[0]
        if isinstance(inner_output, (tuple, list)):
            getitems = {user.args[1]: user for user in call.users if user.target is operator.getitem}
            produced = [getitems.get(position) for position in range(len(inner_output))]
            inner_names = [value.name for value in inner_output]
        else:
            produced, inner_names = [call], [inner_output.name]
        outputs: list[str] = []
        for top, inner_name in zip(produced, inner_names):
            name = output_by_node.get(top) if top is not None else None
            name = name or f"{unit_name}.{inner_name}"
            if top is not None:
                names_by_node[top] = name
            outputs.append(name)
        _inline_attributes(split, call, submodule)
        inputs = tuple(names_by_node[arg] for arg in call.args if arg.op != "get_attr")
        units.append(Unit(unit_name, submodule, inputs, tuple(outputs)))
    return units, model_outputs


def _inline_attributes(split: fx.GraphModule, call: fx.Node, submodule: fx.GraphModule) -> None:
    """Make the weights that ``split_module`` passes in as arguments attributes of the submodule.

    ``split_module`` turns a tensor attribute (a parameter, buffer or lifted constant) into an
    argument of every partition that reads it. A unit must own its weights, so each such
    placeholder becomes an attribute of the submodule again. A weight tied between two units is
    then an attribute of both.
    """
    placeholders = [node for node in submodule.graph.nodes if node.op == "placeholder"]
    for arg, placeholder in zip(call.args, placeholders):
        if arg.op != "get_attr":
            continue
        value = split
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        attribute = str(arg.target).replace(".", "_")
        if isinstance(value, torch.nn.Parameter):
            submodule.register_parameter(attribute, value)
        else:
            submodule.register_buffer(attribute, value)
        with submodule.graph.inserting_before(placeholder):
            replacement = submodule.graph.get_attr(attribute)
        replacement.meta = dict(placeholder.meta)
        placeholder.replace_all_uses_with(replacement)
        submodule.graph.erase_node(placeholder)
    submodule.graph.lint()
    submodule.recompile()


def _check_examples_run(spec: ModelSpec, path: str) -> None:
    """Run the whole program and the unit chain on the examples, so a bad example fails here, clearly."""
    from coordinator.micromodel import reference_forward, run_units

    try:
        expected = reference_forward(spec, spec.example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure means the examples are unusable
        raise SpecError(f"exported program {path} fails on its example inputs: {type(exc).__name__}: {exc}; save the "
                        f"program with example inputs that run (the arguments given to torch.export.export)") from exc
    try:
        got = run_units(spec, spec.example_inputs)
    except Exception as exc:  # noqa: BLE001 - the whole program ran, so the split is at fault
        raise SpecError(f"exported program {path}: its units fail on the example inputs that the whole program runs "
                        f"({type(exc).__name__}: {exc}); deploy it with another split_prefix or split_depth") from exc
    for name in spec.outputs:
        # A mismatch here is a splitting bug, not a user error. It stops the deploy before any blob is written.
        same_shape = got[name].shape == expected[name].shape
        if not same_shape or not torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-5):
            raise SpecError(f"exported program {path}: the units compute output {name!r} differently from the whole "
                            f"program on the example inputs; deploy it with another split_prefix or split_depth")
