"""Branch and block segmentation: the pure routing and planning helpers, then real agent processes.

The slow tests start three ``shardmesh agent`` processes on 127.0.0.1 (static peers, mDNS off).
They deploy two toy models from tests/toymodels.py: a branch model (a trunk with the heads
``classify`` and ``embed``) and a stack of six equal Linear layers cut in blocks of three.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import toymodels
from coordinator.export import export_model
from coordinator.export_job import choose_strategy, infer_block_prefix
from coordinator.micromodel import (
    InputError,
    merge_profile,
    reference_forward,
    required_cuts,
    route_for_task,
    unit_groups,
)
from coordinator.placement import (
    Hop,
    choose_route,
    expand_stages,
    placement_from_stages,
    route_cuts,
    segments_on_route,
)
from coordinator.zoo import load_factory
from nodeagent.coordinator_role import _segmentation_arguments
from nodeagent.localcluster import LocalCluster
from nodeagent.segments import LoadedSegment
from nodeagent.worker import SegmentWorker
from protocol.tensors import tensor_from_json, tensor_to_json

TESTS_DIR = Path(__file__).resolve().parent
TOLERANCE = 1e-5
FORM_TIMEOUT_S = 60.0
DEPLOY_TIMEOUT_S = 90.0

# The branch toy model: trunk units 0-1, head "classify" = unit 2, head "embed" = units 3-4.
BRANCH_ROUTES = {"classify": (0, 1, 2), "embed": (0, 1, 3, 4)}


def _branch_placement():
    return placement_from_stages(
        "branch", "v1", 1, 5, [(0, 1, ["a"]), (2, 2, ["b"]), (3, 3, ["c", "b"]), (4, 4, ["a"])])


# ===================================================================== pure helpers


def test_segments_on_route_skips_other_head() -> None:
    placement = _branch_placement()
    classify = segments_on_route(placement, BRANCH_ROUTES["classify"])
    embed = segments_on_route(placement, BRANCH_ROUTES["embed"])
    assert [(s.first, s.last) for s in classify] == [(0, 1), (2, 2)]
    assert [(s.first, s.last) for s in embed] == [(0, 1), (3, 3), (4, 4)]
    assert [(s.first, s.last) for s in segments_on_route(placement)] == [(0, 1), (2, 2), (3, 3), (4, 4)]


def test_segments_on_route_rejects_straddling_segment() -> None:
    # A segment 2..3 contains the classify head and the first embed unit: no route can use it.
    placement = placement_from_stages("branch", "v1", 1, 5, [(0, 1, ["a"]), (2, 3, ["b"]), (4, 4, ["c"])])
    assert segments_on_route(placement, BRANCH_ROUTES["classify"]) is None
    assert segments_on_route(placement, BRANCH_ROUTES["embed"]) is None
    assert choose_route(placement, 0, outstanding={}, usable={"a", "b", "c"},
                        route_units=BRANCH_ROUTES["embed"]) is None


def test_route_cuts_per_task() -> None:
    placement = _branch_placement()
    assert route_cuts(placement, BRANCH_ROUTES["classify"]) == {0, 2}
    assert route_cuts(placement, BRANCH_ROUTES["embed"]) == {0, 3, 4}
    assert route_cuts(placement) == placement.cuts


def test_choose_route_for_task() -> None:
    placement = _branch_placement()
    usable = {"a", "b", "c"}
    classify = choose_route(placement, 0, outstanding={}, usable=usable, route_units=BRANCH_ROUTES["classify"])
    assert classify == [Hop(0, 1, "a"), Hop(2, 2, "b")]
    embed = choose_route(placement, 0, outstanding={"c": 2}, usable=usable, route_units=BRANCH_ROUTES["embed"])
    assert embed == [Hop(0, 1, "a"), Hop(3, 3, "b"), Hop(4, 4, "a")]


def test_choose_route_skips_excluded_hops_only() -> None:
    placement = placement_from_stages("chain", "v1", 1, 3, [(0, 0, ["a"]), (1, 1, ["a", "b"]), (2, 2, ["a"])])
    usable = {"a", "b"}
    assert choose_route(placement, 0, outstanding={}, usable=usable) == [Hop(0, 0, "a"), Hop(1, 1, "a"), Hop(2, 2, "a")]
    # a refused unit 1: it still runs units 0 and 2, and b takes unit 1.
    assert choose_route(placement, 0, outstanding={}, usable=usable, excluded_hops={("a", 1)}) == [
        Hop(0, 0, "a"), Hop(1, 1, "b"), Hop(2, 2, "a")]
    # With no other holder of the refused segment there is no route.
    assert choose_route(placement, 0, outstanding={}, usable=usable, excluded_hops={("a", 2)}) is None


def test_choose_route_rotates_ties() -> None:
    placement = placement_from_stages("chain", "v1", 1, 2, [(0, 0, ["a", "b", "c"]), (1, 1, ["d"])])
    usable = {"a", "b", "c", "d"}
    firsts = [choose_route(placement, 0, outstanding={}, usable=usable, turn=turn)[0].agent for turn in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    # Fewer outstanding requests still wins over the rotation.
    loaded = [choose_route(placement, 0, outstanding={"a": 1, "c": 1}, usable=usable, turn=turn)[0].agent
              for turn in range(3)]
    assert loaded == ["b", "b", "b"]
    # Rotation only among the tied: a and c tie at 0 outstanding, b has 2.
    tied = [choose_route(placement, 0, outstanding={"b": 2}, usable=usable, turn=turn)[0].agent for turn in range(4)]
    assert tied == ["a", "c", "a", "c"]


def test_choose_route_avoids_suspects() -> None:
    placement = placement_from_stages("chain", "v1", 1, 2, [(0, 0, ["a", "b"]), (1, 1, ["c"])])
    usable = {"a", "b", "c"}
    # A suspected replica gets no hop while another replica is usable, even with fewer requests.
    routes = [choose_route(placement, 0, outstanding={"b": 3}, usable=usable, avoid={"a"}, turn=turn)
              for turn in range(3)]
    assert [route[0].agent for route in routes] == ["b", "b", "b"]
    # A suspected sole holder still gets its hop: waiting on it beats having no route.
    assert choose_route(placement, 0, outstanding={}, usable=usable, avoid={"c"}) == [Hop(0, 0, "a"), Hop(1, 1, "c")]


def test_choose_route_resumes_at_head_start() -> None:
    placement = _branch_placement()
    usable = {"a", "b", "c"}
    # After the trunk, an embed request is held at boundary 3 (the head's first unit), not 2.
    resumed = choose_route(placement, 3, outstanding={}, usable=usable, route_units=BRANCH_ROUTES["embed"])
    assert resumed == [Hop(3, 3, "c"), Hop(4, 4, "a")]
    assert choose_route(placement, 2, outstanding={}, usable=usable, route_units=BRANCH_ROUTES["embed"]) is None
    assert choose_route(placement, 0, outstanding={}, usable={"a", "c"}, route_units=BRANCH_ROUTES["classify"]) is None


def test_expand_stages_maps_groups_to_units() -> None:
    groups = unit_groups(6, [2])
    assert groups == [(0, 2), (3, 5)]
    assert expand_stages([(0, 0, ("a",)), (1, 1, ("b", "c"))], groups) == [(0, 2, ("a",)), (3, 5, ("b", "c"))]
    assert expand_stages([(0, 1, ["a"])], groups) == [(0, 5, ("a",))]


def test_expand_stages_splits_at_required_cuts() -> None:
    groups = unit_groups(5, [0, 1, 2, 3])
    stages = expand_stages([(0, 4, ["a"])], groups, required_cuts=(1, 2))
    assert stages == [(0, 1, ("a",)), (2, 2, ("a",)), (3, 4, ("a",))]
    stages = expand_stages([(0, 1, ["a"]), (2, 4, ["b"])], groups, required_cuts=(1, 2))
    assert stages == [(0, 1, ("a",)), (2, 2, ("b",)), (3, 4, ("b",))]
    with pytest.raises(ValueError, match="5 groups"):
        expand_stages([(0, 5, ["a"])], groups)


def test_expand_stages_branch_plan_serves_every_task() -> None:
    spec = toymodels.build_branch()
    cuts = spec.strategy.allowed_cuts
    groups = unit_groups(len(spec.units), cuts)
    # A planner that ignored the heads would happily put units 0..4 on one agent.
    stages = expand_stages([(0, len(groups) - 1, ["a"])], groups, required_cuts(spec))
    placement = placement_from_stages("branch", "v1", 1, len(spec.units), stages)
    for task in spec.heads:
        route = choose_route(placement, 0, outstanding={}, usable={"a"}, route_units=route_for_task(spec, task))
        assert route is not None, task
        assert [unit for hop in route for unit in range(hop.first, hop.last + 1)] == list(route_for_task(spec, task))


def test_merge_profile_rows_match_groups() -> None:
    rows = [{"name": str(i), "seconds": 1.0, "weight_bytes": 10, "output_bytes": i} for i in range(6)]
    merged = merge_profile(rows, [2])
    assert [row["seconds"] for row in merged] == [3.0, 3.0]
    assert [row["output_bytes"] for row in merged] == [2, 5]


def test_infer_block_prefix_finds_longest_run() -> None:
    minilm_names = ["embeddings", *(f"encoder.layer.{i}" for i in range(6)), "pooling"]
    assert infer_block_prefix(minilm_names) == "encoder.layer."
    assert infer_block_prefix(["stem", "blocks.0", "blocks.1", "blocks.2", "head"]) == "blocks."
    assert infer_block_prefix(["0", "1", "2"]) == ""
    with pytest.raises(ValueError, match="block_prefix"):
        infer_block_prefix(["stem", "body", "head"])


def test_choose_strategy_block_every_three() -> None:
    spec = load_factory("toymodels:build_stack")
    assert choose_strategy(spec, "layer", None, None).allowed_cuts == (0, 1, 2, 3, 4)
    assert choose_strategy(spec, "block", 3, None).allowed_cuts == (2,)
    assert choose_strategy(spec, "block", 2, None).allowed_cuts == (1, 3)
    with pytest.raises(ValueError, match="block size"):
        choose_strategy(spec, "block", None, None)
    branch = choose_strategy(toymodels.build_branch(), "block", 5, "trunk.")
    assert branch.kind == "branch"
    assert set(required_cuts(toymodels.build_branch())) <= set(branch.allowed_cuts)


def test_segmentation_arguments_checks_options() -> None:
    assert _segmentation_arguments({}) == ["--segmentation", "layer"]
    assert _segmentation_arguments({"segmentation": "block", "block_size": 2}) == [
        "--segmentation", "block", "--block-size", "2"]
    assert _segmentation_arguments({"segmentation": "block", "block_size": 1, "block_prefix": "blocks."})[-2:] == [
        "--block-prefix", "blocks."]
    with pytest.raises(ValueError, match="options.segmentation"):
        _segmentation_arguments({"segmentation": "heads"})
    with pytest.raises(ValueError, match="options.block_size"):
        _segmentation_arguments({"segmentation": "block"})
    with pytest.raises(ValueError, match="options.block_size"):
        _segmentation_arguments({"segmentation": "block", "block_size": True})


# ===================================================================== task workers


@pytest.fixture(scope="module")
def branch_export(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    spec = toymodels.build_branch()
    out = tmp_path_factory.mktemp("branch-export")
    manifest = export_model(spec, out)
    return spec, manifest, out


async def test_loaded_segment_worker_per_task(branch_export) -> None:
    from coordinator.export import Segment

    spec, manifest, out = branch_export
    blobs = {unit.sha256: out / "blobs" / unit.sha256 for unit in manifest.units}
    segment = Segment(manifest, 0, 1, blobs)
    created_for: list[str | None] = []

    def make_worker(task: str | None) -> SegmentWorker:
        created_for.append(task)
        return SegmentWorker(f"trunk/{task}", lambda tensors, task=task: segment.run(tensors, task), max_wait_s=0.0)

    loaded = LoadedSegment(("branch", "1", 0, 1), make_worker(None), manifest, (), {1}, make_worker=make_worker)
    try:
        classify = loaded.worker_for("classify")
        embed = loaded.worker_for("embed")
        assert classify is not embed
        assert loaded.worker_for("classify") is classify
        assert created_for == [None, "classify", "embed"]
        with pytest.raises(InputError, match="unknown task"):
            loaded.worker_for("translate")
        assert sorted(loaded.task_workers) == ["classify", "embed"]

        inputs = dict(spec.example_inputs)
        out_classify = await classify.submit(inputs, request_id="r1")
        out_embed = await embed.submit(inputs, request_id="r2")
        assert sorted(out_classify) == ["trunk.1"]
        assert sorted(out_embed) == ["trunk.1", "weight"]
    finally:
        for worker in loaded.workers():
            worker.close()


def test_loaded_segment_rejects_off_route_task(branch_export) -> None:
    spec, manifest, out = branch_export
    loaded = LoadedSegment(("branch", "1", 2, 2), None, manifest, (), {1},  # type: ignore[arg-type]
                           make_worker=lambda task: pytest.fail("no worker may start for an off-route task"))
    with pytest.raises(InputError, match="does not visit units 2..2"):
        loaded.worker_for("embed")


# ===================================================================== real agents


def _infer(cluster: LocalCluster, index: int, model: str, inputs: dict[str, torch.Tensor], **options) -> tuple[int, dict]:
    body = {"inputs": {name: tensor_to_json(tensor) for name, tensor in inputs.items()}, **options}
    return cluster.request(index, "POST", f"/v1/models/{model}/infer", body)


def _outputs(body: dict) -> dict[str, torch.Tensor]:
    return {name: tensor_from_json(value) for name, value in body["outputs"].items()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with pytest.MonkeyPatch.context() as patch:
        # The agents' export jobs import the toy model factories from tests/toymodels.py.
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
        local = LocalCluster(tmp_path_factory.mktemp("branch-cluster"), 3, mdns=False, static_peers=True)
        local.create()
        local.start()
        try:
            local.wait_formed(FORM_TIMEOUT_S)
            for index in range(3):
                local.wait_formed(30.0, via=index)
            yield local
        finally:
            local.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_branch_cluster_tasks_match_reference(cluster: LocalCluster) -> None:
    torch.set_num_threads(1)
    info = cluster.deploy("branch", "v1", "factory:toymodels:build_branch", timeout_s=DEPLOY_TIMEOUT_S,
                          options={"max_stages": 3})
    spec = toymodels.build_branch()
    segments = info["versions"][0]["segments"]
    starts = {segment["first_unit"] for segment in segments}
    # The trunk ends after unit 1 and the classify head after unit 2: both are segment starts.
    assert {0, 2, 3} <= starts, segments

    torch.manual_seed(11)
    inputs = {"x": torch.randn(3, 6), "weight": torch.rand(3, 1)}
    expected = reference_forward(spec, inputs)
    for task in ("classify", "embed"):
        route_units = set(route_for_task(spec, task))
        on_route = [s for s in segments if s["first_unit"] in route_units]
        for gateway in range(3):
            status, body = _infer(cluster, gateway, "branch", inputs, task=task)
            assert status == 200, body
            outputs = _outputs(body)
            head_output = "class_logits" if task == "classify" else "embedding"
            assert sorted(outputs) == [head_output], task
            diff = float((outputs[head_output] - expected[head_output]).abs().max())
            assert diff <= TOLERANCE, f"task {task} via agent-{gateway}: max abs diff {diff}"
            # One hop per segment on the task's route, each on that segment's only holder.
            assert body["route"] == [s["agents"][0] for s in on_route], (task, segments)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_branch_cluster_task_errors(cluster: LocalCluster) -> None:
    if not any(m["name"] == "branch" for m in cluster.get(0, "/v1/models")):
        cluster.deploy("branch", "v1", "factory:toymodels:build_branch", timeout_s=DEPLOY_TIMEOUT_S)
    inputs = {"x": torch.randn(2, 6), "weight": torch.rand(2, 1)}

    status, body = _infer(cluster, 1, "branch", inputs)
    assert status == 400, body
    assert body["error"]["field"] == "task"
    assert body["error"]["expected"] == ["classify", "embed"]

    status, body = _infer(cluster, 1, "branch", inputs, task="translate")
    assert status == 422, body
    assert body["error"]["field"] == "task"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_block_cluster_cuts_only_at_blocks(cluster: LocalCluster) -> None:
    torch.set_num_threads(1)
    started = time.monotonic()
    info = cluster.deploy("stack", "v1", "factory:toymodels:build_stack", timeout_s=DEPLOY_TIMEOUT_S,
                          options={"segmentation": "block", "block_size": 3})
    segments = info["versions"][0]["segments"]
    # Blocks of three of the six units allow one cut, after unit 2.
    assert {segment["first_unit"] for segment in segments} <= {0, 3}, segments
    assert len(segments) == 2, f"the planner left the allowed cut unused: {segments} ({time.monotonic() - started:.1f} s)"

    model, example = toymodels.build_stack()
    inputs = {"input": torch.randn(2, toymodels.STACK_WIDTH)}
    with torch.no_grad():
        expected = model(inputs["input"])
    status, body = _infer(cluster, 2, "stack", inputs)
    assert status == 200, body
    output = next(iter(_outputs(body).values()))
    assert float((output - expected).abs().max()) <= TOLERANCE

    # A task on a model without heads is rejected before any hop runs.
    # The HTTP layer checks the task against the model's heads first and returns 422.
    status, body = _infer(cluster, 2, "stack", inputs, task="classify")
    assert status == 422, body
    assert body["error"]["field"] == "task"
