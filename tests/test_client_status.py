"""`shardmesh status` table helpers against the member records a real agent returns."""

from __future__ import annotations

from nodeagent.client import _device_names


def test_status_device_names_from_probe_records() -> None:
    member = {"capabilities": {"devices": [{"name": "cpu", "kind": "cpu"}, {"name": "cuda:0", "kind": "cuda"}]}}
    assert _device_names(member) == "cpu, cuda:0"


def test_status_device_names_missing_capabilities() -> None:
    assert _device_names({}) == "-"
    assert _device_names({"capabilities": None}) == "-"
