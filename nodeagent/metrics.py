"""Prometheus metrics of one agent, and the recent-request windows the gateway reports.

Each agent owns an `AgentMetrics` with its own `CollectorRegistry`. The module-level default
registry is not used, because tests and the demo run several agents in one process and the same
metric name would be registered twice.

Label sets are kept small on purpose: model, version and segment ids come from the cluster's own
registry (never from request text that failed validation), and peers are node ids. A request for
an unknown model is not recorded, so a client cannot grow the label space by guessing names.

Host figures come from /proc (Linux only; elsewhere they are simply absent). GPU figures come from
nvidia-ml-py (`pynvml`) when it is importable and finds a device; otherwise the gauge
`shardmesh_gpu_metrics_available` is 0 and no GPU series exist.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nodeagent.traffic import LatencyWindow, WindowStats

logger = logging.getLogger(__name__)

# Request latency buckets in seconds: from a small model on one CPU (a few ms) to a large model
# split over slow links (tens of seconds).
LATENCY_BUCKETS_S = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Heartbeat round trips: loopback is ~0.1 ms, a LAN ~1 ms, a WAN tens of ms.
RTT_BUCKETS_S = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Micro-batch sizes: powers of two up to twice the default maximum of 8, then coarse steps.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Length of the window behind the gateway's request rate and percentiles on the status page.
GATEWAY_WINDOW_S = 60.0


class HostCollector(Collector):
    """Host CPU utilization and memory from /proc, computed at scrape time.

    CPU utilization is the busy fraction of all CPUs since the previous scrape (the first scrape
    reports the average since boot).
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._last_cpu: tuple[int, int] | None = None

    def _read_cpu(self) -> tuple[int, int] | None:
        try:
            with open(os.path.join(self._proc, "stat"), encoding="ascii") as f:
                fields = f.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        ticks = [int(x) for x in fields[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return sum(ticks), idle

    def _read_meminfo(self) -> dict[str, int]:
        values: dict[str, int] = {}
        try:
            with open(os.path.join(self._proc, "meminfo"), encoding="ascii") as f:
                for line in f:
                    key, _, rest = line.partition(":")
                    parts = rest.split()
                    if parts and parts[0].isdigit():
                        values[key] = int(parts[0]) * 1024  # the file states kB (KiB)
        except OSError:
            pass
        return values

    def collect(self) -> Iterable[Metric]:
        cpu = self._read_cpu()
        if cpu is not None:
            with self._lock:
                last = self._last_cpu
                self._last_cpu = cpu
            total, idle = cpu
            if last is not None and total > last[0]:
                busy = 1.0 - (idle - last[1]) / (total - last[0])
            else:
                busy = 1.0 - idle / total if total else 0.0
            yield GaugeMetricFamily(
                "shardmesh_host_cpu_utilization",
                "Busy fraction of all host CPUs since the previous scrape (0 to 1).",
                value=max(0.0, min(1.0, busy)),
            )

        mem = self._read_meminfo()
        if "MemTotal" in mem:
            yield GaugeMetricFamily(
                "shardmesh_host_memory_total_bytes", "Host memory.", value=mem["MemTotal"]
            )
        if "MemAvailable" in mem:
            yield GaugeMetricFamily(
                "shardmesh_host_memory_available_bytes",
                "Host memory available to new processes (MemAvailable).",
                value=mem["MemAvailable"],
            )
        yield GaugeMetricFamily(
            "shardmesh_host_cpu_count", "Logical CPUs on the host.", value=os.cpu_count() or 0
        )


class GpuCollector(Collector):
    """GPU utilization and memory per device through nvidia-ml-py, when available."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            self._nvml = pynvml
        except Exception as exc:  # ImportError, or NVMLError when no driver or device exists
            logger.info("GPU metrics absent: nvidia-ml-py unavailable or no device (%s)", exc)

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def collect(self) -> Iterable[Metric]:
        available = GaugeMetricFamily(
            "shardmesh_gpu_metrics_available",
            "1 when GPU metrics are read through nvidia-ml-py, 0 when it or a device is absent.",
            value=1.0 if self._nvml is not None else 0.0,
        )
        yield available
        if self._nvml is None:
            return
        # NOTE: this path has only been written against the nvidia-ml-py API, not run here,
        # because this machine has no GPU and no nvidia-ml-py.
        nvml = self._nvml
        util = GaugeMetricFamily(
            "shardmesh_gpu_utilization", "GPU busy fraction (0 to 1).", labels=["gpu"]
        )
        used = GaugeMetricFamily("shardmesh_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"])
        total = GaugeMetricFamily("shardmesh_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        try:
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                util.add_metric([str(index)], rates.gpu / 100.0)
                used.add_metric([str(index)], float(memory.used))
                total.add_metric([str(index)], float(memory.total))
        except Exception as exc:  # NVMLError subclasses; a failed read must not break a scrape
            logger.warning("reading GPU metrics through nvidia-ml-py failed: %s", exc)
            return
        yield util
        yield used
        yield total


class AgentMetrics:
    """The metrics of one agent, with helpers that the agent's actors call.

    Every helper is safe to call from the event loop or from worker threads (prometheus-client
    metrics are thread-safe, and the request windows take a lock).
    """

    def __init__(self, node_id: str = "", *, collect_host: bool = True) -> None:
        self.node_id = node_id
        self._refreshers: list[Callable[[AgentMetrics], None]] = []
        self._queue_labels: set[str] = set()
        # Worker threads add to it (observe_segment) while the event loop removes from it.
        self._segment_labels: set[tuple[str, str, str]] = set()
        self._segment_labels_lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "shardmesh_requests",
            "Inference requests finished at this gateway, by outcome (ok or error).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "shardmesh_request_seconds",
            "End-to-end latency of inference requests at this gateway.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.segment_seconds = Histogram(
            "shardmesh_segment_seconds",
            "Time one segment took for one micro-batch on this agent (queue excluded). The numeric "
            "canary's reference runs are counted too.",
            ["model", "version", "segment"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge(
            "shardmesh_queue_depth", "Requests waiting in a segment's queue. segment is "
            "model@version[first..last] (unit range).", ["segment"], registry=r
        )
        self.batch_size = Histogram(
            "shardmesh_batch_size",
            "Requests (not rows) per micro-batch run by a segment, canary reference runs included.",
            ["segment"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.peer_bytes_sent = Counter(
            "shardmesh_peer_sent_bytes", "Bytes sent to a peer.", ["peer"], registry=r
        )
        self.peer_bytes_received = Counter(
            "shardmesh_peer_received_bytes", "Bytes received from a peer.", ["peer"], registry=r
        )
        self.heartbeat_rtt = Histogram(
            "shardmesh_heartbeat_rtt_seconds",
            "Heartbeat round-trip time to a peer.",
            ["peer"],
            buckets=RTT_BUCKETS_S,
            registry=r,
        )
        self.elections = Counter(
            "shardmesh_elections",
            "Elections this agent won (outcome=won).",
            ["outcome"],
            registry=r,
        )
        self.failovers = Counter(
            "shardmesh_failovers",
            "Failovers handled, by kind: request_resumed (a gateway resumed a request on another "
            "route), segment_replaced (the coordinator re-placed a dead agent's segments), "
            "repair_replanned (a repair was followed by a better plan).",
            ["kind"],
            registry=r,
        )
        self.epoch = Gauge("shardmesh_epoch", "Current coordinator epoch (term).", registry=r)
        self.is_coordinator = Gauge(
            "shardmesh_is_coordinator", "1 while this agent is the coordinator.", registry=r
        )
        self.http_responses = Counter(
            "shardmesh_http_responses",
            "Admin API responses by route template and status code.",
            ["route", "status"],
            registry=r,
        )
        self.gpu = GpuCollector()
        r.register(self.gpu)
        if collect_host:
            r.register(HostCollector())
            ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds

        self._windows_lock = threading.Lock()
        self._windows: dict[tuple[str, str], LatencyWindow] = {}

    # ---- helpers called by the agent and the gateway ----

    def observe_request(
        self, model: str, version: str, seconds: float, ok: bool, *, now: float | None = None
    ) -> None:
        """Record one finished inference request at this gateway."""
        self.requests.labels(model, version, "ok" if ok else "error").inc()
        if ok:
            self.request_seconds.labels(model, version).observe(seconds)
        window = self._window(model, version)
        window.record(time.monotonic() if now is None else now, seconds, ok)

    def observe_segment(self, model: str, version: str, segment: str, seconds: float) -> None:
        """Record one micro-batch run of a segment (called on the segment's worker thread)."""
        self.segment_seconds.labels(model, version, segment).observe(seconds)
        with self._segment_labels_lock:
            self._segment_labels.add((model, version, segment))

    def set_queue_depth(self, segment: str, depth: int) -> None:
        self.queue_depth.labels(segment).set(depth)

    def observe_batch(self, segment: str, size: int) -> None:
        self.batch_size.labels(segment).observe(size)

    def add_peer_bytes(self, peer: str, *, sent: int = 0, received: int = 0) -> None:
        if sent:
            self.peer_bytes_sent.labels(peer).inc(sent)
        if received:
            self.peer_bytes_received.labels(peer).inc(received)

    def observe_heartbeat_rtt(self, peer: str, seconds: float) -> None:
        self.heartbeat_rtt.labels(peer).observe(seconds)

    def count_election(self, outcome: str) -> None:
        self.elections.labels(outcome).inc()

    def count_failover(self, kind: str) -> None:
        self.failovers.labels(kind).inc()

    def set_role(self, *, epoch: int, is_coordinator: bool) -> None:
        self.epoch.set(epoch)
        self.is_coordinator.set(1 if is_coordinator else 0)

    def forget_version(self, model: str, version: str) -> None:
        """Drop the series of a deleted version so that they stop being exported."""
        for outcome in ("ok", "error"):
            try:
                self.requests.remove(model, version, outcome)
            except KeyError:
                pass
        try:
            self.request_seconds.remove(model, version)
        except KeyError:
            pass
        with self._segment_labels_lock:
            segments = {segment for labels_model, labels_version, segment in self._segment_labels
                        if (labels_model, labels_version) == (model, version)}
        for segment in segments:
            self.forget_segment(segment)
        with self._windows_lock:
            self._windows.pop((model, version), None)

    # ---- reading ----

    def _window(self, model: str, version: str) -> LatencyWindow:
        with self._windows_lock:
            window = self._windows.get((model, version))
            if window is None:
                window = LatencyWindow(GATEWAY_WINDOW_S)
                self._windows[(model, version)] = window
            return window

    def version_window(self, model: str, version: str) -> LatencyWindow:
        """The recent outcomes of one version, for a `CanaryPolicy`."""
        return self._window(model, version)

    def version_stats(self, model: str, version: str, *, now: float | None = None) -> WindowStats:
        with self._windows_lock:
            window = self._windows.get((model, version))
        if window is None:
            window = LatencyWindow(GATEWAY_WINDOW_S)
        return window.stats(time.monotonic() if now is None else now)

    def add_refresher(self, refresh: Callable[["AgentMetrics"], None]) -> None:
        """Call ``refresh(self)`` before every scrape and rule check, to set gauges read on demand."""
        self._refreshers.append(refresh)

    def refresh(self) -> None:
        for refresh in self._refreshers:
            try:
                refresh(self)
            except Exception:  # a broken refresher must not break a scrape
                logger.exception("refreshing metrics failed node=%s", self.node_id)

    def forget_segment(self, segment: str) -> None:
        """Drop the histogram series of a segment this agent unloaded."""
        with self._segment_labels_lock:
            unloaded = {labels for labels in self._segment_labels if labels[2] == segment}
            self._segment_labels -= unloaded
        for labels in unloaded:
            try:
                self.segment_seconds.remove(*labels)
            except KeyError:
                pass
        try:
            self.batch_size.remove(segment)
        except KeyError:
            pass

    def set_queue_depths(self, depths: dict[str, int]) -> None:
        """Set the queue gauge of every loaded segment, and drop the series of unloaded ones."""
        for segment in self._queue_labels - set(depths):
            try:
                self.queue_depth.remove(segment)
            except KeyError:
                pass
        for segment, depth in depths.items():
            self.queue_depth.labels(segment).set(depth)
        self._queue_labels = set(depths)

    def sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """Sum of the samples named `name` whose labels include `labels`, or None if none match."""
        self.refresh()
        selector = labels or {}
        total = 0.0
        found = False
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name != name:
                    continue
                if all(sample.labels.get(k) == v for k, v in selector.items()):
                    total += sample.value
                    found = True
        return total if found else None

    def render(self) -> tuple[bytes, str]:
        """Return the Prometheus text exposition and its content type."""
        self.refresh()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
