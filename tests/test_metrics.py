"""AgentMetrics: the per-segment series appear when fed and disappear when their segment goes."""

from __future__ import annotations

from nodeagent.metrics import AgentMetrics

SEGMENT = "minilm@v1[0..3]"
OTHER = "minilm@v2[0..7]"


def series(metrics: AgentMetrics, name: str) -> dict[str, float]:
    """segment label -> value of the samples called ``name``."""
    found = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[sample.labels["segment"]] = sample.value
    return found


def test_segment_series_follow_loads_and_unloads() -> None:
    metrics = AgentMetrics("agent-0", collect_host=False)
    depths = {SEGMENT: 3, OTHER: 0}
    metrics.add_refresher(lambda m: m.set_queue_depths(depths))
    for size, seconds in ((2, 0.004), (4, 0.006)):
        metrics.observe_segment("minilm", "v1", SEGMENT, seconds)
        metrics.observe_batch(SEGMENT, size)
    metrics.observe_segment("minilm", "v2", OTHER, 0.01)
    metrics.observe_batch(OTHER, 1)

    text = metrics.render()[0].decode()
    assert 'shardmesh_queue_depth{segment="minilm@v1[0..3]"} 3.0' in text
    assert series(metrics, "shardmesh_batch_size_sum") == {SEGMENT: 6.0, OTHER: 1.0}
    assert series(metrics, "shardmesh_segment_seconds_count") == {SEGMENT: 2.0, OTHER: 1.0}
    assert metrics.sample_value("shardmesh_queue_depth") == 3.0

    # The segment is unloaded: its histograms go, and the next refresh drops its queue gauge.
    metrics.forget_segment(SEGMENT)
    del depths[SEGMENT]
    metrics.refresh()
    assert set(series(metrics, "shardmesh_batch_size_sum")) == {OTHER}
    assert set(series(metrics, "shardmesh_segment_seconds_count")) == {OTHER}
    assert set(series(metrics, "shardmesh_queue_depth")) == {OTHER}

    # A deleted version takes its segments' series with it.
    metrics.forget_version("minilm", "v2")
    assert series(metrics, "shardmesh_batch_size_sum") == {}
    assert series(metrics, "shardmesh_segment_seconds_count") == {}
