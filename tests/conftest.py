"""Shared pytest configuration: every async test runs under asyncio's default loop and uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from protocol.tls import NodeCredentials
from helpers import make_cluster  # tests/ is on sys.path (rootdir conftest, no __init__.py)

try:
    import uvloop
except ImportError:  # uvloop is a dependency on Linux; the suite still runs where it is missing
    uvloop = None


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Parametrize each async test over the loops shardmesh supports (pytest-asyncio >= 1.5 hook)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if uvloop is not None:
        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
def cluster_creds(tmp_path: Path) -> list[NodeCredentials]:
    """A cluster CA plus three node credentials (node0 has the CA key)."""
    return make_cluster(tmp_path, 3)
