"""Tests of the capability probe, its score cache, the bandwidth fit and atomic file writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from nodeagent import probe as probe_module
from nodeagent.atomicfile import atomic_write_bytes, atomic_write_json
from nodeagent.probe import (
    CACHE_RELATIVE_PATH,
    Capabilities,
    estimate_bandwidth,
    probe,
    probe_capabilities_dict,
    read_cpu_info,
    read_memory_info,
)

BUDGET_S = 0.05


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_probe_reports_this_cpu(tmp_path: Path) -> None:
    capabilities = probe(tmp_path, budget_s=BUDGET_S)
    assert capabilities.cpu.logical_cores == os.cpu_count()
    assert 0 < capabilities.cpu.usable_cores <= capabilities.cpu.logical_cores
    assert capabilities.cpu.model not in ("", "unknown")
    assert capabilities.memory.total_bytes is not None
    assert capabilities.memory.available_bytes is not None
    assert 0 < capabilities.memory.available_bytes <= capabilities.memory.total_bytes
    assert capabilities.torch_version == torch.__version__
    assert capabilities.torch_threads == 1

    cpu = capabilities.devices[0]
    assert cpu.name == "cpu"
    assert cpu.score_source == "measured"
    assert cpu.gflops is not None and cpu.gflops > 0.1
    assert cpu.score_measured_at is not None


def test_probe_memory_matches_proc_meminfo() -> None:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) * 1024
    memory = read_memory_info()
    assert memory.total_bytes == fields["MemTotal"]
    # MemAvailable moves between the two reads; allow 256 MiB of drift.
    assert abs((memory.available_bytes or 0) - fields["MemAvailable"]) < 256 * 2**20


def test_probe_caches_score(tmp_path: Path) -> None:
    first = probe(tmp_path, budget_s=BUDGET_S)
    cache = json.loads((tmp_path / CACHE_RELATIVE_PATH).read_text())
    entry = cache["entries"][0]
    assert entry["device"] == "cpu"
    assert entry["torch_version"] == torch.__version__
    assert entry["torch_threads"] == 1
    assert entry["gflops"] == first.devices[0].gflops
    assert entry["measured_at"] == first.devices[0].score_measured_at

    second = probe(tmp_path, budget_s=BUDGET_S)
    assert second.devices[0].score_source == "cache"
    assert second.devices[0].gflops == first.devices[0].gflops
    assert second.devices[0].score_measured_at == first.devices[0].score_measured_at


def test_probe_remeasures_stale_score(tmp_path: Path) -> None:
    first = probe(tmp_path, budget_s=BUDGET_S)
    measured_at = first.devices[0].score_measured_at
    assert measured_at is not None
    later = probe(tmp_path, budget_s=BUDGET_S, max_age_s=60.0,
                  wall_clock=lambda: measured_at + 61.0)
    assert later.devices[0].score_source == "measured"
    assert later.devices[0].score_measured_at == measured_at + 61.0
    cache = json.loads((tmp_path / CACHE_RELATIVE_PATH).read_text())
    assert len(cache["entries"]) == 1


def test_probe_remeasures_after_torch_upgrade(tmp_path: Path) -> None:
    probe(tmp_path, budget_s=BUDGET_S)
    cache_path = tmp_path / CACHE_RELATIVE_PATH
    cache = json.loads(cache_path.read_text())
    cache["entries"][0]["torch_version"] = "1.0.0"
    cache_path.write_text(json.dumps(cache))
    again = probe(tmp_path, budget_s=BUDGET_S)
    assert again.devices[0].score_source == "measured"


def test_probe_remeasures_after_thread_change(tmp_path: Path) -> None:
    probe(tmp_path, budget_s=BUDGET_S)
    torch.set_num_threads(2)
    try:
        again = probe(tmp_path, budget_s=BUDGET_S)
    finally:
        torch.set_num_threads(1)
    assert again.devices[0].score_source == "measured"


def test_probe_scores_with_worker_thread_count(tmp_path: Path) -> None:
    """The score is measured with the workers' thread count, and torch's count is restored."""
    torch.set_num_threads(2)
    try:
        capabilities = probe(tmp_path, budget_s=BUDGET_S, torch_threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert capabilities.torch_threads == 1
    # The cache entry was written for one thread: a probe at one thread reuses it.
    again = probe(tmp_path, budget_s=BUDGET_S)
    assert again.devices[0].score_source == "cache"


def test_probe_survives_corrupt_cache(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_path = tmp_path / CACHE_RELATIVE_PATH
    cache_path.parent.mkdir(parents=True)
    cache_path.write_text("{not json")
    capabilities = probe(tmp_path, budget_s=BUDGET_S)
    assert capabilities.devices[0].score_source == "measured"
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert json.loads(cache_path.read_text())["format"] == 1


def test_probe_without_cache_dir_or_benchmark() -> None:
    capabilities = probe(None, benchmark=False)
    assert capabilities.devices[0].score_source == "skipped"
    assert capabilities.devices[0].gflops is None
    assert capabilities.total_gflops == 0.0


def test_probe_names_missing_cuda() -> None:
    # The torch installed here is a CPU-only build, so the real CUDA check runs and fails.
    capabilities = probe(None, benchmark=False)
    assert [device.kind for device in capabilities.devices] == ["cpu"]
    notes = " ".join(capabilities.notes)
    assert "no CUDA" in notes
    assert torch.__version__ in notes


def test_probe_reports_missing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mock: torch is installed in this environment, so its absence is simulated at the import.
    def missing_torch() -> Any:
        raise ImportError("No module named 'torch'")

    monkeypatch.setattr(probe_module, "_import_torch", missing_torch)
    capabilities = probe(None)
    assert [device.name for device in capabilities.devices] == ["cpu"]
    assert capabilities.devices[0].score_source == "skipped"
    assert capabilities.torch_version is None
    assert any("no torch" in note for note in capabilities.notes)


class _FakeTorch:
    """Real torch with a fake `cuda` module. A mock, because no GPU exists on this machine."""

    def __init__(self, cuda: Any) -> None:
        self.cuda = cuda
        self.version = SimpleNamespace(cuda="12.4", hip=None)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _fake_cuda(device_count: int = 2, fail_properties: bool = False) -> SimpleNamespace:
    def get_device_properties(index: int) -> SimpleNamespace:
        if fail_properties:
            raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
        return SimpleNamespace(name=f"NVIDIA H100 #{index}", total_memory=80 * 2**30,
                               major=9, minor=0)

    return SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: device_count,
        get_device_properties=get_device_properties,
        mem_get_info=lambda index: (70 * 2**30, 80 * 2**30),
        synchronize=lambda: None,
    )


def test_probe_lists_fake_cuda_devices() -> None:
    # Mock of torch.cuda: no GPU exists on the test machine, so the CUDA listing runs against a
    # fake module. The benchmark then fails on the real CPU-only torch, which the probe must
    # report instead of raising.
    fake = _FakeTorch(_fake_cuda(device_count=2))
    capabilities = probe(None, budget_s=BUDGET_S, torch_module=fake)  # type: ignore[arg-type]
    names = [device.name for device in capabilities.devices]
    assert names == ["cpu", "cuda:0", "cuda:1"]
    gpu = capabilities.devices[1]
    assert gpu.model == "NVIDIA H100 #0"
    assert gpu.memory_bytes == 80 * 2**30
    assert gpu.free_memory_bytes == 70 * 2**30
    assert gpu.compute_capability == "9.0"
    assert gpu.score_source == "failed"
    assert gpu.gflops is None
    assert any(note.startswith("cuda:0: benchmark failed") for note in capabilities.notes)
    assert capabilities.devices[0].score_source == "measured"
    assert "cuda:0/80G/9.0" in capabilities.summary()


def test_probe_survives_broken_cuda_driver() -> None:
    # Mock of torch.cuda (no GPU here): a driver error while listing devices.
    fake = _FakeTorch(_fake_cuda(fail_properties=True))
    capabilities = probe(None, benchmark=False, torch_module=fake)  # type: ignore[arg-type]
    assert [device.name for device in capabilities.devices] == ["cpu"]
    assert any("cuda: probe failed (RuntimeError: CUDA driver version" in note
               for note in capabilities.notes)


def test_probe_device_filter_notes_missing_device() -> None:
    capabilities = probe(None, benchmark=False, devices=("cpu", "cuda:3"))
    assert [device.name for device in capabilities.devices] == ["cpu"]
    assert "cuda:3: configured in runtime.devices but not found by the probe" in \
        capabilities.notes


def test_probe_to_dict_and_summary(tmp_path: Path) -> None:
    capabilities = probe(tmp_path, budget_s=BUDGET_S)
    data = json.loads(json.dumps(capabilities.to_dict()))
    assert data["devices"][0]["name"] == "cpu"
    assert data["cpu"]["logical_cores"] == os.cpu_count()
    summary = capabilities.summary()
    assert summary.startswith(f"cpu:{os.cpu_count()}c/")
    assert summary.endswith("gf")
    assert len(summary.encode()) < 250
    assert isinstance(capabilities, Capabilities)

    flat = probe_capabilities_dict(tmp_path, budget_s=BUDGET_S)
    assert flat["summary"] == summary
    assert flat["total_gflops"] == capabilities.total_gflops


RASPBERRY_PI_CPUINFO = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41

processor\t: 1
BogoMIPS\t: 108.00

Hardware\t: BCM2835
Revision\t: c03114
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def test_read_cpu_info_raspberry_pi_format(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(RASPBERRY_PI_CPUINFO)
    (tmp_path / "meminfo").write_text("MemTotal:        3884376 kB\nMemFree: 100 kB\n")
    cpu = read_cpu_info(proc_root=tmp_path)
    # "Hardware" comes before "Model" in this file, and either names the board.
    assert cpu.model == "BCM2835"
    assert cpu.physical_cores is None
    memory = read_memory_info(proc_root=tmp_path)
    assert memory.total_bytes == 3884376 * 1024
    assert memory.available_bytes is None


# -- bandwidth ---------------------------------------------------------------------------------


def test_estimate_bandwidth_separates_latency() -> None:
    # 100 MB/s with a fixed 2 ms per transfer.
    samples = [(size, 0.002 + size / 100e6) for size in (64 * 1024, 1 << 20, 4 << 20)]
    estimate = estimate_bandwidth(samples)
    assert estimate.bytes_per_s == pytest.approx(100e6)
    assert estimate.latency_s == pytest.approx(0.002)
    assert estimate.samples == 3


def test_estimate_bandwidth_single_size() -> None:
    estimate = estimate_bandwidth([(1000, 0.5), (1000, 1.5)])
    assert estimate.bytes_per_s == pytest.approx(1000.0)
    assert estimate.latency_s == 0.0


def test_estimate_bandwidth_rejects_bad_samples() -> None:
    with pytest.raises(ValueError):
        estimate_bandwidth([])
    with pytest.raises(ValueError) as caught:
        estimate_bandwidth([(100, 0.0)])
    assert "(100 bytes, 0.0 s)" in str(caught.value)


# -- atomic writes -----------------------------------------------------------------------------


def test_atomic_write_replaces_file_privately(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    atomic_write_json(target, {"term": 3})
    assert json.loads(target.read_text()) == {"term": 3}
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]

    atomic_write_json(target, {"term": 4}, mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_write_failure_keeps_old_content(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
