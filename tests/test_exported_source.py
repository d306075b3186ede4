"""Deploy source ``exported:``: a torch.export.save archive cut into units.

The test model is small but has what breaks naive splitting. A weight is tied between the first
and the last unit. A mask is read only by later blocks and the pooling. The forward signature
lists the mask before the ids that the graph reads first. The root module computes the batch
size once and every block uses it, and the model returns a dictionary of two outputs. It is
saved with a dynamic batch and sequence length, and every check compares against the whole
saved program.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from coordinator.export import Manifest, Segment, export_model
from coordinator.exported_source import EPILOGUE, PROLOGUE, build_exported_spec, split_arguments
from coordinator.micromodel import SpecError, reference_forward, run_units
from nodeagent.localcluster import ClusterError, LocalCluster

TOLERANCE = 1e-5
VOCAB = 40
WIDTH = 16
DEPTH = 4
UNIT_NAMES = [PROLOGUE, "layers.0", "layers.1", "layers.2", "layers.3", EPILOGUE]


class Block(nn.Module):
    def __init__(self, use_mask: bool) -> None:
        super().__init__()
        self.use_mask = use_mask
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 2 * WIDTH)
        self.down = nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, batch: int) -> torch.Tensor:
        update = self.down(torch.relu(self.up(self.norm(hidden))))
        # The reshape reads the batch size the root module computed, a symbolic size in the graph.
        update = update.reshape(batch, -1, 2, WIDTH // 2).flatten(2)
        if self.use_mask:
            update = update * mask.unsqueeze(-1).to(update.dtype)
        return hidden + update


class TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(Block(use_mask=index >= 2) for index in range(DEPTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, mask: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = ids.shape[0]
        hidden = self.embed(ids) * 0.5
        for layer in self.layers:
            hidden = layer(hidden, mask, batch)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return {"logits": self.head(hidden), "pooled": pooled}


def _inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=generator)
    mask = (torch.rand(batch, seq, generator=generator) > 0.3).to(torch.int64)
    mask[:, 0] = 1
    return {"mask": mask, "ids": ids}


def _save(model: nn.Module, args: tuple, path: Path, dynamic_shapes=None) -> Path:
    program = torch.export.export(model.eval(), args, dynamic_shapes=dynamic_shapes)
    torch.export.save(program, path)
    return path


def _save_tied(path: Path, *, keep_examples: bool = True) -> Path:
    torch.manual_seed(0)
    model = TiedModel().eval()
    example = _inputs(3, 6, seed=1)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.export.export(model, (example["mask"], example["ids"]),
                                  dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    if not keep_examples:
        program.example_inputs = None
    torch.export.save(program, path)
    return path


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    return _save_tied(tmp_path_factory.mktemp("exported") / "tied.pt2")


def _run_cut(manifest: Manifest, single: list[Segment], cuts: list[int], inputs: dict) -> dict[str, torch.Tensor]:
    """Run single-unit segments back to back, handing over only what crosses each cut."""
    bounds = [-1, *cuts, len(manifest.units) - 1]
    tensors = dict(inputs)
    for first, last in zip(bounds[:-1], bounds[1:]):
        for index in range(first + 1, last + 1):
            tensors = {**tensors, **single[index].run(tensors)}
        tensors = {name: tensors[name] for name in single[last].outputs()}
    return tensors


def _max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    return max(float((got[name] - want[name]).abs().max()) for name in want)


# --- splitting ------------------------------------------------------------------------------------


def test_units_follow_numbered_layers(saved_model: Path) -> None:
    spec = build_exported_spec(str(saved_model))

    assert [unit.name for unit in spec.units] == UNIT_NAMES
    assert spec.outputs == ("logits", "pooled")
    assert spec.input_specs is not None
    assert {name: s.shape for name, s in spec.input_specs.items()} == {"mask": (-1, -1), "ids": (-1, -1)}
    units = {unit.name: unit for unit in spec.units}
    assert units[PROLOGUE].inputs == ("ids",)
    assert "mask" not in units["layers.0"].inputs
    assert "mask" in units["layers.2"].inputs
    assert "mask" in units[EPILOGUE].inputs


def test_reference_is_whole_program(saved_model: Path) -> None:
    spec = build_exported_spec(str(saved_model))
    torch.manual_seed(0)
    model = TiedModel().eval()
    inputs = _inputs(4, 5, seed=7)

    with torch.no_grad():
        eager = model(inputs["mask"], inputs["ids"])
    assert _max_diff(reference_forward(spec, inputs), eager) <= 1e-6


def test_every_segment_count_matches_program(saved_model: Path, tmp_path: Path) -> None:
    spec = build_exported_spec(str(saved_model))
    manifest = export_model(spec, tmp_path)
    blobs = {unit.sha256: tmp_path / "blobs" / unit.sha256 for unit in manifest.units}
    single = [Segment(manifest, index, index, blobs) for index in range(len(manifest.units))]
    count = len(manifest.units)

    for batch, seq in ((2, 6), (5, 9)):
        inputs = _inputs(batch, seq, seed=batch)
        want = reference_forward(spec, inputs)
        for segments in range(1, count + 1):
            cuts = [round(count * k / segments) - 1 for k in range(1, segments)]
            got = _run_cut(manifest, single, cuts, inputs)
            diff = _max_diff(got, want)
            assert diff <= TOLERANCE, f"batch {batch}, {segments} segments (cuts {cuts}): max abs diff {diff}"


def test_split_depth_one(saved_model: Path) -> None:
    spec = build_exported_spec(str(saved_model), split_depth=1)
    inputs = _inputs(3, 4, seed=3)

    assert [unit.name for unit in spec.units] == ["embed", "layers", "head"]
    assert _max_diff(run_units(spec, inputs), reference_forward(spec, inputs)) <= TOLERANCE


def test_split_prefix_given(saved_model: Path) -> None:
    spec = build_exported_spec(str(saved_model), split_prefix="layers.")

    assert [unit.name for unit in spec.units] == UNIT_NAMES


def test_generated_examples(tmp_path: Path) -> None:
    path = _save_tied(tmp_path / "no-examples.pt2", keep_examples=False)
    assert torch.export.load(path).example_inputs is None

    spec = build_exported_spec(str(path))
    assert {name: list(t.shape) for name, t in spec.example_inputs.items()} == {"mask": [2, 2], "ids": [2, 2]}
    assert bool((spec.example_inputs["mask"] == 1).all())
    inputs = _inputs(3, 5, seed=4)
    assert _max_diff(run_units(spec, inputs), reference_forward(spec, inputs)) <= TOLERANCE


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt2"
    with pytest.raises(SpecError, match=f"{path} not found"):
        build_exported_spec(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=f"{tmp_path} is a directory; give the .pt2 file"):
        build_exported_spec(str(tmp_path))


def test_relative_path() -> None:
    with pytest.raises(SpecError, match="'model.pt2' is relative"):
        build_exported_spec("model.pt2")


def test_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "text.pt2"
    path.write_text("not an archive")
    with pytest.raises(SpecError, match="not a PT2 archive"):
        build_exported_spec(str(path))


def test_zip_without_program(tmp_path: Path) -> None:
    path = tmp_path / "other.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(SpecError, match="not a readable PT2 archive"):
        build_exported_spec(str(path))


class CondModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers[0](x)
        x = torch.cond(x.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (x,))
        return self.layers[1](x)


def test_control_flow_rejected(tmp_path: Path) -> None:
    path = _save(CondModel(), (torch.randn(3, 4),), tmp_path / "cond.pt2",
                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(SpecError, match="control-flow operator"):
        build_exported_spec(str(path))


@torch.library.custom_op("shardmesh_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _double_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[1](_double(self.layers[0](x)))


def test_custom_operator_rejected(tmp_path: Path) -> None:
    path = _save(CustomOpModel(), (torch.randn(3, 4),), tmp_path / "custom.pt2",
                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(SpecError, match="cannot become shardmesh units: operator 'torch.ops.shardmesh_test"):
        build_exported_spec(str(path))


def test_fixed_batch_rejected(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    path = _save(model, (torch.randn(3, 4),), tmp_path / "static.pt2")
    with pytest.raises(SpecError, match="input 'input' has shape \\[3, 4\\] with no dynamic batch dimension"):
        build_exported_spec(str(path))


def test_sequential_root_splits(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    path = _save(model, (torch.randn(3, 4),), tmp_path / "sequential.pt2",
                 dynamic_shapes=({0: torch.export.Dim("batch")},))

    spec = build_exported_spec(str(path))
    assert [unit.name for unit in spec.units] == ["0", "1", "2"]


def test_nothing_to_split(tmp_path: Path) -> None:
    path = _save(nn.Linear(4, 2), (torch.randn(3, 4),), tmp_path / "linear.pt2",
                 dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(SpecError, match="no module with two or more numbered children"):
        build_exported_spec(str(path))
    with pytest.raises(SpecError, match="splits into the single unit .model."):
        build_exported_spec(str(path), split_depth=1)


def test_unknown_prefix(saved_model: Path) -> None:
    with pytest.raises(SpecError, match="split_prefix 'blocks' names no module .* \\['layers'\\]"):
        build_exported_spec(str(saved_model), split_prefix="blocks")


def test_unusable_example(tmp_path: Path) -> None:
    torch.manual_seed(0)
    example = _inputs(3, 6, seed=1)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(TiedModel().eval(), (example["mask"], example["ids"]), dynamic_shapes=(dims, dims))
    program.example_inputs = ((example["mask"].float(), example["ids"]), {})
    path = tmp_path / "bad-example.pt2"
    torch.export.save(program, path)

    with pytest.raises(SpecError, match="example input 'mask' is unusable \\(got dtype float32"):
        build_exported_spec(str(path))


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("exported:/m.pt2", {"split_depth": 0}, "options.split_depth is 0"),
        ("exported:/m.pt2", {"split_depth": True}, "options.split_depth is True"),
        ("exported:/m.pt2", {"split_depth": "2"}, "options.split_depth is '2'"),
        ("exported:/m.pt2", {"split_prefix": 3}, "options.split_prefix is 3"),
        ("exported:/m.pt2", {"split_prefix": "layers", "split_depth": 1}, "exclude each other"),
        ("minilm", {"split_depth": 1}, "applies only to exported: sources"),
    ],
)
def test_split_options_rejected(source: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_arguments(source, options)


def test_split_options_accepted() -> None:
    assert split_arguments("exported:/m.pt2", {}) == []
    assert split_arguments("exported:/m.pt2", {"split_prefix": "layers"}) == ["--split-prefix", "layers"]
    assert split_arguments("exported:/m.pt2", {"split_depth": 2}) == ["--split-depth", "2"]


# --- a real cluster -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cluster_serves_exported_model(saved_model: Path, tmp_path: Path) -> None:
    spec = build_exported_spec(str(saved_model))
    inputs = _inputs(3, 7, seed=11)
    want = reference_forward(spec, inputs)

    cluster = LocalCluster(tmp_path, 2, mdns=False, static_peers=True)
    cluster.create()
    try:
        cluster.start()
        cluster.wait_formed(60, expect=["agent-0", "agent-1"])
        with pytest.raises(ClusterError, match="options.split_depth is 0"):
            cluster.deploy("tied", "v0", f"exported:{saved_model}", timeout_s=30, options={"split_depth": 0})
        info = cluster.deploy("tied", "v1", f"exported:{saved_model}", timeout_s=120,
                              options={"split_prefix": "layers"})
        segments = info["versions"][0]["segments"]
        assert segments[0]["first_unit"] == 0
        assert segments[-1]["last_unit"] == len(UNIT_NAMES) - 1
        # The planner may keep this small model on one agent; the other agent is then the gateway,
        # so the request still crosses the data plane.
        holders = {agent for segment in segments for agent in segment["agents"]}
        gateway = 1 if holders == {"agent-0"} else 0

        body = {"inputs": {name: {"dtype": "int64", "shape": list(t.shape), "data": t.tolist()}
                           for name, t in inputs.items()},
                "deadline_ms": 20000}
        status, reply = cluster.request(gateway, "POST", "/v1/models/tied/infer", body)
        assert status == 200, reply
        got = {name: torch.tensor(reply["outputs"][name]["data"]) for name in want}
        assert _max_diff(got, want) <= TOLERANCE
    finally:
        cluster.stop()
