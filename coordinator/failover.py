"""Gateway-side failover: resume an in-flight request from its last completed boundary.

Problem. A request visits a chain of agents. Any of them can die, stall (SIGSTOP, a wedged worker)
or refuse the hop (it does not hold the segment, or holds a different plan). The client must get
exactly one answer before its deadline: the right output, or an explicit error that says why.

Options rejected.
- Acknowledge-and-forget per hop (each sender drops its activation once the next hop acknowledges
  receipt): if the receiver dies after acknowledging but before forwarding, the work is lost and
  only a restart from the input can save the request.
- Restart from the input on every failure: simple, but wastes every completed segment, so a slow
  last stage that dies makes the whole request pay twice.
- Letting each agent re-route on its own: every agent would need the failure view of every other,
  and two agents could resume the same request at once.

Rule chosen. The gateway owns the request. Each agent that finishes a segment keeps its output for
that request (until the gateway says the request is done, or its deadline passes) and reports
PROGRESS(boundary, holder) to the gateway. When the gateway learns that the route is broken (the
link to an agent dropped, the failure detector declared it dead, a hop was refused, or nothing
happened for ``hop_timeout_s``), it picks the highest boundary whose holder is still usable and at
which the current placement starts a segment, builds a new route from there and asks the holder to
resend (the gateway itself holds boundary 0, the input). Each resume is a new *attempt*; results
and progress carry the attempt, and the first result of any attempt wins, so late duplicates are
dropped. This is the replay approach that Petals uses for its servers, moved to segment boundaries.

This module holds only the bookkeeping (no I/O, time passed in); the data-plane actor sends the
frames.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

GATEWAY_HOLDER = ""
"""Holder id of the gateway itself, which keeps boundary 0 (the request's inputs)."""


@dataclass
class InflightRequest:
    """Gateway state of one request that has no response yet."""

    request_id: str
    model: str
    version: str
    deadline: float
    started: float
    attempt: int = 0
    route_agents: tuple[str, ...] = ()
    # boundary -> agent that keeps the activation at that boundary (GATEWAY_HOLDER for 0).
    holders: dict[int, str] = field(default_factory=lambda: {0: GATEWAY_HOLDER})
    last_event: float = 0.0
    # The agent the request is waiting on now: the next hop after the highest boundary reached.
    waiting_on: str | None = None
    # Highest boundary reported in the current attempt. Reports come from different agents over
    # different links, so an older one can arrive after a newer one and must not move waiting_on back.
    reached: int = 0
    failovers: int = 0
    done: bool = False
    # Set while the request waits for a usable route (for example during a re-placement).
    stalled_reason: str = ""


@dataclass(frozen=True)
class ResumePoint:
    """Restart point of a request: ``boundary``, and the ``holder`` that keeps its activation."""

    boundary: int
    holder: str


class GatewayTracker:
    """In-flight requests of one gateway and the failover decisions about them."""

    def __init__(self) -> None:
        self._requests: dict[str, InflightRequest] = {}
        self.duplicates_dropped = 0

    def __len__(self) -> int:
        return len(self._requests)

    def get(self, request_id: str) -> InflightRequest | None:
        return self._requests.get(request_id)

    def start(self, request_id: str, model: str, version: str, *, now: float, deadline: float) -> InflightRequest:
        request = InflightRequest(request_id, model, version, deadline=deadline, started=now, last_event=now)
        self._requests[request_id] = request
        return request

    def launched(self, request_id: str, route_agents: Iterable[str], *, now: float) -> int:
        """Record a new attempt along ``route_agents``; return the attempt number."""
        request = self._requests[request_id]
        request.attempt += 1
        request.route_agents = tuple(route_agents)
        request.waiting_on = request.route_agents[0] if request.route_agents else None
        request.reached = -1
        request.last_event = now
        request.stalled_reason = ""
        return request.attempt

    def progress(self, request_id: str, attempt: int, boundary: int, holder: str, next_agent: str | None, *, now: float) -> bool:
        """Record that ``holder`` completed up to ``boundary``; False when the request is gone."""
        request = self._requests.get(request_id)
        if request is None or request.done:
            return False
        request.holders[boundary] = holder
        if attempt == request.attempt:
            request.last_event = now
            if boundary > request.reached:
                request.reached = boundary
                request.waiting_on = next_agent
        return True

    def finish(self, request_id: str) -> InflightRequest | None:
        """Mark the request answered; a second call (a late duplicate) returns None and is counted."""
        request = self._requests.pop(request_id, None)
        if request is None or request.done:
            self.duplicates_dropped += 1
            return None
        request.done = True
        return request

    def affected_by(self, agent_id: str) -> list[InflightRequest]:
        """Requests whose current attempt still needs ``agent_id``."""
        return [
            request for request in self._requests.values()
            if agent_id in request.route_agents and not request.done
        ]

    def stalled(self, now: float, hop_timeout_s: float) -> list[InflightRequest]:
        """Requests with no progress for ``hop_timeout_s`` seconds."""
        return [
            request for request in self._requests.values()
            if not request.done and now - request.last_event > hop_timeout_s
        ]

    def expired(self, now: float) -> list[InflightRequest]:
        return [request for request in self._requests.values() if not request.done and now >= request.deadline]

    def resume_point(self, request_id: str, *, usable: Iterable[str], cuts: Iterable[int]) -> ResumePoint:
        """Return the highest boundary that is a segment start and whose holder is usable.

        Boundary 0 is always usable because the gateway holds the inputs itself.
        """
        request = self._requests[request_id]
        usable_set = set(usable)
        cut_set = set(cuts) | {0}
        for boundary in sorted(request.holders, reverse=True):
            holder = request.holders[boundary]
            if boundary not in cut_set:
                continue
            if holder == GATEWAY_HOLDER or holder in usable_set:
                return ResumePoint(boundary, holder)
        return ResumePoint(0, GATEWAY_HOLDER)

    def forget_holder(self, request_id: str, boundary: int) -> None:
        """Drop a boundary whose holder no longer has the activation (it reported it lost)."""
        request = self._requests.get(request_id)
        if request is not None and boundary != 0:
            request.holders.pop(boundary, None)

    def holders_of(self, request: InflightRequest) -> set[str]:
        return {holder for holder in request.holders.values() if holder != GATEWAY_HOLDER}
