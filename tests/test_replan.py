"""Re-planning when an agent joins or dies: the better plan is loaded before traffic moves to it.

Real agent processes on loopback (static peers, mDNS off). In the join tests three voters run,
two of them started first, and a model is deployed over the two. Then the third joins, and the
coordinator must load a three-agent plan in the background and switch to it. MiniLM is a layer
chain, ``build_mlp_stack`` is deployed with block cuts, and ``build_wide_branch`` is a branch
model (tests/toymodels.py). In the death test one agent of a three-agent deploy is killed with
SIGKILL: the local repair overloads one survivor, so the coordinator moves on to the best plan
over the survivors. A version whose shape ``max_stages`` fixed is not re-planned, but a replica
lost with its agent comes back when the agent does. Requests keep succeeding with correct
outputs throughout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

import toymodels
from coordinator.micromodel import reference_forward
from nodeagent.localcluster import LocalCluster
from protocol.tensors import tensor_from_json, tensor_to_json

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
TOLERANCE = 1e-5
SWITCH_TIMEOUT_S = 60.0


def _infer_ok(cluster: LocalCluster, inputs: dict, want: torch.Tensor) -> None:
    body = {"inputs": {name: {"dtype": "int64", "shape": list(t.shape), "data": t.tolist()} for name, t in inputs.items()},
            "deadline_ms": 20000}
    status, reply = cluster.request(0, "POST", "/v1/models/minilm/infer", body)
    assert status == 200, reply
    got = torch.tensor(reply["outputs"]["sentence_embedding"]["data"])
    assert float((got - want).abs().max()) <= 1e-5


def test_replan_join_moves_to_better_plan(tmp_path) -> None:
    from coordinator import zoo

    cluster = LocalCluster(tmp_path, 3, mdns=False, static_peers=True)
    cluster.create()
    try:
        cluster.start([0, 1])
        cluster.wait_formed(90, expect=["agent-0", "agent-1"])
        info = cluster.deploy("minilm", "v1", "minilm", timeout_s=240)
        before = info["versions"][0]["segments"]
        assert {agent for s in before for agent in s["agents"]} <= {"agent-0", "agent-1"}

        inputs = zoo.minilm_tokenize(["A man is eating food."])
        with torch.no_grad():
            want = zoo.build_minilm().reference(inputs)["sentence_embedding"]
        _infer_ok(cluster, inputs, want)

        cluster.start_agent(2)
        deadline = time.monotonic() + 90
        after = before
        while time.monotonic() < deadline:
            _infer_ok(cluster, inputs, want)
            after = cluster.get(0, "/v1/models/minilm")["versions"][0]["segments"]
            if any("agent-2" in s["agents"] for s in after):
                break
            time.sleep(0.5)
        assert any("agent-2" in s["agents"] for s in after), f"placement did not use the new agent: {after}"
        assert after[0]["first_unit"] == 0 and after[-1]["last_unit"] == 7
        # Make-before-break: the switch happens only once agent-2 holds its segment.
        status = cluster.get(0, "/v1/cluster")
        assert status["members"]
        _infer_ok(cluster, inputs, want)
    finally:
        cluster.stop()


@pytest.fixture
def toy_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The agents' export jobs import the toy model factories from tests/toymodels.py.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])))
    cluster = LocalCluster(tmp_path, 3, mdns=False, static_peers=True)
    cluster.create()
    try:
        yield cluster
    finally:
        cluster.stop()


def _infer_toy(cluster: LocalCluster, via: int, model: str, inputs: dict, want: dict[str, torch.Tensor],
               task: str | None = None) -> None:
    """Send one request and compare its outputs with ``want``; None as a key matches a sole output."""
    body = {"inputs": {name: tensor_to_json(t) for name, t in inputs.items()}, "deadline_ms": 20000}
    if task is not None:
        body["task"] = task
    status, reply = cluster.request(via, "POST", f"/v1/models/{model}/infer", body)
    assert status == 200, reply
    outputs = reply["outputs"]
    if None in want:
        assert len(outputs) == 1, sorted(outputs)
        outputs = {None: next(iter(outputs.values()))}
    assert sorted(outputs, key=str) == sorted(want, key=str), (task, sorted(outputs, key=str))
    for name, value in outputs.items():
        diff = float((tensor_from_json(value) - want[name]).abs().max())
        assert diff <= TOLERANCE, f"{model} output {name} via agent-{via}: max abs diff {diff}"


def _segments(cluster: LocalCluster, via: int, model: str) -> list[dict]:
    return cluster.get(via, f"/v1/models/{model}")["versions"][0]["segments"]


def _spans(segments: list[dict]) -> list[tuple[int, int, tuple[str, ...]]]:
    return [(s["first_unit"], s["last_unit"], tuple(s["agents"])) for s in segments]


def test_replan_join_block_model(toy_cluster: LocalCluster) -> None:
    cluster = toy_cluster
    torch.set_num_threads(1)
    cluster.start([0, 1])
    cluster.wait_formed(60, expect=["agent-0", "agent-1"])
    # Blocks of two of the twelve units: a segment may start only at an even unit.
    cluster.deploy("stack", "v1", "factory:toymodels:build_mlp_stack", timeout_s=90,
                   options={"segmentation": "block", "block_size": 2})
    block_starts = set(range(0, toymodels.MLP_STACK_DEPTH, 2))
    before = _segments(cluster, 0, "stack")
    assert {s["first_unit"] for s in before} <= block_starts, before
    assert {agent for s in before for agent in s["agents"]} <= {"agent-0", "agent-1"}

    model, _ = toymodels.build_mlp_stack()
    inputs = {"input": torch.randn(2, toymodels.MLP_WIDTH)}
    with torch.no_grad():
        want = {None: model(inputs["input"])}
    _infer_toy(cluster, 0, "stack", inputs, want)

    cluster.start_agent(2)
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    after = before
    while time.monotonic() < deadline:
        _infer_toy(cluster, 0, "stack", inputs, want)
        after = _segments(cluster, 0, "stack")
        if any("agent-2" in s["agents"] for s in after):
            break
        time.sleep(0.3)
    assert any("agent-2" in s["agents"] for s in after), f"placement did not use the new agent: {after}"
    # The joined agent took a group of blocks: every cut is still a block boundary.
    assert {s["first_unit"] for s in after} <= block_starts, after
    assert after[0]["first_unit"] == 0, after
    assert after[-1]["last_unit"] == toymodels.MLP_STACK_DEPTH - 1, after
    for via in range(3):
        _infer_toy(cluster, via, "stack", inputs, want)


def test_replan_join_branch_model(toy_cluster: LocalCluster) -> None:
    cluster = toy_cluster
    torch.set_num_threads(1)
    cluster.start([0, 1])
    cluster.wait_formed(60, expect=["agent-0", "agent-1"])
    cluster.deploy("wide", "v1", "factory:toymodels:build_wide_branch", timeout_s=90)
    before = _segments(cluster, 0, "wide")
    assert {agent for s in before for agent in s["agents"]} <= {"agent-0", "agent-1"}

    spec = toymodels.build_wide_branch()
    inputs = {"x": torch.randn(2, toymodels.MLP_WIDTH)}
    with torch.no_grad():
        reference = reference_forward(spec, inputs)
    wants = {"left": {"left.out": reference["left.out"]}, "right": {"right.out": reference["right.out"]}}

    cluster.start_agent(2)
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    after = before
    while time.monotonic() < deadline:
        for task, want in wants.items():
            _infer_toy(cluster, 0, "wide", inputs, want, task=task)
        after = _segments(cluster, 0, "wide")
        if any("agent-2" in s["agents"] for s in after):
            break
        time.sleep(0.3)
    assert any("agent-2" in s["agents"] for s in after), f"placement did not use the new agent: {_spans(after)}"
    # The required cuts (trunk end after unit 3, head "left" end after unit 4) still separate
    # segments, so each segment lies wholly on or off each task's route.
    starts = {s["first_unit"] for s in after}
    assert {0, 4, 5} <= starts, _spans(after)
    for via in range(3):
        for task, want in wants.items():
            _infer_toy(cluster, via, "wide", inputs, want, task=task)


def test_repair_replaced_by_best_plan_after_kill(toy_cluster: LocalCluster) -> None:
    cluster = toy_cluster
    torch.set_num_threads(1)
    cluster.start()
    status = cluster.wait_formed(60)
    info = cluster.deploy("stack", "v1", "factory:toymodels:build_mlp_stack", timeout_s=90)
    deployed_plan = info["versions"][0]["plan_version"]
    before = _spans(info["versions"][0]["segments"])
    # The premise: twelve equal units over three agents, about four each. A local repair then
    # gives one survivor about eight units, while the best plan over two agents gives each six.
    assert len(before) == 3, before
    assert len({agents for _, _, agents in before}) == 3, before

    coordinator = status["coordinator"]["node_id"]
    victim = next(agents[0] for _, _, agents in before if agents[0] != coordinator)
    survivors = sorted(set(cluster.node_ids) - {victim})
    via = cluster.index_of(coordinator)

    model, _ = toymodels.build_mlp_stack()
    inputs = {"input": torch.randn(2, toymodels.MLP_WIDTH)}
    with torch.no_grad():
        want = {None: model(inputs["input"])}
    _infer_toy(cluster, via, "stack", inputs, want)

    cluster.kill(cluster.index_of(victim))
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    seen = [before]
    after = before
    while time.monotonic() < deadline:
        _infer_toy(cluster, via, "stack", inputs, want)
        after = _spans(_segments(cluster, via, "stack"))
        if after != seen[-1]:
            seen.append(after)
        if len(after) == 2:
            break
        time.sleep(0.3)
    # The best plan over two agents is one segment each; the local repair left three segments.
    assert len(after) == 2, f"placements seen: {seen}"
    assert sorted(agent for _, _, agents in after for agent in agents) == survivors, after
    # Two plan versions: the local repair, committed at once and serving while agents loaded the
    # best plan, then the best plan itself.
    final_plan = cluster.get(via, "/v1/models/stack")["versions"][0]["plan_version"]
    assert final_plan == deployed_plan + 2, f"plan {deployed_plan} -> {final_plan}; placements seen: {seen}"
    for index in (cluster.index_of(agent) for agent in survivors):
        _infer_toy(cluster, index, "stack", inputs, want)


def test_max_stages_replica_restored_when_its_agent_returns(toy_cluster: LocalCluster) -> None:
    """A version whose shape max_stages fixed keeps its stages, and gets a lost replica back."""
    cluster = toy_cluster
    torch.set_num_threads(1)
    cluster.start()
    status = cluster.wait_formed(60)
    info = cluster.deploy("stack", "v1", "factory:toymodels:build_mlp_stack", timeout_s=90, replicas=2,
                          options={"max_stages": 1})
    before = _spans(info["versions"][0]["segments"])
    # One stage on agent-0; the two other agents replicate it.
    assert before == [(0, toymodels.MLP_STACK_DEPTH - 1, ("agent-0", "agent-1", "agent-2"))], before
    coordinator = status["coordinator"]["node_id"]
    victim = next(agent for agent in ("agent-1", "agent-2") if agent != coordinator)
    via = cluster.index_of(coordinator)
    model, _ = toymodels.build_mlp_stack()
    inputs = {"input": torch.randn(2, toymodels.MLP_WIDTH)}
    with torch.no_grad():
        want = {None: model(inputs["input"])}

    def wait_for_holders(expected: set[str]) -> list:
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        spans = before
        while time.monotonic() < deadline:
            _infer_toy(cluster, via, "stack", inputs, want)
            spans = _spans(_segments(cluster, via, "stack"))
            if len(spans) == 1 and set(spans[0][2]) == expected:
                return spans
            time.sleep(0.3)
        raise AssertionError(f"holders never became {sorted(expected)}; last placement {spans}")

    cluster.kill(cluster.index_of(victim))
    wait_for_holders(set(cluster.node_ids) - {victim})
    cluster.start_agent(cluster.index_of(victim))
    cluster.wait_started(cluster.index_of(victim))  # its admin port is new
    after = wait_for_holders(set(cluster.node_ids))
    # The stage itself did not move: the returning agent is a replica again.
    assert after[0][:2] == before[0][:2], after
    assert after[0][2][0] == "agent-0", after
    _infer_toy(cluster, cluster.index_of(victim), "stack", inputs, want)
