"""The coordinator role: deploys, placement and re-placement while this agent holds the lease.

Design. The role is a reconciliation loop, not a sequence of remote procedure calls. The desired
state lives in the replicated registry (``coordinator.registry``); agents converge on it by
themselves (``nodeagent.segments`` loads what the committed placement assigns to it and reports
what it holds in every heartbeat). The coordinator only ever *writes the registry*, through the
election core, which commits a value once a majority of voters has persisted it. So:

- a deploy exports the model into content-addressed blobs, profiles its units, plans, and commits
  ``add_version`` + ``set_placement``; it is acknowledged (the progress resource reaches
  "loading") only after that commit;
- the loop promotes a version to "ready" once every segment has at least one agent that reports
  it loaded, and commits that;
- the loop repairs placements that name an agent that died or left: replicas cover a segment at
  once, otherwise the segment moves to the surviving agent with the most free memory and the
  least assigned work (a local repair: segments on healthy agents never move), and the
  plan version rises. The repair is priced against the best placement over the survivors with
  the same cost model (``coordinator.replanning``). When it is more than REPAIR_TOLERANCE (5 %)
  slower, the same write stores that best placement as the version's pending placement;
- a pending placement is make-before-break: agents load its segments next to the current ones,
  gateways keep routing on the current placement, and once the version is ready and every
  pending segment is loaded the loop swaps the two (it drops the pending placement instead when
  one of its agents is gone);
- when agents join, every ready version is planned again over the grown cluster, and a plan that
  lowers the period by more than REPLAN_HYSTERESIS becomes the pending placement. Chains (layer
  and block strategies) and branch models are planned on their unit groups, so cuts stay on
  allowed cuts and heads stay apart. A branch model is priced at its worst task mix. A version
  deployed with ``max_stages`` keeps its hand-fixed stages. If it was deployed with replicas, a
  join makes each agent that has no segment of it a replica again, as the deploy did. A new
  agent's link numbers settle over its first seconds, so a join is evaluated again every
  JOIN_RECHECK_S for JOIN_WINDOW_S.

A new coordinator needs no hand-over: it reads the committed registry, rebuilds its view of
agents from their heartbeats, and the same loop finishes whatever the old one left half done.
Every write is fenced by the election term, so a deposed coordinator cannot commit anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from coordinator import registry as registry_ops
from coordinator import replanning
from coordinator.exported_source import split_arguments
from coordinator.micromodel import merge_profile, unit_groups
from coordinator.placement import Placement, SegmentPlacement, expand_stages, placement_from_stages
from coordinator.planner import REPAIR_TOLERANCE, Device, Layer, PlanError, plan as make_plan
from nodeagent import canary
from nodeagent.metrics import GATEWAY_WINDOW_S

logger = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 0.2
COMMIT_TIMEOUT_S = 10.0
EXPORT_TIMEOUT_S = 900.0
DEFAULT_BANDWIDTH = 1e9
DEFAULT_LATENCY_S = 1e-4
DEFAULT_MEMORY_BYTES = 8 << 30
# A join moves segments only when the new plan's period is at least this much lower: moving
# weights costs transfer and load time, and a small gain is within the profile's noise.
REPLAN_HYSTERESIS = 0.1
# A joined agent's link numbers (the smoothed RTT, the one bandwidth probe per connection) are
# taken while it is still busy starting up. So a join is evaluated again every JOIN_RECHECK_S
# until JOIN_WINDOW_S after it, and a re-plan can follow once the numbers settle.
JOIN_WINDOW_S = 30.0
JOIN_RECHECK_S = 2.0


@dataclass
class Deployment:
    """Progress of one deployment on this coordinator."""

    id: str
    model: str
    version: str
    state: str = "pending"
    percent: float = 0.0
    message: str = ""
    started: float = 0.0
    finished: float | None = None
    note: str = ""  # appended to the final message, for what the user asked for but did not get

    def to_dict(self) -> dict:
        return {"id": self.id, "model": self.model, "version": self.version, "state": self.state,
                "percent": round(self.percent, 1), "message": self.message}


class CoordinatorRole:
    """Everything this agent does only while it is the elected coordinator."""

    def __init__(self, host) -> None:
        self.host = host
        self.term: int | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.deployments: dict[str, Deployment] = {}
        self._deploy_tasks: set[asyncio.Task] = set()
        self._commit_lock = asyncio.Lock()
        self.replacements = 0
        self._seen_alive: set[str] | None = None
        self._joined_at: dict[str, float] = {}
        self._next_join_check = 0.0
        self._join_is_new = False

    # ----------------------------------------------------------------- lifecycle

    def start(self, term: int) -> None:
        self.stop()
        self.term = term
        self._seen_alive = None
        self._joined_at = {}
        self._task = asyncio.get_running_loop().create_task(self._loop(term), name="coordinator-role")
        logger.info("coordinator role started node=%s epoch=%d", self.host.node_id, term)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
            logger.info("coordinator role stopped node=%s epoch=%s", self.host.node_id, self.term)
        for task in list(self._deploy_tasks):
            task.cancel()
        self.term = None

    @property
    def active(self) -> bool:
        return self._task is not None and self.host.is_coordinator()

    def registry_changed(self) -> None:
        self._wake.set()

    def member_report(self, peer: str) -> None:
        self._wake.set()

    def member_lost(self, peer: str, reason: str) -> None:
        self._wake.set()

    # ----------------------------------------------------------------- registry writes

    async def commit(self, change) -> dict:
        """Apply ``change(registry) -> registry`` and wait until a majority has persisted it."""
        async with self._commit_lock:
            if not self.host.is_coordinator():
                raise NotCoordinatorError(self.host.leader_id)
            new_value = change(self.host.registry())
            election = self.host.election
            index = election.propose(new_value)
            term = election.term
            deadline = time.monotonic() + COMMIT_TIMEOUT_S
            while election.committed_position < (term, index):
                if election.term != term or not self.host.is_coordinator():
                    raise NotCoordinatorError(election.leader_id)
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"registry write at epoch {term} index {index} was not persisted by a "
                        f"majority of voters within {COMMIT_TIMEOUT_S:.0f} s; check that most voters are up"
                    )
                await asyncio.sleep(0.01)
            return new_value

    # ----------------------------------------------------------------- reconcile loop

    async def _loop(self, term: int) -> None:
        # Give agents one heartbeat round to report what they hold before repairing anything.
        await asyncio.sleep(self.host.config.timing.heartbeat_interval_s * 3)
        while True:
            try:
                self._wake.clear()
                if self.host.is_coordinator():
                    await self._reconcile()
            except asyncio.CancelledError:
                raise
            except NotCoordinatorError:
                pass
            except Exception:
                logger.exception("coordinator reconcile failed node=%s epoch=%d", self.host.node_id, term)
            try:
                await asyncio.wait_for(self._wake.wait(), RECONCILE_INTERVAL_S)
            except asyncio.TimeoutError:
                pass

    def alive_agents(self) -> set[str]:
        membership = self.host.membership
        alive = {self.host.node_id} if not self.host.draining else set()
        for peer in self.host.links.members():
            if peer not in membership.dead and peer not in membership.left and not membership.reports.get(peer, {}).get("draining"):
                alive.add(peer)
        return alive

    def loaded_by_agent(self) -> dict[str, set[tuple]]:
        loaded: dict[str, set[tuple]] = {self.host.node_id: {tuple(item[:4]) for item in self.host.segments.loaded_report()}}
        for peer, report in self.host.membership.reports.items():
            loaded[peer] = {tuple(item[:4]) for item in report.get("loaded", [])}
        return loaded

    async def _reconcile(self) -> None:
        if self.host.draining:
            # A coordinator that is shutting down leaves re-placement to its successor: during a
            # full-cluster stop it would otherwise move segments onto agents that are leaving too.
            return
        registry = self.host.registry()
        alive = self.alive_agents()
        if await self._rollback_failing_canaries(registry, alive):
            return
        loaded = self.loaded_by_agent()
        now = time.monotonic()
        joined = self._joins_to_evaluate(alive, now)
        for name, model in registry["models"].items():
            for version, entry in model["versions"].items():
                if not entry.get("placement"):
                    continue
                placement = Placement.from_dict(entry["placement"])
                repaired = self._repair(placement, entry, alive, registry["plan_version"])
                if repaired is not None:
                    self.replacements += 1
                    logger.warning("re-placing model=%s version=%s plan %d -> %d: %s",
                                   name, version, placement.plan_version, repaired.plan_version, _describe(repaired))
                    if self.host.metrics is not None:
                        self.host.metrics.count_failover("segment_replaced")
                    repaired, best = await self._check_repair(name, version, entry, repaired, alive)
                    # One write: requests run on the repair at once while agents load the best
                    # placement next to it, and _advance_replan switches once it is loaded.
                    await self.commit(lambda reg, p=repaired, b=best: _store_repair(reg, p, b))
                    return
                if entry["state"] == "placing":
                    self._report_loading(name, version, placement, loaded, alive)
                if entry["state"] == "placing" and self._all_loaded(placement, loaded, alive):
                    await self.commit(lambda reg, n=name, v=version, s=entry.get("rollout", "replace"):
                                      self._promote(reg, n, v, s))
                    self._deployment_ready(name, version)
                    return
                if entry["state"] == "ready" and await self._advance_replan(
                        name, version, entry, placement, loaded, alive, joined, registry["plan_version"]):
                    return
        self._seen_alive = alive
        if joined:
            self._next_join_check = now + JOIN_RECHECK_S

    def _joins_to_evaluate(self, alive: set[str], now: float) -> set[str]:
        """Return the recently joined agents when this pass should evaluate a re-plan for them.

        That is on the first pass after a join and then every JOIN_RECHECK_S for JOIN_WINDOW_S.
        A new coordinator's first pass has no previous view, so it does not mistake the whole
        cluster for newcomers.
        """
        new = alive - self._seen_alive if self._seen_alive is not None else set()
        for agent in new:
            self._joined_at.setdefault(agent, now)
        for agent, joined_at in list(self._joined_at.items()):
            if agent not in alive or now - joined_at > JOIN_WINDOW_S:
                del self._joined_at[agent]
        self._join_is_new = bool(new)
        if new or (self._joined_at and now >= self._next_join_check):
            return set(self._joined_at)
        return set()

    async def _advance_replan(self, name: str, version: str, entry: dict, placement: Placement,
                              loaded: dict[str, set[tuple]], alive: set[str], joined: set[str],
                              plan_version: int) -> bool:
        """Start, finish or abandon a make-before-break re-plan; True when a write was committed."""
        pending = entry.get("pending_placement")
        if pending:
            target = Placement.from_dict(pending)
            if not target.agents <= alive:
                logger.info("abandoning re-plan of model=%s version=%s: an agent of it is gone", name, version)
                await self.commit(lambda reg: registry_ops.set_pending_placement(reg, None, name=name, version=version))
                return True
            if self._all_loaded(target, loaded, alive):
                logger.warning("re-plan of model=%s version=%s is loaded; switching to plan %d: %s", name, version,
                               target.plan_version, _describe(target))
                await self.commit(lambda reg: registry_ops.promote_pending_placement(reg, name, version))
                return True
            return False
        if not joined:
            return False
        try:
            better = await self._replan_for_join(name, version, entry, placement, alive, plan_version)
        except PlanError as exc:
            logger.log(self._join_log_level, "no re-plan of model=%s version=%s after %s joined: %s",
                       name, version, ",".join(sorted(joined)), exc)
            return False
        if better is None:
            return False
        logger.warning("agents %s joined; loading plan %d for model=%s version=%s before switching to it: %s",
                       ",".join(sorted(joined)), better.plan_version, name, version, _describe(better))
        await self.commit(lambda reg: registry_ops.set_pending_placement(reg, better))
        return True

    async def _rollback_failing_canaries(self, registry: dict, alive: set[str]) -> bool:
        """Roll back a canary whose merged error rate or p99 passed its limits; True when committed."""
        if not any(canary.canary_versions(model) for model in registry["models"].values()):
            return False
        summaries = [self.host.membership.version_summary()]
        summaries += [report.get("vstats") or {} for peer, report in self.host.membership.reports.items()
                      if peer in alive and peer != self.host.node_id]
        decisions = canary.rollback_decisions(registry, summaries, window_s=GATEWAY_WINDOW_S, now=time.monotonic())
        for decision in decisions:
            def change(reg: dict, d: canary.RollbackDecision = decision) -> dict:
                # The split may have changed since the decision: roll back only the same canary.
                if d.version not in canary.canary_versions(reg["models"].get(d.model) or {}):
                    return reg
                return registry_ops.rollback(reg, d.model)

            committed = await self.commit(change)
            traffic = committed["models"].get(decision.model, {}).get("traffic")
            if traffic == registry["models"][decision.model]["traffic"]:
                continue
            logger.warning("canary rolled back node=%s model=%s version=%s: %s; traffic is now %s",
                           self.host.node_id, decision.model, decision.version, decision.decision.reason, traffic)
            return True
        return False

    def _report_loading(self, name: str, version: str, placement: Placement,
                        loaded: dict[str, set[tuple]], alive: set[str]) -> None:
        """Show in the deployment's progress how many segments some agent has loaded."""
        ready = sum(
            1 for segment in placement.segments
            if any(agent in alive and (name, version, segment.first, segment.last) in loaded.get(agent, set())
                   for agent in segment.agents)
        )
        count = len(placement.segments)
        for deployment in self.deployments.values():
            if deployment.model == name and deployment.version == version and deployment.state == "loading":
                deployment.percent = 60.0 + 40.0 * ready / max(count, 1) * 0.99
                deployment.message = f"agents are fetching and loading segments: {ready} of {count} loaded"

    def _all_loaded(self, placement: Placement, loaded: dict[str, set[tuple]], alive: set[str]) -> bool:
        for segment in placement.segments:
            key = (placement.model, placement.version, segment.first, segment.last)
            if not any(agent in alive and key in loaded.get(agent, set()) for agent in segment.agents):
                return False
        return True

    @staticmethod
    def _promote(registry: dict, name: str, version: str, rollout: str) -> dict:
        registry = registry_ops.set_state(registry, name, version, "ready")
        model = registry["models"][name]
        others = {v: w for v, w in model["traffic"].items() if v != version and w > 0}
        if rollout == "replace" or not others:
            if model["traffic"] != {version: 1.0}:
                registry = registry_ops.set_traffic(registry, name, {version: 1.0})
        elif rollout == "canary":
            weight = float(model["versions"][version].get("canary_weight", 0.1))
            scale = (1.0 - weight) / sum(others.values())
            registry = registry_ops.set_traffic(registry, name, {**{v: w * scale for v, w in others.items()}, version: weight})
        return registry

    def _repair(self, placement: Placement, entry: dict, alive: set[str], plan_version: int) -> Placement | None:
        """Return a repaired placement when some segment names an agent that is gone."""
        if all(agent in alive for agent in placement.agents):
            return None
        memory = self._free_memory(alive)
        assigned = {agent: 0 for agent in alive}
        for segment in placement.segments:
            for agent in segment.agents:
                if agent in assigned:
                    assigned[agent] += segment.last - segment.first + 1
        weights = entry.get("unit_weight_bytes") or []
        segments = []
        for segment in placement.segments:
            agents = tuple(agent for agent in segment.agents if agent in alive)
            if not agents:
                need = sum(weights[segment.first:segment.last + 1]) if weights else 0
                candidates = [a for a in alive if not self._is_witness(a) and memory.get(a, 0) >= need]
                if not candidates:
                    logger.error("cannot re-place segment %d..%d of %s@%s: no alive agent has %d bytes free",
                                 segment.first, segment.last, placement.model, placement.version, need)
                    return None
                choice = min(candidates, key=lambda a: (assigned[a], -memory.get(a, 0), a))
                assigned[choice] += segment.last - segment.first + 1
                memory[choice] = memory.get(choice, 0) - need
                agents = (choice,)
            segments.append(SegmentPlacement(segment.index, segment.first, segment.last, agents))
        return Placement(placement.model, placement.version, plan_version + 1, placement.unit_count,
                         tuple(segments), placement.predicted_period_s, placement.predicted_latency_s, False)

    async def _check_repair(self, name: str, version: str, entry: dict, repaired: Placement,
                            alive: set[str]) -> tuple[Placement, Placement | None]:
        """Compare a local repair with the best placement over the survivors.

        Returns the repair (with its predicted period when it could be priced) and the best
        placement to load next to it, or None when the repair is within REPAIR_TOLERANCE of it.
        """
        survivors = sorted(a for a in alive if not self._is_witness(a))
        try:
            shape = replanning.shape_from_entry(entry, repaired.unit_count)
            if shape is None or entry.get("max_stages"):
                logger.info("local repair of model=%s version=%s kept unchecked: its deploy fixed the plan's "
                            "shape with max_stages", name, version)
                return repaired, None
            # On a thread, like every planner search (see _plan).
            check = await asyncio.to_thread(
                replanning.check_repair, shape, repaired, self._planner_devices(survivors),
                replicas=int(entry.get("replicas", 1)) > 1, plan_version=repaired.plan_version + 1)
        except PlanError as exc:
            logger.warning("local repair of model=%s version=%s kept: no plan over the survivors to compare "
                           "it with: %s", name, version, exc)
            return repaired, None
        if check.keep:
            logger.info("local repair of model=%s version=%s kept: period %.4f s, best over %d survivors %.4f s "
                        "(tolerance %.0f %%)", name, version, check.repaired_cost.period_s, len(survivors),
                        check.best_cost.period_s, REPAIR_TOLERANCE * 100)
            return check.repaired, None
        logger.warning("local repair of model=%s version=%s has period %.4f s, more than %.0f %% above the best "
                       "placement's %.4f s over %d survivors; loading plan %d before switching to it: %s",
                       name, version, check.repaired_cost.period_s, REPAIR_TOLERANCE * 100,
                       check.best_cost.period_s, len(survivors), check.best.plan_version, _describe(check.best))
        if self.host.metrics is not None:
            self.host.metrics.count_failover("repair_replanned")
        return check.repaired, check.best

    def _is_witness(self, agent: str) -> bool:
        if agent == self.host.node_id:
            return bool(self.host.config.election.witness)
        peer = self.host.links.peers.get(agent)
        return bool(peer and peer.info.get("witness"))

    def _capabilities(self, agent: str) -> dict:
        if agent == self.host.node_id:
            return self.host.capabilities
        peer = self.host.links.peers.get(agent)
        return (peer.info.get("caps") if peer else None) or {}

    def _free_memory(self, agents) -> dict[str, int]:
        return {agent: _available_memory(self._capabilities(agent)) for agent in agents}

    # ----------------------------------------------------------------- deploy

    def start_deploy(self, *, name: str, version: str, source: str, rollout: str, replicas: int, options: dict) -> Deployment:
        if not self.active:
            raise NotCoordinatorError(self.host.leader_id)
        registry = self.host.registry_view()
        if version in registry["models"].get(name, {}).get("versions", {}):
            raise registry_ops.RegistryError(
                f"version {version!r} of model {name!r} already exists; pick a new version name", kind="conflict")
        try:
            check_deploy_options(source, rollout, options)
            max_stages = options.get("max_stages")
            workers = [a for a in self.alive_agents() if not self._is_witness(a)]
            if isinstance(max_stages, int) and max_stages > len(workers):
                raise ValueError(f"options.max_stages is {max_stages}, but only {len(workers)} alive agents can run "
                                 f"segments; use at most {len(workers)}")
        except ValueError as exc:
            logger.info("deploy rejected model=%s version=%s: %s", name, version, exc)
            raise registry_ops.RegistryError(str(exc), kind="invalid") from None
        deployment = Deployment(uuid.uuid4().hex[:12], name, version, started=time.monotonic())
        self.deployments[deployment.id] = deployment
        task = asyncio.get_running_loop().create_task(
            self._deploy(deployment, source, rollout, replicas, options), name=f"deploy-{deployment.id}")
        self._deploy_tasks.add(task)
        task.add_done_callback(self._deploy_tasks.discard)
        return deployment

    def _deployment_ready(self, name: str, version: str) -> None:
        for deployment in self.deployments.values():
            if deployment.model == name and deployment.version == version and deployment.state != "ready":
                deployment.state, deployment.percent = "ready", 100.0
                deployment.finished = time.monotonic()
                deployment.message = f"ready after {deployment.finished - deployment.started:.1f} s"
                if deployment.note:
                    deployment.message += f"; {deployment.note}"
                logger.info("deployment ready id=%s model=%s version=%s", deployment.id, name, version)

    async def _deploy(self, deployment: Deployment, source: str, rollout: str, replicas: int, options: dict) -> None:
        try:
            deployment.state, deployment.message = "distributing", f"exporting {source}"
            canary_policy = canary.policy_from_options(options)
            job = await self._export(source, deployment, options)
            deployment.percent = 40.0
            deployment.message = "planning"
            placement, predicted = await self._plan(deployment.model, deployment.version, job, replicas, options)
            deployment.percent = 50.0
            if replicas > 1 and all(len(segment.agents) == 1 for segment in placement.segments):
                deployment.note = ("no replicas: the plan uses every agent for a pipeline stage, and replicas "
                                   "go only on spare agents (limit the stages with options.max_stages)")
                logger.warning("deployment id=%s model=%s version=%s: %s", deployment.id, deployment.model,
                               deployment.version, deployment.note)

            def change(registry: dict) -> dict:
                registry = registry_ops.add_version(
                    registry, deployment.model, deployment.version, manifest=job["manifest"],
                    source=source, strategy=str(job.get("strategy") or options.get("segmentation", "layer")),
                    replicas=replicas)
                entry = registry["models"][deployment.model]["versions"][deployment.version]
                # Cut rules, so a later coordinator can plan this version again without the export.
                entry["allowed_cuts"] = _allowed_cuts(job)
                entry["required_cuts"] = [int(cut) for cut in job.get("required_cuts") or []]
                entry["tasks"] = list(job.get("tasks") or [])
                entry["rollout"] = rollout
                entry["canary_weight"] = float(options.get("canary_weight", 0.1))
                entry["unit_weight_bytes"] = [layer["weight_bytes"] for layer in job["profile"]]
                # Kept for re-planning after joins and deaths. A shape fixed by hand with max_stages
                # is kept, and joins only restore its replicas (_restore_replicas).
                entry["profile"] = job["profile"]
                entry["max_stages"] = options.get("max_stages")
                entry["predicted"] = predicted
                entry["tokenizer"] = job.get("tokenizer")
                entry["canary"] = job.get("canary")
                entry["canary_policy"] = canary_policy
                placement_next = Placement.from_dict({**placement.to_dict(), "plan_version": registry["plan_version"] + 1})
                return registry_ops.set_placement(registry, placement_next)

            await self.commit(change)
            deployment.state, deployment.percent = "loading", 60.0
            deployment.message = "placement committed; agents are fetching and loading segments"
            logger.info("deployment committed id=%s model=%s version=%s segments=%s", deployment.id,
                        deployment.model, deployment.version,
                        [(s.first, s.last, s.agents) for s in placement.segments])
        except asyncio.CancelledError:
            deployment.state, deployment.message = "failed", "coordinator stepped down during the deploy; deploy again"
            raise
        except Exception as exc:
            deployment.state, deployment.message = "failed", f"{type(exc).__name__}: {exc}"
            deployment.finished = time.monotonic()
            logger.error("deployment failed id=%s model=%s version=%s: %s", deployment.id,
                         deployment.model, deployment.version, exc)

    async def _export(self, source: str, deployment: Deployment, options: dict) -> dict:
        """Export ``source`` in a child process (torch.export holds the GIL for seconds)."""
        with tempfile.TemporaryDirectory(prefix="shardmesh-export-") as out_dir:
            cmd = [sys.executable, "-m", "coordinator.export_job", "--source", source,
                   "--name", deployment.model, "--version", deployment.version, "--out", out_dir,
                   "--cache", str(self.host.data_dir / "profile-cache"),
                   *_segmentation_arguments(options), *split_arguments(source, options)]
            process = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                stdout, stderr = await asyncio.wait_for(process.communicate(), EXPORT_TIMEOUT_S)
            except asyncio.TimeoutError:
                process.kill()
                raise TimeoutError(f"exporting {source} took longer than {EXPORT_TIMEOUT_S:.0f} s")
            if process.returncode != 0:
                tail = stderr.decode(errors="replace").strip().splitlines()[-5:]
                raise RuntimeError(f"export of {source!r} failed (exit {process.returncode}): {' | '.join(tail)}")
            job = json.loads(stdout.decode().strip().splitlines()[-1])
            await asyncio.to_thread(self._import_blobs, Path(out_dir, "blobs"))
            return job

    def _import_blobs(self, blob_dir: Path) -> None:
        """Copy exported blobs into the store (hashing and fsync: run in a thread)."""
        for blob in blob_dir.iterdir():
            if not self.host.store.has(blob.name):
                self.host.store.put(blob.read_bytes(), expected_sha256=blob.name)

    async def _plan(self, name: str, version: str, job: dict, replicas: int,
                    options: dict | None = None) -> tuple[Placement, dict]:
        """Plan a placement over the alive agents, on a worker thread (see `_plan_for_devices`)."""
        alive = sorted(a for a in self.alive_agents() if not self._is_witness(a))
        devices = self._planner_devices(alive)
        # The search is pure Python and takes up to about a second for a dozen agents and
        # hundreds of units. On a thread it shares the GIL with the event loop in switch-interval
        # slices, so heartbeats and elections keep running while it searches.
        return await asyncio.to_thread(_plan_for_devices, name, version, job, replicas, options, devices)

    def _planner_devices(self, agents: list[str]) -> list[Device]:
        """Describe agents to the planner: speed relative to this agent, free memory, link."""
        own_score = float(self.host.capabilities.get("total_gflops") or 1.0)
        devices = []
        for agent in agents:
            caps = self._capabilities(agent)
            score = float(caps.get("total_gflops") or own_score)
            devices.append(Device(
                id=agent,
                speed=score / own_score,
                memory_bytes=_available_memory(caps),
                bandwidth_bytes_per_s=float(self.host.membership.bandwidth.get(agent, DEFAULT_BANDWIDTH)),
                latency_s=max(self.host.membership.rtt_s.get(agent, DEFAULT_LATENCY_S) / 2, DEFAULT_LATENCY_S),
            ))
        return devices

    def _restore_replicas(self, name: str, version: str, entry: dict, placement: Placement, alive: set[str],
                          plan_version: int) -> Placement | None:
        """Return a placement that makes agents without a segment of a ``max_stages`` version replicas.

        Its stages stay as the deploy fixed them. As at the deploy, with ``replicas`` above 1
        every spare agent replicates the stage with the most profiled seconds per holder, so a
        replica lost with its agent comes back when the agent returns. None when nothing changes.
        """
        shape = replanning.shape_from_entry(entry, placement.unit_count)  # PlanError on a stale profile
        if int(entry.get("replicas", 1)) <= 1 or shape is None:
            logger.log(self._join_log_level, "model=%s version=%s keeps its hand-fixed shape after a join "
                       "(deployed with max_stages, without replicas or without a stored profile)", name, version)
            return None
        spare = sorted(a for a in alive if a not in placement.agents and not self._is_witness(a))
        if not spare:
            return None
        stages = _replicate_slowest([(s.first, s.last, s.agents) for s in placement.segments], spare,
                                    list(shape.units))
        segments = tuple(SegmentPlacement(segment.index, first, last, tuple(agents))
                         for segment, (first, last, agents) in zip(placement.segments, stages))
        logger.info("model=%s version=%s: agents %s replicate its hand-fixed stages again", name, version,
                    ",".join(spare))
        return Placement(placement.model, placement.version, plan_version + 1, placement.unit_count, segments,
                         placement.predicted_period_s, placement.predicted_latency_s, False)

    @property
    def _join_log_level(self) -> int:
        # A join's first evaluation is logged at INFO, its re-checks at DEBUG.
        return logging.INFO if self._join_is_new else logging.DEBUG

    async def _replan_for_join(self, name: str, version: str, entry: dict, placement: Placement, alive: set[str],
                               plan_version: int) -> Placement | None:
        """Return a better placement over the grown cluster, or None to keep the current one.

        Chains (layer and block strategies) and branch models are planned on their unit groups,
        so every cut stays an allowed cut and the required cuts keep heads apart. Both
        placements are priced on every route (``coordinator.replanning``), and the current one
        stays unless the new one lowers the period by more than REPLAN_HYSTERESIS.
        """
        if entry.get("max_stages"):
            return self._restore_replicas(name, version, entry, placement, alive, plan_version)
        shape = replanning.shape_from_entry(entry, placement.unit_count)
        if shape is None:
            logger.log(self._join_log_level, "model=%s version=%s is not re-planned after a join: its deploy "
                       "fixed the plan's shape with max_stages", name, version)
            return None
        agents = sorted(a for a in alive if not self._is_witness(a))
        # On a thread, like every planner search (see _plan).
        better, current_cost, best_cost = await asyncio.to_thread(
            replanning.plan_after_join, shape, placement, self._planner_devices(agents),
            hysteresis=REPLAN_HYSTERESIS, replicas=int(entry.get("replicas", 1)) > 1, plan_version=plan_version + 1)
        if better is None:
            logger.log(self._join_log_level, "keeping the plan of model=%s version=%s after a join: best period "
                       "%.4f s, current %.4f s, a move needs more than %.0f %% gain", name, version,
                       best_cost.period_s, current_cost.period_s, REPLAN_HYSTERESIS * 100)
            return None
        logger.info("model=%s version=%s: a plan over %d agents lowers the predicted period from %.4f s to %.4f s",
                    name, version, len(agents), current_cost.period_s, best_cost.period_s)
        return better

    def deployment(self, deployment_id: str) -> Deployment | None:
        return self.deployments.get(deployment_id)


def _store_repair(registry: dict, repaired: Placement, best: Placement | None) -> dict:
    """Return ``registry`` with a local repair as the placement and ``best``, when given, as pending."""
    registry = registry_ops.set_placement(registry, repaired)
    if best is None:
        return registry
    return registry_ops.set_pending_placement(registry, best)


def _describe(placement: Placement) -> str:
    """Format a placement's segments for logs as ``first..last@agent/agent``."""
    return ", ".join(f"{s.first}..{s.last}@{'/'.join(s.agents)}" for s in placement.segments)


def _allowed_cuts(job: dict) -> list[int]:
    """Return the export job's allowed cuts; an older job output without them allows every cut."""
    unit_count = len(job["profile"])
    cuts = job.get("allowed_cuts")
    if cuts is None:
        return list(range(unit_count - 1))
    return sorted({int(cut) for cut in cuts if 0 <= int(cut) < unit_count - 1})


# Every deploy option, with what it does: an unknown key (often a typo) is an error, not a no-op.
DEPLOY_OPTIONS = {
    "max_stages": "use at most this many agents, the first in id order (benchmarks, tests)",
    "segmentation": "layer (cut at any unit) or block (cut only between groups of blocks)",
    "block_size": "with segmentation block: blocks per group",
    "block_prefix": "with segmentation block: the unit name prefix of the blocks",
    "split_prefix": "exported: sources: the module whose numbered children become units",
    "split_depth": "exported: sources: one unit per module path cut to this many parts",
    "canary_weight": "with strategy canary: the traffic share the new version starts with",
    **{key: "with strategy canary: an automatic rollback limit" for key in canary.POLICY_OPTIONS},
}
_PATH_SOURCES = ("exported:", "hf:")


def check_deploy_options(source: str, rollout: str, options: dict) -> None:
    """Raise ValueError naming the first deploy option that is unknown, invalid or does not apply.

    Runs when the deploy is submitted, so a typo gets a 400 at once instead of a deploy that
    silently ignores it. The coordinator also checks that a path source exists on its disk.
    """
    unknown = sorted(set(options) - set(DEPLOY_OPTIONS))
    if unknown:
        raise ValueError(f"options.{unknown[0]} is not a deploy option; known options: {', '.join(sorted(DEPLOY_OPTIONS))}")
    if options.get("segmentation", "layer") != "block":
        for key in ("block_size", "block_prefix"):
            if key in options:
                raise ValueError(f"options.{key} applies only with options.segmentation \"block\"; remove it or set segmentation")
    _segmentation_arguments(options)
    split_arguments(source, options)
    canary_keys = ["canary_weight", *canary.POLICY_OPTIONS]
    if rollout != "canary":
        for key in canary_keys:
            if key in options:
                raise ValueError(f"options.{key} applies only to strategy \"canary\", but the strategy is {rollout!r}")
    weight = options.get("canary_weight", 0.1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
        raise ValueError(f"options.canary_weight is {weight!r}; use a number above 0 and at most 1")
    canary.policy_from_options(options)
    max_stages = options.get("max_stages")
    if max_stages is not None and (isinstance(max_stages, bool) or not isinstance(max_stages, int) or max_stages < 1):
        raise ValueError(f"options.max_stages is {max_stages!r}; use an integer >= 1")
    for prefix in _PATH_SOURCES:
        if source.startswith(prefix):
            path = Path(source[len(prefix):])
            if not path.is_absolute():
                raise ValueError(f"source {source!r} needs an absolute path on the coordinator, such as {prefix}/srv/models/x")
            if not path.exists():
                raise ValueError(f"source {source!r}: {path} does not exist on the coordinator ({socket.gethostname()}), "
                                 f"which runs the export; copy the model to that path there")


def _segmentation_arguments(options: dict) -> list[str]:
    """Check the deploy's segmentation options and return them as export job arguments."""
    segmentation = options.get("segmentation", "layer")
    if segmentation not in ("layer", "block"):
        raise ValueError(f"options.segmentation is {segmentation!r}; use \"layer\" or \"block\"")
    arguments = ["--segmentation", segmentation]
    if segmentation == "layer":
        return arguments
    block_size = options.get("block_size")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"options.block_size is {block_size!r}; block segmentation needs an integer >= 1 "
                         f"(allow a cut after every that many blocks)")
    arguments += ["--block-size", str(block_size)]
    block_prefix = options.get("block_prefix")
    if block_prefix is not None:
        if not isinstance(block_prefix, str):
            raise ValueError(f"options.block_prefix is {block_prefix!r}; use the unit name prefix of the blocks, "
                             f"such as \"encoder.layer.\"")
        arguments += ["--block-prefix", block_prefix]
    return arguments


def _plan_for_devices(name: str, version: str, job: dict, replicas: int, options: dict | None,
                      devices: list[Device]) -> tuple[Placement, dict]:
    """Plan a placement of an export job over ``devices`` (pure: safe to run on a thread).

    Segments start and end only at the job's allowed cuts, and every required cut (the trunk
    end and the head ends of a branch model) separates two segments.
    ``options["max_stages"]`` (an integer from 1 to the number of agents) limits the pipeline
    to the first that many agents in id order. With ``replicas > 1`` the other agents then
    replicate the slowest stages. Benchmarks and tests use it to get a known shape.
    """
    # The planner places unit groups, the units between two allowed cuts, so every stage
    # boundary it picks is an allowed cut. expand_stages maps the stages back to units.
    groups = unit_groups(len(job["profile"]), _allowed_cuts(job))
    merged = merge_profile(job["profile"], _allowed_cuts(job))
    layers = [Layer(l["name"], float(l["seconds"]), int(l["weight_bytes"]), int(l["output_bytes"])) for l in merged]
    if not devices:
        raise PlanError("no alive agent can run segments (only witnesses are up)")
    max_stages = (options or {}).get("max_stages")
    if max_stages is None:
        result = make_plan(devices, layers, replicas=replicas > 1)
        stages = [(stage.first_layer, stage.last_layer, stage.devices) for stage in result.stages]
    else:
        if isinstance(max_stages, bool) or not isinstance(max_stages, int) or not 1 <= max_stages <= len(devices):
            raise PlanError(f"options.max_stages is {max_stages!r}; use an integer from 1 to {len(devices)} "
                            f"(the number of alive agents that can run segments)")
        result = make_plan(devices[:max_stages], layers, replicas=False)
        stages = [(stage.first_layer, stage.last_layer, stage.devices) for stage in result.stages]
        if replicas > 1:
            # NOTE: the predicted period below is then that of the pipeline without these replicas.
            stages = _replicate_slowest(stages, [device.id for device in devices[max_stages:]], layers)
    # A branch model is planned as one chain over all its units, and a required cut that falls
    # inside a stage splits it on the same agents.
    # NOTE: the cost model then charges every head to each request, so the predicted period
    # and latency of a branch model are upper bounds, not the optimum for one task's route.
    stages = expand_stages(stages, groups, job.get("required_cuts") or ())
    placement = placement_from_stages(
        name, version, 0, len(job["profile"]), stages,
        predicted_period_s=result.period_s, predicted_latency_s=result.latency_s, optimal=result.optimal)
    predicted = {"period_s": result.period_s, "latency_s": result.latency_s,
                 "throughput_rps_per_item": 1.0 / result.period_s if result.period_s > 0 else None,
                 "optimal": result.optimal, "lower_bound_s": result.lower_bound_s,
                 "profile_batch": job.get("profile_batch")}
    return placement, predicted


def _replicate_slowest(stages: list[tuple[int, int, tuple[str, ...]]], spare: list[str], layers: list[Layer]) -> list:
    """Give each spare agent to the stage with the highest profiled seconds per holder."""
    stages = [(first, last, tuple(agents)) for first, last, agents in stages]
    for agent in spare:
        load = [sum(layer.seconds for layer in layers[first:last + 1]) / len(agents) for first, last, agents in stages]
        slowest = load.index(max(load))
        first, last, agents = stages[slowest]
        stages[slowest] = (first, last, (*agents, agent))
    return stages


def _available_memory(capabilities: dict) -> int:
    """Memory the planner may fill on an agent: what its probe found available, else 8 GiB."""
    memory = capabilities.get("memory") or {}
    return int(memory.get("available_bytes") or DEFAULT_MEMORY_BYTES)


class NotCoordinatorError(RuntimeError):
    """A coordinator action was attempted on an agent that does not hold the lease."""

    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"this agent is not the coordinator (coordinator: {leader_id or 'none elected'})")
        self.leader_id = leader_id
