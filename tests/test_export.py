"""Exported unit artifacts: segmented runs equal the whole model, safe loading, input checks.

Each model is exported once per module (MiniLM about 4 s, EfficientNet about 4 s on one thread)
and every segment count reuses those blobs.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

import toymodels
from coordinator import zoo
from coordinator.export import (
    METADATA_KEY,
    ArtifactError,
    Manifest,
    Segment,
    check_inputs,
    check_program,
    export_model,
    load_manifest,
    load_unit,
    read_header,
)
from coordinator.micromodel import InputError, ModelSpec, reference_forward, route_for_task

TOLERANCE = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _blob_paths(out_dir: Path, manifest: Manifest) -> dict[str, Path]:
    return {unit.sha256: out_dir / "blobs" / unit.sha256 for unit in manifest.units}


def _even_cuts(unit_count: int, segment_count: int) -> list[int]:
    """Cuts (after unit b) that split unit_count units into segment_count contiguous segments."""
    return [round(unit_count * k / segment_count) - 1 for k in range(1, segment_count)]


def _run_pipeline(segments: list[Segment], inputs: dict[str, torch.Tensor], task: str | None = None) -> dict[str, torch.Tensor]:
    tensors = dict(inputs)
    for segment in segments:
        tensors = segment.run(tensors, task)
    return tensors


def _segments(manifest: Manifest, blobs: dict[str, Path], cuts: list[int]) -> list[Segment]:
    bounds = [-1, *cuts, len(manifest.units) - 1]
    return [Segment(manifest, bounds[i] + 1, bounds[i + 1], blobs) for i in range(len(bounds) - 1)]


class Exported:
    def __init__(self, spec: ModelSpec, out_dir: Path) -> None:
        self.spec = spec
        self.dir = out_dir
        self.manifest = export_model(spec, out_dir)
        self.blobs = _blob_paths(out_dir, self.manifest)
        # One loaded Segment per unit; segments of any length are then built from the same blobs.
        self.single = [Segment(self.manifest, i, i, self.blobs) for i in range(len(self.manifest.units))]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(zoo.build_minilm(), tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def efficientnet(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return Exported(zoo.build_efficientnet(), tmp_path_factory.mktemp("efficientnet"))


def _check_every_segment_count(exported: Exported, inputs: dict[str, torch.Tensor]) -> None:
    output = exported.spec.outputs[0]
    expected = reference_forward(exported.spec, inputs)[output]
    unit_count = len(exported.manifest.units)
    for count in range(1, unit_count + 1):
        cuts = _even_cuts(unit_count, count)
        bounds = [-1, *cuts, unit_count - 1]
        tensors = dict(inputs)
        for first, last in zip(bounds[:-1], bounds[1:]):
            # A segment of several units: run the loaded single-unit segments back to back, and hand
            # over only what the multi-unit segment returns (the names live after `last`).
            for index in range(first + 1, last + 1):
                tensors = {**tensors, **exported.single[index].run(tensors)}
            live = exported.single[last].outputs()
            tensors = {name: tensors[name] for name in live}
        diff = float((tensors[output] - expected).abs().max())
        assert diff <= TOLERANCE, f"{count} segments (cuts {cuts}): max abs diff {diff}"


# --- the packaged models --------------------------------------------------------------------------


def test_minilm_every_segment_count(minilm: Exported) -> None:
    # Batch 3 and a sequence length unlike the export example: both dimensions are dynamic.
    inputs = zoo.minilm_tokenize(["A man is eating food.", "hi", "The quick brown fox jumps over the lazy dog again and again."])
    _check_every_segment_count(minilm, inputs)


def test_minilm_multi_unit_segments(minilm: Exported) -> None:
    inputs = zoo.minilm_tokenize(["one", "two sentences here"])
    expected = reference_forward(minilm.spec, inputs)["sentence_embedding"]
    segments = _segments(minilm.manifest, minilm.blobs, [1, 5])
    assert [s.inputs for s in segments] == [
        ("input_ids", "attention_mask", "token_type_ids"),
        ("attention_mask", "hidden.1"),
        ("attention_mask", "hidden.5"),
    ]
    out = _run_pipeline(segments, inputs)
    assert set(out) == {"sentence_embedding"}
    assert float((out["sentence_embedding"] - expected).abs().max()) <= TOLERANCE


def test_minilm_batch_of_one(minilm: Exported) -> None:
    inputs = zoo.minilm_tokenize(["A single request."])
    out = _run_pipeline(_segments(minilm.manifest, minilm.blobs, [3]), inputs)
    expected = reference_forward(minilm.spec, inputs)["sentence_embedding"]
    assert float((out["sentence_embedding"] - expected).abs().max()) <= TOLERANCE


def test_units_load_from_several_threads_at_once(minilm: Exported) -> None:
    """Segments load on worker threads, several at a time after a re-plan; none may fail."""
    paths = [minilm.blobs[unit.sha256] for unit in minilm.manifest.units] * 3
    with ThreadPoolExecutor(max_workers=4) as pool:
        units = list(pool.map(load_unit, paths))
    assert [unit.name for unit in units] == [unit.name for unit in minilm.manifest.units] * 3


def test_minilm_manifest_shapes(minilm: Exported) -> None:
    manifest = load_manifest(minilm.dir / "manifest.json")
    assert manifest == minilm.manifest
    layer = manifest.units[1]
    assert layer.input_specs["hidden.0"].shape == (-1, -1, 384)
    assert layer.output_specs["hidden.1"].dtype == "float32"
    assert manifest.input_specs["input_ids"].shape == (-1, -1)
    for unit in manifest.units:
        path = minilm.blobs[unit.sha256]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == unit.sha256
        assert path.stat().st_size == unit.blob_bytes


def test_efficientnet_every_segment_count(efficientnet: Exported) -> None:
    inputs = {"image": torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(5))}
    _check_every_segment_count(efficientnet, inputs)


def test_minilm_manifest_links_input_lengths(minilm: Exported) -> None:
    # attention_mask meets input_ids' length only in the encoder layers, through the embeddings'
    # output, so the link comes from following symbols across units.
    assert minilm.manifest.equal_dims == (
        (("input_ids", 0), ("attention_mask", 0), ("token_type_ids", 0)),
        (("input_ids", 1), ("attention_mask", 1), ("token_type_ids", 1)),
    )
    good = zoo.minilm_tokenize(["a longer sentence here", "b"])
    check_inputs(minilm.manifest, good)
    short_mask = {**good, "attention_mask": good["attention_mask"][:, :-1]}
    with pytest.raises(InputError, match=r"input 'attention_mask' dimension 1 is 5, but input 'input_ids' dimension 1 is 6"):
        check_inputs(minilm.manifest, short_mask)


def test_manifest_equal_dims_checked_on_load(minilm: Exported) -> None:
    obj = json.loads(minilm.manifest.to_json())
    assert Manifest.from_json(json.dumps(obj)).equal_dims == minilm.manifest.equal_dims
    # A manifest written before equal_dims existed loads with no groups.
    del obj["equal_dims"]
    assert Manifest.from_json(json.dumps(obj)).equal_dims == ()
    for bad in ([[["input_ids", 1], ["no_such_input", 1]]], [[["input_ids", 2], ["attention_mask", 2]]],
                [[["input_ids", 1]]], {"input_ids": 1}):
        obj["equal_dims"] = bad
        with pytest.raises(ArtifactError, match=r"manifest.equal_dims"):
            Manifest.from_json(json.dumps(obj))


def test_efficientnet_manifest_batch_dynamic(efficientnet: Exported) -> None:
    specs = [spec for unit in efficientnet.manifest.units for spec in unit.output_specs.values()]
    assert all(spec.shape[0] == -1 for spec in specs)
    assert efficientnet.manifest.units[-1].output_specs["logits"].shape == (-1, 1000)


# --- toy models -----------------------------------------------------------------------------------


def test_tied_weights_each_unit_has_copy(tmp_path: Path) -> None:
    spec = toymodels.build_tied()
    manifest = export_model(spec, tmp_path)
    blobs = _blob_paths(tmp_path, manifest)
    embed_tensors = load_tensors(blobs[manifest.units[0].sha256].read_bytes())
    project_tensors = load_tensors(blobs[manifest.units[2].sha256].read_bytes())
    assert torch.equal(embed_tensors["state_dict/embedding.weight"], project_tensors["state_dict/embedding.weight"])
    inputs = {"ids": torch.randint(0, toymodels.VOCAB, (4, 9))}
    expected = reference_forward(spec, inputs)["logits"]
    for cuts in ([], [0], [1], [0, 1]):
        out = _run_pipeline(_segments(manifest, blobs, cuts), inputs)
        assert float((out["logits"] - expected).abs().max()) <= TOLERANCE, cuts


def test_tied_weights_stored_once_in_unit(tmp_path: Path) -> None:
    manifest = export_model(toymodels.build_tied(), tmp_path)
    data = (tmp_path / "blobs" / manifest.units[1].sha256).read_bytes()
    stored = [key for key in read_header(data) if key != "__metadata__"]
    # The Linear reachable under two attribute names is stored once.
    assert len(stored) == 2
    assert manifest.units[1].weight_bytes == (toymodels.WIDTH * toymodels.WIDTH + toymodels.WIDTH) * 4
    x = torch.randn(3, 4, toymodels.WIDTH)
    unit = load_unit(data)
    with torch.no_grad():
        expected = toymodels.build_tied().units[1].module(x)
    assert float((unit({"hidden.0": x})["hidden.1"] - expected).abs().max()) <= TOLERANCE


def test_export_is_deterministic(tmp_path: Path) -> None:
    first = export_model(toymodels.build_tied(), tmp_path / "a")
    second = export_model(toymodels.build_tied(), tmp_path / "b")
    assert [u.sha256 for u in first.units] == [u.sha256 for u in second.units]


def test_branch_request_visits_trunk_and_head(tmp_path: Path) -> None:
    spec = toymodels.build_branch()
    manifest = export_model(spec, tmp_path)
    blobs = _blob_paths(tmp_path, manifest)
    trunk = Segment(manifest, 0, 1, blobs)
    heads = {"classify": Segment(manifest, 2, 2, blobs), "embed": Segment(manifest, 3, 4, blobs)}
    inputs = {"x": torch.randn(3, 6), "weight": torch.rand(3, 1)}
    expected = reference_forward(spec, inputs)
    for task, output in (("classify", "class_logits"), ("embed", "embedding")):
        visited = [i for i in route_for_task(manifest, task)]
        shared = trunk.run(inputs, task)
        out = heads[task].run(shared, task)
        assert set(out) == {output}, task
        assert float((out[output] - expected[output]).abs().max()) <= TOLERANCE, task
        assert visited == ([0, 1, 2] if task == "classify" else [0, 1, 3, 4])
    assert set(trunk.run(inputs, "classify")) == {"trunk.1"}
    with pytest.raises(InputError, match="task 'classify' does not visit this segment"):
        heads["embed"].run(trunk.run(inputs, "embed"), "classify")


def test_branch_segment_across_heads_rejected(tmp_path: Path) -> None:
    manifest = export_model(toymodels.build_branch(), tmp_path)
    with pytest.raises(InputError, match="cross from one head into another"):
        Segment(manifest, 2, 3, _blob_paths(tmp_path, manifest))


# --- input order and checks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_use(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelSpec, Manifest, dict[str, Path]]:
    spec = toymodels.build_first_use()
    out_dir = tmp_path_factory.mktemp("first-use")
    manifest = export_model(spec, out_dir)
    return spec, manifest, _blob_paths(out_dir, manifest)


def test_input_order_does_not_matter(first_use: tuple[ModelSpec, Manifest, dict[str, Path]]) -> None:
    spec, manifest, blobs = first_use
    segment = Segment(manifest, 0, 1, blobs)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    expected = reference_forward(spec, {"a": a, "b": b})["out"]
    forward = segment.run({"a": a, "b": b})["out"]
    backward = segment.run({"b": b, "a": a})["out"]
    assert torch.equal(forward, backward)
    assert float((forward - expected).abs().max()) <= TOLERANCE
    # The same tensors in the other positional order give another answer, so the check has teeth.
    assert float((reference_forward(spec, {"a": b, "b": a})["out"] - expected).abs().max()) > 0.1


def test_input_renamed_is_an_error(first_use: tuple[ModelSpec, Manifest, dict[str, Path]]) -> None:
    _, manifest, blobs = first_use
    segment = Segment(manifest, 0, 0, blobs)
    with pytest.raises(InputError, match="missing input 'b'"):
        segment.run({"a": torch.randn(2, 4), "x": torch.randn(2, 4)})
    with pytest.raises(InputError, match="unexpected input 'x'"):
        check_inputs(manifest, {"a": torch.randn(2, 4), "b": torch.randn(2, 4), "x": torch.randn(2, 4)})


def test_check_inputs_names_dtype_and_shape(minilm: Exported) -> None:
    good = zoo.minilm_tokenize(["a", "b"])
    check_inputs(minilm.manifest, good)
    swapped = {**good, "attention_mask": good["attention_mask"].to(torch.float32)}
    with pytest.raises(InputError, match=r"input 'attention_mask' got dtype float32 shape \[2, 3\], expected dtype int64"):
        check_inputs(minilm.manifest, swapped)
    flat = {**good, "input_ids": good["input_ids"].flatten()}
    with pytest.raises(InputError, match=r"input 'input_ids' got shape \[6\], expected \[\*, \*\]"):
        check_inputs(minilm.manifest, flat)
    uneven = {**good, "token_type_ids": torch.zeros(3, 3, dtype=torch.int64)}
    with pytest.raises(InputError, match="'token_type_ids' has batch size 3 in dimension 0, but 'input_ids' has 2"):
        check_inputs(minilm.manifest, uneven)


def test_unit_checks_shape_bounds(minilm: Exported) -> None:
    embeddings, layer = minilm.single[0].units[0], minilm.single[1].units[0]
    # Every MiniLM unit has plain shape rules, so it skips the exported module's pre-hooks.
    assert embeddings.rules is not None and layer.rules is not None
    assert any(rule.high == 512 for rule in embeddings.rules)
    too_long = zoo.minilm_tokenize(["x " * 600], max_length=600)
    with pytest.raises(InputError, match=r"dimension 1 is 600, above the largest size the exported model accepts \(512\)"):
        minilm.single[0].run(too_long)
    hidden = torch.randn(2, 7, 384)
    mask = torch.ones(2, 6, dtype=torch.int64)
    with pytest.raises(InputError, match=r"'attention_mask' dimension 1 is 6, but input 'hidden.0' dimension 1 is 7"):
        minilm.single[1].run({"hidden.0": hidden, "attention_mask": mask})


def test_unit_checks_embedding_indices(minilm: Exported) -> None:
    embeddings = minilm.single[0].units[0]
    assert embeddings.index_limits == {"input_ids": 30522, "token_type_ids": 2}
    inputs = zoo.minilm_tokenize(["hello there"])
    for bad in (30522, -1):
        wrong = {**inputs, "input_ids": inputs["input_ids"].clone()}
        wrong["input_ids"][0, 1] = bad
        with pytest.raises(InputError, match=rf"input 'input_ids' contains the invalid index {bad}; its embedding table accepts 0..30521"):
            minilm.single[0].run(wrong)
    # The largest valid id still runs.
    edge = {**inputs, "input_ids": inputs["input_ids"].clone()}
    edge["input_ids"][0, 1] = 30521
    assert minilm.single[0].run(edge)["hidden.0"].shape[0] == 1


def test_broadcast_mask_equals_model_mask(minilm: Exported) -> None:
    from transformers.masking_utils import create_bidirectional_mask

    layer_unit = minilm.spec.units[1].module
    assert layer_unit.config._attn_implementation == "sdpa"
    inputs = zoo.minilm_tokenize(["a much longer sentence than the other", "short", "mid length one"])
    hidden = minilm.spec.units[0].module(inputs["input_ids"], inputs["token_type_ids"])
    full = create_bidirectional_mask(config=layer_unit.config, inputs_embeds=hidden, attention_mask=inputs["attention_mask"])
    broadcast = inputs["attention_mask"][:, None, None, :].to(torch.bool)
    assert torch.equal(full, broadcast.expand_as(full))
    with torch.no_grad():
        assert torch.equal(layer_unit(hidden, inputs["attention_mask"]), layer_unit.layer(hidden, full))


def test_segment_checks_activation_shape(efficientnet: Exported) -> None:
    wrong = {"features.3": torch.randn(2, 24, 56, 57)}
    with pytest.raises(InputError, match=r"input 'features.3' got shape \[2, 24, 56, 57\], expected \[\*, 24, 56, 56\]"):
        efficientnet.single[4].run(wrong)


# --- artifact safety ------------------------------------------------------------------------------


def _rewrite_program(data: bytes, change: object) -> bytes:
    """Return a blob whose program JSON was changed by `change(program)`, with the same tensors."""
    record = json.loads(read_header(data)["__metadata__"][METADATA_KEY])
    change(record["program"])  # type: ignore[operator]
    return save_tensors(load_tensors(data), metadata={METADATA_KEY: json.dumps(record)})


def _tied_blob(tmp_path: Path) -> bytes:
    manifest = export_model(toymodels.build_tied(), tmp_path)
    return (tmp_path / "blobs" / manifest.units[1].sha256).read_bytes()


def test_load_unit_rejects_wrong_hash(tmp_path: Path) -> None:
    data = _tied_blob(tmp_path)
    with pytest.raises(ArtifactError, match="expected " + "0" * 64):
        load_unit(data, expected_sha256="0" * 64)


def test_load_unit_rejects_foreign_operator(tmp_path: Path) -> None:
    def change(program: dict) -> None:
        program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.load"

    with pytest.raises(ArtifactError, match="operator 'torch.load' is not an aten"):
        load_unit(_rewrite_program(_tied_blob(tmp_path), change))


def test_load_unit_rejects_code_in_shape_expression(tmp_path: Path) -> None:
    def change(program: dict) -> None:
        program["range_constraints"] = {}
        node = program["graph_module"]["graph"]["nodes"][0]
        node["outputs"] = [{"as_sym_int": {"as_name": "x"}}]
        program["graph_module"]["graph"]["sym_int_values"] = {
            "x": {"as_expr": {"expr_str": "Add(breakpoint(), Integer(1))", "hint": None}}
        }

    with pytest.raises(ArtifactError, match="'breakpoint', which is not on the allowlist"):
        load_unit(_rewrite_program(_tied_blob(tmp_path), change))


def test_load_unit_rejects_guards_code(tmp_path: Path) -> None:
    def change(program: dict) -> None:
        program["guards_code"] = ["__import__('os').system('true') or True"]

    with pytest.raises(ArtifactError, match="guards_code"):
        load_unit(_rewrite_program(_tied_blob(tmp_path), change))


def test_check_program_rejects_odd_names() -> None:
    with pytest.raises(ArtifactError, match="not a Python identifier"):
        check_program({"graph_module": {"graph": {"inputs": [{"as_tensor": {"name": "x; import os"}}]}}})
    with pytest.raises(ArtifactError, match="not a dotted identifier"):
        check_program({"graph_module": {"signature": {"input_specs": [{"parameter": {"parameter_name": "__class__.x"}}]}}})


def test_load_unit_rejects_truncated_blob(tmp_path: Path) -> None:
    data = _tied_blob(tmp_path)
    with pytest.raises(ArtifactError, match="header length"):
        load_unit(data[:1] + b"\xff" * 7 + data[8:])


def test_manifest_rejects_bad_sha(minilm: Exported) -> None:
    obj = json.loads(minilm.manifest.to_json())
    obj["units"][2]["sha256"] = "../../etc/passwd"
    with pytest.raises(ArtifactError, match=r"manifest.units\[2\].sha256"):
        Manifest.from_json(json.dumps(obj))
