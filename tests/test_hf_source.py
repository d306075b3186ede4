"""The hf:/abs/dir deploy source: transformers directories cut into units.

Every model here is a tiny random-weight model built in the test from a transformers config
class and written with save_pretrained (safetensors). Exported units, run as segments, must
match the transformers model run as one call.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator import hf
from coordinator.export import Manifest, Segment, export_model
from coordinator.export_job import build_spec, choose_strategy, infer_block_prefix
from coordinator.micromodel import InputError, ModelSpec, SpecError, reference_forward

TOLERANCE = 1e-5
VOCAB = 500
HIDDEN = 64
GPT2_POSITIONS = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _tiny_model(family: str) -> torch.nn.Module:
    """Build a random-weight model of ``family``; the seed makes its weights repeatable."""
    import transformers as tf

    torch.manual_seed(0)
    decoder = dict(num_hidden_layers=3, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=VOCAB)
    encoder = dict(num_hidden_layers=2, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
                   vocab_size=VOCAB)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=3, n_embd=HIDDEN, n_head=4, vocab_size=VOCAB,
                                                n_positions=GPT2_POSITIONS))
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, tie_word_embeddings=True))
    if family == "qwen2":
        # Layers 1 and 2 use a 4-token sliding window, so masks differ between layers.
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder, use_sliding_window=True, sliding_window=4,
                                                  max_window_layers=1))
    if family == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**decoder, sliding_window=4))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(**encoder))
    if family == "roberta":
        return tf.RobertaModel(tf.RobertaConfig(**encoder))
    raise AssertionError(f"no tiny model for {family}")


FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta")
BLOCK_PREFIXES = {"gpt2": "h.", "llama": "layers.", "qwen2": "layers.", "mistral": "layers.",
                  "bert": "encoder.layer.", "roberta": "encoder.layer."}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        _tiny_model(family).save_pretrained(path)
        dirs[family] = path
    return dirs


class Exported:
    def __init__(self, family: str, spec: ModelSpec, out_dir: Path) -> None:
        self.family = family
        self.spec = spec
        self.dir = out_dir
        self.manifest: Manifest = export_model(spec, out_dir)
        self.blobs = {unit.sha256: out_dir / "blobs" / unit.sha256 for unit in self.manifest.units}
        self.single = [Segment(self.manifest, i, i, self.blobs) for i in range(len(self.manifest.units))]


@pytest.fixture(scope="module")
def exports(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """Exported models by family, filled on first use so each family is exported once."""

    class Cache(dict):
        def __missing__(self, family: str) -> Exported:
            spec = hf.build_hf_spec(model_dirs[family])
            self[family] = Exported(family, spec, tmp_path_factory.mktemp(f"{family}-export"))
            return self[family]

    return Cache()


@pytest.fixture(params=FAMILIES)
def exported(request: pytest.FixtureRequest, exports: dict[str, Exported]) -> Exported:
    return exports[request.param]


def _inputs(spec: ModelSpec, batch: int, length: int) -> dict[str, torch.Tensor]:
    """Random token ids; row 0 is padded on the left, the last row on the right (batch > 1)."""
    generator = torch.Generator().manual_seed(batch * 100 + length)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[-1, length - 2 :] = 0
    if batch > 1:
        mask[0, :2] = 0
    inputs = {"input_ids": torch.randint(0, VOCAB, (batch, length), generator=generator), "attention_mask": mask}
    if "token_type_ids" in spec.input_names:
        inputs["token_type_ids"] = torch.zeros(batch, length, dtype=torch.int64)
    return inputs


def _even_cuts(unit_count: int, segment_count: int) -> list[int]:
    return [round(unit_count * k / segment_count) - 1 for k in range(1, segment_count)]


def _run_cut(exported: Exported, inputs: dict[str, torch.Tensor], cuts: list[int]) -> dict[str, torch.Tensor]:
    """Run the exported units with the given cuts, handing over only the names live at each cut."""
    unit_count = len(exported.manifest.units)
    bounds = [-1, *cuts, unit_count - 1]
    tensors = dict(inputs)
    for first, last in zip(bounds[:-1], bounds[1:]):
        for index in range(first + 1, last + 1):
            tensors = {**tensors, **exported.single[index].run(tensors)}
        tensors = {name: tensors[name] for name in exported.single[last].outputs()}
    return tensors


# --- exported units against the whole model --------------------------------------------------------


@pytest.mark.parametrize("batch,length", [(1, 5), (3, 11)])
def test_every_segment_count_matches_reference(exported: Exported, batch: int, length: int) -> None:
    inputs = _inputs(exported.spec, batch, length)
    output = exported.spec.outputs[0]
    expected = reference_forward(exported.spec, inputs)[output]
    assert not torch.isnan(expected).any()
    unit_count = len(exported.manifest.units)
    for count in range(1, unit_count + 1):
        cuts = _even_cuts(unit_count, count)
        got = _run_cut(exported, inputs, cuts)
        assert set(got) == {output}, f"{count} segments: returned {sorted(got)}"
        assert got[output].shape == expected.shape
        diff = float((got[output] - expected).abs().max())
        assert diff <= TOLERANCE, f"{count} segments (cuts {cuts}): max abs diff {diff}"


def test_only_hidden_state_and_mask_cross_cuts(exported: Exported) -> None:
    manifest = exported.manifest
    prefix = BLOCK_PREFIXES[exported.family]
    layers = [i for i, unit in enumerate(manifest.units) if unit.name.startswith(prefix)]
    # Every cut from the embeddings up to the last layer but one.
    for index in [layers[0] - 1, *layers[:-1]]:
        hidden = manifest.units[index].outputs[0]
        assert set(exported.single[index].outputs()) == {hidden, "attention_mask"}, manifest.units[index].name
        assert manifest.tensor_spec(hidden).shape == (-1, -1, HIDDEN)
        assert manifest.tensor_spec("attention_mask").shape == (-1, -1)


def test_batch_and_sequence_stay_dynamic(exported: Exported) -> None:
    manifest = exported.manifest
    for unit in manifest.units:
        for name, spec in {**unit.input_specs, **unit.output_specs}.items():
            assert spec.shape[0] == -1, f"unit {unit.name} tensor {name}: batch fixed in {spec.shape}"
            if len(spec.shape) == 3 or name in ("input_ids", "attention_mask", "token_type_ids"):
                assert spec.shape[1] == -1, f"unit {unit.name} tensor {name}: sequence fixed in {spec.shape}"


def test_layer_unit_names_give_block_prefix(exported: Exported) -> None:
    names = [unit.name for unit in exported.manifest.units]
    prefix = BLOCK_PREFIXES[exported.family]
    assert infer_block_prefix(names) == prefix
    strategy = choose_strategy(exported.spec, "block", 2, None)
    first_layer = names.index(prefix + "0")
    assert strategy.kind == "block"
    assert strategy.allowed_cuts[0] == first_layer - 1
    assert first_layer + 1 in strategy.allowed_cuts


# --- family details -----------------------------------------------------------------------------


def test_tied_embeddings_copied_into_both_units(model_dirs: dict[str, Path], exports: dict[str, Exported]) -> None:
    saved = load_file(model_dirs["llama"] / "model.safetensors")
    # save_pretrained writes a tied weight once, so the LM head must come from the embeddings.
    assert "lm_head.weight" not in saved
    embedding = saved["model.embed_tokens.weight"]
    llama = exports["llama"]
    by_name = {unit.name: unit for unit in llama.manifest.units}
    for unit_name in ("embed_tokens", "lm_head"):
        tensors = load_file(llama.blobs[by_name[unit_name].sha256])
        copies = [t for t in tensors.values() if t.shape == embedding.shape and torch.equal(t, embedding)]
        assert len(copies) == 1, f"unit {unit_name} holds {len(copies)} copies of the embedding matrix"


def test_qwen2_layers_pick_their_mask(model_dirs: dict[str, Path]) -> None:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    spec = hf.build_hf_spec(model_dirs["qwen2"])
    layers = [unit.module for unit in spec.units if unit.name.startswith("layers.")]
    assert [layer.make_mask for layer in layers] == [
        create_causal_mask, create_sliding_window_causal_mask, create_sliding_window_causal_mask]


def test_mistral_layers_use_sliding_window(model_dirs: dict[str, Path]) -> None:
    from transformers.masking_utils import create_sliding_window_causal_mask

    spec = hf.build_hf_spec(model_dirs["mistral"])
    layers = [unit.module for unit in spec.units if unit.name.startswith("layers.")]
    assert len(layers) == 3
    assert all(layer.make_mask is create_sliding_window_causal_mask for layer in layers)


def test_encoder_pooling_none_returns_hidden_state(model_dirs: dict[str, Path]) -> None:
    spec = hf.build_hf_spec(model_dirs["bert"], pooling="none")
    assert spec.outputs == ("last_hidden_state",)
    assert spec.units[-1].name == "encoder.layer.1"
    inputs = _inputs(spec, 2, 6)
    with torch.inference_mode():
        got = spec.units[0].module(inputs["input_ids"], inputs["token_type_ids"])
        for unit in spec.units[1:]:
            got = unit.module(got, inputs["attention_mask"])
    expected = reference_forward(spec, inputs)["last_hidden_state"]
    assert got.shape == (2, 6, HIDDEN)
    assert float((got - expected).abs().max()) <= TOLERANCE


def _max_length(family: str) -> int:
    if family == "gpt2":
        return GPT2_POSITIONS
    config = _tiny_model(family).config
    if family == "roberta":
        # RoBERTa numbers positions from its padding index + 1.
        return config.max_position_embeddings - config.pad_token_id - 1
    return config.max_position_embeddings


def _constant_inputs(spec: ModelSpec, length: int) -> dict[str, torch.Tensor]:
    inputs = {name: torch.full((2, length), 5, dtype=torch.int64) for name in spec.input_names}
    if "token_type_ids" in inputs:
        inputs["token_type_ids"].zero_()
    return inputs


@pytest.mark.parametrize("family", ["gpt2", "bert", "roberta"])
def test_too_long_sequence_rejected(exports: dict[str, Exported], family: str) -> None:
    exported = exports[family]
    max_length = _max_length(family)
    fits = _constant_inputs(exported.spec, max_length)
    too_long = _constant_inputs(exported.spec, max_length + 1)
    # The whole model sets the limit: it runs at max_length and fails one token later.
    reference_forward(exported.spec, fits)
    with pytest.raises((IndexError, RuntimeError)):
        reference_forward(exported.spec, too_long)

    embeddings = exported.single[0]
    assert embeddings.run(fits)["hidden.0"].shape == (2, max_length, HIDDEN)
    with pytest.raises((InputError, RuntimeError), match=rf"\b{max_length}\b"):
        embeddings.run(too_long)


def test_build_spec_hf_source_tokenizer(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    bert_dir = tmp_path / "bert"
    _tiny_model("bert").save_pretrained(bert_dir)
    Tokenizer(WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]")).save(str(bert_dir / "tokenizer.json"))
    spec, tokenizer = build_spec(f"hf:{bert_dir}")
    assert spec.outputs == ("sentence_embedding",)
    assert tokenizer == bert_dir / "tokenizer.json"

    # A decoder reads no token_type_ids, which the agent's text route always produces.
    gpt2_dir = tmp_path / "gpt2"
    _tiny_model("gpt2").save_pretrained(gpt2_dir)
    (gpt2_dir / "tokenizer.json").write_bytes((bert_dir / "tokenizer.json").read_bytes())
    spec, tokenizer = build_spec(f"hf:{gpt2_dir}")
    assert spec.outputs == ("logits",)
    assert tokenizer is None


# --- invalid directories ------------------------------------------------------------------------


def test_unsupported_model_type_lists_supported(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(num_layers=1, d_model=16, vocab_size=VOCAB).save_pretrained(tmp_path)
    with pytest.raises(SpecError, match="model_type 't5'") as caught:
        hf.build_hf_spec(tmp_path)
    for family in FAMILIES:
        assert family in str(caught.value)


def test_missing_directory_rejected(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(SpecError, match="does not exist") as caught:
        build_spec(f"hf:{missing}")
    assert str(missing) in str(caught.value)


def test_relative_path_rejected() -> None:
    with pytest.raises(SpecError, match="absolute path"):
        hf.build_hf_spec("models/gpt2")


def test_missing_config_rejected(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no config.json"):
        hf.build_hf_spec(tmp_path)


def test_pickle_only_weights_rejected(tmp_path: Path) -> None:
    model = _tiny_model("gpt2")
    model.config.save_pretrained(tmp_path)
    # Written only to be refused: the loader must not open it.
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(SpecError, match="pytorch_model.bin") as caught:
        hf.build_hf_spec(tmp_path)
    assert "convert" in str(caught.value)
    assert "safetensors" in str(caught.value)


def test_missing_lm_head_weights_rejected(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    # A base model saved without its LM head, while the config sets an untied one. Loading it as a
    # causal LM would fill lm_head with random values.
    config = LlamaConfig(num_hidden_layers=1, hidden_size=HIDDEN, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=False)
    LlamaModel(config).save_pretrained(tmp_path)
    with pytest.raises(SpecError, match="lm_head.weight"):
        hf.build_hf_spec(tmp_path)


def test_invalid_pooling_rejected(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(SpecError, match="pooling 'max'"):
        hf.build_hf_spec(model_dirs["bert"], pooling="max")


# --- a real cluster -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_deploys_hf_llama(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    from nodeagent.localcluster import LocalCluster

    spec = hf.build_hf_spec(model_dirs["llama"])
    inputs = _inputs(spec, 2, 7)
    expected = reference_forward(spec, inputs)["logits"]

    cluster = LocalCluster(tmp_path / "cluster", 2, mdns=False, static_peers=True)
    cluster.create()
    try:
        cluster.start()
        cluster.wait_formed(90, expect=["agent-0", "agent-1"])
        info = cluster.deploy("tiny-llama", "v1", f"hf:{model_dirs['llama']}", timeout_s=120)
        segments = info["versions"][0]["segments"]
        assert segments[0]["first_unit"] == 0
        assert segments[-1]["last_unit"] == len(spec.units) - 1

        body = {"inputs": {name: {"dtype": "int64", "shape": list(t.shape), "data": t.tolist()}
                           for name, t in inputs.items()},
                "deadline_ms": 20000}
        status, reply = cluster.request(1, "POST", "/v1/models/tiny-llama/infer", body)
        assert status == 200, reply
        assert len(reply["route"]) == len(segments), reply["route"]
        logits = reply["outputs"]["logits"]
        assert logits["shape"] == list(expected.shape)
        got = torch.tensor(logits["data"], dtype=torch.float32)
        diff = float((got - expected).abs().max())
        assert diff <= TOLERANCE, f"max abs diff {diff} over segments {segments}"
    finally:
        cluster.stop()
