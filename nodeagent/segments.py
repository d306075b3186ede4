"""Segment host: load the segments the committed placement assigns to this agent, and run them.

The host is level-triggered: whenever the registry changes (or a coordinator command asks), it
compares the segments that placements assign here with the ones loaded, fetches the missing blobs
from peers (``nodeagent.blobs``), loads them off the event loop, and starts one worker per segment
(``nodeagent.worker``: micro-batching, priorities, its own thread). Segments that no placement
names any more are stopped and their blobs unpinned, so the store may evict them. A segment keeps
the set of plan versions under which it was assigned here; the data plane refuses frames of any
other plan version.

Every version that the registry still lists stays loaded, which makes a rollback instant.

Spare copies. Exported blobs start on the coordinator that exported them and reach only the
agents that load them. A segment held by one agent that is also the coordinator would then exist
nowhere else, and when that agent dies no survivor can load the segment again. So once its own
segments are loaded, each agent also fetches and pins (without loading) the blobs of the segment
after each of its own, in a ring over the placement: every segment of a multi-segment placement
ends up stored on at least two agents.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from coordinator import registry as registry_ops
from coordinator.export import Manifest, Segment
from nodeagent.worker import SegmentWorker

logger = logging.getLogger(__name__)

LOAD_RETRY_S = 1.0


@dataclass
class LoadedSegment:
    """A segment that is loaded here, with its worker and the plan versions it serves."""

    key: tuple[str, str, int, int]
    worker: SegmentWorker
    manifest: Manifest
    blobs: tuple[str, ...]
    plan_versions: set[int] = field(default_factory=set)
    loaded_unix: float = field(default_factory=time.time)


class SegmentHost:
    """Loads, serves and unloads this agent's segments."""

    def __init__(self, host) -> None:
        self.host = host
        self._segments: dict[tuple[str, str, int, int], LoadedSegment] = {}
        self._loading: dict[tuple[str, str, int, int], asyncio.Task] = {}
        self._manifests: dict[str, Manifest] = {}
        self._errors: dict[tuple, str] = {}
        # Spare copies, keyed (manifest sha, first unit, last unit): pinned blob shas, or the fetch task.
        self._spares: dict[tuple[str, int, int], tuple[str, ...]] = {}
        self._spare_tasks: dict[tuple[str, int, int], asyncio.Task] = {}
        self._kick = asyncio.Event()
        self.loads = 0

    # ----------------------------------------------------------------- queries

    def get(self, model, version, first: int, last: int) -> LoadedSegment | None:
        return self._segments.get((str(model), str(version), int(first), int(last)))

    def loaded_report(self) -> list[list]:
        return [[*key, sorted(seg.plan_versions)] for key, seg in sorted(self._segments.items())]

    def queue_depth(self) -> int:
        return sum(seg.worker.stats().queue_depth for seg in self._segments.values())

    def is_wedged(self, threshold_s: float) -> bool:
        now = time.monotonic()
        return any(seg.worker.is_wedged(now, threshold_s) for seg in self._segments.values())

    def busy(self) -> bool:
        for segment in self._segments.values():
            stats = segment.worker.stats()
            if stats.queue_depth or stats.running:
                return True
        return False

    def kick(self) -> None:
        self._kick.set()

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

    def _desired(self) -> dict[tuple[str, str, int, int], tuple[str, int]]:
        """Segments assigned here: key -> (manifest sha, plan version)."""
        desired = {}
        registry = self.host.registry()
        for name, model in registry["models"].items():
            for version, entry in model["versions"].items():
                placement = entry.get("placement")
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
            if key not in self._loading:
                task = asyncio.get_running_loop().create_task(self._load(key, manifest_sha, plan_version))
                self._loading[key] = task
        for key in [key for key in self._segments if key not in desired]:
            self._unload(key)
        self._reconcile_spares()

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
            paths = {}
            for sha in shas:
                paths[sha] = await self.host.blobs.fetch(sha, self._holders())
                self.host.store.pin(sha)
            runtime = self.host.config.runtime
            segment = await asyncio.to_thread(Segment, manifest, first, last, paths)
            worker = SegmentWorker(
                f"{model}@{version}[{first}..{last}]", segment.run,
                torch_threads=runtime.torch_threads, max_batch_size=runtime.batch_max_size,
                max_wait_s=runtime.batch_max_wait_ms / 1000.0, capacity=runtime.queue_max,
            )
            self._segments[key] = LoadedSegment(key, worker, manifest, tuple(shas), {plan_version})
            self._errors.pop(key, None)
            self.loads += 1
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

    def _unload(self, key) -> None:
        segment = self._segments.pop(key)
        segment.worker.close()
        for sha in segment.blobs:
            self.host.store.unpin(sha)
        logger.info("segment unloaded node=%s key=%s", self.host.node_id, key)

    async def close(self) -> None:
        for task in list(self._loading.values()) + list(self._spare_tasks.values()):
            task.cancel()
        for key in list(self._segments):
            self._unload(key)

    def status(self) -> dict:
        return {
            "loaded": [
                {"model": k[0], "version": k[1], "first": k[2], "last": k[3],
                 "plan_versions": sorted(s.plan_versions), "queue": s.worker.stats().queue_depth}
                for k, s in sorted(self._segments.items())
            ],
            "loading": [list(k) for k in self._loading],
            "errors": [{"key": list(k), "error": e} for k, e in self._errors.items()],
            "spares": [{"manifest": k[0], "first": k[1], "last": k[2]} for k in sorted(self._spares)],
        }
