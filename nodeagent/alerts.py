"""Alarm rules over the agent's own metrics.

Problem. Operators want to hear when a queue stays deep, errors climb or heartbeats slow down,
without running a Prometheus server next to every cluster. A rule names a metric, a comparison, a
threshold and a window; a firing alarm is listed at GET /v1/alerts, shown on the status page, and
logged once at WARNING when it starts and once when it clears.

Rule chosen. The Prometheus alerting `for:` rule: the condition must hold at every evaluation for
`window_s` seconds before the alarm fires, and it clears at the first evaluation where it does not
hold. A single slow request therefore does not page anyone, and `window_s = 0` fires at once.
Options rejected: averaging over the window (one huge spike fires an alarm for a whole window) and
hysteresis bands (another number per rule for operators to tune).

The compared value is either the metric's current value (`aggregate = "value"`, for gauges) or its
per-second increase over the window (`aggregate = "rate"`, for counters such as
`shardmesh_requests_total{outcome="error"}`). Several series matching the labels are summed. A
metric with no series yet counts as "condition does not hold".

`AlertEngine` is the pure core (values and times in, transitions out); `AlertMonitor` is the thin
asyncio shell that samples an `AgentMetrics` on an interval and logs the transitions.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from nodeagent.facade import AlertInfo

logger = logging.getLogger(__name__)

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_AGGREGATES = ("value", "rate")
_RULE_KEYS = {"name", "metric", "labels", "comparison", "threshold", "window_s", "aggregate", "message"}


class AlertRuleError(ValueError):
    """An invalid alarm rule in the config; the message names the rule, the key and the fix."""


@dataclass(frozen=True)
class AlertRule:
    name: str
    metric: str
    threshold: float
    comparison: str = ">"
    window_s: float = 60.0
    aggregate: str = "value"
    labels: dict[str, str] = field(default_factory=dict)
    message: str = ""

    def __post_init__(self) -> None:
        where = f"alert rule {self.name!r}"
        if not self.name:
            raise AlertRuleError("alert rule has an empty name; set alerts.rules[].name")
        if not self.metric:
            raise AlertRuleError(f"{where}: metric is empty; set it to a metric sample name")
        if self.comparison not in _COMPARISONS:
            raise AlertRuleError(
                f"{where}: comparison {self.comparison!r} is invalid; use one of "
                f"{', '.join(_COMPARISONS)}"
            )
        if self.aggregate not in _AGGREGATES:
            raise AlertRuleError(
                f"{where}: aggregate {self.aggregate!r} is invalid; use one of {', '.join(_AGGREGATES)}"
            )
        if not math.isfinite(self.threshold):
            raise AlertRuleError(f"{where}: threshold {self.threshold!r} must be a finite number")
        if not math.isfinite(self.window_s) or self.window_s < 0:
            raise AlertRuleError(f"{where}: window_s {self.window_s!r} must be >= 0 seconds")
        if self.aggregate == "rate" and self.window_s <= 0:
            raise AlertRuleError(f"{where}: aggregate 'rate' needs window_s > 0")

    def holds(self, value: float | None) -> bool:
        return value is not None and _COMPARISONS[self.comparison](value, self.threshold)

    def describe(self) -> str:
        selector = ",".join(f'{k}="{v}"' for k, v in sorted(self.labels.items()))
        metric = f"{self.metric}{{{selector}}}" if selector else self.metric
        if self.aggregate == "rate":
            metric = f"rate({metric}[{self.window_s:g}s])"
        return f"{metric} {self.comparison} {self.threshold:g} for {self.window_s:g}s"


def rules_from_config(items: Iterable[Mapping[str, Any]]) -> list[AlertRule]:
    """Build rules from config entries (TOML `[[alerts.rules]]` tables), checking every key."""
    rules: list[AlertRule] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        where = f"alerts.rules[{index}]"
        if not isinstance(item, Mapping):
            raise AlertRuleError(f"{where} must be a table, got {type(item).__name__}")
        unknown = set(item) - _RULE_KEYS
        if unknown:
            raise AlertRuleError(
                f"{where} has unknown keys {sorted(unknown)}; accepted keys: {sorted(_RULE_KEYS)}"
            )
        for key in ("name", "metric", "threshold"):
            if key not in item:
                raise AlertRuleError(f"{where} is missing the required key {key!r}")
        try:
            threshold = float(item["threshold"])
            window_s = float(item.get("window_s", 60.0))
        except (TypeError, ValueError) as exc:
            raise AlertRuleError(f"{where}: threshold and window_s must be numbers ({exc})") from None
        labels = item.get("labels", {})
        if not isinstance(labels, Mapping):
            raise AlertRuleError(f"{where}.labels must be a table of label = value")
        rule = AlertRule(
            name=str(item["name"]),
            metric=str(item["metric"]),
            threshold=threshold,
            comparison=str(item.get("comparison", ">")),
            window_s=window_s,
            aggregate=str(item.get("aggregate", "value")),
            labels={str(k): str(v) for k, v in labels.items()},
            message=str(item.get("message", "")),
        )
        if rule.name in seen:
            raise AlertRuleError(f"{where}: rule name {rule.name!r} is used twice; names must be unique")
        seen.add(rule.name)
        rules.append(rule)
    return rules


@dataclass(frozen=True)
class AlertTransition:
    rule: AlertRule
    firing: bool  # True: the alarm started, False: it cleared
    value: float | None
    at: float  # monotonic time of the evaluation


@dataclass
class _RuleState:
    history: deque[tuple[float, float]] = field(default_factory=deque)  # (time, raw value)
    breach_since: float | None = None
    firing: bool = False
    fired_wall: float = 0.0
    value: float | None = None


class AlertEngine:
    """Pure evaluation of alarm rules: feed raw metric values with `update`, read `firing`."""

    def __init__(self, rules: Iterable[AlertRule]) -> None:
        self.rules = list(rules)
        self._state = {rule.name: _RuleState() for rule in self.rules}

    def _compared_value(self, rule: AlertRule, state: _RuleState, now: float, raw: float | None) -> float | None:
        if rule.aggregate == "value":
            return raw
        if raw is not None:
            state.history.append((now, raw))
        horizon = now - rule.window_s
        # Keep one sample at or before the horizon so that the rate covers the whole window.
        while len(state.history) >= 2 and state.history[1][0] <= horizon:
            state.history.popleft()
        if len(state.history) < 2:
            return None
        (t0, v0), (t1, v1) = state.history[0], state.history[-1]
        if t1 <= t0:
            return None
        increase = v1 - v0 if v1 >= v0 else v1  # a counter reset restarts from 0
        return increase / (t1 - t0)

    def update(
        self, now: float, raw_values: Mapping[str, float | None], *, wall_now: float | None = None
    ) -> list[AlertTransition]:
        """Evaluate every rule at monotonic time `now`; `raw_values` maps rule name to value."""
        transitions: list[AlertTransition] = []
        for rule in self.rules:
            state = self._state[rule.name]
            value = self._compared_value(rule, state, now, raw_values.get(rule.name))
            state.value = value
            if not rule.holds(value):
                state.breach_since = None
                if state.firing:
                    state.firing = False
                    transitions.append(AlertTransition(rule, False, value, now))
                continue
            if state.breach_since is None:
                state.breach_since = now
            if not state.firing and now - state.breach_since >= rule.window_s:
                state.firing = True
                state.fired_wall = time.time() if wall_now is None else wall_now
                transitions.append(AlertTransition(rule, True, value, now))
        return transitions

    def firing(self) -> list[AlertInfo]:
        alarms: list[AlertInfo] = []
        for rule in self.rules:
            state = self._state[rule.name]
            if not state.firing:
                continue
            alarms.append(
                AlertInfo(
                    name=rule.name,
                    metric=rule.metric,
                    value=state.value if state.value is not None else float("nan"),
                    threshold=rule.threshold,
                    comparison=rule.comparison,
                    window_s=rule.window_s,
                    since=state.fired_wall,
                    message=rule.message or rule.describe(),
                )
            )
        return alarms


def log_transition(transition: AlertTransition, *, node_id: str = "") -> None:
    """Write the one WARNING line for an alarm that started or cleared."""
    rule = transition.rule
    value = "absent" if transition.value is None else f"{transition.value:g}"
    if transition.firing:
        logger.warning(
            "node %s: alarm %s started: %s (value %s)", node_id, rule.name, rule.describe(), value
        )
    else:
        logger.warning(
            "node %s: alarm %s cleared: %s is false now (value %s)",
            node_id,
            rule.name,
            rule.describe(),
            value,
        )


class AlertMonitor:
    """Samples metrics on an interval, feeds an `AlertEngine` and logs its transitions.

    `read_metric(name, labels)` returns the summed value of matching samples or None
    (`AgentMetrics.sample_value` fits). The owner awaits `run()` inside its task group and cancels
    it on shutdown.
    """

    def __init__(
        self,
        rules: Iterable[AlertRule],
        read_metric: Callable[[str, dict[str, str]], float | None],
        *,
        interval_s: float = 5.0,
        node_id: str = "",
    ) -> None:
        self.engine = AlertEngine(rules)
        self._read_metric = read_metric
        self.interval_s = interval_s
        self.node_id = node_id

    def evaluate_once(self, now: float | None = None) -> list[AlertTransition]:
        raw = {rule.name: self._read_metric(rule.metric, rule.labels) for rule in self.engine.rules}
        transitions = self.engine.update(time.monotonic() if now is None else now, raw)
        for transition in transitions:
            log_transition(transition, node_id=self.node_id)
        return transitions

    def firing(self) -> list[AlertInfo]:
        return self.engine.firing()

    async def run(self) -> None:
        if not self.engine.rules:
            return
        logger.info(
            "node %s: alarm monitor started with %d rules, every %g s",
            self.node_id,
            len(self.engine.rules),
            self.interval_s,
        )
        try:
            while True:
                self.evaluate_once()
                await asyncio.sleep(self.interval_s)
        finally:
            logger.info("node %s: alarm monitor stopped", self.node_id)
