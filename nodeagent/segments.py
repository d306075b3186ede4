"""Segment host: load the segments the committed placement assigns to this agent, and run them.

The host is level-triggered: whenever the registry changes (or a coordinator command asks), it
compares the segments that placements assign here with the ones loaded, fetches the missing blobs
from peers (``nodeagent.blobs``), loads them off the event loop, and starts one worker per segment
(``nodeagent.worker``: micro-batching, priorities, its own thread). A segment of a branch model
gets one more worker per task that visits it, created on the first request for that task: the
tensors a segment passes on depend on the task, so requests of different tasks must never share
a batch, and the worker's batch key sees only the inputs. Segments that no placement
names any more are stopped and their blobs unpinned, so the store may evict them. A segment keeps
the set of plan versions under which it was assigned here; the data plane refuses frames of any
other plan version.

Every version that the registry still lists stays loaded, which makes a rollback instant.

Every loaded segment runs its numeric canary (``nodeagent.canary``) right after loading and then
periodically. A segment whose output differs from the recording is unloaded at once (so the data
plane refuses its frames and heartbeats stop reporting it), its blobs are re-hashed and a blob that
fails is deleted, and the reconcile loop loads it again, fetching what is missing from peers.

Spare copies. Exported blobs start on the coordinator that exported them and reach only the
agents that load them. A segment held by one agent that is also the coordinator would then exist
nowhere else, and when that agent dies no survivor can load the segment again. So once its own
segments are loaded, each agent also fetches and pins (without loading) the blobs of the segment
after each of its own, in a ring over the placement: every segment of a multi-segment placement
ends up stored on at least two agents.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator import registry as registry_ops
from coordinator.export import Manifest, Segment
from coordinator.micromodel import InputError, route_for_task
from nodeagent.canary import SegmentCanaries
from nodeagent.store import BlobNotFoundError, CorruptBlobError
from nodeagent.worker import SegmentWorker

logger = logging.getLogger(__name__)

LOAD_RETRY_S = 1.0
# A segment that the committed placement no longer names stays loaded this long. Gateways apply a
# plan switch on their own schedule, so requests routed on the old plan still arrive for a moment.
# Unloading at once refused them, and each such request waited out its gateway's exclusion of this agent.
UNLOAD_GRACE_S = 3.0
_now = time.monotonic  # the clock of the unload grace; tests replace it


@dataclass
class LoadedSegment:
    """A segment that is loaded here, with its workers and the plan versions it serves.

    ``worker`` serves requests that name no task. ``task_workers`` contains one worker per task of
    a branch model, made by ``make_worker`` on first use (see ``worker_for``).
    """

    key: tuple[str, str, int, int]
    worker: SegmentWorker
    manifest: Manifest
    blobs: tuple[str, ...]
    plan_versions: set[int] = field(default_factory=set)
    loaded_unix: float = field(default_factory=time.time)
    make_worker: Callable[[str | None], SegmentWorker] | None = None
    task_workers: dict[str, SegmentWorker] = field(default_factory=dict)
    segment: Segment | None = None

    def worker_for(self, task: str | None) -> SegmentWorker:
        """Return the worker for requests of ``task``, creating it on the first request.

        Raises InputError when the model has no such task or the task's route skips this
        segment, so a frame with a bad task cannot start a thread.
        """
        if task is None:
            return self.worker
        worker = self.task_workers.get(task)
        if worker is not None:
            return worker
        first = self.key[2]
        if first not in route_for_task(self.manifest, task):
            raise InputError(f"task {task!r} does not visit units {self.key[2]}..{self.key[3]} of model {self.key[0]!r}")
        if self.make_worker is None:
            raise InputError(f"segment {self.key} has no worker factory for task {task!r}")
        worker = self.make_worker(task)
        self.task_workers[task] = worker
        logger.info("task worker started model=%s version=%s units=%d..%d task=%s", *self.key, task)
        return worker

    def workers(self) -> list[SegmentWorker]:
        return [self.worker, *self.task_workers.values()]


class SegmentHost:
    """Loads, serves and unloads this agent's segments."""

    def __init__(self, host) -> None:
        self.host = host
        self._segments: dict[tuple[str, str, int, int], LoadedSegment] = {}
        self._loading: dict[tuple[str, str, int, int], asyncio.Task] = {}
        # Blob bytes received and needed per segment being loaded, for status and deploy progress.
        self._progress: dict[tuple[str, str, int, int], list[int]] = {}
        self._manifests: dict[str, Manifest] = {}
        self._errors: dict[tuple, str] = {}
        # Segments no longer in any placement, with the time they were first seen so (see UNLOAD_GRACE_S).
        self._undesired_since: dict[tuple[str, str, int, int], float] = {}
        # Spare copies, keyed (manifest sha, first unit, last unit): pinned blob shas, or the fetch task.
        self._spares: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._spare_tasks: dict[tuple[str, int, int], asyncio.Task] = {}
        self._kick = asyncio.Event()
        self.loads = 0
        self.canaries = SegmentCanaries(
            host.node_id, get=lambda key: self._segments.get(key), keys=lambda: list(self._segments),
            canary_sha=self._canary_sha, fetch=self._fetch_blob, mark_bad=self._canary_failed)

    # ----------------------------------------------------------------- queries

    def get(self, model, version, first: int, last: int) -> LoadedSegment | None:
        return self._segments.get((str(model), str(version), int(first), int(last)))

    def loaded_report(self) -> list[list]:
        return [[*key, sorted(seg.plan_versions)] for key, seg in sorted(self._segments.items())]

    def queue_depth(self) -> int:
        return sum(worker.stats().queue_depth for seg in self._segments.values() for worker in seg.workers())

    def is_wedged(self, threshold_s: float) -> bool:
        now = time.monotonic()
        return any(worker.is_wedged(now, threshold_s) for seg in self._segments.values() for worker in seg.workers())

    def busy(self) -> bool:
        for segment in self._segments.values():
            for worker in segment.workers():
                stats = worker.stats()
                if stats.queue_depth or stats.running:
                    return True
        return False

    def kick(self) -> None:
        self._kick.set()

    def cached_manifest(self, sha: str) -> Manifest | None:
        """Return a manifest this agent has already parsed, without fetching anything."""
        return self._manifests.get(sha)

    async def manifest(self, sha: str) -> Manifest:
        """Return a parsed manifest, fetching its blob from peers when needed."""
        cached = self._manifests.get(sha)
        if cached is not None:
            return cached
        path = await self.host.blobs.fetch(sha, self._holders())
        manifest = Manifest.from_json(path.read_bytes())
        self._manifests[sha] = manifest
        return manifest

    def _holders(self) -> list[str]:
        leader = self.host.leader_id
        peers = self.host.links.members()
        return ([leader] if leader in peers else []) + [p for p in peers if p != leader]

    # ----------------------------------------------------------------- reconcile

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._kick.wait(), LOAD_RETRY_S)
            except asyncio.TimeoutError:
                pass
            self._kick.clear()
            self._reconcile()
            self.canaries.tick()

    def _desired(self) -> dict[tuple[str, str, int, int], tuple[str, int]]:
        """Segments assigned here: key -> (manifest sha, plan version)."""
        desired = {}
        registry = self.host.registry()
        for name, model in registry["models"].items():
            for version, entry in model["versions"].items():
                # A pending placement is loaded before it replaces the current one.
                for placement in (entry.get("placement"), entry.get("pending_placement")):
                    if not placement:
                        continue
                    for segment in placement["segments"]:
                        if self.host.node_id in segment["agents"]:
                            key = (name, version, int(segment["first"]), int(segment["last"]))
                            desired[key] = (entry["manifest"], int(placement["plan_version"]))
        return desired

    def _reconcile(self) -> None:
        if self.host.config.election.witness:
            return
        desired = self._desired()
        for key, (manifest_sha, plan_version) in desired.items():
            loaded = self._segments.get(key)
            if loaded is not None:
                loaded.plan_versions.add(plan_version)
                # Keep only a few old plan versions: frames of older plans are refused.
                while len(loaded.plan_versions) > 4:
                    loaded.plan_versions.discard(min(loaded.plan_versions))
                continue
            if key not in self._loading and not self.canaries.held_back(key):
                task = asyncio.get_running_loop().create_task(self._load(key, manifest_sha, plan_version))
                self._loading[key] = task
        now = _now()
        for key in list(self._undesired_since):
            if key in desired or key not in self._segments:
                del self._undesired_since[key]
        for key in [key for key in self._segments if key not in desired]:
            since = self._undesired_since.setdefault(key, now)
            if now - since >= UNLOAD_GRACE_S or self._removed(key):
                self._undesired_since.pop(key, None)
                self._unload(key)
        self._reconcile_spares()

    def _removed(self, key: tuple[str, str, int, int]) -> bool:
        """Tell whether the key's version is gone from the registry, so no request can need it."""
        model, version = key[0], key[1]
        return version not in self.host.registry_view()["models"].get(model, {}).get("versions", {})

    def _desired_spares(self) -> set[tuple[str, int, int]]:
        """Unit ranges to keep a spare copy of: the segment after each segment held here."""
        spares = set()
        for model in self.host.registry()["models"].values():
            for entry in model["versions"].values():
                segments = (entry.get("placement") or {}).get("segments") or []
                # NOTE: a single-segment placement gets no spare copy; its blobs stay only on
                # its holders and on the coordinator that exported it.
                for index, segment in enumerate(segments if len(segments) > 1 else []):
                    following = segments[(index + 1) % len(segments)]
                    if self.host.node_id in segment["agents"] and self.host.node_id not in following["agents"]:
                        spares.add((entry["manifest"], int(following["first"]), int(following["last"])))
        return spares

    def _reconcile_spares(self) -> None:
        desired = self._desired_spares()
        for key in [key for key in self._spares if key not in desired]:
            for sha in self._spares.pop(key):
                self.host.store.unpin(sha)
        for key, task in list(self._spare_tasks.items()):
            if key not in desired:
                task.cancel()
        if self._loading:
            return  # own segments first: a spare copy must not delay this agent's readiness
        for key in desired:
            if key not in self._spares and key not in self._spare_tasks:
                self._spare_tasks[key] = asyncio.get_running_loop().create_task(self._fetch_spare(key))

    async def _fetch_spare(self, key: tuple[str, int, int]) -> None:
        manifest_sha, first, last = key
        pinned: list[str] = []
        try:
            manifest = await self.manifest(manifest_sha)
            for index in range(first, last + 1):
                sha = manifest.units[index].sha256
                await self.host.blobs.fetch(sha, self._holders())
                self.host.store.pin(sha)
                pinned.append(sha)
            self._spares[key] = tuple(pinned)
            logger.info("spare copy stored node=%s manifest=%s units=%d..%d",
                        self.host.node_id, manifest_sha[:12], first, last)
        except asyncio.CancelledError:
            for sha in pinned:
                self.host.store.unpin(sha)
            raise
        except Exception as exc:
            for sha in pinned:
                self.host.store.unpin(sha)
            logger.warning("fetching spare copy failed node=%s manifest=%s units=%d..%d: %s; retrying",
                           self.host.node_id, manifest_sha[:12], first, last, exc)
        finally:
            self._spare_tasks.pop(key, None)

    async def _load(self, key: tuple[str, str, int, int], manifest_sha: str, plan_version: int) -> None:
        model, version, first, last = key
        started = time.monotonic()
        try:
            manifest = await self.manifest(manifest_sha)
            shas = [manifest.units[index].sha256 for index in range(first, last + 1)]
            total = sum(manifest.units[index].blob_bytes for index in range(first, last + 1))
            self._progress[key] = [0, total]
            paths = {}
            for sha in shas:
                done_before = self._progress[key][0]

                def progress(received: int, size: int, base: int = done_before) -> None:
                    self._progress[key][0] = base + received

                paths[sha] = await self.host.blobs.fetch(sha, self._holders(), progress=progress)
                self._progress[key][0] = done_before + self.host.store.size(sha)
                self.host.store.pin(sha)
            runtime = self.host.config.runtime
            segment = await asyncio.to_thread(Segment, manifest, first, last, paths)

            def make_worker(task: str | None) -> SegmentWorker:
                label = f"{model}@{version}[{first}..{last}]" + (f"/{task}" if task is not None else "")
                metrics = self.host.metrics

                def observe(size: int, seconds: float) -> None:
                    metrics.observe_segment(model, version, label, seconds)
                    metrics.observe_batch(label, size)

                return SegmentWorker(
                    label, functools.partial(segment.run, task=task),
                    torch_threads=runtime.torch_threads, max_batch_size=runtime.batch_max_size,
                    max_wait_s=runtime.batch_max_wait_ms / 1000.0, capacity=runtime.queue_max,
                    on_batch=observe if metrics is not None else None,
                )

            self._segments[key] = LoadedSegment(key, make_worker(None), manifest, tuple(shas), {plan_version},
                                                make_worker=make_worker, segment=segment)
            self._errors.pop(key, None)
            self.loads += 1
            self.canaries.loaded(key)
            logger.info("segment loaded node=%s model=%s version=%s units=%d..%d plan=%d in %.2f s",
                        self.host.node_id, model, version, first, last, plan_version, time.monotonic() - started)
            self.host.role.member_report(self.host.node_id)
            self.host.dataplane.placement_changed()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._errors[key] = f"{type(exc).__name__}: {exc}"
            logger.error("loading segment failed node=%s model=%s version=%s units=%d..%d: %s; retrying",
                         self.host.node_id, model, version, first, last, exc)
        finally:
            self._loading.pop(key, None)
            self._progress.pop(key, None)

    def _unload(self, key) -> None:
        segment = self._segments.pop(key)
        for worker in segment.workers():
            worker.close()
            if self.host.metrics is not None:
                self.host.metrics.forget_segment(worker.name)
        for sha in segment.blobs:
            self.host.store.unpin(sha)
        logger.info("segment unloaded node=%s key=%s", self.host.node_id, key)

    def loaded_keys(self) -> list[tuple[str, str, int, int]]:
        return list(self._segments)

    def _canary_sha(self, model: str, version: str) -> str | None:
        entry = self.host.registry_view()["models"].get(model, {}).get("versions", {}).get(version) or {}
        return entry.get("canary")

    async def _fetch_blob(self, sha: str):
        return await self.host.blobs.fetch(sha, self._holders())

    async def _canary_failed(self, key: tuple[str, str, int, int], loaded: LoadedSegment) -> None:
        """Unload a segment that failed its canary, drop its corrupt blobs and start the reload."""
        if self._segments.get(key) is loaded:
            self._unload(key)
        self.host.role.member_report(self.host.node_id)
        self.host.dataplane.placement_changed()
        # A blob that still hashes right holds exactly the exported bytes, and deleting it could
        # lose the only copy; so only blobs that fail the hash check are deleted and fetched again.
        for sha in loaded.blobs:
            try:
                await asyncio.to_thread(self.host.store.verify, sha)
            except CorruptBlobError:
                logger.error("blob of a segment that failed its canary was corrupt and is deleted node=%s "
                             "model=%s version=%s blob=%s", self.host.node_id, key[0], key[1], sha[:12])
            except BlobNotFoundError:
                pass
        self.kick()

    async def close(self) -> None:
        await self.canaries.close()
        for task in list(self._loading.values()) + list(self._spare_tasks.values()):
            task.cancel()
        for key in list(self._segments):
            self._unload(key)

    def queue_depths(self) -> dict[str, int]:
        """Requests waiting per worker, by worker name (the segment label of the metrics)."""
        return {worker.name: worker.stats().queue_depth
                for segment in self._segments.values() for worker in segment.workers()}

    def status(self) -> dict:
        return {
            "loaded": [
                {"model": k[0], "version": k[1], "first": k[2], "last": k[3],
                 "plan_versions": sorted(s.plan_versions),
                 "queue": sum(worker.stats().queue_depth for worker in s.workers()),
                 "tasks": sorted(s.task_workers)}
                for k, s in sorted(self._segments.items())
            ],
            "loading": [
                {"key": list(k), "bytes_done": self._progress.get(k, [0, 0])[0],
                 "bytes_total": self._progress.get(k, [0, 0])[1]}
                for k in self._loading
            ],
            "errors": [{"key": list(k), "error": e} for k, e in self._errors.items()],
            "spares": [{"manifest": k[0], "first": k[1], "last": k[2]} for k in sorted(self._spares)],
            "canary": self.canaries.status(),
        }
