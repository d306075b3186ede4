"""Tests of the traffic split, rollback and canary cores (pure, driven with plain floats as time)."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from nodeagent.traffic import (
    CanaryPolicy,
    LatencyWindow,
    ModelTraffic,
    RollbackUnavailable,
    TrafficError,
    VersionInUse,
    choose_version,
    validate_weights,
)

KEYS = [f"user-{i}" for i in range(20_000)]


def shares(weights: dict[str, float], keys: list[str]) -> dict[str, float]:
    counts = Counter(choose_version(weights, key) for key in keys)
    return {v: counts[v] / len(keys) for v in weights}


@pytest.mark.parametrize(
    "weights",
    [{"v1": 0.9, "v2": 0.1}, {"a": 0.5, "b": 0.3, "c": 0.2}, {"v1": 3.0, "v2": 1.0}],
    ids=["canary_10", "three_way", "relative"],
)
def test_choose_keyed_split_matches_weights(weights: dict[str, float]) -> None:
    total = sum(weights.values())
    for version, share in shares(weights, KEYS).items():
        # 20 000 keys: one binomial standard deviation is at most 0.0036, so 0.015 is > 4 sd.
        assert abs(share - weights[version] / total) < 0.015, (version, share)


def test_choose_unkeyed_split_matches_weights() -> None:
    rng = random.Random(11)
    weights = {"v1": 0.7, "v2": 0.3}
    counts = Counter(choose_version(weights, None, rng=rng) for _ in range(20_000))
    assert abs(counts["v2"] / 20_000 - 0.3) < 0.015


def test_choose_same_key_same_version() -> None:
    weights = {"v1": 0.5, "v2": 0.5}
    for key in KEYS[:200]:
        first = choose_version(weights, key)
        assert all(choose_version(weights, key) == first for _ in range(5))


def test_choose_raising_canary_moves_keys_only_to_it() -> None:
    before = {key: choose_version({"v1": 0.9, "v2": 0.1}, key) for key in KEYS[:5000]}
    after = {key: choose_version({"v1": 0.8, "v2": 0.2}, key) for key in KEYS[:5000]}
    moved = [key for key in before if before[key] != after[key]]
    assert all(before[key] == "v1" and after[key] == "v2" for key in moved)
    # About 10% of the keys must move (0.8 -> 0.9 of them stay on v1).
    assert 0.08 < len(moved) / 5000 < 0.12


def test_choose_zero_weight_never_chosen() -> None:
    assert {choose_version({"v1": 1.0, "v2": 0.0}, key) for key in KEYS[:2000]} == {"v1"}


def test_choose_no_weight_raises() -> None:
    with pytest.raises(TrafficError, match="no version has a positive"):
        choose_version({"v1": 0.0}, "k")


def test_choose_stable_across_processes(tmp_path: Path) -> None:
    weights = {"v1": 0.5, "v2": 0.3, "v3": 0.2}
    in_this_process = [choose_version(weights, key) for key in KEYS[:300]]
    script = (
        "import json, sys\n"
        "from nodeagent.traffic import choose_version\n"
        f"keys = [f'user-{{i}}' for i in range(300)]\n"
        f"print(json.dumps([choose_version({weights!r}, k) for k in keys]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parents[1], timeout=60, check=True)
    assert json.loads(out.stdout) == in_this_process


@pytest.mark.parametrize(
    "weights,field",
    [
        ({"v1": -0.1}, "weights.v1"),
        ({"v1": math.nan}, "weights.v1"),
        ({"v1": math.inf}, "weights.v1"),
        ({"v1": True}, "weights.v1"),
        ({"v1": "1"}, "weights.v1"),
        ({"v9": 1.0}, "weights.v9"),
        ({"v1": 0.0, "v2": 0.0}, "weights"),
        ({}, "weights"),
        ([1.0], "weights"),
    ],
    ids=["negative", "nan", "inf", "bool", "string", "unknown", "zero_sum", "empty", "list"],
)
def test_validate_weights_rejects(weights: object, field: str) -> None:
    with pytest.raises(TrafficError) as info:
        validate_weights(weights, ["v1", "v2"])
    assert info.value.field == field


def test_validate_weights_fills_missing_with_zero() -> None:
    assert validate_weights({"v2": 2}, ["v1", "v2"]) == {"v1": 0.0, "v2": 2.0}


def test_traffic_canary_rollback_restores_previous() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2", weight=0.1)
    assert traffic.weights == pytest.approx({"v1": 0.9, "v2": 0.1})
    assert traffic.previous == "v1"
    rolled = traffic.rollback()
    assert rolled.weights == {"v1": 1.0, "v2": 0.0}
    assert rolled.versions == ["v1", "v2"]  # the canary stays loaded
    assert rolled.previous is None


def test_traffic_rollback_after_full_promotion() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2", weight=0.1)
    traffic = traffic.set_weights({"v1": 0.5, "v2": 0.5}).promote("v2")
    assert traffic.weights == {"v1": 0.0, "v2": 1.0}
    assert traffic.previous == "v1"
    assert traffic.rollback().weights == {"v1": 1.0, "v2": 0.0}


def test_traffic_next_canary_targets_current_version() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2").promote("v2")
    traffic = traffic.add_version("v3", weight=0.2)
    assert traffic.previous == "v2"
    assert traffic.rollback().weights == {"v1": 0.0, "v2": 1.0, "v3": 0.0}


def test_traffic_rollback_without_previous_raises() -> None:
    with pytest.raises(RollbackUnavailable) as info:
        ModelTraffic("m").add_version("v1").rollback()
    assert info.value.field == "previous_version"


def test_traffic_delete_in_use_raises() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2", weight=0.3)
    with pytest.raises(VersionInUse) as info:
        traffic.delete_version("v2")
    assert info.value.value == "v2"


def test_traffic_delete_previous_clears_target() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2").promote("v2")
    assert traffic.previous == "v1"
    traffic = traffic.delete_version("v1")
    assert traffic.versions == ["v2"]
    assert traffic.previous is None


def test_traffic_add_duplicate_version_raises() -> None:
    with pytest.raises(TrafficError, match="already loaded"):
        ModelTraffic("m").add_version("v1").add_version("v1")


def test_traffic_dict_roundtrip() -> None:
    traffic = ModelTraffic("m").add_version("v1").add_version("v2", weight=0.25)
    assert ModelTraffic.from_dict(json.loads(json.dumps(traffic.to_dict()))) == traffic


def test_window_drops_old_samples() -> None:
    window = LatencyWindow(10.0)
    for t in range(20):
        window.record(float(t), 0.010, ok=(t % 2 == 0))
    stats = window.stats(19.0)
    assert stats.requests == 11  # samples at t = 9..19
    assert stats.errors == 6  # the odd times 9, 11, ..., 19
    assert stats.rate_per_s == pytest.approx(1.1)


def test_window_quantiles_use_successes_only() -> None:
    window = LatencyWindow(60.0)
    for i in range(1, 101):
        window.record(0.0, i / 1000.0, ok=True)
    window.record(0.0, 30.0, ok=False)  # a timeout
    stats = window.stats(1.0)
    assert stats.p50_s == pytest.approx(0.050)
    assert stats.p99_s == pytest.approx(0.099)


def test_canary_waits_for_min_requests() -> None:
    policy = CanaryPolicy(max_error_rate=0.05, max_p99_ms=100, min_requests=20, window_s=30)
    window = policy.new_window()
    for i in range(19):
        window.record(float(i), 0.010, ok=False)
    decision = policy.evaluate(window, 19.0)
    assert not decision.rollback
    assert "19 of 20" in decision.reason


def test_canary_error_rate_triggers_rollback() -> None:
    policy = CanaryPolicy(max_error_rate=0.05, max_p99_ms=100, min_requests=20, window_s=30)
    window = policy.new_window()
    for i in range(40):
        window.record(i * 0.5, 0.010, ok=(i % 10 != 0))  # 10% errors
    decision = policy.evaluate(window, 20.0)
    assert decision.rollback
    assert "error rate 0.100" in decision.reason


def test_canary_p99_triggers_rollback() -> None:
    policy = CanaryPolicy(max_error_rate=0.05, max_p99_ms=100, min_requests=20, window_s=30)
    window = policy.new_window()
    for i in range(50):
        window.record(i * 0.1, 0.250 if i >= 45 else 0.020, ok=True)
    decision = policy.evaluate(window, 5.0)
    assert decision.rollback
    assert "p99 latency 250.0 ms" in decision.reason


def test_canary_healthy_stays() -> None:
    policy = CanaryPolicy(max_error_rate=0.05, max_p99_ms=100, min_requests=20, window_s=30)
    window = policy.new_window()
    for i in range(50):
        window.record(i * 0.1, 0.020, ok=True)
    decision = policy.evaluate(window, 5.0)
    assert not decision.rollback
    assert decision.stats.requests == 50


def test_canary_old_errors_expire() -> None:
    policy = CanaryPolicy(max_error_rate=0.05, max_p99_ms=100, min_requests=10, window_s=10)
    window = policy.new_window()
    for i in range(20):
        window.record(float(i) * 0.1, 0.010, ok=False)
    assert policy.evaluate(window, 2.0).rollback
    for i in range(20):
        window.record(20.0 + i * 0.1, 0.010, ok=True)
    assert not policy.evaluate(window, 22.0).rollback


@pytest.mark.parametrize(
    "kwargs",
    [{"max_error_rate": 1.5}, {"max_p99_ms": 0}, {"min_requests": 0}, {"window_s": -1}],
    ids=["error_rate", "p99", "min_requests", "window"],
)
def test_canary_policy_rejects_bad_limits(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CanaryPolicy(**kwargs)
