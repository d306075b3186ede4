"""Traffic split between versions of one model, rollback, and the canary check.

Problem. Several versions of a model can be loaded at once. Operators split requests between them
by weight, a client that sends the same request key must keep landing on the same version (so a
user's session does not flip between models), rolling back must be instant, and a bad canary
should be rolled back without a human.

Choosing a version. Options considered:
- A cumulative-weight table indexed by a hash of the key. Sticky while the weights stay put, but
  raising a canary from 10% to 20% moves keys between every pair of versions, not only onto the
  canary.
- Consistent hashing on a ring. Needs many virtual nodes to honour weights closely.
- Weighted rendezvous hashing (chosen). Each version scores `-ln(u) / w`, where `u` in (0, 1) is a
  hash of (key, version); the lowest score wins. Version `v` wins with probability `w_v / sum(w)`,
  and changing one weight moves keys only to or from that version. Cost is one hash per version,
  which is nothing next to an inference. The hash is BLAKE2b (stdlib, keyed by nothing, stable
  across processes and Python versions, unlike `hash()`).
Requests without a key pick uniformly at random by weight.

Rollback. `ModelTraffic.previous` records the version that carried the most traffic before the
current split began. Rollback gives it weight 1 and every other version 0. No version is unloaded
by a weight change, so rollback needs no loading and is instant; a version leaves only through an
explicit delete, which is refused while it still has weight.

Canary check. `LatencyWindow` keeps the outcomes of recent requests of one version (bounded in
time and in count), and `CanaryPolicy.evaluate` decides from it whether to roll back: the error
rate or the p99 latency above its limit, once at least `min_requests` outcomes are in the window.
Defaults: 5% errors, 1000 ms p99, 20 requests, a 60 s window. They are starting points to tune per
model, not measured values.

Everything here is pure: time comes in as an argument and randomness from a `random.Random` the
caller owns.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

# A weight below this counts as zero. Weights are floats from JSON, so 1e-12 leftovers from a
# client's arithmetic must not keep a version "in traffic".
_ZERO_WEIGHT = 1e-9

# Upper bound on samples one LatencyWindow keeps. 10 000 outcomes cost about 400 KiB and sorting
# them for a p99 takes about 1 ms; at higher request rates the window keeps the newest samples.
DEFAULT_MAX_SAMPLES = 10_000


class TrafficError(ValueError):
    """An invalid traffic change. `field`, `value` and `expected` describe the fault."""

    def __init__(self, message: str, *, field: str, value: object, expected: object) -> None:
        super().__init__(message)
        self.field = field
        self.value = value
        self.expected = expected


class RollbackUnavailable(TrafficError):
    """Rollback was requested but no previous version is recorded."""


class VersionInUse(TrafficError):
    """Delete was requested for a version that still has traffic."""


# --------------------------------------------------------------------------------------------
# Choosing a version
# --------------------------------------------------------------------------------------------


def _unit_hash(request_key: str, version: str) -> float:
    """Map (key, version) to a float strictly inside (0, 1), stable across processes."""
    digest = hashlib.blake2b(
        request_key.encode("utf-8") + b"\x00" + version.encode("utf-8"), digest_size=8
    ).digest()
    # 53 bits fill a float's mantissa exactly; +0.5 keeps the value away from 0 and 1.
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) / float(1 << 53)


def choose_version(
    weights: Mapping[str, float], request_key: str | None, *, rng: random.Random | None = None
) -> str:
    """Return the version that serves a request.

    With a `request_key`, the choice is deterministic (weighted rendezvous hashing), so the same
    key gets the same version while the weights are unchanged. Without one, the version is drawn
    at random in proportion to the weights. Raises `TrafficError` when no version has weight.
    """
    active = sorted((version, w) for version, w in weights.items() if w > _ZERO_WEIGHT)
    if not active:
        raise TrafficError(
            "no version has a positive traffic weight",
            field="weights",
            value=dict(weights),
            expected="at least one version with weight > 0",
        )
    if len(active) == 1:
        return active[0][0]

    if request_key is None:
        draw = (rng or random).random() * sum(w for _, w in active)
        for version, w in active:
            draw -= w
            if draw < 0:
                return version
        return active[-1][0]  # float rounding left a sliver at the end

    best_version = active[0][0]
    best_score = math.inf
    for version, w in active:
        score = -math.log(_unit_hash(request_key, version)) / w
        if score < best_score:
            best_version, best_score = version, score
    return best_version


def validate_weights(weights: object, available: Iterable[str]) -> dict[str, float]:
    """Check a requested split and return it with every available version present.

    Versions left out of `weights` get weight 0. Raises `TrafficError` naming the offending
    version and value.
    """
    known = sorted(available)
    if not isinstance(weights, Mapping) or not weights:
        raise TrafficError(
            "traffic weights must be a non-empty JSON object of version to weight",
            field="weights",
            value=weights,
            expected={v: "number >= 0" for v in known},
        )
    clean: dict[str, float] = {v: 0.0 for v in known}
    for version, weight in weights.items():
        if version not in clean:
            raise TrafficError(
                f"version {version!r} is not loaded; loaded versions: {', '.join(known) or 'none'}",
                field=f"weights.{version}",
                value=weight,
                expected=known,
            )
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TrafficError(
                f"weight of version {version!r} must be a number, got {weight!r}",
                field=f"weights.{version}",
                value=weight,
                expected="number >= 0",
            )
        if not math.isfinite(weight) or weight < 0:
            raise TrafficError(
                f"weight of version {version!r} must be finite and >= 0, got {weight!r}",
                field=f"weights.{version}",
                value=weight,
                expected="number >= 0",
            )
        clean[version] = float(weight)
    if sum(clean.values()) <= _ZERO_WEIGHT:
        raise TrafficError(
            "traffic weights sum to 0, so no version would serve requests",
            field="weights",
            value=dict(weights),
            expected="at least one weight > 0",
        )
    return clean


def normalize(weights: Mapping[str, float]) -> dict[str, float]:
    """Scale weights so they sum to 1 (weights are relative, this is for display)."""
    total = sum(weights.values())
    return {v: (w / total if total > 0 else 0.0) for v, w in weights.items()}


# --------------------------------------------------------------------------------------------
# Per-model traffic state
# --------------------------------------------------------------------------------------------


def _dominant(weights: Mapping[str, float]) -> str | None:
    """The version with the largest weight (ties: the greatest name), or None if all are 0."""
    ranked = sorted((w, v) for v, w in weights.items() if w > _ZERO_WEIGHT)
    return ranked[-1][1] if ranked else None


@dataclass(frozen=True)
class ModelTraffic:
    """The loaded versions of one model, their weights and the rollback target.

    Immutable: each operation returns a new value, so the coordinator can compute the next state,
    replicate it, and only then make it current.
    """

    name: str
    weights: dict[str, float] = field(default_factory=dict)
    previous: str | None = None

    @property
    def versions(self) -> list[str]:
        return sorted(self.weights)

    def choose(self, request_key: str | None, *, rng: random.Random | None = None) -> str:
        return choose_version(self.weights, request_key, rng=rng)

    def add_version(self, version: str, *, weight: float = 0.0) -> ModelTraffic:
        """Add a loaded version that takes the fraction `weight` of traffic (0 = loaded but idle).

        The other versions keep their proportions among the remaining `1 - weight`. The first
        version of a model always gets all traffic.
        """
        if not 0.0 <= weight <= 1.0 or not math.isfinite(weight):
            raise TrafficError(
                f"initial weight of version {version!r} must be a fraction in [0, 1], got {weight}",
                field="weight",
                value=weight,
                expected="0 <= weight <= 1",
            )
        if version in self.weights:
            raise TrafficError(
                f"version {version!r} of model {self.name!r} is already loaded",
                field="version",
                value=version,
                expected=f"a version other than {', '.join(self.versions)}",
            )
        if not self.weights:
            return replace(self, weights={version: 1.0})
        if weight <= _ZERO_WEIGHT:
            return replace(self, weights={**self.weights, version: 0.0})
        scale = (1.0 - weight) / sum(self.weights.values())
        new_weights = {v: w * scale for v, w in self.weights.items()}
        new_weights[version] = float(weight)
        return self._with_split(new_weights)

    def set_weights(self, weights: object) -> ModelTraffic:
        """Apply a new split and update the rollback target.

        The target is the version that served all traffic before the rollout began, kept through
        later steps of the same rollout, so rollback after a full promotion still restores it.
        """
        return self._with_split(validate_weights(weights, self.weights))

    def promote(self, version: str) -> ModelTraffic:
        """Send all traffic to `version` (a `replace` deployment finishing)."""
        if version not in self.weights:
            raise TrafficError(
                f"version {version!r} of model {self.name!r} is not loaded",
                field="version",
                value=version,
                expected=self.versions,
            )
        return self._with_split({v: (1.0 if v == version else 0.0) for v in self.weights})

    def _with_split(self, new_weights: dict[str, float]) -> ModelTraffic:
        old_active = [v for v, w in self.weights.items() if w > _ZERO_WEIGHT]
        if len(old_active) == 1:
            # A split that starts from one serving version makes that version the target.
            previous = old_active[0]
        elif self.previous is not None and self.previous in new_weights:
            # A later step of the same rollout (10% -> 50% -> 100%) keeps the original target.
            previous = self.previous
        else:
            previous = _dominant(self.weights)
        if previous is not None and all(
            w <= _ZERO_WEIGHT for v, w in new_weights.items() if v != previous
        ):
            previous = None  # the target already has all traffic: nothing to roll back
        return replace(self, weights=new_weights, previous=previous)

    def rollback(self) -> ModelTraffic:
        """Give the recorded previous version all traffic and every other version 0.

        Raises `RollbackUnavailable` when no previous version is recorded. Every version stays
        loaded.
        """
        target = self.previous
        if target is None or target not in self.weights:
            raise RollbackUnavailable(
                f"model {self.name!r} has no previous version to roll back to; "
                "set the traffic split explicitly instead",
                field="previous_version",
                value=target,
                expected="a version that served traffic before the current split",
            )
        weights = {v: (1.0 if v == target else 0.0) for v in self.weights}
        return replace(self, weights=weights, previous=None)

    def delete_version(self, version: str) -> ModelTraffic:
        """Remove a version. Raises `VersionInUse` while it has weight."""
        if version not in self.weights:
            raise TrafficError(
                f"version {version!r} of model {self.name!r} is not loaded",
                field="version",
                value=version,
                expected=self.versions,
            )
        if self.weights[version] > _ZERO_WEIGHT:
            raise VersionInUse(
                f"version {version!r} of model {self.name!r} still has traffic weight "
                f"{self.weights[version]:g}; move its traffic to another version first",
                field="version",
                value=version,
                expected=[v for v, w in sorted(self.weights.items()) if w <= _ZERO_WEIGHT],
            )
        weights = {v: w for v, w in self.weights.items() if v != version}
        previous = None if self.previous == version else self.previous
        return replace(self, weights=weights, previous=previous)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "weights": dict(self.weights), "previous": self.previous}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelTraffic:
        weights = data.get("weights") or {}
        previous = data.get("previous")
        if not isinstance(weights, Mapping):
            raise TrafficError(
                "stored traffic weights are not a mapping",
                field="weights",
                value=weights,
                expected="{version: weight}",
            )
        return cls(
            name=str(data["name"]),
            weights={str(v): float(w) for v, w in weights.items()},
            previous=str(previous) if previous is not None else None,
        )


# --------------------------------------------------------------------------------------------
# Per-version latency and errors, and the canary decision
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowStats:
    requests: int
    errors: int
    error_rate: float
    p50_s: float | None
    p99_s: float | None
    rate_per_s: float


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an ascending list (the value at rank ceil(q*n))."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


class LatencyWindow:
    """Outcomes of one version's recent requests, kept for `window_s` seconds.

    Errors count toward the error rate; latencies of successful requests only feed the quantiles,
    because a failure's duration (often a timeout) says nothing about the model's speed.
    """

    def __init__(self, window_s: float, *, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._samples: deque[tuple[float, float, bool]] = deque(maxlen=max_samples)

    def record(self, now: float, seconds: float, ok: bool) -> None:
        self._samples.append((now, seconds, ok))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def stats(self, now: float) -> WindowStats:
        self._prune(now)
        requests = len(self._samples)
        errors = sum(1 for _, _, ok in self._samples if not ok)
        latencies = sorted(seconds for _, seconds, ok in self._samples if ok)
        # The rate divides by the span actually covered, so a window that just started does not
        # report a rate diluted by the empty part of window_s.
        span = min(self.window_s, now - self._samples[0][0]) if self._samples else self.window_s
        return WindowStats(
            requests=requests,
            errors=errors,
            error_rate=errors / requests if requests else 0.0,
            p50_s=_quantile(latencies, 0.50) if latencies else None,
            p99_s=_quantile(latencies, 0.99) if latencies else None,
            rate_per_s=requests / max(span, 1.0),
        )


@dataclass(frozen=True)
class CanaryDecision:
    rollback: bool
    reason: str
    stats: WindowStats


@dataclass(frozen=True)
class CanaryPolicy:
    """Limits for a canary version; `evaluate` says whether to roll it back and why."""

    max_error_rate: float = 0.05
    max_p99_ms: float = 1000.0
    min_requests: int = 20
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be in [0, 1], got {self.max_error_rate}")
        if self.max_p99_ms <= 0:
            raise ValueError(f"max_p99_ms must be > 0, got {self.max_p99_ms}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")

    def new_window(self) -> LatencyWindow:
        return LatencyWindow(self.window_s)

    def evaluate(self, window: LatencyWindow, now: float) -> CanaryDecision:
        stats = window.stats(now)
        if stats.requests < self.min_requests:
            return CanaryDecision(
                False,
                f"only {stats.requests} of {self.min_requests} requests needed in the last "
                f"{self.window_s:g} s",
                stats,
            )
        if stats.error_rate > self.max_error_rate:
            return CanaryDecision(
                True,
                f"error rate {stats.error_rate:.3f} is above max_error_rate "
                f"{self.max_error_rate:g} ({stats.errors} of {stats.requests} requests in "
                f"{self.window_s:g} s)",
                stats,
            )
        if stats.p99_s is not None and stats.p99_s * 1000.0 > self.max_p99_ms:
            return CanaryDecision(
                True,
                f"p99 latency {stats.p99_s * 1000.0:.1f} ms is above max_p99_ms "
                f"{self.max_p99_ms:g} ({stats.requests} requests in {self.window_s:g} s)",
                stats,
            )
        return CanaryDecision(False, "within limits", stats)
