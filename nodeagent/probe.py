"""Capability probe: what this machine can compute, measured rather than guessed.

Problem: the planner places model segments by capacity, so each agent must report its CPU,
memory and accelerators, plus a number that compares their speed. Datasheet numbers mislead
(thermal limits on small boards, shared cores in VMs, a torch build without the fast kernels), so
the score is measured: a short float32 matrix multiply per device, reported in GFLOP/s.

Rules:
- The probe does not raise when a device stack is missing or fails. Each part (CPU, memory, CUDA, MPS, XPU, benchmark) is guarded; a part
  that fails adds a note with the reason, and the agent carries on with what is left. A machine
  without a GPU library reports CPU only and says why (torch missing, a CPU-only torch build, no
  device visible to the driver).
- The benchmark is bounded in time (`budget_s` per device, 0.3 s by default, plus one warm-up
  multiply) and in memory (three square float32 matrices: 12 MiB at n=1024 on CPU, 192 MiB at
  n=4096 on a GPU).
- Scores are cached in `<data_dir>/probe/compute_scores.json` with the time they were measured,
  the torch version, the device model and the CPU thread count. A cached score is reused while
  all of those match and it is younger than `max_age_s` (seven days by default); otherwise it is
  measured again. The agent therefore starts in milliseconds after the first run.

Link bandwidth and round-trip time need a peer link, so they are measured on the link itself;
`estimate_bandwidth` here turns the (bytes, seconds) samples of such a measurement into numbers.

Memory figures come from /proc/meminfo and the cgroup v2 limit, because psutil is not a
dependency. On systems without /proc (macOS) memory is reported as unknown with a note.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from nodeagent.atomicfile import atomic_write_json

logger = logging.getLogger(__name__)

__all__ = [
    "BandwidthEstimate", "Capabilities", "CpuInfo", "DeviceInfo", "MemoryInfo",
    "estimate_bandwidth", "probe", "probe_capabilities_dict", "read_cpu_info",
    "read_memory_info",
]

CACHE_RELATIVE_PATH = Path("probe") / "compute_scores.json"
CACHE_FORMAT_VERSION = 1
DEFAULT_MAX_AGE_S = 7 * 24 * 3600.0
DEFAULT_BUDGET_S = 0.3

# Matrix sizes: large enough that one multiply takes milliseconds (so timer resolution and call
# overhead are small), small enough to fit on a Raspberry Pi class board and a small GPU.
CPU_MATRIX_SIZE = 1024
ACCELERATOR_MATRIX_SIZE = 4096
MAX_BENCH_ITERATIONS = 10_000


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU."""

    model: str
    architecture: str
    logical_cores: int
    physical_cores: int | None
    """Distinct (package, core) pairs in /proc/cpuinfo; None where the file does not list them."""
    usable_cores: float
    """Cores this process may use: the affinity mask, lowered by a cgroup v2 cpu.max quota."""


@dataclass(frozen=True)
class MemoryInfo:
    """Host memory in bytes; None where it could not be read."""

    total_bytes: int | None
    available_bytes: int | None
    cgroup_limit_bytes: int | None
    """memory.max of this process's cgroup (v2), or None when unlimited or unknown."""


@dataclass(frozen=True)
class DeviceInfo:
    """One torch device and its measured speed."""

    name: str
    """torch device string: cpu, cuda:0, mps, xpu:0."""
    kind: str
    """cpu, cuda, mps or xpu."""
    model: str
    memory_bytes: int | None
    """Total device memory (for the CPU and MPS, host memory)."""
    free_memory_bytes: int | None
    compute_capability: str | None
    """CUDA compute capability as "major.minor"; None for other kinds."""
    gflops: float | None
    """Measured float32 matrix-multiply throughput; None when not measured."""
    score_measured_at: float | None
    """Unix time of the measurement behind `gflops`."""
    score_source: str
    """measured, cache, skipped or failed."""


@dataclass(frozen=True)
class Capabilities:
    """Everything the probe found, for the planner, status output and mDNS."""

    cpu: CpuInfo
    memory: MemoryInfo
    devices: tuple[DeviceInfo, ...]
    torch_version: str | None
    torch_threads: int | None
    notes: tuple[str, ...] = ()
    """Reasons for missing or unmeasured parts, one sentence each."""
    probed_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dict."""
        data = dataclasses.asdict(self)
        data["devices"] = [dataclasses.asdict(device) for device in self.devices]
        data["notes"] = list(self.notes)
        return data

    @property
    def total_gflops(self) -> float:
        """Sum of the measured scores of all devices (0 when none was measured)."""
        return sum(device.gflops or 0.0 for device in self.devices)

    def summary(self) -> str:
        """Return a short line for an mDNS TXT record, such as `cpu:8c/31G/95gf cuda:0/80G/9.0/...`.

        Memory is in GiB, rounded down; scores are rounded GFLOP/s. The full record travels over
        the peer link, so this only helps an operator browsing with avahi-browse.
        """
        parts: list[str] = []
        for device in self.devices:
            text = device.name
            if device.kind == "cpu":
                text += f":{self.cpu.logical_cores}c"
            if device.memory_bytes:
                text += f"/{device.memory_bytes >> 30}G"
            if device.compute_capability:
                text += f"/{device.compute_capability}"
            if device.gflops is not None:
                text += f"/{device.gflops:.0f}gf"
            parts.append(text)
        return " ".join(parts)


# -- host CPU and memory -----------------------------------------------------------------------


def read_cpu_info(proc_root: Path = Path("/proc"),
                  cgroup_root: Path = Path("/sys/fs/cgroup")) -> CpuInfo:
    """Read the CPU model and core counts from /proc/cpuinfo, the affinity mask and cgroup v2."""
    model = ""
    packages_cores: set[tuple[str, str]] = set()
    try:
        text = (proc_root / "cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    physical_id = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        # x86 writes "model name"; ARM boards write "Model" (Raspberry Pi) or "Hardware".
        if key in ("model name", "Model", "Hardware", "cpu model") and not model:
            model = value
        elif key == "physical id":
            physical_id = value
        elif key == "core id":
            packages_cores.add((physical_id, value))
    model = model or platform.processor() or platform.machine() or "unknown"

    logical = os.cpu_count() or 1
    try:
        usable: float = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        usable = float(logical)
    quota = _read_cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        usable = min(usable, quota)

    return CpuInfo(model=model, architecture=platform.machine() or "unknown",
                   logical_cores=logical, physical_cores=len(packages_cores) or None,
                   usable_cores=usable)


def _own_cgroup_dir(cgroup_root: Path) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # cgroup v2 has the single line "0::/path".
        if line.startswith("0::"):
            return cgroup_root / line[3:].lstrip("/")
    return None


def _read_cgroup_cpu_quota(cgroup_root: Path) -> float | None:
    directory = _own_cgroup_dir(cgroup_root)
    if directory is None:
        return None
    try:
        quota_text, period_text = (directory / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota_text == "max":
        return None
    try:
        return int(quota_text) / int(period_text)
    except (ValueError, ZeroDivisionError):
        return None


def read_memory_info(proc_root: Path = Path("/proc"),
                     cgroup_root: Path = Path("/sys/fs/cgroup")) -> MemoryInfo:
    """Read MemTotal and MemAvailable from /proc/meminfo and the cgroup v2 memory.max."""
    values: dict[str, int] = {}
    try:
        for line in (proc_root / "meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields and fields[0].isdigit():
                # /proc/meminfo writes "kB" but means KiB.
                scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
                values[key.strip()] = int(fields[0]) * scale
    except OSError:
        pass

    limit: int | None = None
    directory = _own_cgroup_dir(cgroup_root)
    if directory is not None:
        try:
            text = (directory / "memory.max").read_text().strip()
            limit = int(text) if text != "max" else None
        except (OSError, ValueError):
            limit = None

    return MemoryInfo(total_bytes=values.get("MemTotal"),
                      available_bytes=values.get("MemAvailable"), cgroup_limit_bytes=limit)


# -- torch devices -----------------------------------------------------------------------------


@dataclass
class _DeviceDraft:
    name: str
    kind: str
    model: str
    memory_bytes: int | None
    free_memory_bytes: int | None = None
    compute_capability: str | None = None


def _import_torch() -> ModuleType:
    import torch

    return torch


def _list_cuda(torch: ModuleType, notes: list[str]) -> list[_DeviceDraft]:
    cuda = torch.cuda
    if not cuda.is_available():
        if getattr(torch.version, "cuda", None) is None and getattr(torch.version, "hip", None) \
                is None:
            notes.append(f"no CUDA: this torch build ({torch.__version__}) has no CUDA or ROCm "
                         "support; install a CUDA build of torch to use NVIDIA GPUs")
        else:
            notes.append(f"no CUDA: torch {torch.__version__} has CUDA support but no device is "
                         "visible (no GPU, driver not loaded, or CUDA_VISIBLE_DEVICES empty)")
        return []

    drafts: list[_DeviceDraft] = []
    for index in range(cuda.device_count()):
        props = cuda.get_device_properties(index)
        free: int | None = None
        try:
            free, _total = cuda.mem_get_info(index)
        except (RuntimeError, AttributeError) as exc:
            notes.append(f"cuda:{index}: free memory unknown ({exc})")
        drafts.append(_DeviceDraft(
            name=f"cuda:{index}", kind="cuda", model=str(props.name),
            memory_bytes=int(props.total_memory), free_memory_bytes=free,
            compute_capability=f"{props.major}.{props.minor}"))
    return drafts


def _list_mps(torch: ModuleType, memory: MemoryInfo, notes: list[str]) -> list[_DeviceDraft]:
    backend = getattr(getattr(torch, "backends", None), "mps", None)
    if backend is None or not backend.is_available():
        return []
    total = memory.total_bytes
    mps = getattr(torch, "mps", None)
    if mps is not None and hasattr(mps, "recommended_max_memory"):
        try:
            total = int(mps.recommended_max_memory())
        except RuntimeError as exc:
            notes.append(f"mps: recommended memory unknown ({exc})")
    return [_DeviceDraft(name="mps", kind="mps", model="Apple MPS", memory_bytes=total)]


def _list_xpu(torch: ModuleType, notes: list[str]) -> list[_DeviceDraft]:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return []
    drafts: list[_DeviceDraft] = []
    for index in range(xpu.device_count()):
        props = xpu.get_device_properties(index)
        drafts.append(_DeviceDraft(name=f"xpu:{index}", kind="xpu", model=str(props.name),
                                   memory_bytes=int(getattr(props, "total_memory", 0)) or None))
    return drafts


# -- benchmark ---------------------------------------------------------------------------------


def _synchronize(torch: ModuleType, kind: str) -> None:
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()
    elif kind == "xpu":
        torch.xpu.synchronize()


def measure_gflops(torch: ModuleType, device: str, kind: str, *, budget_s: float,
                   matrix_size: int | None = None,
                   clock: Callable[[], float] = time.perf_counter) -> float:
    """Measure float32 matrix-multiply throughput on `device` in GFLOP/s within about `budget_s`.

    One warm-up multiply runs first (it includes kernel selection and allocation); then multiplies
    repeat until `budget_s` has passed or MAX_BENCH_ITERATIONS ran. Each n x n multiply counts as
    2 n^3 floating-point operations.
    """
    # NOTE: only the CPU path has run; the CUDA, MPS and XPU paths (synchronize, 4096 matrices)
    # were tested only against a fake torch.cuda, because no GPU was available.
    size = matrix_size or (CPU_MATRIX_SIZE if kind == "cpu" else ACCELERATOR_MATRIX_SIZE)
    generator = torch.Generator(device="cpu").manual_seed(0)
    a = torch.rand((size, size), generator=generator, dtype=torch.float32).to(device)
    b = torch.rand((size, size), generator=generator, dtype=torch.float32).to(device)
    out = torch.empty((size, size), dtype=torch.float32, device=device)

    with torch.inference_mode():
        torch.matmul(a, b, out=out)
        _synchronize(torch, kind)
        iterations = 0
        started = clock()
        elapsed = 0.0
        while iterations < MAX_BENCH_ITERATIONS:
            torch.matmul(a, b, out=out)
            iterations += 1
            if iterations % 4 == 0 or kind == "cpu":
                _synchronize(torch, kind)
                elapsed = clock() - started
                if elapsed >= budget_s:
                    break
        _synchronize(torch, kind)
        elapsed = clock() - started
    return 2.0 * size ** 3 * iterations / max(elapsed, 1e-9) / 1e9


# -- cache -------------------------------------------------------------------------------------


def _cache_key(draft: _DeviceDraft, torch_version: str, threads: int) -> dict[str, Any]:
    return {"device": draft.name, "model": draft.model, "torch_version": torch_version,
            "torch_threads": threads if draft.kind == "cpu" else None}


def _load_cache(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        logger.warning("probe cache %s is unreadable (%s); scores are measured again", path, exc)
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT_VERSION \
            or not isinstance(data.get("entries"), list):
        logger.warning("probe cache %s has an unknown format; scores are measured again", path)
        return []
    return [entry for entry in data["entries"] if isinstance(entry, dict)]


def _find_cached(entries: list[dict[str, Any]], key: dict[str, Any], now: float,
                 max_age_s: float) -> dict[str, Any] | None:
    for entry in entries:
        if all(entry.get(name) == value for name, value in key.items()):
            measured_at = entry.get("measured_at")
            gflops = entry.get("gflops")
            if not isinstance(measured_at, (int, float)) or not isinstance(gflops, (int, float)):
                continue
            if 0 <= now - measured_at <= max_age_s:
                return entry
    return None


# -- entry point -------------------------------------------------------------------------------


def probe(data_dir: Path | None = None, *, devices: Sequence[str] = (), benchmark: bool = True,
          budget_s: float = DEFAULT_BUDGET_S, max_age_s: float = DEFAULT_MAX_AGE_S,
          torch_module: ModuleType | None = None, torch_threads: int | None = None,
          wall_clock: Callable[[], float] = time.time) -> Capabilities:
    """Probe the host and its torch devices, recording failures as notes instead of raising.

    `devices` restricts the result to the named torch devices (empty keeps every one found).
    `torch_threads` is the intra-op thread count the segment workers will use. The CPU score is
    measured with it, because it is the speed the planner must predict (None: torch's current
    count).
    `data_dir=None` disables the score cache. `torch_module` replaces `import torch` (tests
    with a fake CUDA module, because no GPU exists on the test machine).
    """
    notes: list[str] = []
    cpu = _guarded(lambda: read_cpu_info(), notes, "cpu",
                   CpuInfo("unknown", platform.machine() or "unknown", os.cpu_count() or 1,
                           None, float(os.cpu_count() or 1)))
    memory = _guarded(lambda: read_memory_info(), notes, "memory", MemoryInfo(None, None, None))
    if memory.total_bytes is None:
        notes.append("memory: /proc/meminfo is not readable; total and available memory unknown")

    torch: ModuleType | None = torch_module
    if torch is None:
        try:
            torch = _import_torch()
        except ImportError as exc:
            notes.append(f"no torch: {exc}; only the CPU is reported and no score is measured")

    drafts = [_DeviceDraft(name="cpu", kind="cpu", model=cpu.model,
                           memory_bytes=memory.total_bytes,
                           free_memory_bytes=memory.available_bytes)]
    torch_version: str | None = None
    threads: int | None = None
    if torch is not None:
        torch_version = str(torch.__version__)
        threads = _guarded(lambda: int(torch.get_num_threads()), notes, "torch threads", None)
        if torch_threads is not None:
            threads = torch_threads
        drafts += _guarded(lambda: _list_cuda(torch, notes), notes, "cuda", [])
        drafts += _guarded(lambda: _list_mps(torch, memory, notes), notes, "mps", [])
        drafts += _guarded(lambda: _list_xpu(torch, notes), notes, "xpu", [])

    if devices:
        wanted = set(devices)
        missing = wanted - {draft.name for draft in drafts}
        for name in sorted(missing):
            notes.append(f"{name}: configured in runtime.devices but not found by the probe")
        drafts = [draft for draft in drafts if draft.name in wanted]

    previous_threads = torch.get_num_threads() if torch is not None and torch_threads is not None else None
    if previous_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        results = _score_devices(drafts, torch, torch_version, threads or 1, data_dir, benchmark,
                                 budget_s, max_age_s, wall_clock, notes)
    finally:
        if previous_threads is not None:
            torch.set_num_threads(previous_threads)
    capabilities = Capabilities(cpu=cpu, memory=memory, devices=tuple(results),
                                torch_version=torch_version, torch_threads=threads,
                                notes=tuple(notes), probed_at=wall_clock())
    logger.info("capability probe: %s%s", capabilities.summary(),
                f" ({'; '.join(notes)})" if notes else "")
    return capabilities


def probe_capabilities_dict(data_dir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run `probe` and return `Capabilities.to_dict()` plus its `summary` and `total_gflops`."""
    capabilities = probe(data_dir, **kwargs)
    return capabilities.to_dict() | {"summary": capabilities.summary(),
                                     "total_gflops": capabilities.total_gflops}


def _score_devices(drafts: list[_DeviceDraft], torch: ModuleType | None,
                   torch_version: str | None, threads: int, data_dir: Path | None,
                   benchmark: bool, budget_s: float, max_age_s: float,
                   wall_clock: Callable[[], float], notes: list[str]) -> list[DeviceInfo]:
    cache_path = data_dir / CACHE_RELATIVE_PATH if data_dir is not None else None
    entries = _load_cache(cache_path) if cache_path is not None else []
    changed = False
    results: list[DeviceInfo] = []

    for draft in drafts:
        gflops: float | None = None
        measured_at: float | None = None
        source = "skipped"
        if torch is not None and torch_version is not None and benchmark:
            key = _cache_key(draft, torch_version, threads)
            cached = _find_cached(entries, key, wall_clock(), max_age_s)
            if cached is not None:
                gflops, measured_at, source = float(cached["gflops"]), \
                    float(cached["measured_at"]), "cache"
            else:
                try:
                    gflops = measure_gflops(torch, draft.name, draft.kind, budget_s=budget_s)
                    measured_at, source = wall_clock(), "measured"
                    # Replace the stale entry of this device, whatever version measured it.
                    entries = [entry for entry in entries
                               if (entry.get("device"), entry.get("model"))
                               != (draft.name, draft.model)]
                    entries.append({**key, "gflops": gflops, "measured_at": measured_at})
                    changed = True
                    logger.info("probe: %s (%s) measured at %.1f GFLOP/s", draft.name,
                                draft.model, gflops)
                except Exception as exc:  # a GPU stack can raise anything; the probe must not
                    source = "failed"
                    notes.append(f"{draft.name}: benchmark failed ({type(exc).__name__}: {exc})")
                    logger.warning("probe: benchmark on %s failed", draft.name, exc_info=exc)
        results.append(DeviceInfo(
            name=draft.name, kind=draft.kind, model=draft.model,
            memory_bytes=draft.memory_bytes, free_memory_bytes=draft.free_memory_bytes,
            compute_capability=draft.compute_capability, gflops=gflops,
            score_measured_at=measured_at, score_source=source))

    if changed and cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cache_path, {"format": CACHE_FORMAT_VERSION, "entries": entries},
                              mode=0o644)
        except OSError as exc:
            notes.append(f"probe cache not saved to {cache_path}: {exc.strerror}")
            logger.warning("probe: cannot save score cache %s: %s", cache_path, exc)
    return results


def _guarded(action: Callable[[], Any], notes: list[str], part: str, fallback: Any) -> Any:
    """Run one probe step; on any error, note it and return `fallback`."""
    try:
        return action()
    except Exception as exc:  # third-party device stacks raise arbitrary types; never crash
        notes.append(f"{part}: probe failed ({type(exc).__name__}: {exc})")
        logger.warning("probe: %s failed", part, exc_info=exc)
        return fallback


# -- link bandwidth ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BandwidthEstimate:
    """Link speed derived from transfer samples."""

    bytes_per_s: float
    latency_s: float
    """Fixed cost per transfer (about one round trip), from the fit's intercept; 0 if unknown."""
    samples: int


def estimate_bandwidth(samples: Sequence[tuple[int, float]]) -> BandwidthEstimate:
    """Fit `seconds = latency + bytes / bandwidth` to (bytes, seconds) transfer samples.

    With samples of at least two distinct sizes, a least-squares line gives both the bandwidth
    (inverse slope) and the per-transfer latency (intercept, clamped at 0). With one size only,
    the latency cannot be separated and the bandwidth is total bytes over total seconds. Raises
    ValueError for no samples or for a sample with non-positive bytes or seconds.
    """
    if not samples:
        raise ValueError("estimate_bandwidth needs at least one (bytes, seconds) sample")
    for size, seconds in samples:
        if size <= 0 or seconds <= 0:
            raise ValueError(f"sample ({size} bytes, {seconds} s) is invalid: both must be > 0")

    count = len(samples)
    sizes = [float(size) for size, _ in samples]
    times = [float(seconds) for _, seconds in samples]
    mean_size = sum(sizes) / count
    mean_time = sum(times) / count
    spread = sum((size - mean_size) ** 2 for size in sizes)
    if spread > 0:
        slope = sum((size - mean_size) * (t - mean_time)
                    for size, t in zip(sizes, times)) / spread
        if slope > 0:
            intercept = max(0.0, mean_time - slope * mean_size)
            return BandwidthEstimate(bytes_per_s=1.0 / slope, latency_s=intercept, samples=count)
    # One size, or noise so large that bigger transfers were not slower: no usable slope.
    return BandwidthEstimate(bytes_per_s=sum(sizes) / sum(times), latency_s=0.0, samples=count)
