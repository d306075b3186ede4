"""The status page rendered by headless Chromium against a real app on 127.0.0.1.

The app runs the HTTP layer over tests.memfacade.MemFacade (three members, two models) on a
background thread's event loop; Chromium loads the page, runs its script, and either dumps the
resulting DOM or writes a screenshot. These are plain (not async) tests so that each runs once,
not once per event loop: Chromium takes seconds to start.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from memfacade import MemFacade  # tests/ is on sys.path (rootdir conftest)
from nodeagent.facade import AlertInfo
from nodeagent.http_api import HttpSettings, create_app, start_server
from nodeagent.http_auth import Tokens
from nodeagent.metrics import AgentMetrics

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is absent; install Debian's chromium package (apt-get install chromium)",
)


class ServerThread:
    """An app served on 127.0.0.1 from its own event loop in a thread."""

    def __init__(self, facade: MemFacade, settings: HttpSettings, tokens: Tokens | None) -> None:
        self.facade = facade
        self.settings = settings
        self.tokens = tokens
        self.url = ""
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="status-page-server", daemon=True)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        metrics = AgentMetrics(self.facade.node_id, collect_host=False)
        for i in range(40):
            metrics.observe_request("double", "v1", 0.004 + i * 0.0005, ok=True)
        app = create_app(self.facade, config=self.settings, tokens=self.tokens, metrics=metrics,
                         node_id=self.facade.node_id)
        runner, port = await start_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{port}/"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("status page server did not start within 10 s")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def chromium(tmp_path: Path, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900",
        "--virtual-time-budget=3000", *extra, url,
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)


@pytest.fixture
def page_server() -> Iterator[ServerThread]:
    facade = MemFacade()
    facade.alert_list = [
        AlertInfo(name="deep-queue", metric="shardmesh_queue_depth", value=140.0, threshold=100.0,
                  comparison=">", window_s=30.0, since=1_700_000_000.0, message="seg1 queue above 100"),
    ]
    with ServerThread(facade, HttpSettings(), None) as server:
        yield server


def test_status_page_dom_shows_members_and_placement(page_server: ServerThread, tmp_path: Path) -> None:
    dom = chromium(tmp_path, page_server.url, "--dump-dom").stdout
    rows = re.findall(r'<tr data-node-id="([^"]+)"', dom)
    assert rows == ["node-a", "node-b", "node-c"]
    assert re.search(r'id="coordinator">node-a<', dom)
    assert re.search(r'id="epoch">4<', dom)
    # double v1 runs seg0 on node-a and seg1 on node-b + node-c; v2 has three segments.
    v1 = dom[dom.index('data-version="v1"'):]
    v1 = v1[: v1.index("</svg>")]
    assert re.findall(r'data-segment="([^"]+)"', v1) == ["seg0", "seg1"]
    assert re.findall(r'class="agent"[^>]*>([^<]+)<', v1) == ["node-a", "node-b", "node-c"]
    assert v1.count("<polygon") == 1  # one arrow between two boxes
    assert dom.count('data-segment="seg2"') == 1
    assert "req/s" in v1
    assert "p99" in v1
    assert "deep-queue" in dom
    assert "seg1 queue above 100" in dom
    assert re.search(r'<section id="auth"[^>]*hidden', dom)


def test_status_page_asks_for_token(tmp_path: Path) -> None:
    tokens = Tokens(admin="smadm_" + "a" * 43, infer="sminf_" + "b" * 43)
    with ServerThread(MemFacade(), HttpSettings(require_token=True), tokens) as server:
        dom = chromium(tmp_path, server.url, "--dump-dom").stdout
    assert not re.search(r'<section id="auth"[^>]*hidden', dom)
    assert "sessionStorage" in dom
    assert 'data-node-id="' not in dom


def test_status_page_screenshot(page_server: ServerThread, tmp_path: Path) -> None:
    shot = tmp_path / "status.png"
    chromium(tmp_path, page_server.url, f"--screenshot={shot}")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 900)
    assert len(data) > 20_000  # a blank page is about 5 KB; tables and boxes make it larger
