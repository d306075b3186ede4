"""Small models for segmentation tests: tied weights, a trunk with two heads, first-use order."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from coordinator.micromodel import ModelSpec, TensorDict, TensorSpec, Unit

VOCAB = 50
WIDTH = 8


class TiedLM(nn.Module):
    """Embedding and output projection share one weight; ``mix`` calls one Linear twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH)
        self.mix = SharedTwice(nn.Linear(WIDTH, WIDTH))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.mix(self.embedding(ids)), self.embedding.weight)


class SharedTwice(nn.Module):
    """Holds the same Linear under two attribute names, so its weight aliases inside one unit."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.first = linear
        self.second = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


class EmbedUnit(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)


class ProjectUnit(nn.Module):
    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight)


def build_tied() -> ModelSpec:
    """Three units; the first and last read the same embedding weight."""
    torch.manual_seed(1)
    model = TiedLM().eval()
    units = (
        Unit("embed", EmbedUnit(model.embedding), ("ids",), ("hidden.0",)),
        Unit("mix", model.mix, ("hidden.0",), ("hidden.1",)),
        Unit("project", ProjectUnit(model.embedding), ("hidden.1",), ("logits",)),
    )

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        return {"logits": model(inputs["ids"])}

    ids = torch.randint(0, VOCAB, (2, 5))
    return ModelSpec(
        name="tied",
        units=units,
        example_inputs={"ids": ids},
        outputs=("logits",),
        input_specs={"ids": TensorSpec("int64", (-1, -1))},
        reference=reference,
    )


class BranchNet(nn.Module):
    """A trunk of two layers, a classification head, and an embedding head that reads ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk_in = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.trunk_out = nn.Linear(16, 16)
        self.classify = nn.Linear(16, 3)
        self.embed = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> TensorDict:
        shared = self.trunk_out(self.trunk_in(x))
        return {
            "class_logits": self.classify(shared),
            "embedding": scaled_normalize(self.embed(shared), weight),
        }


def scaled_normalize(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1) * weight


class ScaledNormalize(nn.Module):
    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return scaled_normalize(x, weight)


def build_branch() -> ModelSpec:
    """Trunk units 0-1, head ``classify`` = unit 2, head ``embed`` = units 3-4."""
    torch.manual_seed(2)
    model = BranchNet().eval()
    units = (
        Unit("trunk.in", model.trunk_in, ("x",), ("trunk.0",)),
        Unit("trunk.out", model.trunk_out, ("trunk.0",), ("trunk.1",)),
        Unit("classify", model.classify, ("trunk.1",), ("class_logits",)),
        Unit("embed.project", model.embed, ("trunk.1",), ("embed.0",)),
        Unit("embed.normalize", ScaledNormalize(), ("embed.0", "weight"), ("embedding",)),
    )

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        return model(inputs["x"], inputs["weight"])

    return ModelSpec(
        name="branch",
        units=units,
        example_inputs={"x": torch.randn(2, 6), "weight": torch.rand(2, 1)},
        outputs=("class_logits", "embedding"),
        heads={"classify": (2,), "embed": (3, 4)},
        reference=reference,
    )


class FirstUseOrder(nn.Module):
    """``forward(a, b)`` uses ``b`` first: a stage built by first use would take (b, a)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        scaled = b * self.scale
        return scaled - 10.0 * a


def build_first_use() -> ModelSpec:
    """Two same-shaped float inputs whose first use is the reverse of the signature order."""
    torch.manual_seed(3)
    first = FirstUseOrder().eval()
    tail = nn.Linear(4, 2).eval()
    units = (
        Unit("combine", first, ("a", "b"), ("combined",)),
        Unit("tail", tail, ("combined",), ("out",)),
    )

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        return {"out": tail(first(inputs["a"], inputs["b"]))}

    return ModelSpec(
        name="first-use",
        units=units,
        example_inputs={"a": torch.randn(2, 4), "b": torch.randn(2, 4)},
        outputs=("out",),
        reference=reference,
    )


def build_sequential() -> tuple[nn.Sequential, torch.Tensor]:
    """A factory in the ``(nn.Sequential, example_input)`` form accepted by ``load_factory``."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.randn(2, 4)


STACK_DEPTH = 6
STACK_WIDTH = 1024
STACK_EXAMPLE_ROWS = 256


def build_stack() -> tuple[nn.Sequential, torch.Tensor]:
    """Six equal Linear layers (units "0".."5") whose profile makes a planner split them.

    The example batch of 256 rows is what the export job profiles: each unit then computes for
    milliseconds, more than a loopback link costs, so a plan over three agents uses every cut it
    may. Requests may use any batch size.
    """
    torch.manual_seed(5)
    layers = [nn.Linear(STACK_WIDTH, STACK_WIDTH) for _ in range(STACK_DEPTH)]
    return nn.Sequential(*layers), torch.randn(STACK_EXAMPLE_ROWS, STACK_WIDTH)



# MLP blocks: much compute per unit, a narrow activation between units. A link then costs far
# less than a unit's compute, even with the low bandwidth a busy agent measures at start-up.
MLP_WIDTH = 128
MLP_HIDDEN = 8192
MLP_EXAMPLE_ROWS = 64
MLP_STACK_DEPTH = 12


def _mlp_block() -> nn.Sequential:
    return nn.Sequential(nn.Linear(MLP_WIDTH, MLP_HIDDEN), nn.ReLU(), nn.Linear(MLP_HIDDEN, MLP_WIDTH)).eval()


def build_mlp_stack() -> tuple[nn.Sequential, torch.Tensor]:
    """Twelve equal MLP blocks (units "0".."11").

    Twelve units keep a plan's stages balanced when the profile of single units is noisy, as it
    is on a busy machine.
    """
    torch.manual_seed(7)
    model = nn.Sequential(*(_mlp_block() for _ in range(MLP_STACK_DEPTH))).eval()
    return model, torch.randn(MLP_EXAMPLE_ROWS, MLP_WIDTH)


WIDE_BRANCH_TRUNK = 4


def build_wide_branch() -> ModelSpec:
    """A trunk of four equal MLP blocks (units 0-3) and two one-block heads.

    Head ``left`` is unit 4 and head ``right`` is unit 5.
    """
    torch.manual_seed(6)
    blocks = [_mlp_block() for _ in range(WIDE_BRANCH_TRUNK + 2)]
    trunk = tuple(
        Unit(f"trunk.{i}", blocks[i], ("x",) if i == 0 else (f"hidden.{i - 1}",), (f"hidden.{i}",))
        for i in range(WIDE_BRANCH_TRUNK)
    )
    shared = f"hidden.{WIDE_BRANCH_TRUNK - 1}"
    heads = (
        Unit("left", blocks[WIDE_BRANCH_TRUNK], (shared,), ("left.out",)),
        Unit("right", blocks[WIDE_BRANCH_TRUNK + 1], (shared,), ("right.out",)),
    )

    def reference(inputs: Mapping[str, torch.Tensor]) -> TensorDict:
        hidden = inputs["x"]
        for block in blocks[:WIDE_BRANCH_TRUNK]:
            hidden = block(hidden)
        return {"left.out": blocks[WIDE_BRANCH_TRUNK](hidden), "right.out": blocks[WIDE_BRANCH_TRUNK + 1](hidden)}

    return ModelSpec(
        name="wide-branch",
        units=trunk + heads,
        example_inputs={"x": torch.randn(MLP_EXAMPLE_ROWS, MLP_WIDTH)},
        outputs=("left.out", "right.out"),
        heads={"left": (WIDE_BRANCH_TRUNK,), "right": (WIDE_BRANCH_TRUNK + 1,)},
        reference=reference,
    )
