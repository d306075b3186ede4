"""Canaries: a numeric check of every loaded segment, and automatic rollback of a bad canary version.

Numeric canary
--------------
Problem. A segment can load without error and still compute garbage: a bit flipped in memory, a
kernel that misbehaves on one machine, weights damaged after the blob's hash was checked at load.
Heartbeats and request errors do not show that, because the segment still returns outputs.

Options rejected. Re-hashing the blobs on disk finds only damage on disk, never in memory.
Comparing replicas with each other needs two replicas and cannot tell which one is wrong.

Rule chosen. At deploy time the export job runs the exported units (the same artifacts that
agents load) on the first ``CANARY_ROWS`` rows of the model's example inputs. It records every
named tensor of that run, which is the inputs and the output of every unit, and stores them as one
safetensors blob, content-addressed like the unit blobs, and the registry names it in the version
entry (``"canary"``). Each agent runs each loaded segment on the recorded tensors at its first
boundary, once right after loading and then every ``CANARY_INTERVAL_S``, and compares its outputs
with the recorded tensors at its last boundary (`check_canary`). Floating-point outputs may differ
by at most the tolerance of their dtype (`TOLERANCE_BY_DTYPE`, 1e-4 for float32). Another thread
count or batch composition changes only the summation order, which moved no toy-model output by
more than 1e-6 in the tests. Integer and boolean outputs must be equal. A segment that fails is
unloaded, its blobs are re-hashed (a blob that fails is deleted and fetched again), and it is
loaded again.

Automatic rollback
------------------
Every agent sends, in each heartbeat, its gateway's counts for the versions that carry traffic:
``{model: {version: [requests, errors, p99_ms]}}`` over the metrics window (`version_summary`).
The coordinator merges them with its own (`merge_summaries`): requests and errors add up, and the
merged p99 is the largest per-agent p99. That is an upper bound of the cluster-wide p99, because
at least 99% of the requests on every agent, hence of all requests, are at or below it. So a
rollback may come early, never late. The coordinator then finds the canary of each model
(`canary_versions`): a version whose weight is above zero and below the total, that gained weight
in the last traffic change, with limits stored in its registry entry (``"canary_policy"``, made
from the deploy options ``canary_max_error_rate``, ``canary_max_p99_ms`` and
``canary_min_requests``). A version deployed without any of those options is never rolled back
automatically. `rollback_decisions` applies `CanaryPolicy` to the merged counts.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.micromodel import live_names, segment_inputs
from nodeagent.traffic import CanaryDecision, CanaryPolicy, WindowStats
from nodeagent.worker import DeadlineExceeded, QueueFull, SegmentRunError, WorkerClosed

logger = logging.getLogger(__name__)

# Seconds between two canary runs of one loaded segment. A run costs one forward pass of the
# segment on CANARY_ROWS rows, so at this interval it is far below 1% of a worker's time.
CANARY_INTERVAL_S = 30.0
# Seconds a canary run may wait in the worker's queue and run before it is skipped (not failed).
CANARY_TIMEOUT_S = 60.0
# Rows of the example inputs to record. Two is the smallest batch that torch.export does not
# specialize, and it keeps the blob small (EfficientNet-Lite0 activations are megabytes per row).
CANARY_ROWS = 2

TOLERANCE_BY_DTYPE: dict[torch.dtype, float] = {
    torch.float64: 1e-6,
    torch.float32: 1e-4,
    # NOTE: the half-precision tolerances are estimates from their 11-bit and 8-bit mantissas,
    # not measured on a real half-precision model.
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}

# Deploy options that set a canary limit, and the CanaryPolicy field each one sets.
POLICY_OPTIONS = {
    "canary_max_error_rate": "max_error_rate",
    "canary_max_p99_ms": "max_p99_ms",
    "canary_min_requests": "min_requests",
}


# --------------------------------------------------------------------------------------------
# Recording at deploy time
# --------------------------------------------------------------------------------------------


def record_canary(manifest: Any, blobs: Mapping[str, Path], inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run every exported unit of ``manifest`` on ``inputs`` and return every named tensor.

    ``blobs`` maps a unit's sha256 to its blob file. Units run in index order, which is a valid
    order for every route because a unit reads only model inputs and outputs of earlier units.
    """
    from coordinator.export import load_unit

    env: dict[str, torch.Tensor] = {name: tensor.contiguous() for name, tensor in inputs.items()}
    for entry in manifest.units:
        unit = load_unit(blobs[entry.sha256], expected_sha256=entry.sha256)
        env.update(unit(env))
    return env


def canary_inputs(example_inputs: Mapping[str, torch.Tensor], rows: int = CANARY_ROWS) -> dict[str, torch.Tensor]:
    """Return the first ``rows`` rows (dimension 0) of each example input."""
    return {name: tensor[:rows].clone() for name, tensor in example_inputs.items()}


def canary_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize recorded tensors as one safetensors blob (each tensor copied to its own storage)."""
    from safetensors.torch import save

    return save({name: tensor.detach().contiguous().clone() for name, tensor in tensors.items()})


def load_canary(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Read the tensors ``names`` from a canary blob; raise KeyError naming a missing one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
        missing = [name for name in names if name not in stored]
        if missing:
            raise KeyError(f"canary blob {path.name[:12]} has no tensors {missing}; deploy the version again")
        return {name: handle.get_tensor(name) for name in names}


# --------------------------------------------------------------------------------------------
# Checking a segment
# --------------------------------------------------------------------------------------------


def output_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    """Return the largest absolute difference; inf when dtype or shape differ or NaNs do not line up.

    Integer and boolean tensors return 0.0 when equal and inf otherwise, so any difference fails.
    """
    if not isinstance(actual, torch.Tensor) or actual.dtype != expected.dtype or actual.shape != expected.shape:
        return math.inf
    if actual.numel() == 0:
        return 0.0
    if not expected.is_floating_point():
        return 0.0 if torch.equal(expected, actual.to(expected.device)) else math.inf
    expected64 = expected.to(torch.float64)
    actual64 = actual.detach().to("cpu", torch.float64)
    if not torch.equal(torch.isnan(expected64), torch.isnan(actual64)):
        return math.inf
    both = ~torch.isnan(expected64)
    return float((expected64[both] - actual64[both]).abs().max()) if bool(both.any()) else 0.0


def tolerance_for(dtype: torch.dtype) -> float:
    """Return the allowed absolute difference for outputs of ``dtype`` (0 for exact dtypes)."""
    return TOLERANCE_BY_DTYPE.get(dtype, 0.0)


@dataclass(frozen=True)
class CanaryResult:
    """Outcome of one canary run: the worst output and how far it is from the recording."""

    passed: bool
    worst_output: str | None
    difference: float
    tolerance: float
    error: str | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"the segment failed on the recorded input: {self.error}"
        if self.worst_output is None:
            return "no outputs to compare"
        return f"output {self.worst_output!r} differs by {self.difference:.3g} (tolerance {self.tolerance:g})"


def compare_outputs(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor]) -> CanaryResult:
    """Compare every recorded output with the segment's; the result names the worst one.

    "Worst" is the output furthest past its tolerance, so a float32 output 2e-5 off never hides
    an integer output that changed.
    """
    worst_name, worst_difference, worst_tolerance, worst_excess = None, 0.0, 0.0, -math.inf
    for name, reference in expected.items():
        difference = output_difference(reference, actual.get(name)) if name in actual else math.inf
        tolerance = tolerance_for(reference.dtype)
        excess = difference - tolerance
        if excess > worst_excess:
            worst_name, worst_difference, worst_tolerance, worst_excess = name, difference, tolerance, excess
    passed = worst_name is None or worst_difference <= worst_tolerance
    return CanaryResult(passed, worst_name, worst_difference, worst_tolerance)


def check_canary(
    segment_run: Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    canary: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> CanaryResult:
    """Run ``segment_run`` on the recorded ``input_names`` and compare with the recorded ``output_names``.

    This synchronous form suits tests and callers already off the event loop. The segment host
    runs the same comparison on the outputs that its segment worker returns.
    """
    outputs = segment_run({name: canary[name] for name in input_names})
    return compare_outputs({name: canary[name] for name in output_names}, outputs)


# --------------------------------------------------------------------------------------------
# Automatic rollback
# --------------------------------------------------------------------------------------------


def policy_from_options(options: Mapping[str, Any]) -> dict[str, float] | None:
    """Return the canary limits set by deploy ``options``, or None when none is set.

    Limits not given take the `CanaryPolicy` defaults. Raises ValueError naming the option when
    a value is invalid.
    """
    given = {key: options[key] for key in POLICY_OPTIONS if options.get(key) is not None}
    if not given:
        return None
    fields: dict[str, float] = {}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"deploy option {key} is {value!r}; expected a finite number")
        fields[POLICY_OPTIONS[key]] = value
    if "min_requests" in fields:
        if fields["min_requests"] != int(fields["min_requests"]):
            raise ValueError(f"deploy option canary_min_requests is {fields['min_requests']!r}; expected a whole number >= 1")
        fields["min_requests"] = int(fields["min_requests"])
    try:
        policy = CanaryPolicy(**fields)
    except ValueError as exc:
        raise ValueError(f"invalid canary limit in deploy options: {exc}") from None
    return {"max_error_rate": policy.max_error_rate, "max_p99_ms": policy.max_p99_ms, "min_requests": policy.min_requests}


def version_summary(registry: Mapping, stats_of: Callable[[str, str], WindowStats]) -> dict[str, dict[str, list]]:
    """Return ``{model: {version: [requests, errors, p99_ms]}}`` for versions with traffic and requests.

    ``stats_of(model, version)`` returns this gateway's window. ``p99_ms`` is None when no request
    succeeded in the window.
    """
    summary: dict[str, dict[str, list]] = {}
    for name, model in registry.get("models", {}).items():
        for version, weight in (model.get("traffic") or {}).items():
            if weight <= 0:
                continue
            stats = stats_of(name, version)
            if stats.requests <= 0:
                continue
            p99_ms = None if stats.p99_s is None else round(stats.p99_s * 1000.0, 3)
            summary.setdefault(name, {})[version] = [int(stats.requests), int(stats.errors), p99_ms]
    return summary


def merge_summaries(summaries: Sequence[Mapping]) -> dict[tuple[str, str], WindowStats]:
    """Merge per-agent summaries into one `WindowStats` per (model, version).

    Malformed entries (from a newer or broken agent) are skipped, not raised. The merged p99 is
    the largest per-agent p99, an upper bound of the cluster-wide p99; the merged p50 and rate
    are not computed (None and 0).
    """
    totals: dict[tuple[str, str], list] = {}
    for summary in summaries:
        if not isinstance(summary, Mapping):
            continue
        for name, versions in summary.items():
            if not isinstance(versions, Mapping):
                continue
            for version, row in versions.items():
                parsed = _parse_row(row)
                if parsed is None:
                    continue
                requests, errors, p99_ms = parsed
                total = totals.setdefault((str(name), str(version)), [0, 0, None])
                total[0] += requests
                total[1] += errors
                if p99_ms is not None:
                    total[2] = p99_ms if total[2] is None else max(total[2], p99_ms)
    return {
        key: WindowStats(
            requests=requests,
            errors=errors,
            error_rate=errors / requests if requests else 0.0,
            p50_s=None,
            p99_s=None if p99_ms is None else p99_ms / 1000.0,
            rate_per_s=0.0,
        )
        for key, (requests, errors, p99_ms) in totals.items()
    }


def _parse_row(row: Any) -> tuple[int, int, float | None] | None:
    if not isinstance(row, (list, tuple)) or len(row) != 3:
        return None
    requests, errors, p99_ms = row
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (requests, errors)) or errors > requests:
        return None
    if p99_ms is not None and (isinstance(p99_ms, bool) or not isinstance(p99_ms, (int, float)) or not p99_ms >= 0):
        return None
    return requests, errors, None if p99_ms is None else float(p99_ms)


class MergedWindow:
    """Merged counts in the shape `CanaryPolicy.evaluate` reads (it only calls ``stats``)."""

    def __init__(self, stats: WindowStats) -> None:
        self._stats = stats

    def stats(self, now: float) -> WindowStats:
        return self._stats


def canary_versions(model: Mapping) -> list[str]:
    """Return the canary versions of one registry model entry that have rollback limits.

    A canary carries a weight above zero and below the model's total, gained weight in the last
    traffic change, and can be rolled back (``previous_traffic`` is set). Only versions whose
    entry has ``canary_policy`` are returned.
    """
    traffic = model.get("traffic") or {}
    previous = model.get("previous_traffic") or {}
    total = sum(w for w in traffic.values() if w > 0)
    if not previous or total <= 0:
        return []
    previous_total = sum(w for w in previous.values() if w > 0)
    found = []
    for version, weight in sorted(traffic.items()):
        share = weight / total
        previous_share = previous.get(version, 0.0) / previous_total if previous_total > 0 else 0.0
        entry = (model.get("versions") or {}).get(version) or {}
        if 0 < share < 1 and share > previous_share and entry.get("canary_policy"):
            found.append(version)
    return found


@dataclass(frozen=True)
class RollbackDecision:
    """A canary version that passed one of its limits, with the policy's reason."""

    model: str
    version: str
    decision: CanaryDecision


def rollback_decisions(
    registry: Mapping, summaries: Sequence[Mapping], *, window_s: float, now: float
) -> list[RollbackDecision]:
    """Return one decision per model whose canary should be rolled back now.

    ``summaries`` are the `version_summary` outputs of every alive agent (the caller's included),
    each covering the last ``window_s`` seconds.
    """
    merged = merge_summaries(summaries)
    decisions = []
    for name, model in sorted(registry.get("models", {}).items()):
        for version in canary_versions(model):
            limits = model["versions"][version]["canary_policy"]
            try:
                policy = CanaryPolicy(
                    max_error_rate=float(limits["max_error_rate"]),
                    max_p99_ms=float(limits["max_p99_ms"]),
                    min_requests=int(limits["min_requests"]),
                    window_s=window_s,
                )
            except (KeyError, TypeError, ValueError) as exc:
                logger.warning("ignoring invalid canary limits model=%s version=%s limits=%r: %s", name, version, limits, exc)
                continue
            stats = merged.get((name, version))
            if stats is None:
                continue
            decision = policy.evaluate(MergedWindow(stats), now)
            if decision.rollback:
                decisions.append(RollbackDecision(name, version, decision))
                break  # one rollback per model: it restores the whole previous split
    return decisions


# --------------------------------------------------------------------------------------------
# The agent's canary loop
# --------------------------------------------------------------------------------------------

# Consecutive failures of one segment that are reloaded at once. Later failures wait before the
# reload, doubling from CANARY_INTERVAL_S up to MAX_RELOAD_DELAY_S. So a segment that fails on
# every load (a machine whose numerics differ) does not reload in a tight loop.
IMMEDIATE_RELOADS = 2
MAX_RELOAD_DELAY_S = 600.0

SegmentKey = tuple[str, str, int, int]


class SegmentCanaries:
    """Schedules and runs the numeric canary of every segment loaded on one agent.

    The owner (the segment host) calls `loaded` after each load and `tick` from its loop, and
    calls `held_back` before it loads a segment again. Callbacks keep this class free of the
    host's internals:

    - ``get(key)`` returns the loaded segment (with ``worker``, ``manifest``) or None;
    - ``keys()`` lists the loaded keys;
    - ``canary_sha(model, version)`` returns the registry's canary blob sha256 or None;
    - ``fetch(sha)`` returns the local path of a blob, fetching it from peers when needed;
    - ``mark_bad(key, segment)`` unloads the segment, re-checks its blobs and starts the reload.
    """

    def __init__(
        self,
        node_id: str,
        *,
        get: Callable[[SegmentKey], Any],
        keys: Callable[[], list[SegmentKey]],
        canary_sha: Callable[[str, str], str | None],
        fetch: Callable[[str], Any],
        mark_bad: Callable[[SegmentKey, Any], Any],
        interval_s: float = CANARY_INTERVAL_S,
    ) -> None:
        self.node_id = node_id
        self._get = get
        self._keys = keys
        self._canary_sha = canary_sha
        self._fetch = fetch
        self._mark_bad = mark_bad
        self.interval_s = interval_s
        self._due: dict[SegmentKey, float] = {}
        self._tasks: dict[SegmentKey, asyncio.Task] = {}
        self._strikes: dict[SegmentKey, int] = {}
        self._reload_after: dict[SegmentKey, float] = {}
        self._runs = 0
        self.passes = 0
        self.failures = 0
        self.skips = 0
        self.last_failure: str | None = None

    def loaded(self, key: SegmentKey) -> None:
        """Schedule a check of a segment that was just loaded."""
        self._due[key] = time.monotonic()

    def held_back(self, key: SegmentKey) -> bool:
        """Whether a segment that failed its canary repeatedly must wait before loading again."""
        return time.monotonic() < self._reload_after.get(key, 0.0)

    def tick(self) -> None:
        """Start the checks that are due (at most one at a time per segment)."""
        now = time.monotonic()
        loaded = set(self._keys())
        for key in [key for key in self._due if key not in loaded]:
            del self._due[key]
        for key in loaded:
            due = self._due.setdefault(key, now + self.interval_s)
            if due <= now and key not in self._tasks:
                self._tasks[key] = asyncio.get_running_loop().create_task(self._check(key), name=f"canary-{key}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, Any]:
        return {"passes": self.passes, "failures": self.failures, "skips": self.skips,
                "last_failure": self.last_failure, "held_back": sorted(list(k) for k in self._reload_after if self.held_back(k))}

    async def run_once(self, key: SegmentKey) -> CanaryResult | None:
        """Check one loaded segment now; return the result, or None when the check was skipped."""
        model, version, first, last = key
        segment = self._get(key)
        if segment is None:
            return None
        sha = self._canary_sha(model, version)
        if not sha:
            # Versions deployed before canaries were recorded have no blob: never check them.
            self._due[key] = math.inf
            logger.info("no canary recorded node=%s model=%s version=%s units=%d..%d; skipping the check",
                        self.node_id, model, version, first, last)
            return None

        self._runs += 1
        request_id = f"canary-{self.node_id}-{self._runs}"
        try:
            path = await self._fetch(sha)
            input_names = segment_inputs(segment.manifest, first)
            output_names = live_names(segment.manifest, last)
            tensors = await asyncio.to_thread(load_canary, Path(path), [*input_names, *output_names])
            outputs = await segment.worker.submit(
                {name: tensors[name] for name in input_names}, priority="low",
                deadline=time.monotonic() + CANARY_TIMEOUT_S, request_id=request_id)
            result = compare_outputs({name: tensors[name] for name in output_names}, outputs)
        except SegmentRunError as exc:
            # The segment raised on an input it ran at deploy time: it is as bad as a mismatch.
            result = CanaryResult(False, None, math.inf, 0.0, error=str(exc))
        except (QueueFull, DeadlineExceeded, WorkerClosed) as exc:
            self.skips += 1
            logger.info("canary skipped node=%s rid=%s model=%s version=%s units=%d..%d: %s",
                        self.node_id, request_id, model, version, first, last, exc)
            return None
        except Exception as exc:  # a missing or unreadable canary blob, or inputs the worker rejects
            self.skips += 1
            logger.warning("canary could not run node=%s rid=%s model=%s version=%s units=%d..%d: %s: %s",
                           self.node_id, request_id, model, version, first, last, type(exc).__name__, exc)
            return None
        if self._get(key) is not segment:
            return None  # unloaded or reloaded while the check ran
        await self._record(key, segment, result)
        return result

    async def _record(self, key: SegmentKey, segment: Any, result: CanaryResult) -> None:
        model, version, first, last = key
        if result.passed:
            self.passes += 1
            self._strikes.pop(key, None)
            self._reload_after.pop(key, None)
            logger.debug("canary passed node=%s model=%s version=%s units=%d..%d difference=%.3g",
                         self.node_id, model, version, first, last, result.difference)
            return

        self.failures += 1
        strikes = self._strikes[key] = self._strikes.get(key, 0) + 1
        delay = 0.0 if strikes <= IMMEDIATE_RELOADS else min(
            self.interval_s * 2 ** (strikes - IMMEDIATE_RELOADS - 1), MAX_RELOAD_DELAY_S)
        self._reload_after[key] = time.monotonic() + delay
        self.last_failure = f"{model}@{version} units {first}..{last}: {result.describe()}"
        logger.error("canary mismatch node=%s model=%s version=%s units=%d..%d: %s; unloading the segment, "
                     "re-checking its blobs and loading it again in %.0f s (failure %d in a row)",
                     self.node_id, model, version, first, last, result.describe(), delay, strikes)
        await self._mark_bad(key, segment)

    async def _check(self, key: SegmentKey) -> None:
        try:
            await self.run_once(key)
        finally:
            self._tasks.pop(key, None)
            if key in self._due:
                self._due[key] = max(self._due[key], time.monotonic() + self.interval_s)
