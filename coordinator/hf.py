"""Local Hugging Face transformers directories as models of units (deploy source ``hf:/abs/dir``).

Problem
-------
A user has a model saved with ``save_pretrained``: a directory with ``config.json`` and
safetensors weights. shardmesh needs it as a chain of units (see ``coordinator.micromodel``) that
export one by one and can be cut between any two of them. The whole model's ``forward`` cannot
be split as it is, because it computes shared values once at the top and hands them to every
layer: the attention mask expanded to [batch, 1, seq, seq], and in Llama-style decoders the
rotary position embeddings (cos and sin, [batch, seq, head_dim] each). Passing those across
every cut would multiply the bytes on the wire, and the mask grows with the square of the
sequence length.

Rule chosen
-----------
Each layer unit rebuilds what it needs from small tensors. A layer unit reads the hidden state
and the raw 0/1 ``attention_mask`` ([batch, seq] int64). It then derives the position ids
(``0 .. seq - 1``, as the whole model does without a cache), the rotary embeddings from its own
reference to the model's rotary module, and the attention mask. Decoder layers build the mask
with the transformers mask function the whole model calls. Encoder layers reuse
``coordinator.zoo.BertLayerUnit``, which builds a mask with equal rows. The tests check that the
outputs match the whole model's, and only the hidden state and the raw mask cross a cut.

One adapter per family, chosen by ``config.model_type``:

* ``bert``, ``roberta``: units ``embeddings``, ``encoder.layer.0`` .. ``encoder.layer.N-1``,
  then ``pooling`` when ``pooling="mean"``. Inputs are ``input_ids``, ``attention_mask`` and
  ``token_type_ids`` (RoBERTa accepts all-zero type ids). The output is ``sentence_embedding``,
  the mean of the token states the mask marks, without normalization. With ``pooling="none"`` the
  last layer writes ``last_hidden_state`` instead. The deploy source uses ``mean``. A
  ``factory:`` source can call :func:`build_hf_spec` with ``pooling="none"``.
* ``gpt2``: units ``embeddings`` (token and position embeddings), ``h.0`` .. ``h.N-1``,
  ``lm_head`` (final LayerNorm and LM head). Inputs ``input_ids`` and ``attention_mask``, output
  ``logits`` [batch, seq, vocab].
* ``llama``, ``qwen2``, ``mistral``: units ``embed_tokens``, ``layers.0`` .. ``layers.N-1``,
  ``lm_head`` (final RMSNorm and LM head), with the same inputs and output as GPT-2. Each layer
  picks its mask function the way the family's model does: per ``config.layer_types`` entry
  (Qwen2), or sliding-window when ``config.sliding_window`` is set (Mistral), otherwise causal.

The layer unit names end in the layer number, so ``segmentation: block`` finds the blocks by
name prefix. There is no KV cache and no generation: one forward pass returns logits for every
position. Batch and sequence length are dynamic in every unit. With tied input and output
embeddings (``tie_word_embeddings``) the embedding unit and the head unit refer to the same
weight here, and export stores it in both unit blobs, so each segment has its own copy.

Sequence length is limited where the model has learned positions: BERT by
``max_position_embeddings``, RoBERTa by that minus ``pad_token_id + 1`` (it numbers positions
after the padding index) and GPT-2 by ``n_positions``. The embeddings unit checks the limit with
``torch._check``, which export turns into a range constraint that the exported unit checks on
every call. Without the check, a long input fails as an index error. Rotary models have no
learned positions and no such check.

Loading: the directory is read with ``local_files_only=True``, ``use_safetensors=True`` and
``trust_remote_code=False``, with the hub switched off. A directory with only
``pytorch_model.bin`` is rejected before transformers sees it, because that file is a pickle.
Weights load as float32 whatever dtype the checkpoint stores, so the units and the reference
compute in one dtype. A bfloat16 or float16 checkpoint therefore needs twice its file size in
memory. The adapters call transformers internals (``masking_utils``, layer signatures) as of
transformers 5.25.

``ModelSpec.reference`` runs the transformers model as one call (``model(input_ids=...,
attention_mask=..., use_cache=False)``), which the tests compare segmented runs against.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.micromodel import ModelSpec, SpecError, TensorDict, TensorSpec, Unit
from coordinator.zoo import BertEmbeddingsUnit, BertLayerUnit

logger = logging.getLogger(__name__)

ENCODER_TYPES = ("bert", "roberta")
GPT2_TYPES = ("gpt2",)
DECODER_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = ENCODER_TYPES + GPT2_TYPES + DECODER_TYPES
POOLING_MODES = ("mean", "none")

# Example inputs for export: two rows so the batch dimension stays dynamic, eight tokens so the
# sequence dimension does, and padding in the second row so the mask path is traced with zeros.
EXAMPLE_BATCH = 2
EXAMPLE_LENGTH = 8
EXAMPLE_PADDING = 3


# --- the directory --------------------------------------------------------------------------------


def check_model_dir(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Check a model directory and return it with its parsed ``config.json``.

    Raises SpecError naming the path when it is relative, missing, has no usable config, or has
    no safetensors weights.
    """
    model_dir = Path(path)
    if not model_dir.is_absolute():
        raise SpecError(
            f"Hugging Face model directory {str(path)!r} is a relative path; use an absolute path "
            "(hf:/abs/path/to/dir) because the export job runs in another working directory"
        )
    if not model_dir.is_dir():
        raise SpecError(
            f"Hugging Face model directory {str(model_dir)!r} does not exist or is not a directory on the "
            "coordinator's machine; copy the model there and deploy with its absolute path"
        )
    config_path = model_dir / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(
            f"{str(model_dir)!r} has no config.json; save the model with save_pretrained, which writes it"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpecError(f"cannot read {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise SpecError(f"{str(config_path)!r} does not contain a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise SpecError(
            f"model_type {model_type!r} in {str(config_path)!r} is not supported; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(model_dir.glob("*.safetensors")):
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        if pickled:
            raise SpecError(
                f"{str(model_dir)!r} has weights only in {', '.join(pickled)}, which are pickle files that "
                "shardmesh does not load; convert them to safetensors on a machine you trust (for example "
                "load the model and call save_pretrained, which writes model.safetensors)"
            )
        raise SpecError(f"{str(model_dir)!r} has no *.safetensors weight files; save the model with save_pretrained")
    return model_dir, config


def load_pretrained(model_dir: Path, model_class: Any, **kwargs: Any) -> nn.Module:
    """Load ``model_class`` from a local directory: safetensors only, no hub, no remote code, float32.

    Raises SpecError when the directory lacks weights the model needs, because transformers
    would otherwise fill them with random values.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers.utils import logging as transformers_logging

    # The weight-loading progress bar would land in the agent's log as terminal escape codes.
    transformers_logging.disable_progress_bar()
    model, info = model_class.from_pretrained(
        str(model_dir),
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
        dtype=torch.float32,
        attn_implementation="sdpa",
        output_loading_info=True,
        **kwargs,
    )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SpecError(
            f"{str(model_dir)!r} lacks weights the model needs ({listed}); save the whole model "
            f"({type(model).__name__}) with save_pretrained"
        )
    model.eval()
    return model


# --- shared pieces --------------------------------------------------------------------------------


def position_ids(hidden: torch.Tensor) -> torch.Tensor:
    """Return ``[[0, 1, .., seq - 1]]``: the positions the whole model uses without a cache."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return the mean of the token states where ``attention_mask`` is 1 ([batch, hidden])."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    counts = torch.clamp(mask.sum(dim=1), min=1e-9)
    return (hidden * mask).sum(dim=1) / counts


class MeanPoolUnit(nn.Module):
    """Masked mean of the token states (no weights)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden, attention_mask)


class CausalLmHeadUnit(nn.Module):
    """Final norm and LM head: logits for every position."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def check_length(input_ids: torch.Tensor, max_length: int) -> None:
    """Reject a sequence longer than the model's learned positions (see the module docstring)."""
    torch._check(
        input_ids.shape[1] <= max_length,
        lambda: f"sequence length {input_ids.shape[1]} exceeds this model's maximum of {max_length} tokens",
    )


def _token_specs(names: tuple[str, ...]) -> dict[str, TensorSpec]:
    return {name: TensorSpec("int64", (-1, -1)) for name in names}


def example_inputs(vocab_size: int, *, with_token_types: bool) -> TensorDict:
    """Return seeded int64 example inputs: random token ids and a mask with right padding."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (EXAMPLE_BATCH, EXAMPLE_LENGTH), generator=generator)
    mask = torch.ones(EXAMPLE_BATCH, EXAMPLE_LENGTH, dtype=torch.int64)
    mask[1, EXAMPLE_LENGTH - EXAMPLE_PADDING :] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if with_token_types:
        inputs["token_type_ids"] = torch.zeros(EXAMPLE_BATCH, EXAMPLE_LENGTH, dtype=torch.int64)
    return inputs


# --- BERT and RoBERTa encoders --------------------------------------------------------------------


class EncoderEmbeddingsUnit(BertEmbeddingsUnit):
    """BERT or RoBERTa embeddings with the sequence length check."""

    def __init__(self, embeddings: nn.Module, max_length: int) -> None:
        super().__init__(embeddings)
        self.max_length = max_length

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        check_length(input_ids, self.max_length)
        return super().forward(input_ids, token_type_ids)


def encoder_max_length(config: Any) -> int:
    """Return the longest sequence an encoder's position embeddings cover."""
    if config.model_type == "roberta":
        return int(config.max_position_embeddings) - int(config.pad_token_id) - 1
    return int(config.max_position_embeddings)


def build_encoder(model_dir: Path, name: str, pooling: str) -> ModelSpec:
    """Describe a BERT-style encoder: embeddings, one unit per layer, optional mean pooling."""
    from transformers import AutoModel

    # BertModel and RobertaModel take add_pooling_layer. Without it, a checkpoint saved from a
    # masked-LM model (which has no pooler) would report the pooler weights as missing.
    model = load_pretrained(model_dir, AutoModel, add_pooling_layer=False)
    layers = model.encoder.layer
    count = len(layers)
    last_name = "last_hidden_state" if pooling == "none" else f"hidden.{count}"
    embeddings = EncoderEmbeddingsUnit(model.embeddings, encoder_max_length(model.config))
    units = [Unit("embeddings", embeddings, ("input_ids", "token_type_ids"), ("hidden.0",))]
    for i, layer in enumerate(layers):
        output = last_name if i == count - 1 else f"hidden.{i + 1}"
        units.append(Unit(f"encoder.layer.{i}", BertLayerUnit(layer, model.config), (f"hidden.{i}", "attention_mask"), (output,)))
    if pooling == "mean":
        units.append(Unit("pooling", MeanPoolUnit(), (last_name, "attention_mask"), ("sentence_embedding",)))
    output_name = "sentence_embedding" if pooling == "mean" else "last_hidden_state"

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            token_type_ids=inputs["token_type_ids"],
        )
        if pooling == "none":
            return {output_name: out.last_hidden_state}
        return {output_name: masked_mean(out.last_hidden_state, inputs["attention_mask"])}

    names = ("input_ids", "attention_mask", "token_type_ids")
    return ModelSpec(
        name=name,
        units=tuple(units),
        example_inputs=example_inputs(model.config.vocab_size, with_token_types=True),
        outputs=(output_name,),
        input_specs=_token_specs(names),
        reference=reference,
    )


# --- GPT-2 ----------------------------------------------------------------------------------------


class Gpt2EmbeddingsUnit(nn.Module):
    """Token plus position embeddings, as GPT2Model computes them without a cache, with the length check."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.wte = transformer.wte
        self.wpe = transformer.wpe
        self.drop = transformer.drop
        self.max_length = int(transformer.wpe.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        check_length(input_ids, self.max_length)
        embeds = self.wte(input_ids)
        return self.drop(embeds + self.wpe(position_ids(embeds)))


class Gpt2BlockUnit(nn.Module):
    """One GPT-2 block that builds its causal mask from the raw 0/1 mask."""

    def __init__(self, block: nn.Module, config: Any) -> None:
        super().__init__()
        self.block = block
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        positions = position_ids(hidden)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=positions
        )
        return self.block(hidden, attention_mask=mask, position_ids=positions)


def build_gpt2(model_dir: Path, name: str) -> ModelSpec:
    """Describe GPT-2: embeddings, one unit per block, final LayerNorm with the LM head."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(model_dir, AutoModelForCausalLM)
    transformer = model.transformer
    blocks = transformer.h
    units = [Unit("embeddings", Gpt2EmbeddingsUnit(transformer), ("input_ids",), ("hidden.0",))]
    for i, block in enumerate(blocks):
        units.append(Unit(f"h.{i}", Gpt2BlockUnit(block, model.config), (f"hidden.{i}", "attention_mask"), (f"hidden.{i + 1}",)))
    units.append(Unit("lm_head", CausalLmHeadUnit(transformer.ln_f, model.lm_head), (f"hidden.{len(blocks)}",), ("logits",)))
    return _causal_lm_spec(model, name, units)


# --- Llama-style decoders -------------------------------------------------------------------------


def mask_kind(config: Any, layer_index: int) -> str:
    """Return ``full_attention`` or ``sliding_attention`` for a layer, as the family's model decides."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_index]
    if getattr(config, "sliding_window", None) is not None:
        return "sliding_attention"
    return "full_attention"


def mask_function(kind: str) -> Callable[..., Any]:
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    functions = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    try:
        return functions[kind]
    except KeyError:
        raise SpecError(f"layer type {kind!r} is not supported; supported layer types: {sorted(functions)}") from None


class DecoderLayerUnit(nn.Module):
    """One decoder layer that computes its rotary embeddings and attention mask itself."""

    def __init__(self, layer: nn.Module, rotary: nn.Module, config: Any, kind: str) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary
        self.config = config
        self.make_mask = mask_function(kind)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = position_ids(hidden)
        mask = self.make_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=positions
        )
        cos_sin = self.rotary(hidden, positions)
        return self.layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)


class TokenEmbeddingUnit(nn.Module):
    def __init__(self, embedding: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def build_decoder(model_dir: Path, name: str) -> ModelSpec:
    """Describe a Llama-style decoder: embeddings, one unit per layer, final norm with the LM head."""
    from transformers import AutoModelForCausalLM

    model = load_pretrained(model_dir, AutoModelForCausalLM)
    inner = model.model
    layers = inner.layers[: model.config.num_hidden_layers]
    units = [Unit("embed_tokens", TokenEmbeddingUnit(inner.embed_tokens), ("input_ids",), ("hidden.0",))]
    for i, layer in enumerate(layers):
        unit = DecoderLayerUnit(layer, inner.rotary_emb, model.config, mask_kind(model.config, i))
        units.append(Unit(f"layers.{i}", unit, (f"hidden.{i}", "attention_mask"), (f"hidden.{i + 1}",)))
    units.append(Unit("lm_head", CausalLmHeadUnit(inner.norm, model.lm_head), (f"hidden.{len(layers)}",), ("logits",)))
    return _causal_lm_spec(model, name, units)


def _causal_lm_spec(model: nn.Module, name: str, units: list[Unit]) -> ModelSpec:
    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        return {"logits": out.logits}

    return ModelSpec(
        name=name,
        units=tuple(units),
        example_inputs=example_inputs(model.config.vocab_size, with_token_types=False),
        outputs=("logits",),
        input_specs=_token_specs(("input_ids", "attention_mask")),
        reference=reference,
    )


# --- entry points ---------------------------------------------------------------------------------


def build_hf_spec(path: str | Path, *, pooling: str = "mean", name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from a local transformers directory (see the module docstring).

    ``pooling`` applies to encoders only: ``mean`` outputs ``sentence_embedding`` and ``none``
    outputs ``last_hidden_state``. ``name`` defaults to the directory name.
    """
    if pooling not in POOLING_MODES:
        raise SpecError(f"pooling {pooling!r} is invalid; use one of {', '.join(POOLING_MODES)}")
    model_dir, config = check_model_dir(path)
    model_type = config["model_type"]
    name = name or model_dir.name
    logger.info("building model %s from %s directory %s", name, model_type, model_dir)
    if model_type in ENCODER_TYPES:
        spec = build_encoder(model_dir, name, pooling)
    elif model_type in GPT2_TYPES:
        spec = build_gpt2(model_dir, name)
    else:
        spec = build_decoder(model_dir, name)
    logger.info("built model %s with %d units from %s", spec.name, len(spec.units), model_dir)
    return spec


def build_source(path: str) -> tuple[ModelSpec, Path | None]:
    """Build the deploy source ``hf:<path>``: the spec and the tokenizer file to ship, if any.

    The tokenizer ships for encoders only, because the agent's text route produces
    ``input_ids``, ``attention_mask`` and ``token_type_ids`` and a decoder reads no type ids.
    """
    spec = build_hf_spec(path)
    tokenizer = Path(path) / "tokenizer.json"
    if set(spec.input_names) == {"input_ids", "attention_mask", "token_type_ids"} and tokenizer.is_file():
        return spec, tokenizer
    return spec, None
