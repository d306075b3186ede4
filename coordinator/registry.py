"""The model registry: deployed models, their versions, placements and traffic weights.

The registry is one small JSON-compatible dict. The coordinator changes it only by proposing a
new value through the election core, which commits it once a majority of voters has written it to
disk; every agent then reads the committed value. So the registry survives a coordinator change
and a full cluster restart, and every agent can route requests from its own copy.

The functions here are pure: each takes a registry and returns a changed deep copy, or raises
``RegistryError`` with a message naming the model, version or weight at fault.

Schema (``format`` 1)::

    {"format": 1,
     "plan_version": int,                  # rises on every placement change, cluster-wide
     "models": {name: {
         "versions": {version: {"manifest": sha256, "source": str, "strategy": str,
                                "replicas": int, "state": "placing" | "ready" | "failed",
                                "message": str, "placement": Placement dict | None,
                                "created_unix": float}},
         "traffic": {version: weight},
         "previous_traffic": {version: weight} | None}}}
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping

from coordinator.placement import Placement

logger = logging.getLogger(__name__)

REGISTRY_FORMAT = 1


class RegistryError(ValueError):
    """A registry change that cannot be applied. ``kind`` is "not_found", "conflict" or "invalid"."""

    def __init__(self, message: str, *, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def empty_registry() -> dict:
    return {"format": REGISTRY_FORMAT, "plan_version": 0, "models": {}}


def normalize(value: Mapping | None) -> dict:
    """Return a registry dict for a committed value, which is None before the first write.

    The result is a deep copy that the caller may change (to build the next value).
    """
    return copy.deepcopy(dict(view(value)))


def view(value: Mapping | None) -> Mapping:
    """Return a committed value as a registry without copying it; the caller must not change it.

    Each inference request resolves a version and a placement, and only reads the registry. A
    deep copy of a registry with a few versions and their profiles would cost more than the rest
    of the gateway's work on the request.
    """
    if not value:
        return empty_registry()
    if value.get("format") != REGISTRY_FORMAT:
        raise RegistryError(
            f"registry format {value.get('format')!r} is not supported by this agent "
            f"(supports {REGISTRY_FORMAT}); upgrade the agent"
        )
    return value


def _model(registry: dict, name: str) -> dict:
    model = registry["models"].get(name)
    if model is None:
        known = sorted(registry["models"]) or ["(none)"]
        raise RegistryError(f"model {name!r} not found; deployed models: {', '.join(known)}", kind="not_found")
    return model


def _version(registry: dict, name: str, version: str) -> dict:
    model = _model(registry, name)
    entry = model["versions"].get(version)
    if entry is None:
        known = sorted(model["versions"]) or ["(none)"]
        raise RegistryError(
            f"version {version!r} of model {name!r} not found; versions: {', '.join(known)}",
            kind="not_found",
        )
    return entry


def add_version(
    registry: Mapping,
    name: str,
    version: str,
    *,
    manifest: str,
    source: str,
    strategy: str,
    replicas: int,
) -> dict:
    """Add a version in state "placing". A version name can be deployed only once."""
    result = normalize(registry)
    model = result["models"].setdefault(name, {"versions": {}, "traffic": {}, "previous_traffic": None})
    if version in model["versions"]:
        raise RegistryError(
            f"version {version!r} of model {name!r} already exists; pick a new version name "
            f"or delete the old one first",
            kind="conflict",
        )
    model["versions"][version] = {
        "manifest": manifest,
        "source": source,
        "strategy": strategy,
        "replicas": int(replicas),
        "state": "placing",
        "message": "",
        "placement": None,
        "created_unix": time.time(),
    }
    return result


def set_placement(registry: Mapping, placement: Placement) -> dict:
    """Store a new placement for a version and bump the cluster's plan version."""
    result = normalize(registry)
    entry = _version(result, placement.model, placement.version)
    result["plan_version"] = max(int(result["plan_version"]), placement.plan_version)
    entry["placement"] = placement.to_dict()
    return result


def set_pending_placement(registry: Mapping, placement: Placement | None, *, name: str | None = None,
                          version: str | None = None) -> dict:
    """Store the placement that agents load before it replaces the current one (None clears it).

    Make-before-break: agents load the segments of both placements, and gateways keep routing on
    the current one until ``promote_pending_placement`` swaps them.
    """
    result = normalize(registry)
    if placement is None:
        _version(result, str(name), str(version))["pending_placement"] = None
        return result
    entry = _version(result, placement.model, placement.version)
    result["plan_version"] = max(int(result["plan_version"]), placement.plan_version)
    entry["pending_placement"] = placement.to_dict()
    return result


def promote_pending_placement(registry: Mapping, name: str, version: str) -> dict:
    """Make the pending placement the current one."""
    result = normalize(registry)
    entry = _version(result, name, version)
    pending = entry.get("pending_placement")
    if not pending:
        raise RegistryError(f"version {version!r} of model {name!r} has no pending placement", kind="conflict")
    entry["placement"], entry["pending_placement"] = pending, None
    return result


def set_state(registry: Mapping, name: str, version: str, state: str, message: str = "") -> dict:
    """Set a version's state; the first version of a model to become ready gets all traffic."""
    if state not in ("placing", "ready", "failed"):
        raise RegistryError(f"invalid version state {state!r}; expected placing, ready or failed")
    result = normalize(registry)
    entry = _version(result, name, version)
    entry["state"] = state
    entry["message"] = message
    model = result["models"][name]
    if state == "ready" and not any(weight > 0 for weight in model["traffic"].values()):
        model["traffic"] = {version: 1.0}
    return result


def set_traffic(registry: Mapping, name: str, weights: Mapping[str, float]) -> dict:
    """Replace a model's traffic weights; the old weights are kept for rollback."""
    result = normalize(registry)
    model = _model(result, name)
    clean: dict[str, float] = {}
    for version, weight in weights.items():
        if version not in model["versions"]:
            known = ", ".join(sorted(model["versions"]))
            raise RegistryError(
                f"traffic weight names version {version!r} of model {name!r}, which does not exist; "
                f"versions: {known}",
                kind="not_found",
            )
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise RegistryError(
                f"traffic weight for version {version!r} is {weight!r}; expected a finite number >= 0"
            )
        if weight > 0 and model["versions"][version]["state"] != "ready":
            raise RegistryError(
                f"version {version!r} of model {name!r} is {model['versions'][version]['state']}, "
                f"not ready; wait for its deployment to finish before sending it traffic",
                kind="conflict",
            )
        clean[version] = float(weight)
    if sum(clean.values()) <= 0:
        raise RegistryError(
            f"traffic weights {dict(weights)!r} sum to 0; at least one version needs a weight > 0"
        )
    model["previous_traffic"] = dict(model["traffic"])
    model["traffic"] = clean
    return result


def rollback(registry: Mapping, name: str) -> dict:
    """Restore the previous traffic weights (instant: the old version is still loaded)."""
    result = normalize(registry)
    model = _model(result, name)
    previous = model.get("previous_traffic")
    if not previous:
        raise RegistryError(
            f"model {name!r} has no previous traffic split to roll back to", kind="conflict"
        )
    missing = [v for v in previous if v not in model["versions"]]
    if missing:
        raise RegistryError(
            f"cannot roll back model {name!r}: version(s) {', '.join(missing)} were deleted",
            kind="conflict",
        )
    model["traffic"], model["previous_traffic"] = dict(previous), dict(model["traffic"])
    return result


def delete_version(registry: Mapping, name: str, version: str) -> dict:
    """Remove a version that carries no traffic, or the model's last version with the model itself."""
    result = normalize(registry)
    model = _model(result, name)
    _version(result, name, version)
    if model["traffic"].get(version, 0) > 0 and len(model["versions"]) > 1:
        raise RegistryError(
            f"version {version!r} of model {name!r} still receives traffic "
            f"(weight {model['traffic'][version]}); move its traffic first with "
            f"`shardmesh traffic {name} OTHER=1`",
            kind="conflict",
        )
    del model["versions"][version]
    model["traffic"].pop(version, None)
    if model.get("previous_traffic"):
        model["previous_traffic"].pop(version, None)
    if not model["versions"]:
        del result["models"][name]
    return result


def placements(registry: Mapping | None) -> list[Placement]:
    """Every placement in the registry."""
    result = []
    for model in normalize(registry)["models"].values():
        for entry in model["versions"].values():
            if entry.get("placement"):
                result.append(Placement.from_dict(entry["placement"]))
    return result


def find_placement(registry: Mapping | None, name: str, version: str) -> Placement | None:
    entry = view(registry)["models"].get(name, {}).get("versions", {}).get(version)
    if not entry or not entry.get("placement"):
        return None
    return Placement.from_dict(entry["placement"])
