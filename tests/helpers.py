"""Helpers shared by tests: TLS credentials for a throwaway cluster, event-loop stall timing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from protocol.tls import NodeCredentials, init_cluster, issue_node


def make_cluster(tmp_path: Path, n: int, *, cluster_id: str = "test-cluster") -> list[NodeCredentials]:
    """Create a cluster CA and `n` nodes with ids node0..node{n-1} under `tmp_path`.

    node0's data directory (`tmp_path / "node0"`) contains the CA key, and every node has its own key
    made in its own data directory.
    """
    if n < 1:
        raise ValueError(f"a cluster needs at least one node, got n={n}")
    ca_dir = tmp_path / "node0"
    nodes = [init_cluster(ca_dir, node_id="node0", cluster_id=cluster_id)]
    for index in range(1, n):
        nodes.append(issue_node(ca_dir, tmp_path / f"node{index}", f"node{index}"))
    return nodes


@contextlib.asynccontextmanager
async def loop_gaps(interval_s: float) -> AsyncIterator[list[float]]:
    """Record, while the block runs, the seconds between ticks of a timer of ``interval_s``.

    A tick far above ``interval_s`` means something held the event loop (or the GIL) that long.
    """
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(interval_s)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        yield gaps
    finally:
        stop.set()
        await ticking
