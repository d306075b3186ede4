"""Re-planning when an agent joins: the better plan is loaded before traffic moves to it.

Real agent processes on loopback: three voters, two of them started first. MiniLM is deployed
over the two, then the third joins; the coordinator must load a three-agent plan in the
background and switch to it, while requests keep succeeding with correct outputs.
"""

from __future__ import annotations

import time

import pytest
import torch

from nodeagent.localcluster import LocalCluster

pytestmark = pytest.mark.slow


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
