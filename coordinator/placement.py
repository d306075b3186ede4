"""Placement records: which agent runs which unit range of a model version.

A *placement* is the part of a plan that agents act on. The coordinator turns the planner's
stages into a placement, replicates it inside the registry (so it survives a coordinator change
and every agent can act as a gateway), and each agent reads from it which segments to load.

Unit ranges are inclusive: a segment ``first..last`` runs units ``first`` through ``last``. A
*boundary* ``b`` is the point before unit ``b``; boundary 0 is the model input and boundary
``unit_count`` is the model output. An activation held at boundary ``b`` can resume on any segment
that starts at ``b``, which is what the gateway's failover relies on.

A branch model (a shared trunk and one head per task) is still placed as one chain of segments
over every unit. A request visits only the segments on its task's route, which are the trunk's
units and its head's units (``route_units``, from ``coordinator.micromodel.route_for_task``). On
such a route the activation after the trunk is held at the boundary before the head's first
unit, not at ``trunk_end + 1``, because that is where the request resumes. Plans therefore always
cut at the trunk end and at every head end, so each segment lies wholly on or wholly off a route.

Everything here is pure: records, conversions and route choice. No I/O.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentPlacement:
    """One segment of a model version and the agents that hold a loaded copy of it."""

    index: int
    first: int
    last: int
    agents: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"index": self.index, "first": self.first, "last": self.last, "agents": list(self.agents)}

    @classmethod
    def from_dict(cls, obj: Mapping) -> "SegmentPlacement":
        return cls(int(obj["index"]), int(obj["first"]), int(obj["last"]), tuple(obj["agents"]))


@dataclass(frozen=True)
class Placement:
    """Segments of one model version in pipeline order, stamped with the plan version."""

    model: str
    version: str
    plan_version: int
    unit_count: int
    segments: tuple[SegmentPlacement, ...]
    predicted_period_s: float = 0.0
    predicted_latency_s: float = 0.0
    optimal: bool = False

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "version": self.version,
            "plan_version": self.plan_version,
            "unit_count": self.unit_count,
            "segments": [segment.to_dict() for segment in self.segments],
            "predicted_period_s": self.predicted_period_s,
            "predicted_latency_s": self.predicted_latency_s,
            "optimal": self.optimal,
        }

    @classmethod
    def from_dict(cls, obj: Mapping) -> "Placement":
        return cls(
            model=str(obj["model"]),
            version=str(obj["version"]),
            plan_version=int(obj["plan_version"]),
            unit_count=int(obj["unit_count"]),
            segments=tuple(SegmentPlacement.from_dict(s) for s in obj["segments"]),
            predicted_period_s=float(obj.get("predicted_period_s", 0.0)),
            predicted_latency_s=float(obj.get("predicted_latency_s", 0.0)),
            optimal=bool(obj.get("optimal", False)),
        )

    @property
    def cuts(self) -> frozenset[int]:
        """Boundaries at which some segment starts."""
        return frozenset(segment.first for segment in self.segments)

    @property
    def agents(self) -> frozenset[str]:
        return frozenset(agent for segment in self.segments for agent in segment.agents)

    def segments_for(self, agent_id: str) -> list[SegmentPlacement]:
        return [segment for segment in self.segments if agent_id in segment.agents]

    def covers(self, alive: Iterable[str]) -> bool:
        """Tell whether every segment has at least one agent in ``alive``."""
        alive_set = set(alive)
        return all(any(agent in alive_set for agent in segment.agents) for segment in self.segments)


@dataclass(frozen=True)
class Hop:
    """One step of a request's route: run units ``first..last`` on ``agent``."""

    first: int
    last: int
    agent: str

    def to_list(self) -> list:
        return [self.first, self.last, self.agent]

    @classmethod
    def from_list(cls, obj: list) -> "Hop":
        if not isinstance(obj, (list, tuple)) or len(obj) != 3:
            raise ValueError(f"invalid hop {obj!r}: expected [first, last, agent]")
        return cls(int(obj[0]), int(obj[1]), str(obj[2]))


def placement_from_stages(
    model: str,
    version: str,
    plan_version: int,
    unit_count: int,
    stages: Iterable[tuple[int, int, Iterable[str]]],
    *,
    predicted_period_s: float = 0.0,
    predicted_latency_s: float = 0.0,
    optimal: bool = False,
) -> Placement:
    """Build a placement from ``(first, last, agents)`` stages and check that they tile the model."""
    segments = tuple(
        SegmentPlacement(index, first, last, tuple(agents))
        for index, (first, last, agents) in enumerate(stages)
    )
    expected_first = 0
    for segment in segments:
        if segment.first != expected_first or segment.last < segment.first:
            raise ValueError(
                f"segment {segment.index} covers units {segment.first}..{segment.last}, "
                f"expected it to start at unit {expected_first}: stages must tile 0..{unit_count - 1}"
            )
        if not segment.agents:
            raise ValueError(f"segment {segment.index} has no agent")
        expected_first = segment.last + 1
    if expected_first != unit_count:
        raise ValueError(f"stages end at unit {expected_first - 1}, the model has {unit_count} units")
    return Placement(
        model, version, plan_version, unit_count, segments,
        predicted_period_s, predicted_latency_s, optimal,
    )


def segments_on_route(placement: Placement, route_units: Sequence[int] | None = None) -> list[SegmentPlacement] | None:
    """Return the segments a request visits in order, or None when they do not cover its route.

    ``route_units`` lists the unit indices of the request's route in ascending order (None means
    every unit). A segment that contains units both on and off the route also gives None: a plan
    that skipped a required cut cannot serve the route.
    """
    if route_units is None:
        return sorted(placement.segments, key=lambda segment: segment.first)
    on_route = set(route_units)
    visited: list[SegmentPlacement] = []
    covered: list[int] = []
    for segment in sorted(placement.segments, key=lambda segment: segment.first):
        units = range(segment.first, segment.last + 1)
        inside = sum(1 for unit in units if unit in on_route)
        if inside == 0:
            continue
        if inside != len(units):
            return None
        visited.append(segment)
        covered.extend(units)
    if covered != list(route_units):
        return None
    return visited


def route_cuts(placement: Placement, route_units: Sequence[int] | None = None) -> frozenset[int]:
    """Return the boundaries on a route where a request may resume: the starts of its segments."""
    segments = segments_on_route(placement, route_units)
    return frozenset(segment.first for segment in segments or ())


def choose_route(
    placement: Placement,
    start: int,
    *,
    outstanding: Mapping[str, int],
    usable: Iterable[str],
    route_units: Sequence[int] | None = None,
    excluded_hops: Collection[tuple[str, int]] = (),
    turn: int = 0,
    avoid: Collection[str] = (),
) -> list[Hop] | None:
    """Pick a route from boundary ``start`` to the end of the request's route, or None when none exists.

    Each hop goes to the usable replica with the fewest outstanding requests. Ties rotate with
    ``turn`` (a gateway passes a counter) over the tied replicas in the planner's order, so that
    at low load every replica gets a share; ``turn=0`` picks the one listed first. The route
    must begin with a segment that starts exactly at ``start``, because an activation held
    there cannot enter a segment half-way. ``route_units`` restricts the walk to one task's segments of a branch model (see
    ``segments_on_route``); None walks every segment. ``excluded_hops`` holds (agent, first
    unit) pairs that must not be used, such as a segment that an agent just refused, while the
    agent stays usable for its other segments. An agent in ``avoid`` (one the failure detector
    suspects) gets a hop only when the segment has no other usable replica.
    """
    segments = segments_on_route(placement, route_units)
    if segments is None:
        return None
    if route_units is None and start == placement.unit_count:
        return []
    firsts = [segment.first for segment in segments]
    if start not in firsts:
        return None
    usable_set = set(usable)
    route: list[Hop] = []
    for segment in segments[firsts.index(start):]:
        candidates = [agent for agent in segment.agents
                      if agent in usable_set and (agent, segment.first) not in excluded_hops]
        if not candidates:
            return None
        candidates = [agent for agent in candidates if agent not in avoid] or candidates
        fewest = min(outstanding.get(agent, 0) for agent in candidates)
        tied = [agent for agent in candidates if outstanding.get(agent, 0) == fewest]
        route.append(Hop(segment.first, segment.last, tied[turn % len(tied)]))
    return route


def expand_stages(
    stages: Iterable[tuple[int, int, Iterable[str]]],
    groups: Sequence[tuple[int, int]],
    required_cuts: Iterable[int] = (),
) -> list[tuple[int, int, tuple[str, ...]]]:
    """Map planner stages over unit groups back to unit ranges, splitting at required cuts.

    A stage ``(first, last, agents)`` indexes ``groups`` (the inclusive unit ranges that
    ``coordinator.micromodel.unit_groups`` returns). A required cut ``c`` (between unit ``c`` and
    unit ``c + 1``) that falls inside a stage splits it into two segments held by the same agents,
    so the split moves no work between agents.
    """
    required = sorted(set(required_cuts))
    expanded: list[tuple[int, int, tuple[str, ...]]] = []
    for first_group, last_group, agents in stages:
        if not 0 <= first_group <= last_group < len(groups):
            raise ValueError(f"stage covers groups {first_group}..{last_group}, but there are {len(groups)} groups")
        holders = tuple(agents)
        first = groups[first_group][0]
        last = groups[last_group][1]
        for cut in required:
            if first <= cut < last:
                expanded.append((first, cut, holders))
                first = cut + 1
        expanded.append((first, last, holders))
    return expanded
