"""The registry's pure operations and placement routing."""

from __future__ import annotations

import pytest

from coordinator import registry as reg
from coordinator.failover import GATEWAY_HOLDER, GatewayTracker
from coordinator.placement import Hop, Placement, choose_route, placement_from_stages


def _placement(plan_version: int = 1) -> Placement:
    return placement_from_stages(
        "m", "v1", plan_version, 6, [(0, 1, ["a"]), (2, 3, ["b", "c"]), (4, 5, ["d"])])


def _ready_registry() -> dict:
    value = reg.add_version(reg.empty_registry(), "m", "v1", manifest="f" * 64, source="minilm",
                            strategy="layer", replicas=1)
    value = reg.set_placement(value, _placement())
    return reg.set_state(value, "m", "v1", "ready")


def test_placement_stages_must_tile_model() -> None:
    with pytest.raises(ValueError, match="start at unit 2"):
        placement_from_stages("m", "v1", 1, 6, [(0, 1, ["a"]), (3, 5, ["b"])])
    with pytest.raises(ValueError, match="6 units"):
        placement_from_stages("m", "v1", 1, 6, [(0, 4, ["a"])])
    with pytest.raises(ValueError, match="no agent"):
        placement_from_stages("m", "v1", 1, 2, [(0, 1, [])])


def test_placement_round_trips_through_dict() -> None:
    placement = _placement(7)
    assert Placement.from_dict(placement.to_dict()) == placement
    assert placement.cuts == {0, 2, 4}
    assert placement.agents == {"a", "b", "c", "d"}
    assert [s.index for s in placement.segments_for("c")] == [1]


def test_route_prefers_fewest_outstanding_replica() -> None:
    placement = _placement()
    route = choose_route(placement, 0, outstanding={"b": 3, "c": 1}, usable={"a", "b", "c", "d"})
    assert route == [Hop(0, 1, "a"), Hop(2, 3, "c"), Hop(4, 5, "d")]
    tie = choose_route(placement, 0, outstanding={}, usable={"a", "b", "c", "d"})
    assert tie[1].agent == "b"


def test_route_skips_unusable_and_fails_without_cover() -> None:
    placement = _placement()
    assert choose_route(placement, 2, outstanding={}, usable={"c", "d"}) == [Hop(2, 3, "c"), Hop(4, 5, "d")]
    assert choose_route(placement, 0, outstanding={}, usable={"b", "c", "d"}) is None
    assert choose_route(placement, 3, outstanding={}, usable={"a", "b", "c", "d"}) is None


def test_registry_first_ready_version_gets_traffic() -> None:
    value = _ready_registry()
    assert value["models"]["m"]["traffic"] == {"v1": 1.0}
    assert value["plan_version"] == 1
    assert reg.find_placement(value, "m", "v1") == _placement()


def test_registry_rejects_duplicate_version() -> None:
    with pytest.raises(reg.RegistryError, match="already exists") as info:
        reg.add_version(_ready_registry(), "m", "v1", manifest="0" * 64, source="x", strategy="layer", replicas=1)
    assert info.value.kind == "conflict"


def test_registry_traffic_validation() -> None:
    value = _ready_registry()
    with pytest.raises(reg.RegistryError, match="'v9'") as info:
        reg.set_traffic(value, "m", {"v9": 1.0})
    assert info.value.kind == "not_found"
    with pytest.raises(reg.RegistryError, match="finite number"):
        reg.set_traffic(value, "m", {"v1": -1})
    with pytest.raises(reg.RegistryError, match="sum to 0"):
        reg.set_traffic(value, "m", {"v1": 0})
    placing = reg.add_version(value, "m", "v2", manifest="e" * 64, source="x", strategy="layer", replicas=1)
    with pytest.raises(reg.RegistryError, match="not ready"):
        reg.set_traffic(placing, "m", {"v2": 1.0})


def test_registry_canary_and_rollback() -> None:
    value = reg.add_version(_ready_registry(), "m", "v2", manifest="e" * 64, source="x", strategy="layer", replicas=1)
    value = reg.set_state(value, "m", "v2", "ready")
    assert value["models"]["m"]["traffic"] == {"v1": 1.0}
    value = reg.set_traffic(value, "m", {"v1": 0.9, "v2": 0.1})
    value = reg.rollback(value, "m")
    assert value["models"]["m"]["traffic"] == {"v1": 1.0}
    with pytest.raises(reg.RegistryError, match="still receives traffic"):
        reg.delete_version(value, "m", "v1")
    value = reg.delete_version(value, "m", "v2")
    assert list(value["models"]["m"]["versions"]) == ["v1"]
    assert "v2" not in value["models"]["m"]["previous_traffic"]
    # The last version goes with its traffic, and the model with it.
    value = reg.delete_version(value, "m", "v1")
    assert "m" not in value["models"]


def test_registry_operations_do_not_mutate_input() -> None:
    value = _ready_registry()
    before = repr(value)
    reg.set_traffic(value, "m", {"v1": 2.0})
    reg.set_state(value, "m", "v1", "failed")
    assert repr(value) == before


def test_registry_unknown_format_is_rejected() -> None:
    with pytest.raises(reg.RegistryError, match="format 99"):
        reg.normalize({"format": 99})


def test_tracker_resumes_from_highest_usable_boundary() -> None:
    tracker = GatewayTracker()
    tracker.start("r1", "m", "v1", now=0.0, deadline=10.0)
    tracker.launched("r1", ["a", "b", "d"], now=0.0)
    tracker.progress("r1", 1, 2, "a", "b", now=0.1)
    tracker.progress("r1", 1, 4, "b", "d", now=0.2)
    point = tracker.resume_point("r1", usable={"a", "b", "c"}, cuts={0, 2, 4})
    assert (point.boundary, point.holder) == (4, "b")
    point = tracker.resume_point("r1", usable={"a", "c"}, cuts={0, 2, 4})
    assert (point.boundary, point.holder) == (2, "a")
    # A boundary that the new placement does not cut at cannot be resumed from.
    point = tracker.resume_point("r1", usable={"a", "b"}, cuts={0, 3})
    assert (point.boundary, point.holder) == (0, GATEWAY_HOLDER)


def test_tracker_crossed_progress_reports() -> None:
    tracker = GatewayTracker()
    tracker.start("r1", "m", "v1", now=0.0, deadline=10.0)
    tracker.launched("r1", ["a", "b", "c"], now=0.0)
    # The second hop's report overtakes the first hop's on another link.
    tracker.progress("r1", 1, 4, "b", "c", now=0.2)
    tracker.progress("r1", 1, 2, "a", "b", now=0.3)
    request = tracker.get("r1")
    assert request.waiting_on == "c"
    assert request.holders == {0: GATEWAY_HOLDER, 2: "a", 4: "b"}
    assert request.last_event == 0.3


def test_tracker_drops_duplicates_and_stale_progress() -> None:
    tracker = GatewayTracker()
    tracker.start("r1", "m", "v1", now=0.0, deadline=1.0)
    tracker.launched("r1", ["a", "b"], now=0.0)
    assert tracker.affected_by("b")[0].request_id == "r1"
    assert tracker.affected_by("z") == []
    assert tracker.stalled(0.5, 1.0) == []
    assert [r.request_id for r in tracker.stalled(1.5, 1.0)] == ["r1"]
    assert [r.request_id for r in tracker.expired(1.0)] == ["r1"]
    tracker.launched("r1", ["c", "b"], now=2.0)
    # Progress of an older attempt is recorded as a holder but does not move the watchdog.
    tracker.progress("r1", 1, 1, "a", "b", now=3.0)
    assert tracker.get("r1").last_event == 2.0
    assert tracker.finish("r1") is not None
    assert tracker.finish("r1") is None
    assert tracker.duplicates_dropped == 1
    assert tracker.progress("r1", 2, 1, "c", "b", now=4.0) is False


def test_registry_pending_placement_swap() -> None:
    value = _ready_registry()
    pending = placement_from_stages("m", "v1", 5, 6, [(0, 2, ["a"]), (3, 5, ["b"])])
    value = reg.set_pending_placement(value, pending)
    assert value["plan_version"] == 5
    assert reg.find_placement(value, "m", "v1") == _placement()
    value = reg.promote_pending_placement(value, "m", "v1")
    assert reg.find_placement(value, "m", "v1") == pending
    assert value["models"]["m"]["versions"]["v1"]["pending_placement"] is None
    with pytest.raises(reg.RegistryError, match="no pending placement"):
        reg.promote_pending_placement(value, "m", "v1")


def test_registry_pending_placement_cleared() -> None:
    value = reg.set_pending_placement(_ready_registry(), placement_from_stages("m", "v1", 2, 6, [(0, 5, ["a"])]))
    value = reg.set_pending_placement(value, None, name="m", version="v1")
    assert value["models"]["m"]["versions"]["v1"]["pending_placement"] is None
    assert reg.find_placement(value, "m", "v1") == _placement()
