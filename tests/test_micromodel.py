"""Unit graphs, live names, strategies, the packaged models and per-unit profiling (eager)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import toymodels
from coordinator import zoo
from coordinator.micromodel import (
    InputError,
    ModelSpec,
    SpecError,
    Strategy,
    TensorSpec,
    Unit,
    block_strategy,
    check_strategy,
    layer_strategy,
    live_names,
    merge_profile,
    required_cuts,
    route_for_task,
    run_units,
    reference_forward,
    segment_inputs,
    segments_for_cuts,
    unit_groups,
    weight_bytes,
)
from coordinator.profiling import profile_units, write_profile


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def minilm() -> ModelSpec:
    return zoo.build_minilm()


def _linear_unit(name: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> Unit:
    return Unit(name, nn.Identity(), inputs, outputs)


def _chain(units: tuple[Unit, ...], **examples: torch.Tensor) -> ModelSpec:
    return ModelSpec(name="chain", units=units, example_inputs=examples or {"x": torch.zeros(2, 3)}, outputs=(units[-1].outputs[0],))


# --- validation -------------------------------------------------------------------------------


def test_spec_rejects_second_writer() -> None:
    units = (_linear_unit("a", ("x",), ("h",)), _linear_unit("b", ("h",), ("h",)))
    with pytest.raises(SpecError, match="'h' is written by unit 'a' and again by 'b'"):
        _chain(units)


def test_spec_rejects_unknown_read() -> None:
    units = (_linear_unit("a", ("x",), ("h",)), _linear_unit("b", ("mask",), ("out",)))
    with pytest.raises(SpecError, match="unit 'b' reads 'mask'"):
        _chain(units)


def test_spec_rejects_unused_input() -> None:
    units = (_linear_unit("a", ("x",), ("h",)),)
    with pytest.raises(SpecError, match=r"model inputs \['y'\] are read by no unit"):
        _chain(units, x=torch.zeros(2, 3), y=torch.zeros(2, 3))


def test_spec_rejects_fixed_batch() -> None:
    with pytest.raises(SpecError, match="fixed batch dimension"):
        ModelSpec(
            name="fixed",
            units=(_linear_unit("a", ("x",), ("h",)),),
            example_inputs={"x": torch.zeros(2, 3)},
            outputs=("h",),
            input_specs={"x": TensorSpec("float32", (2, 3))},
        )


def test_spec_rejects_batch_of_one_example() -> None:
    with pytest.raises(SpecError, match="size >= 2"):
        _chain((_linear_unit("a", ("x",), ("h",)),), x=torch.zeros(1, 3))


def test_spec_rejects_writing_an_input() -> None:
    with pytest.raises(SpecError, match="writes 'x', which is a model input"):
        _chain((_linear_unit("a", ("x",), ("x",)),))


def test_spec_rejects_bad_unit_name() -> None:
    with pytest.raises(SpecError, match="invalid unit name"):
        _chain((_linear_unit("a b", ("x",), ("h",)),))


# --- live names ---------------------------------------------------------------------------------


def test_live_names_carry_mask_to_pooling(minilm: ModelSpec) -> None:
    assert live_names(minilm, 0) == ("attention_mask", "hidden.0")
    assert live_names(minilm, 6) == ("attention_mask", "hidden.6")
    assert live_names(minilm, 7) == ("sentence_embedding",)
    assert segment_inputs(minilm, 0) == ("input_ids", "attention_mask", "token_type_ids")
    assert segment_inputs(minilm, 7) == ("attention_mask", "hidden.6")


def test_live_names_keep_early_outputs() -> None:
    units = (_linear_unit("a", ("x",), ("early",)), _linear_unit("b", ("early",), ("late",)), _linear_unit("c", ("late",), ("last",)))
    spec = ModelSpec(name="two-out", units=units, example_inputs={"x": torch.zeros(2, 3)}, outputs=("early", "last"))
    assert live_names(spec, 1) == ("early", "late")
    assert live_names(spec, 2) == ("early", "last")


def test_live_names_out_of_range(minilm: ModelSpec) -> None:
    with pytest.raises(InputError, match="boundary 8 is out of range 0..7"):
        live_names(minilm, 8)


# --- branch models ------------------------------------------------------------------------------


def test_branch_routes_visit_trunk_and_head() -> None:
    spec = toymodels.build_branch()
    assert route_for_task(spec, "classify") == (0, 1, 2)
    assert route_for_task(spec, "embed") == (0, 1, 3, 4)
    with pytest.raises(InputError, match="unknown task 'translate'"):
        route_for_task(spec, "translate")
    with pytest.raises(InputError, match="name a task"):
        route_for_task(spec)


def test_branch_live_names_per_task() -> None:
    spec = toymodels.build_branch()
    assert live_names(spec, 1, "classify") == ("trunk.1",)
    assert live_names(spec, 1, "embed") == ("weight", "trunk.1")
    assert live_names(spec, 1) == ("weight", "trunk.1")
    assert live_names(spec, 2) == ("class_logits",)
    assert segment_inputs(spec, 3) == ("weight", "trunk.1")


def test_branch_run_visits_only_its_head() -> None:
    spec = toymodels.build_branch()
    calls: list[str] = []
    for unit in spec.units:
        unit.module.register_forward_hook(lambda module, args, out, name=unit.name: calls.append(name))
    inputs = {"x": torch.randn(3, 6), "weight": torch.rand(3, 1)}
    out = run_units(spec, inputs, task="classify")
    assert calls == ["trunk.in", "trunk.out", "classify"]
    assert set(out) == {"class_logits"}
    torch.testing.assert_close(out["class_logits"], reference_forward(spec, inputs)["class_logits"], rtol=0, atol=0)


def test_branch_required_cuts() -> None:
    spec = toymodels.build_branch()
    assert required_cuts(spec) == (1, 2)
    assert spec.strategy == Strategy("branch", (0, 1, 2, 3))
    with pytest.raises(SpecError, match=r"misses the required cuts \[2\]"):
        check_strategy(spec, Strategy("branch", (1,)))


def test_branch_rejects_gap_between_heads() -> None:
    units = tuple(_linear_unit(f"u{i}", ("x",), (f"o{i}",)) for i in range(4))
    with pytest.raises(SpecError, match="lie between heads"):
        ModelSpec(name="gap", units=units, example_inputs={"x": torch.zeros(2, 3)}, outputs=("o3",), heads={"a": (1,), "b": (3,)})


# --- strategies ---------------------------------------------------------------------------------


def test_layer_strategy_allows_every_boundary(minilm: ModelSpec) -> None:
    assert layer_strategy(minilm) == Strategy("layer", (0, 1, 2, 3, 4, 5, 6))


def test_block_strategy_every_two_layers(minilm: ModelSpec) -> None:
    strategy = block_strategy(minilm, prefix="encoder.layer.", every=2)
    assert strategy == Strategy("block", (0, 2, 4, 6))
    assert unit_groups(len(minilm.units), strategy.allowed_cuts) == [(0, 0), (1, 2), (3, 4), (5, 6), (7, 7)]


def test_block_strategy_named_units(minilm: ModelSpec) -> None:
    assert block_strategy(minilm, after=("encoder.layer.2",)).allowed_cuts == (3,)
    with pytest.raises(SpecError, match="names no unit"):
        block_strategy(minilm, after=("decoder.0",))
    with pytest.raises(SpecError, match="no unit name starts with"):
        block_strategy(minilm, prefix="blocks.")


def test_merge_profile_sums_groups() -> None:
    layers = [{"name": f"u{i}", "seconds": 0.5 * (i + 1), "weight_bytes": 10 * (i + 1), "output_bytes": 100 + i} for i in range(4)]
    merged = merge_profile(layers, (1,))
    assert merged[0] == {"name": "u0..u1", "seconds": 1.5, "weight_bytes": 30, "output_bytes": 101}
    assert merged[1] == {"name": "u2..u3", "seconds": 3.5, "weight_bytes": 70, "output_bytes": 103}
    assert segments_for_cuts(4, (0, 2)) == [(0, 0), (1, 2), (3, 3)]


# --- packaged models, eager ---------------------------------------------------------------------


def test_minilm_cosine_check_value(minilm: ModelSpec) -> None:
    inputs = zoo.minilm_tokenize(["A man is eating food.", "A man is eating a piece of bread."])
    embedding = run_units(minilm, inputs)["sentence_embedding"]
    assert embedding.shape == (2, 384)
    assert round(float(embedding[0] @ embedding[1]), 4) == 0.7553


def test_minilm_units_match_whole_model(minilm: ModelSpec) -> None:
    inputs = zoo.minilm_tokenize(["short", "a somewhat longer sentence with padding after the short one"])
    assert int(inputs["attention_mask"][0].sum()) < inputs["attention_mask"].shape[1]
    ours = run_units(minilm, inputs)["sentence_embedding"]
    whole = reference_forward(minilm, inputs)["sentence_embedding"]
    assert float((ours - whole).abs().max()) <= 1e-6


def test_minilm_tokenize_matches_transformers() -> None:
    from transformers import AutoTokenizer

    sentences = ["Hello, world!", "Tokenizers split unaffable words."]
    ours = zoo.minilm_tokenize(sentences)
    theirs = AutoTokenizer.from_pretrained(str(zoo.minilm_model_dir()))(sentences, padding=True, return_tensors="pt")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(ours[name], theirs[name]), name


def test_minilm_tokenize_rejects_short_pad() -> None:
    with pytest.raises(ValueError, match="pad_to=3 is shorter"):
        zoo.minilm_tokenize(["a sentence of several tokens"], pad_to=3)


def test_tied_model_units_match_whole_model() -> None:
    spec = toymodels.build_tied()
    inputs = {"ids": torch.randint(0, toymodels.VOCAB, (3, 7))}
    torch.testing.assert_close(run_units(spec, inputs)["logits"], reference_forward(spec, inputs)["logits"], rtol=0, atol=0)
    # The shared Linear is counted once in its unit.
    assert weight_bytes(spec.units[1].module) == (toymodels.WIDTH * toymodels.WIDTH + toymodels.WIDTH) * 4


# --- factories ----------------------------------------------------------------------------------


def test_load_factory_sequential() -> None:
    spec = zoo.load_factory("toymodels:build_sequential")
    assert [unit.name for unit in spec.units] == ["0", "1", "2"]
    x = torch.randn(5, 4)
    out = run_units(spec, {"input": x})
    torch.testing.assert_close(out["2.out"], reference_forward(spec, {"input": x})["2.out"], rtol=0, atol=0)


def test_load_factory_model_spec() -> None:
    spec = zoo.load_factory("toymodels:build_branch")
    assert spec.heads == {"classify": (2,), "embed": (3, 4)}


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("toymodels", "use 'package.module:function'"),
        ("no_such_module_xyz:build", "cannot import module"),
        ("toymodels:missing", "has no attribute 'missing'"),
        ("toymodels:VOCAB", "returned int"),
    ],
)
def test_load_factory_errors(path: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        zoo.load_factory(path)


# --- profiling ----------------------------------------------------------------------------------


def test_profile_units_rows(minilm: ModelSpec, tmp_path: Path) -> None:
    inputs = zoo.minilm_tokenize(["one sentence", "and another, a bit longer"], pad_to=16)
    rows = profile_units(minilm, inputs, cache_dir=tmp_path)
    assert [row["name"] for row in rows] == [unit.name for unit in minilm.units]
    assert all(row["seconds"] > 0 for row in rows)
    assert rows[0]["weight_bytes"] == weight_bytes(minilm.units[0].module)
    assert rows[-1]["weight_bytes"] == 0
    # After a layer: hidden [2, 16, 384] float32 plus the int64 mask [2, 16].
    assert rows[1]["output_bytes"] == 2 * 16 * 384 * 4 + 2 * 16 * 8
    assert rows[-1]["output_bytes"] == 2 * 384 * 4
    write_profile(rows, tmp_path / "PROFILE.json")
    assert json.loads((tmp_path / "PROFILE.json").read_text())["layers"] == rows


def test_profile_units_cache(tmp_path: Path) -> None:
    spec = toymodels.build_tied()
    first = profile_units(spec, cache_dir=tmp_path)
    files = list(tmp_path.glob("profile-*.json"))
    assert len(files) == 1
    assert profile_units(spec, cache_dir=tmp_path) == first
    refreshed = profile_units(spec, cache_dir=tmp_path, refresh=True)
    assert [row["weight_bytes"] for row in refreshed] == [row["weight_bytes"] for row in first]
    with torch.no_grad():
        spec.units[1].module.first.weight.add_(1.0)
    profile_units(spec, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("profile-*.json"))) == 2


def test_profile_units_rejects_few_repeats() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        profile_units(toymodels.build_tied(), repeats=3)


def test_profile_cache_key_accepts_zero_dim_buffers(tmp_path) -> None:
    """BatchNorm keeps a 0-d int64 buffer; the profile cache key must hash it, not raise."""
    import torch
    from torch import nn

    from coordinator.micromodel import sequential_spec
    from coordinator.profiling import profile_units, spec_fingerprint

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    spec = sequential_spec("bn", model, torch.randn(2, 3, 8, 8))
    first = spec_fingerprint(spec)
    assert len(first) == 64
    model[1].num_batches_tracked.fill_(7)
    assert spec_fingerprint(spec) != first
    rows = profile_units(spec, cache_dir=tmp_path)
    assert [row["name"] for row in rows] == [unit.name for unit in spec.units]
    assert list(tmp_path.iterdir()), "the profile was not cached"
