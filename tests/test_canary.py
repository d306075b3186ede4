"""Numeric canary of loaded segments, and the coordinator's automatic canary rollback.

The segment tests export real toy models with torch.export, record the canary the way the
export job does, and load real segments from a real BlobStore. The reload path runs a real
SegmentHost whose agent around it is reduced to what the host reads: the registry, the store,
the blob transfer (with no peers connected) and two notification hooks that only count calls.
Corrupting a loaded segment's weights needs a hand on its modules, which production code does not
offer, so that path is tested here and not in a cluster test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import pytest
import torch

import toymodels
from coordinator import export_job
from coordinator import registry as registry_ops
from coordinator.export import Manifest, Segment, export_model
from coordinator.micromodel import live_names, segment_inputs, sequential_spec
from coordinator.placement import Placement, SegmentPlacement
from nodeagent import canary
from nodeagent.blobs import BlobTransfer
from nodeagent.config import AgentConfig
from nodeagent.metrics import AgentMetrics
from nodeagent.segments import SegmentHost
from nodeagent.store import BlobStore


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@dataclasses.dataclass
class Exported:
    manifest: Manifest
    blob_dir: Path
    canary_path: Path
    canary_sha: str

    def blobs(self) -> dict[str, Path]:
        return {unit.sha256: self.blob_dir / unit.sha256 for unit in self.manifest.units}


def _export_with_canary(spec, out: Path) -> Exported:
    manifest = export_model(spec, out)
    blob_dir = out / "blobs"
    blobs = {unit.sha256: blob_dir / unit.sha256 for unit in manifest.units}
    tensors = canary.record_canary(manifest, blobs, canary.canary_inputs(spec.example_inputs))
    data = canary.canary_bytes(tensors)
    sha = export_job._put_blob(blob_dir, data)
    return Exported(manifest, blob_dir, blob_dir / sha, sha)


@pytest.fixture(scope="module")
def sequential(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    model, example = toymodels.build_sequential()
    spec = sequential_spec("seq", model, torch.randn(4, 4))
    return _export_with_canary(spec, tmp_path_factory.mktemp("seq"))


@pytest.fixture(scope="module")
def branch(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    return _export_with_canary(toymodels.build_branch(), tmp_path_factory.mktemp("branch"))


def _names(manifest: Manifest, first: int, last: int) -> tuple[list[str], list[str]]:
    return list(segment_inputs(manifest, first)), list(live_names(manifest, last))


def _alter_weight(segment: Segment) -> None:
    """Add 0.05 to one element of the last floating-point parameter (a bias, past every ReLU)."""
    for unit in reversed(segment.units):
        for tensor in reversed(list(unit.module.parameters())):
            if tensor.is_floating_point() and tensor.numel():
                with torch.no_grad():
                    tensor.view(-1)[0] += 0.05
                return
    raise AssertionError("the segment has no floating-point parameter to alter")


# ---------------------------------------------------------------- recording and checking


def test_record_canary_rows_and_names(sequential: Exported) -> None:
    names = [unit.outputs[0] for unit in sequential.manifest.units]
    stored = canary.load_canary(sequential.canary_path, ["input", *names])
    assert stored["input"].shape[0] == canary.CANARY_ROWS
    for name in names:
        assert stored[name].shape[0] == canary.CANARY_ROWS


def test_load_canary_missing_name(sequential: Exported) -> None:
    with pytest.raises(KeyError, match="no-such-tensor"):
        canary.load_canary(sequential.canary_path, ["no-such-tensor"])


@pytest.mark.parametrize("bounds", [(0, 0), (1, 2), (0, 2)])
def test_check_canary_passes_unchanged(sequential: Exported, bounds: tuple[int, int]) -> None:
    first, last = bounds
    segment = Segment(sequential.manifest, first, last, sequential.blobs())
    inputs, outputs = _names(sequential.manifest, first, last)
    tensors = canary.load_canary(sequential.canary_path, inputs + outputs)
    result = canary.check_canary(segment.run, tensors, inputs, outputs)
    assert result.passed, result.describe()
    assert result.difference <= 1e-6


def test_check_canary_detects_altered_weight(sequential: Exported) -> None:
    segment = Segment(sequential.manifest, 0, 2, sequential.blobs())
    inputs, outputs = _names(sequential.manifest, 0, 2)
    tensors = canary.load_canary(sequential.canary_path, inputs + outputs)
    _alter_weight(segment)
    result = canary.check_canary(segment.run, tensors, inputs, outputs)
    assert not result.passed
    assert result.difference > canary.tolerance_for(torch.float32)
    assert result.worst_output == outputs[0]


@pytest.mark.parametrize("bounds", [(0, 1), (2, 2), (3, 4)])
def test_check_canary_branch_segments(branch: Exported, bounds: tuple[int, int]) -> None:
    first, last = bounds
    segment = Segment(branch.manifest, first, last, branch.blobs())
    inputs, outputs = _names(branch.manifest, first, last)
    tensors = canary.load_canary(branch.canary_path, inputs + outputs)
    assert canary.check_canary(segment.run, tensors, inputs, outputs).passed
    _alter_weight(segment)
    assert not canary.check_canary(segment.run, tensors, inputs, outputs).passed


def test_compare_outputs_float_tolerance() -> None:
    expected = {"y": torch.zeros(2, 3)}
    near = canary.compare_outputs(expected, {"y": torch.full((2, 3), 5e-5)})
    far = canary.compare_outputs(expected, {"y": torch.full((2, 3), 2e-4)})
    assert near.passed
    assert not far.passed
    assert far.difference == pytest.approx(2e-4, rel=1e-3)


def test_compare_outputs_integer_exact() -> None:
    expected = {"ids": torch.tensor([[1, 2], [3, 4]]), "y": torch.zeros(2)}
    changed = canary.compare_outputs(expected, {"ids": torch.tensor([[1, 2], [3, 5]]), "y": torch.full((2,), 1e-5)})
    assert not changed.passed
    assert changed.worst_output == "ids"
    assert math.isinf(changed.difference)
    assert canary.compare_outputs(expected, {"ids": expected["ids"].clone(), "y": torch.zeros(2)}).passed


def test_compare_outputs_shape_dtype_nan_missing() -> None:
    expected = {"y": torch.tensor([1.0, float("nan")])}
    assert canary.compare_outputs(expected, {"y": torch.tensor([1.0, float("nan")])}).passed
    assert not canary.compare_outputs(expected, {"y": torch.tensor([1.0, 2.0])}).passed
    assert not canary.compare_outputs(expected, {"y": torch.tensor([1.0, float("nan"), 0.0])}).passed
    assert not canary.compare_outputs(expected, {"y": torch.tensor([1.0, float("nan")], dtype=torch.float64)}).passed
    missing = canary.compare_outputs(expected, {})
    assert not missing.passed
    assert missing.worst_output == "y"


def test_export_job_returns_canary(tmp_path: Path) -> None:
    result = export_job.run("factory:toymodels:build_sequential", "seq", "v1", tmp_path, None, "layer", None)
    manifest = Manifest.from_json((tmp_path / "blobs" / result["manifest"]).read_bytes())
    path = tmp_path / "blobs" / result["canary"]
    assert path.exists()
    names = [unit.outputs[0] for unit in manifest.units]
    stored = canary.load_canary(path, names)
    assert set(stored) == set(names)
    assert json.loads(json.dumps(result))["canary"] == result["canary"]


# ---------------------------------------------------------------- the reload path in a SegmentHost


class _Links:
    """No peer is connected: blobs missing from the local store cannot be fetched."""

    def members(self) -> list[str]:
        return []

    def connected(self, peer: str, plane: str) -> bool:
        return False


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def member_report(self, peer: str) -> None:
        self.calls += 1

    def placement_changed(self) -> None:
        self.calls += 1


class _Agent:
    """The parts of an agent that SegmentHost reads, around a real store and blob transfer."""

    def __init__(self, root: Path, registry: dict) -> None:
        self.node_id = "n1"
        self.leader_id = "n1"
        self.config = AgentConfig.with_profile("test")
        self.store = BlobStore(root / "store", 1 << 30)
        self.links = _Links()
        self.blobs = BlobTransfer(node_id=self.node_id, store=self.store, links=self.links)
        self.role = _Counter()
        self.dataplane = _Counter()
        self.metrics = AgentMetrics("n1", collect_host=False)
        self._registry = registry

    def registry(self) -> dict:
        return self._registry

    def registry_view(self) -> dict:
        return self._registry


def _agent_with(exported: Exported, root: Path) -> tuple[_Agent, tuple[str, str, int, int]]:
    last = len(exported.manifest.units) - 1
    manifest_bytes = exported.manifest.to_json().encode()
    registry = registry_ops.add_version(registry_ops.empty_registry(), "seq", "v1",
                                        manifest="0" * 64, source="test", strategy="layer", replicas=1)
    agent = _Agent(root, registry)
    manifest_sha = agent.store.put(manifest_bytes).name
    for path in [*exported.blobs().values(), exported.canary_path]:
        agent.store.put(path.read_bytes(), expected_sha256=path.name)
    entry = registry["models"]["seq"]["versions"]["v1"]
    entry["manifest"] = manifest_sha
    entry["canary"] = exported.canary_sha
    placement = Placement("seq", "v1", 1, last + 1, (SegmentPlacement(0, 0, last, ("n1",)),), 0.0, 0.0, True)
    agent._registry = registry_ops.set_placement(registry, placement)
    return agent, ("seq", "v1", 0, last)


@contextlib.asynccontextmanager
async def _running(agent: _Agent):
    """Run a SegmentHost for ``agent`` and close it afterwards."""
    host = SegmentHost(agent)
    task = asyncio.get_running_loop().create_task(host.run())
    try:
        yield host
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await host.close()


async def _wait_for(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_segment_host_reloads_bad_segment(sequential: Exported, tmp_path: Path) -> None:
    agent, key = _agent_with(sequential, tmp_path)
    async with _running(agent) as host:
        await _wait_for(lambda: host.canaries.passes >= 1)
        first = host.get(*key)
        assert first is not None
        _alter_weight(first.segment)

        result = await host.canaries.run_once(key)
        assert result is not None
        assert not result.passed
        assert host.canaries.failures == 1
        assert host.get(*key) is not first

        await _wait_for(lambda: host.loads == 2 and host.canaries.passes >= 2)
        second = host.get(*key)
        assert second is not None
        assert second is not first
        assert host.status()["canary"]["failures"] == 1
        for sha in second.blobs:
            assert agent.store.has(sha)


async def test_segment_host_unloads_after_grace(sequential: Exported, tmp_path: Path, monkeypatch) -> None:
    from nodeagent import segments as segments_module

    agent, key = _agent_with(sequential, tmp_path)
    async with _running(agent) as host:
        await _wait_for(lambda: host.get(*key) is not None)
        loaded = host.get(*key)
        # A new plan moves the segment elsewhere: requests routed on the old plan still arrive for
        # a moment, so the segment stays loaded for the grace period.
        entry = agent._registry["models"]["seq"]["versions"]["v1"]
        entry["placement"]["segments"][0]["agents"] = ["n2"]
        host._reconcile()
        assert host.get(*key) is loaded
        clock = time.monotonic() + segments_module.UNLOAD_GRACE_S + 0.1
        monkeypatch.setattr(segments_module, "_now", lambda: clock)
        host._reconcile()
        assert host.get(*key) is None


async def test_segment_host_unloads_deleted_version_at_once(sequential: Exported, tmp_path: Path) -> None:
    agent, key = _agent_with(sequential, tmp_path)
    async with _running(agent) as host:
        await _wait_for(lambda: host.get(*key) is not None)
        agent._registry = registry_ops.empty_registry()
        host._reconcile()
        assert host.get(*key) is None


async def test_segment_host_deletes_corrupt_blob(sequential: Exported, tmp_path: Path) -> None:
    agent, key = _agent_with(sequential, tmp_path)
    async with _running(agent) as host:
        await _wait_for(lambda: host.canaries.passes >= 1)
        loaded = host.get(*key)
        assert loaded is not None
        damaged = loaded.blobs[0]
        path = agent.store.path(damaged)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        _alter_weight(loaded.segment)

        result = await host.canaries.run_once(key)
        assert result is not None
        assert not result.passed
        await _wait_for(lambda: not agent.store.has(damaged))
        # With no peer to fetch the deleted blob from, the segment stays unloaded and unreported.
        await asyncio.sleep(0.3)
        assert host.get(*key) is None
        assert all(tuple(item[:4]) != key for item in host.loaded_report())
        for sha in loaded.blobs[1:]:
            assert agent.store.has(sha)


# ---------------------------------------------------------------- automatic rollback


def _canary_registry(policy: dict | None) -> dict:
    registry = registry_ops.empty_registry()
    for version in ("v1", "v2"):
        registry = registry_ops.add_version(registry, "m", version, manifest="0" * 64,
                                            source="test", strategy="layer", replicas=1)
        registry = registry_ops.set_state(registry, "m", version, "ready")
    registry["models"]["m"]["versions"]["v2"]["canary_policy"] = policy
    return registry_ops.set_traffic(registry, "m", {"v1": 0.9, "v2": 0.1})


LIMITS = {"max_error_rate": 0.1, "max_p99_ms": 500.0, "min_requests": 10}


def test_policy_from_options_cases() -> None:
    assert canary.policy_from_options({"canary_weight": 0.2}) is None
    policy = canary.policy_from_options({"canary_max_error_rate": 0.2})
    assert policy is not None
    assert policy["max_error_rate"] == 0.2
    assert policy["min_requests"] >= 1
    with pytest.raises(ValueError, match="canary_max_p99_ms"):
        canary.policy_from_options({"canary_max_p99_ms": "fast"})
    with pytest.raises(ValueError, match="max_error_rate"):
        canary.policy_from_options({"canary_max_error_rate": 2})
    with pytest.raises(ValueError, match="canary_min_requests"):
        canary.policy_from_options({"canary_min_requests": 2.5})


def test_version_summary_from_metrics() -> None:
    registry = _canary_registry(LIMITS)
    metrics = AgentMetrics("n1", collect_host=False)
    now = time.monotonic()
    for index in range(8):
        metrics.observe_request("m", "v2", 0.010 * (index + 1), ok=index != 0, now=now)
    metrics.observe_request("m", "v1", 0.005, ok=True, now=now)
    summary = canary.version_summary(registry, lambda m, v: metrics.version_stats(m, v, now=now))
    assert summary["m"]["v2"][:2] == [8, 1]
    assert summary["m"]["v2"][2] == pytest.approx(80.0)
    assert summary["m"]["v1"] == [1, 0, 5.0]


def test_merge_summaries_sums_and_max_p99() -> None:
    merged = canary.merge_summaries([
        {"m": {"v2": [10, 1, 120.0]}},
        {"m": {"v2": [30, 2, 80.0]}},
        {"m": {"v2": [5, 9, 1.0]}},  # more errors than requests: skipped
        {"m": {"v2": "garbage"}},
        "not a mapping",
    ])
    stats = merged[("m", "v2")]
    assert stats.requests == 40
    assert stats.errors == 3
    assert stats.p99_s == pytest.approx(0.120)


def test_canary_versions_cases() -> None:
    assert canary.canary_versions(_canary_registry(LIMITS)["models"]["m"]) == ["v2"]
    assert canary.canary_versions(_canary_registry(None)["models"]["m"]) == []
    rolled = registry_ops.rollback(_canary_registry(LIMITS), "m")
    assert canary.canary_versions(rolled["models"]["m"]) == []


def test_rollback_decisions_error_rate() -> None:
    registry = _canary_registry(LIMITS)
    summaries = [{"m": {"v2": [20, 2, 50.0], "v1": [100, 0, 10.0]}}, {"m": {"v2": [20, 4, 60.0]}}]
    decisions = canary.rollback_decisions(registry, summaries, window_s=60.0, now=0.0)
    assert [(d.model, d.version) for d in decisions] == [("m", "v2")]
    assert "error rate" in decisions[0].decision.reason


def test_rollback_decisions_p99() -> None:
    registry = _canary_registry(LIMITS)
    decisions = canary.rollback_decisions(registry, [{"m": {"v2": [40, 0, 900.0]}}], window_s=60.0, now=0.0)
    assert len(decisions) == 1
    assert "p99" in decisions[0].decision.reason


def test_rollback_decisions_none_cases() -> None:
    bad = [{"m": {"v2": [40, 40, 900.0]}}]
    assert canary.rollback_decisions(_canary_registry(None), bad, window_s=60.0, now=0.0) == []
    too_few = [{"m": {"v2": [9, 9, 900.0]}}]
    assert canary.rollback_decisions(_canary_registry(LIMITS), too_few, window_s=60.0, now=0.0) == []
    healthy = [{"m": {"v2": [50, 1, 100.0]}}]
    assert canary.rollback_decisions(_canary_registry(LIMITS), healthy, window_s=60.0, now=0.0) == []
    rolled = registry_ops.rollback(_canary_registry(LIMITS), "m")
    assert canary.rollback_decisions(rolled, bad, window_s=60.0, now=0.0) == []


@pytest.mark.slow
def test_cluster_rolls_back_slow_canary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two agent processes: a canary whose p99 passes its limit loses its traffic on its own.

    The limit (0.001 ms) is one that every real request passes, so the rollback is certain once
    the canary has served ``canary_min_requests`` requests across both gateways.
    """
    from nodeagent.localcluster import LocalCluster

    # The agents' export jobs import the toy model factory from this directory.
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    cluster = LocalCluster(tmp_path, 2, mdns=False, static_peers=True)
    cluster.create()
    cluster.start()
    try:
        cluster.wait_formed(60)
        cluster.deploy("toy", "v1", "factory:toymodels:build_sequential", timeout_s=90)
        status, body = cluster.request(0, "POST", "/v1/models", {
            "name": "toy", "version": "v2", "source": "factory:toymodels:build_sequential",
            "strategy": "canary", "replicas": 1,
            "options": {"canary_weight": 0.5, "canary_max_p99_ms": 0.001, "canary_min_requests": 3}})
        assert status == 202, body
        deadline = time.monotonic() + 90
        while cluster.get(0, "/v1/models/toy")["weights"].get("v2", 0) <= 0:
            assert time.monotonic() < deadline, "the canary never received traffic"
            time.sleep(0.2)

        request = {"inputs": {"input": {"dtype": "float32", "shape": [2, 4], "data": [[0.5] * 4, [0.25] * 4]}}}
        weights = {}
        for sent in range(200):
            code, result = cluster.request(sent % 2, "POST", "/v1/models/toy/infer",
                                           {**request, "request_key": f"key-{sent}"})
            assert code == 200, result
            weights = cluster.get(0, "/v1/models/toy")["weights"]
            if weights.get("v2", 0) <= 0:
                break
            time.sleep(0.05)
        assert weights.get("v2", 0) <= 0, f"the canary kept its traffic: {weights}"
        assert weights.get("v1", 0) > 0

        # Each loaded segment of v1 and of v2 ran its numeric canary once after loading.
        checks = [cluster.get(index, "/v1/cluster")["segments"]["canary"] for index in range(2)]
        assert sum(check["passes"] for check in checks) >= 2
        assert [check["failures"] for check in checks] == [0, 0]
    finally:
        cluster.stop()
