"""Tests of alarm rules: config parsing, the `for:` evaluation core, and start/clear logging."""

from __future__ import annotations

import logging

import pytest

from nodeagent.alerts import AlertEngine, AlertMonitor, AlertRule, AlertRuleError, rules_from_config
from nodeagent.metrics import AgentMetrics


def test_rules_from_config_builds_rules() -> None:
    rules = rules_from_config([
        {"name": "deep-queue", "metric": "shardmesh_queue_depth", "threshold": 100, "window_s": 30,
         "labels": {"segment": "seg0"}},
        {"name": "errors", "metric": "shardmesh_requests_total", "labels": {"outcome": "error"},
         "aggregate": "rate", "comparison": ">=", "threshold": 1, "window_s": 60},
    ])
    assert rules[0].labels == {"segment": "seg0"}
    assert rules[0].comparison == ">"
    assert rules[1].describe() == 'rate(shardmesh_requests_total{outcome="error"}[60s]) >= 1 for 60s'


@pytest.mark.parametrize(
    "items,match",
    [
        ([{"name": "a", "metric": "m"}], "missing the required key 'threshold'"),
        ([{"name": "a", "metric": "m", "threshold": 1, "colour": "red"}], "unknown keys"),
        ([{"name": "a", "metric": "m", "threshold": 1, "comparison": "=="}], "comparison '=='"),
        ([{"name": "a", "metric": "m", "threshold": "high"}], "must be numbers"),
        ([{"name": "a", "metric": "m", "threshold": 1, "window_s": -5}], "window_s"),
        ([{"name": "a", "metric": "m", "threshold": 1, "aggregate": "rate", "window_s": 0}], "window_s > 0"),
        ([{"name": "a", "metric": "m", "threshold": 1}, {"name": "a", "metric": "n", "threshold": 2}],
         "used twice"),
        (["not a table"], "must be a table"),
    ],
    ids=["missing", "unknown_key", "comparison", "threshold_type", "window", "rate_window", "duplicate",
         "not_table"],
)
def test_rules_from_config_rejects(items: list[object], match: str) -> None:
    with pytest.raises(AlertRuleError, match=match):
        rules_from_config(items)  # type: ignore[arg-type]


def test_engine_fires_after_window_and_clears() -> None:
    rule = AlertRule(name="deep", metric="q", threshold=10, window_s=5)
    engine = AlertEngine([rule])
    assert engine.update(0.0, {"deep": 50}, wall_now=1000.0) == []
    assert engine.update(4.0, {"deep": 50}, wall_now=1004.0) == []
    started = engine.update(5.0, {"deep": 50}, wall_now=1005.0)
    assert [(t.rule.name, t.firing) for t in started] == [("deep", True)]
    assert engine.update(6.0, {"deep": 60}) == []  # still firing: no second transition
    firing = engine.firing()
    assert firing[0]["value"] == 60
    assert firing[0]["since"] == 1005.0
    cleared = engine.update(7.0, {"deep": 3})
    assert [(t.rule.name, t.firing) for t in cleared] == [("deep", False)]
    assert engine.firing() == []


def test_engine_dip_restarts_window() -> None:
    engine = AlertEngine([AlertRule(name="deep", metric="q", threshold=10, window_s=5)])
    engine.update(0.0, {"deep": 50})
    engine.update(3.0, {"deep": 5})  # condition broken: the 5 s start again
    assert engine.update(6.0, {"deep": 50}) == []
    assert engine.update(10.0, {"deep": 50}) == []
    assert len(engine.update(11.0, {"deep": 50})) == 1


def test_engine_zero_window_fires_at_once() -> None:
    engine = AlertEngine([AlertRule(name="low", metric="m", threshold=1, comparison="<", window_s=0)])
    assert [t.firing for t in engine.update(0.0, {"low": 0.5})] == [True]


def test_engine_absent_metric_does_not_fire() -> None:
    engine = AlertEngine([AlertRule(name="x", metric="m", threshold=-1, window_s=0)])
    assert engine.update(0.0, {"x": None}) == []
    assert engine.firing() == []


def test_engine_rate_of_counter() -> None:
    rule = AlertRule(name="errs", metric="c", threshold=2, aggregate="rate", window_s=10)
    engine = AlertEngine([rule])
    fired_at = None
    for step in range(40):
        now = float(step)
        transitions = engine.update(now, {"errs": 5.0 * now})  # 5 errors per second
        if transitions:
            fired_at = now
            break
    # The rate is known from the second sample (t=1); it must then hold for 10 s.
    assert fired_at == 11.0
    assert engine.firing()[0]["value"] == pytest.approx(5.0)


def test_engine_rate_survives_counter_reset() -> None:
    engine = AlertEngine([AlertRule(name="errs", metric="c", threshold=100, aggregate="rate", window_s=10)])
    engine.update(0.0, {"errs": 1000.0})
    engine.update(1.0, {"errs": 3.0})  # agent restarted: counter starts over
    assert engine.firing() == []


def test_monitor_logs_start_and_clear_once(caplog: pytest.LogCaptureFixture) -> None:
    metrics = AgentMetrics("node-a", collect_host=False)
    rule = AlertRule(name="deep-queue", metric="shardmesh_queue_depth", labels={"segment": "seg0"},
                     threshold=10, window_s=2)
    monitor = AlertMonitor([rule], metrics.sample_value, node_id="node-a")
    with caplog.at_level(logging.WARNING, logger="nodeagent.alerts"):
        metrics.set_queue_depth("seg0", 50)
        metrics.set_queue_depth("seg1", 500)  # another segment: not selected by the labels
        for t in range(6):
            monitor.evaluate_once(float(t))
        assert [a["name"] for a in monitor.firing()] == ["deep-queue"]
        metrics.set_queue_depth("seg0", 0)
        for t in range(6, 10):
            monitor.evaluate_once(float(t))
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 2, lines
    assert "alarm deep-queue started" in lines[0]
    assert "node-a" in lines[0]
    assert "alarm deep-queue cleared" in lines[1]
    assert monitor.firing() == []


def test_monitor_sums_matching_series() -> None:
    metrics = AgentMetrics(collect_host=False)
    metrics.set_queue_depth("seg0", 4)
    metrics.set_queue_depth("seg1", 7)
    monitor = AlertMonitor([AlertRule(name="total", metric="shardmesh_queue_depth", threshold=10, window_s=0)],
                           metrics.sample_value)
    transitions = monitor.evaluate_once(0.0)
    assert [t.value for t in transitions] == [11.0]
