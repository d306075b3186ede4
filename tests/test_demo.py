"""End to end: `shardmesh demo` as a user runs it, with and without an agent killed mid-run.

Each test starts three real agent processes on loopback, deploys the packaged MiniLM through the
planner and checks the demo's JSON summary, so it takes about half a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {
    "agents", "coordinator", "epoch", "segments", "requests", "failed", "max_abs_diff",
    "p50_ms", "p99_ms", "throughput_rps", "killed_agent",
}


def _run_demo(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    completed = subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "demo", "--json", *args],
        capture_output=True, text=True, timeout=400, env=env,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"demo printed nothing; stderr:\n{completed.stderr[-3000:]}"
    return completed, json.loads(lines[-1])


def _check_segments(summary: dict) -> None:
    segments = summary["segments"]
    assert segments, "the placement has no segments"
    assert segments[0]["first_layer"] == 0
    for before, after in zip(segments, segments[1:]):
        assert after["first_layer"] == before["last_layer"] + 1
    assert segments[-1]["last_layer"] == 7  # MiniLM has 8 units: embeddings, 6 layers, pooling


def test_demo_three_agents_json() -> None:
    completed, summary = _run_demo("--agents", "3", "--requests", "40")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert SUMMARY_KEYS <= set(summary)
    assert summary["agents"] == 3
    assert summary["requests"] == 40
    assert summary["failed"] == 0
    assert summary["max_abs_diff"] <= 1e-4
    assert summary["killed_agent"] is None
    assert summary["coordinator"] in {"agent-0", "agent-1", "agent-2"}
    assert summary["epoch"] >= 1
    assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert summary["throughput_rps"] > 0
    assert "PASS: 40 of 40 requests answered" in completed.stderr
    _check_segments(summary)


def test_demo_chaos_loses_no_request() -> None:
    completed, summary = _run_demo("--agents", "3", "--requests", "60", "--chaos")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert summary["failed"] == 0
    assert summary["max_abs_diff"] <= 1e-4
    killed = summary["killed_agent"]
    assert killed in {"agent-1", "agent-2"}, "the gateway agent-0 must not be the one killed"
    # After the re-placement no segment may still name the killed agent.
    assert all(segment["agent"] != killed for segment in summary["segments"])
    _check_segments(summary)


def test_demo_rejects_bad_arguments() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "nodeagent.cli", "demo", "--agents", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert "--agents" in completed.stderr


def test_demo_efficientnet_images() -> None:
    completed, summary = _run_demo("--model", "efficientnet", "--requests", "10")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert summary["failed"] == 0
    assert summary["max_abs_diff"] <= 1e-4
    segments = summary["segments"]
    assert segments[0]["first_layer"] == 0
    assert segments[-1]["last_layer"] == 17  # stem, 16 MBConv blocks, head
