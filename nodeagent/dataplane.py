"""Data plane: requests enter at a gateway, activations flow agent to agent, results come back.

Every agent plays two parts here:

- *Gateway* for the requests that reach its HTTP endpoint. It pins the model version, builds a
  route from the committed placement (each hop to the replica with the fewest outstanding
  requests, tied replicas in turn), sends the inputs to the first hop and waits for exactly one
  result. Failover decisions are made by ``coordinator.failover.GatewayTracker``; see the essay
  there.
- *Hop* for activations that other agents send it. It checks that it has the segment loaded
  under the frame's plan version, and otherwise rejects the hop at once so the gateway retries
  elsewhere. It queues the work on the segment's worker (micro-batching, priorities, off the
  event loop) and keeps the output until the gateway reports the request done. It forwards the
  output to the next hop and reports PROGRESS to the gateway.

The coordinator is never on this path. Frames carry epoch, plan version, request id, attempt,
hop index and the time left (``ttl_ms``, relative, so agents need no synchronised clocks).

A request for a branch model names its task. The gateway routes it over the segments on that
task's route only (``coordinator.placement.segments_on_route``), the frames carry ``task``, and
each hop runs its segment for that task on a worker of that task. An activation is held at the
boundary where the next hop starts, which on a task's route is the head's first unit right after
the trunk, so a resume never lands on another head's segment.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from coordinator.failover import GATEWAY_HOLDER, GatewayTracker, InflightRequest, ResumePoint
from coordinator.placement import Hop, Placement, choose_route, route_cuts, segments_on_route
from protocol.messages import MsgType
from nodeagent.worker import DeadlineExceeded as WorkerDeadline
from nodeagent.worker import QueueFull, WorkerClosed
from protocol.tensors import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

WATCHDOG_INTERVAL_S = 0.05
# A request that found no route (every holder excluded, or a segment still loading) tries again
# this often; exclusions last ``exclusion_s`` (1 s by default), so a few tries fit in one.
ROUTE_RETRY_S = 0.25


class InferenceError(Exception):
    """A request that ended without a result. ``status`` is the HTTP status the gateway returns."""

    def __init__(self, message: str, *, status: int, request_id: str) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id


@dataclass
class HeldActivation:
    """An activation this agent produced and keeps until the gateway no longer needs it."""

    tensors: dict[str, torch.Tensor]
    expires: float
    header: dict


@dataclass
class GatewayRequest:
    """Gateway-side state that the pure tracker does not hold: tensors, futures, exclusions."""

    inputs: dict[str, torch.Tensor]
    future: asyncio.Future
    priority: str
    task: str | None = None
    route_units: tuple[int, ...] | None = None
    excluded: dict[str, float] = field(default_factory=dict)
    # (agent, first unit) -> until: a segment the agent refused; its other segments stay usable.
    excluded_hops: dict[tuple[str, int], float] = field(default_factory=dict)
    route: list[Hop] = field(default_factory=list)
    result_info: dict = field(default_factory=dict)


class DataPlane:
    """Gateway and hop logic of one agent. ``host`` is the agent (see ``nodeagent.agent.Agent``)."""

    def __init__(self, host, *, hop_timeout_s: float, exclusion_s: float = 1.0) -> None:
        self.host = host
        self.node_id: str = host.node_id
        self.hop_timeout_s = hop_timeout_s
        self.exclusion_s = exclusion_s
        self.tracker = GatewayTracker()
        self._requests: dict[str, GatewayRequest] = {}
        self._held: dict[tuple[str, int], HeldActivation] = {}
        self._outstanding: dict[str, int] = {}
        self._route_turn = 0  # rotates ties between equally loaded replicas (choose_route)
        self.counters = {
            "requests": 0, "succeeded": 0, "failed": 0, "failovers": 0, "refusals_sent": 0,
            "hops_run": 0, "duplicates_dropped": 0,
        }

    # ================================================================= gateway

    async def infer(
        self,
        model: str,
        version: str,
        inputs: Mapping[str, torch.Tensor],
        *,
        priority: str = "normal",
        deadline_s: float = 10.0,
        request_id: str | None = None,
        task: str | None = None,
        route_units: tuple[int, ...] | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict]:
        """Run one request through the cluster; raise InferenceError when it cannot finish.

        For a branch model, ``task`` names the head and ``route_units`` lists the units of that
        task's route (``coordinator.micromodel.route_for_task``); the caller checks both.
        """
        request_id = request_id or uuid.uuid4().hex[:16]
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        self.counters["requests"] += 1
        self.tracker.start(request_id, model, version, now=now, deadline=now + deadline_s)
        state = GatewayRequest(dict(inputs), loop.create_future(), priority, task,
                               tuple(route_units) if route_units is not None else None)
        self._requests[request_id] = state
        # A timer at the deadline fails the request on time; waiting for the watchdog's 50 ms tick
        # would add up to 50 ms.
        expiry = loop.call_later(deadline_s, self._fail_expired, request_id)
        try:
            self._launch(request_id, ResumePoint(0, GATEWAY_HOLDER), reason="new request")
            outputs = await state.future
            self.counters["succeeded"] += 1
            return outputs, state.result_info
        except InferenceError:
            self.counters["failed"] += 1
            raise
        finally:
            expiry.cancel()
            self._forget_request(request_id)

    def _forget_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        request = self.tracker.get(request_id)
        holders = self.tracker.holders_of(request) if request is not None else set()
        if request is not None:
            self.tracker.finish(request_id)
        if state is not None:
            for hop in state.route:
                self._outstanding[hop.agent] = max(0, self._outstanding.get(hop.agent, 0) - 1)
        for holder in holders:
            if holder == self.node_id:
                self._drop_held(request_id)
            else:
                self.host.links.send_nowait(holder, MsgType.CANCEL, {"rid": request_id}, plane="control")

    def _usable(self, state: GatewayRequest) -> set[str]:
        now = time.monotonic()
        for agent, until in list(state.excluded.items()):
            if until <= now:
                del state.excluded[agent]
        for hop, until in list(state.excluded_hops.items()):
            if until <= now:
                del state.excluded_hops[hop]
        return self.host.usable_agents() - set(state.excluded)

    def _launch(self, request_id: str, point: ResumePoint, *, reason: str) -> None:
        """Send the request along a new route from ``point``; leave it waiting when none exists."""
        request = self.tracker.get(request_id)
        state = self._requests.get(request_id)
        if request is None or state is None or request.done:
            return
        placement = self.host.placement_for(request.model, request.version)
        if placement is None:
            request.stalled_reason = f"model {request.model} version {request.version} has no placement"
            return
        usable = self._usable(state)
        placement = self.host.ready_placement(placement)
        point, route = self._plan_route(request_id, state, placement, point, usable,
                                        turn=self._route_turn, avoid=self.host.suspected_agents())
        self._route_turn += 1
        if route is None:
            reason = self._no_route_reason(placement, state, point.boundary, usable)
            if reason != request.stalled_reason:
                logger.info("request waits for a route rid=%s model=%s boundary=%d: %s",
                            request_id, request.model, point.boundary, reason)
            request.stalled_reason = reason
            return
        for hop in state.route:
            self._outstanding[hop.agent] = max(0, self._outstanding.get(hop.agent, 0) - 1)
        for hop in route:
            self._outstanding[hop.agent] = self._outstanding.get(hop.agent, 0) + 1
        state.route = route
        attempt = self.tracker.launched(request_id, [hop.agent for hop in route], now=time.monotonic())
        if attempt > 1:
            request.failovers += 1
            self.counters["failovers"] += 1
            self.host.metric_failover(request.model)
            logger.warning(
                "resuming request rid=%s attempt=%d from boundary %d held by %s via %s: %s",
                request_id, attempt, point.boundary, point.holder or "gateway",
                "->".join(hop.agent for hop in route), reason,
            )
        header = self._activation_header(request, placement, attempt, route)
        if point.holder == GATEWAY_HOLDER:
            self._forward(header, state.inputs, from_gateway=True)
        else:
            resend = dict(header, boundary=point.boundary)
            if point.holder == self.node_id:
                self._resend(resend)
            else:
                self._send_or_fail(point.holder, MsgType.RESEND, resend, plane="control", rid=request_id)

    @staticmethod
    def _no_route_reason(placement: Placement, state: GatewayRequest, boundary: int, usable: set[str]) -> str:
        """Name the first segment on the way that lacks a holder, not the resume boundary."""
        segments = segments_on_route(placement, state.route_units)
        if segments is None:
            return (f"placement plan {placement.plan_version} has no segments that cover the route of task "
                    f"{state.task!r} (units {list(state.route_units or ())})")
        for segment in segments:
            holders = [agent for agent in segment.agents
                       if agent in usable and (agent, segment.first) not in state.excluded_hops]
            if segment.last >= boundary and not holders:
                refused = sorted(agent for agent, first in state.excluded_hops if first == segment.first)
                return (f"no usable agent has loaded the segment starting at unit {segment.first} "
                        f"(usable agents: {', '.join(sorted(usable)) or 'none'}"
                        + (f"; refused it just now: {', '.join(refused)}" if refused else "") + ")")
        return f"no segment starts at boundary {boundary} on the request's route"

    def _activation_header(self, request: InflightRequest, placement: Placement, attempt: int, route: list[Hop]) -> dict:
        remaining = max(0.0, request.deadline - time.monotonic())
        return {
            "epoch": self.host.epoch,
            "plan": placement.plan_version,
            "rid": request.request_id,
            "att": attempt,
            "hop": 0,
            "route": [hop.to_list() for hop in route],
            "ttl_ms": int(remaining * 1000),
            "model": request.model,
            "version": request.version,
            "gw": self.node_id,
            "prio": self._requests[request.request_id].priority,
            "task": self._requests[request.request_id].task,
        }

    def _send_or_fail(self, peer: str, msg_type: MsgType, header: dict, *, plane: str, rid: str, buffers=()) -> None:
        """Send a frame; when the peer is unreachable, treat it as a failed hop."""

        def failed(exc: BaseException) -> None:
            logger.info("send to %s failed rid=%s type=%s: %s", peer, rid, msg_type.name, exc)
            self._hop_failed(rid, peer, f"agent {peer} unreachable: {exc}")

        self.host.links.send_nowait(peer, msg_type, header, buffers, plane=plane, on_error=failed)

    def _hop_failed(self, request_id: str, agent: str, reason: str, *, first: int | None = None) -> None:
        """Exclude ``agent`` for a while (only its segment at unit ``first`` when given) and retry."""
        state = self._requests.get(request_id)
        if state is None:
            # The failure happened on another agent's behalf: tell the gateway through PROGRESS.
            return
        if first is None:
            state.excluded[agent] = time.monotonic() + self.exclusion_s
        else:
            state.excluded_hops[(agent, first)] = time.monotonic() + self.exclusion_s
        self._launch(request_id, ResumePoint(-1, GATEWAY_HOLDER), reason=reason)

    # ----------------------------------------------------------------- gateway: incoming

    def _on_result(self, sender: str, header: dict, tensors: dict[str, torch.Tensor] | None) -> None:
        request_id = header.get("rid")
        state = self._requests.get(request_id)
        request = self.tracker.get(request_id)
        if state is None or request is None or state.future.done():
            self.counters["duplicates_dropped"] += 1
            logger.debug("dropping late result rid=%s from=%s att=%s", request_id, sender, header.get("att"))
            return
        if header.get("error"):
            state.future.set_exception(InferenceError(
                f"segment failed on agent {sender}: {header['error']}", status=500, request_id=request_id))
            return
        state.result_info = {
            "request_id": request_id,
            "attempts": request.attempt,
            "failovers": request.failovers,
            "route": [hop.to_list() for hop in state.route],
            "latency_s": time.monotonic() - request.started,
        }
        state.future.set_result(tensors or {})

    def _on_progress(self, sender: str, header: dict) -> None:
        request_id = header.get("rid")
        if request_id not in self._requests:
            return
        boundary = int(header.get("boundary", -1))
        if header.get("lost"):
            self.tracker.forget_holder(request_id, boundary)
            self._launch(request_id, ResumePoint(-1, GATEWAY_HOLDER), reason=f"agent {sender} lost boundary {boundary}")
            return
        self.tracker.progress(request_id, int(header.get("att", 0)), boundary, sender,
                              header.get("next"), now=time.monotonic())
        failed = header.get("next_failed")
        if failed and int(header.get("att", 0)) == self.tracker.get(request_id).attempt:
            self._hop_failed(request_id, failed, f"agent {sender} could not reach {failed}")

    def _on_refuse(self, sender: str, header: dict) -> None:
        request_id = header.get("rid")
        request = self.tracker.get(request_id)
        if request is None or int(header.get("att", 0)) != request.attempt:
            return
        logger.info("hop refused rid=%s by=%s: %s", request_id, sender, header.get("reason"))
        first = header.get("first")
        # A refusal names the segment: exclude only that one, so the agent's other segments stay
        # on the route. A refusal without it (an older agent) excludes the agent.
        self._hop_failed(request_id, sender, f"agent {sender} refused: {header.get('reason')}",
                         first=first if isinstance(first, int) and not isinstance(first, bool) else None)

    def agent_lost(self, agent_id: str, reason: str) -> None:
        """Resume every request whose current route needs ``agent_id``."""
        for request in self.tracker.affected_by(agent_id):
            self._hop_failed(request.request_id, agent_id, f"agent {agent_id} lost: {reason}")

    def placement_changed(self) -> None:
        """Retry requests that were waiting for a route."""
        for request_id, state in list(self._requests.items()):
            request = self.tracker.get(request_id)
            if request is not None and request.stalled_reason:
                self._launch(request_id, ResumePoint(-1, GATEWAY_HOLDER), reason="placement changed")

    def _fail_expired(self, request_id: str) -> None:
        """Fail a request whose deadline has passed: 503 when it waits for a route, else 504."""
        request = self.tracker.get(request_id)
        state = self._requests.get(request_id)
        if request is None or state is None or state.future.done():
            return
        if request.stalled_reason:
            error = InferenceError(
                f"request {request_id} could not finish before its deadline: {request.stalled_reason}",
                status=503, request_id=request_id)
        else:
            error = InferenceError(
                f"request {request_id} passed its deadline waiting on agent {request.waiting_on or 'unknown'} "
                f"after {request.attempt} attempt(s); allow more time (deadline_ms) or retry",
                status=504, request_id=request_id)
        logger.warning("request failed rid=%s: %s", request_id, error)
        state.future.set_exception(error)

    async def watchdog(self) -> None:
        """Fail requests past their deadline, resume stalled ones, retry ones waiting for a route."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            now = time.monotonic()
            # Each request's own timer fails it at its deadline; this catches any timer that a
            # slow loop has not run yet.
            for request in self.tracker.expired(now):
                self._fail_expired(request.request_id)
            scale = self.host.timeout_scale()
            for request in self.tracker.stalled(now, ROUTE_RETRY_S):
                if request.stalled_reason:
                    self._launch(request.request_id, ResumePoint(-1, GATEWAY_HOLDER), reason="retrying route")
                    request.last_event = now
            for request in self.tracker.stalled(now, self.hop_timeout_s * scale):
                if request.stalled_reason:
                    continue
                if request.waiting_on:
                    self._hop_failed(request.request_id, request.waiting_on,
                                     f"no progress from agent {request.waiting_on} for {self.hop_timeout_s * scale:.1f} s")
                else:
                    request.last_event = now
            self._move_off_suspects()
            for key, held in list(self._held.items()):
                if held.expires <= now:
                    del self._held[key]

    def _move_off_suspects(self) -> None:
        """Resume requests that wait on a suspected agent, where a route without it exists.

        Without this, such a request waits until the detector declares the agent dead
        (dead_after_s) or the hop times out. A suspect that was only slow may still send its
        result, and the gateway drops that late result as a duplicate. A request whose only route
        needs the suspect keeps waiting on it.
        """
        suspects = self.host.suspected_agents()
        if not suspects:
            return
        for request_id, state in list(self._requests.items()):
            request = self.tracker.get(request_id)
            if request is None or request.done or request.stalled_reason or request.waiting_on not in suspects:
                continue
            agent = request.waiting_on
            if self._route_exists_without(request, state, agent):
                self._hop_failed(request_id, agent, f"agent {agent} is suspected by the failure detector")

    def _route_exists_without(self, request: InflightRequest, state: GatewayRequest, agent: str) -> bool:
        placement = self.host.placement_for(request.model, request.version)
        if placement is None:
            return False
        usable = self._usable(state) - {agent}
        _, route = self._plan_route(request.request_id, state, self.host.ready_placement(placement),
                                    ResumePoint(-1, GATEWAY_HOLDER), usable)
        return route is not None

    def _plan_route(
        self, request_id: str, state: GatewayRequest, placement: Placement, point: ResumePoint, usable: set[str],
        *, turn: int = 0, avoid: Collection[str] = (),
    ) -> tuple[ResumePoint, list[Hop] | None]:
        """Return where the request resumes (boundary 0 stays 0) and a route from there over ``usable``."""
        if point.boundary:
            point = self.tracker.resume_point(request_id, usable=usable, cuts=route_cuts(placement, state.route_units))
        route = choose_route(placement, point.boundary, outstanding=self._outstanding, usable=usable,
                             route_units=state.route_units, excluded_hops=state.excluded_hops, turn=turn, avoid=avoid)
        return point, route

    # ================================================================= hops

    def on_frame(self, sender: str, msg_type: MsgType, header: dict, payload) -> None:
        """Dispatch one data-plane frame (called by the agent's frame router)."""
        if msg_type == MsgType.ACTIVATION:
            tensors = decode_tensors(header.get("tensors", []), payload, limits=self.host.limits, peer=sender)
            self._accept_activation(sender, header, tensors)
        elif msg_type == MsgType.RESULT:
            tensors = None
            if not header.get("error"):
                tensors = decode_tensors(header.get("tensors", []), payload, limits=self.host.limits, peer=sender)
            self._on_result(sender, header, tensors)
        elif msg_type == MsgType.PROGRESS:
            self._on_progress(sender, header)
        elif msg_type == MsgType.HOP_REFUSE:
            self._on_refuse(sender, header)
        elif msg_type == MsgType.RESEND:
            self._resend(header)
        elif msg_type == MsgType.CANCEL:
            self._drop_held(str(header.get("rid")))

    def _forward(self, header: dict, tensors: Mapping[str, torch.Tensor], *, from_gateway: bool = False) -> None:
        """Send an activation to the agent of hop ``header['hop']`` (or run it here)."""
        hop = Hop.from_list(header["route"][header["hop"]])
        if hop.agent == self.node_id:
            self._accept_activation(self.node_id, header, dict(tensors))
            return
        meta, buffers = encode_tensors(tensors)
        frame_header = dict(header, tensors=meta)
        if from_gateway:
            self._send_or_fail(hop.agent, MsgType.ACTIVATION, frame_header, plane="data", rid=header["rid"], buffers=buffers)
            return

        def failed(exc: BaseException) -> None:
            logger.info("forward failed rid=%s to=%s: %s", header["rid"], hop.agent, exc)
            self._report(header, {"rid": header["rid"], "att": header["att"], "boundary": hop.first,
                                  "next": hop.agent, "next_failed": hop.agent})

        self.host.links.send_nowait(hop.agent, MsgType.ACTIVATION, frame_header, buffers, plane="data", on_error=failed)

    def _refuse(self, header: dict, reason: str, *, first: int | None = None) -> None:
        """Refuse a hop; ``first`` names the refused segment's first unit when it is known."""
        self.counters["refusals_sent"] += 1
        logger.info("refusing hop rid=%s hop=%s: %s", header.get("rid"), header.get("hop"), reason)
        body = {"rid": header.get("rid"), "att": header.get("att"), "reason": reason}
        if first is not None:
            body["first"] = first
        self._report(header, body, msg_type=MsgType.HOP_REFUSE)

    def _report(self, header: dict, body: dict, *, msg_type: MsgType = MsgType.PROGRESS) -> None:
        """Send a small control message to the request's gateway (or handle it here)."""
        gateway = header.get("gw")
        if gateway == self.node_id:
            if msg_type == MsgType.PROGRESS:
                self._on_progress(self.node_id, body)
            elif msg_type == MsgType.HOP_REFUSE:
                self._on_refuse(self.node_id, body)
            return

        def failed(exc: BaseException) -> None:
            # The gateway notices through its own link and hop timeout; nothing to retry here.
            logger.debug("report to gateway %s failed rid=%s type=%s: %s", gateway, body.get("rid"), msg_type.name, exc)

        self.host.links.send_nowait(gateway, msg_type, body, plane="control", on_error=failed)

    def _accept_activation(self, sender: str, header: dict, tensors: dict[str, torch.Tensor]) -> None:
        try:
            hop_index = int(header["hop"])
            hop = Hop.from_list(header["route"][hop_index])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            logger.warning("malformed activation header from=%s rid=%s: %s", sender, header.get("rid"), exc)
            return
        if hop.agent != self.node_id:
            self._refuse(header, f"hop {hop_index} names agent {hop.agent}, not {self.node_id}")
            return
        if header.get("gw") == self.node_id and sender != self.node_id and hop_index > 0:
            # The sender skips its PROGRESS report when the next hop is the gateway. So record
            # here, before any refusal, that the sender keeps the activation at this boundary.
            self._on_progress(sender, {"rid": header.get("rid"), "att": header.get("att"),
                                       "boundary": hop.first, "next": self.node_id})
        if int(header.get("epoch", 0)) < self.host.fenced_epoch():
            self._refuse(header, f"stale epoch {header.get('epoch')}; this agent accepted epoch {self.host.fenced_epoch()}")
            return
        segment = self.host.segments.get(header.get("model"), header.get("version"), hop.first, hop.last)
        if segment is None:
            self._refuse(header, f"segment units {hop.first}..{hop.last} of {header.get('model')}@{header.get('version')} is not loaded here",
                         first=hop.first)
            return
        plan_version = int(header.get("plan", -1))
        if plan_version not in segment.plan_versions and plan_version < max(segment.plan_versions):
            self._refuse(header, f"plan version {plan_version} is not held here (holds {sorted(segment.plan_versions)})",
                         first=hop.first)
            return
        # A newer plan version that names this exact segment is served: the gateway saw the
        # commit before this agent did, and the units to run are the same under both plans.
        ttl = float(header.get("ttl_ms", 0)) / 1000.0
        if ttl <= 0:
            logger.info("dropping expired activation rid=%s hop=%d", header.get("rid"), hop_index)
            return
        self._run_hop(header, hop_index, segment, tensors, time.monotonic() + ttl)

    def _run_hop(self, header: dict, hop_index: int, segment, tensors, deadline: float) -> None:
        """Queue the hop on its segment's worker; ``_hop_done`` continues with the worker's result.

        No task per hop: the worker calls back on this loop, which saves a task and a loop pass on
        each side of the segment run.
        """
        request_id = header["rid"]
        try:
            task = header.get("task")
            if task is not None and not isinstance(task, str):
                raise ValueError(f"activation field task is {task!r}; expected a task name or null")
            worker = segment.worker if task is None else segment.worker_for(task)
            worker.submit_nowait(
                tensors, priority=header.get("prio", "normal"), deadline=deadline, request_id=request_id,
                on_done=lambda outputs, error: self._hop_done(header, hop_index, segment, deadline, outputs, error),
            )
        except Exception as exc:  # rejected before it was queued: same handling as a failed run
            self._hop_done(header, hop_index, segment, deadline, None, exc)

    def _hop_done(self, header: dict, hop_index: int, segment, deadline: float, outputs, error) -> None:
        request_id = header["rid"]
        if isinstance(error, (QueueFull, WorkerClosed)):
            # Backpressure, or the segment was unloaded (re-placement, failed canary): refuse the
            # hop so the gateway retries on another replica or after the reload.
            self._refuse(header, str(error), first=segment.key[2])
            return
        if isinstance(error, WorkerDeadline):
            logger.info("hop passed its deadline in the queue rid=%s segment=%s", request_id, segment.key)
            return
        if error is not None:  # the segment rejected this input or failed on it
            logger.warning("segment run failed rid=%s segment=%s: %s", request_id, segment.key, error)
            self._send_result(header, None, error=f"{type(error).__name__}: {error}")
            return
        self.counters["hops_run"] += 1
        route = header["route"]
        if hop_index == len(route) - 1:
            self._send_result(header, outputs)
            return
        next_hop = Hop.from_list(route[hop_index + 1])
        # The next hop's first unit, not hop.last + 1: after the trunk of a branch model the
        # route skips the other heads.
        boundary = next_hop.first
        self._held[(request_id, boundary)] = HeldActivation(outputs, deadline, header)
        next_header = dict(header, hop=hop_index + 1, ttl_ms=int(max(0.0, deadline - time.monotonic()) * 1000))
        next_header.pop("tensors", None)
        # Forward first: the next hop is on the request's critical path, the gateway's record of
        # where the activation is held is not (it matters only if the next hop fails).
        self._forward(next_header, outputs)
        if next_hop.agent != header.get("gw") or next_hop.agent == self.node_id:
            self._report(header, {"rid": request_id, "att": header["att"], "boundary": boundary, "next": next_hop.agent})
        # Otherwise the next hop is the gateway itself, which records this progress when the
        # activation reaches it (see _accept_activation). That saves a control frame per request.

    def _send_result(self, header: dict, outputs: dict[str, torch.Tensor] | None, *, error: str | None = None) -> None:
        body = {"rid": header["rid"], "att": header["att"]}
        gateway = header["gw"]
        if error is not None:
            body["error"] = error
        if gateway == self.node_id:
            self._on_result(self.node_id, body, outputs)
            return
        buffers = ()
        if outputs is not None:
            meta, buffers = encode_tensors(outputs)
            body["tensors"] = meta

        def failed(exc: BaseException) -> None:
            logger.warning("cannot return result rid=%s to gateway %s: %s", header["rid"], gateway, exc)

        self.host.links.send_nowait(gateway, MsgType.RESULT, body, buffers, plane="data", on_error=failed)

    def _resend(self, header: dict) -> None:
        request_id = str(header.get("rid"))
        boundary = int(header.get("boundary", -1))
        held = self._held.get((request_id, boundary))
        if held is None:
            self._report(header, {"rid": request_id, "att": header.get("att"), "boundary": boundary, "lost": True})
            return
        activation = {k: v for k, v in header.items() if k != "boundary"}
        activation["hop"] = 0
        self._forward(activation, held.tensors)

    def _drop_held(self, request_id: str) -> None:
        for key in [key for key in self._held if key[0] == request_id]:
            del self._held[key]

    # ================================================================= plumbing

    async def close(self) -> None:
        for rid, state in list(self._requests.items()):
            if not state.future.done():
                state.future.set_exception(InferenceError(
                    f"agent {self.node_id} is shutting down; retry on another agent", status=503, request_id=rid))
        # Frames still waiting on a congested link are tasks of the peer links, which end as the links close.

    def status(self) -> dict:
        return {
            "inflight_gateway": len(self.tracker),
            "held_activations": len(self._held),
            "outstanding_by_agent": dict(self._outstanding),
            **self.counters,
        }
