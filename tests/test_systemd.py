"""Tests of the sd_notify client over real unix sockets and of the systemd unit files."""

from __future__ import annotations

import asyncio
import configparser
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nodeagent.actors import Supervisor
from nodeagent.sdnotify import SystemdNotifier, WatchdogPinger

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT = REPO_ROOT / "systemd" / "shardmesh-agent.service"
GPU_DROP_IN = REPO_ROOT / "systemd" / "shardmesh-agent-gpu.conf"
MAX_EXPOSURE = 2.0


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = tmp_path / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2.0)
    yield receiver, str(path)
    receiver.close()


def _receive(receiver: socket.socket) -> str:
    return receiver.recv(4096).decode()


def test_sdnotify_sends_ready_and_status(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, path = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("node a\nserving  on 7470")
    assert _receive(receiver) == "READY=1\nSTATUS=node a serving on 7470"
    assert notifier.stopping()
    assert _receive(receiver) == "STOPPING=1"
    assert notifier.watchdog()
    assert _receive(receiver) == "WATCHDOG=1"
    assert notifier.status("draining 3 requests")
    assert _receive(receiver) == "STATUS=draining 3 requests"
    notifier.close()


def test_sdnotify_abstract_socket() -> None:
    name = f"shardmesh-test-{uuid.uuid4().hex}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(b"\0" + name.encode())
    receiver.settimeout(2.0)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert _receive(receiver) == "READY=1"
        notifier.close()
    finally:
        receiver.close()


def test_sdnotify_noop_outside_systemd() -> None:
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval_s is None


def test_sdnotify_missing_socket_is_logged_once(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "sd_notify" in warnings[0].getMessage()


def test_sdnotify_rejects_relative_socket_path(caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "relative.sock"})
    assert not notifier.enabled
    assert any("neither an absolute path" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("env", "interval_s"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
])
def test_sdnotify_watchdog_interval(env: dict[str, str], interval_s: float | None) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": "/run/none.sock", **env})
    assert notifier.watchdog_interval_s == interval_s


async def test_watchdog_pinger_sends_pings(notify_socket: tuple[socket.socket, str]) -> None:
    receiver, path = notify_socket
    receiver.setblocking(False)
    # 100 ms watchdog deadline, so pings every 50 ms.
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    healthy = True
    pinger = WatchdogPinger(notifier, is_healthy=lambda: healthy)
    async with Supervisor("t") as supervisor:
        supervisor.start(pinger)
        await asyncio.sleep(0.28)
        pings_while_healthy = pinger.pings
        healthy = False
        await asyncio.sleep(0.2)
        assert pinger.pings == pings_while_healthy
    received = []
    while True:
        try:
            received.append(receiver.recv(64).decode())
        except BlockingIOError:
            break
    assert 3 <= pings_while_healthy <= 8
    assert received == ["WATCHDOG=1"] * pings_while_healthy
    notifier.close()


async def test_watchdog_pinger_idle_without_watchdog() -> None:
    pinger = WatchdogPinger(SystemdNotifier({}))
    async with Supervisor("t") as supervisor:
        supervisor.start(pinger)
        await asyncio.sleep(0.05)
        assert supervisor.status()[0].state == "finished"
    assert pinger.pings == 0


# -- unit files --------------------------------------------------------------------------------


def _unit_settings(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def test_unit_declares_notify_service() -> None:
    unit = _unit_settings(UNIT)
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["Restart"] == "on-failure"
    assert int(service["WatchdogSec"]) > 0
    assert service["DynamicUser"] == "yes"
    assert service["StateDirectory"] == "shardmesh"
    assert service["ExecStart"].endswith("shardmesh agent --config /etc/shardmesh/agent.toml")
    assert "network-online.target" in unit["Unit"]["After"]
    assert "network-online.target" in unit["Unit"]["Wants"]
    text = UNIT.read_text()
    for credential in ("ca.pem", "node.pem", "node.key", "revoked.json", "tokens.json"):
        assert f"LoadCredential={credential}:" in text
    assert "Environment=SHARDMESH_TLS_DIR=%d" in text
    assert "Environment=SHARDMESH_ADMIN_TOKEN_FILE=%d/tokens.json" in text
    assert "ca.key" not in text.split("[Service]", 1)[1].replace("(ca.key)", "")


def _systemd_analyze_missing() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (Debian package: systemd)"
    return None


def _exposure(unit_path: Path) -> float:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_path)],
        capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure line in output: {result.stdout[-500:]}{result.stderr[-500:]}"
    return float(match.group(1))


def _merge_drop_in(base: Path, drop_in: Path, target: Path) -> None:
    """Write base + drop-in as one unit, the way systemd applies a [Service] drop-in."""
    drop_body = drop_in.read_text().split("[Service]", 1)[1]
    drop_keys = {line.split("=", 1)[0] for line in drop_body.splitlines()
                 if "=" in line and not line.startswith("#")}
    # Single-value settings in the drop-in replace the base value; list settings append.
    replaced = drop_keys - {"DeviceAllow", "SupplementaryGroups"}
    lines = [line for line in base.read_text().splitlines()
             if line.split("=", 1)[0] not in replaced]
    merged = "\n".join(lines).replace("[Install]", drop_body + "\n[Install]")
    target.write_text(merged)


@pytest.mark.skipif(_systemd_analyze_missing() is not None,
                    reason=_systemd_analyze_missing() or "")
def test_unit_security_exposure() -> None:
    assert _exposure(UNIT) <= MAX_EXPOSURE


@pytest.mark.skipif(_systemd_analyze_missing() is not None,
                    reason=_systemd_analyze_missing() or "")
def test_unit_security_exposure_with_gpu(tmp_path: Path) -> None:
    merged = tmp_path / "shardmesh-agent.service"
    _merge_drop_in(UNIT, GPU_DROP_IN, merged)
    text = merged.read_text()
    assert "PrivateDevices=no" in text
    assert "PrivateDevices=yes" not in text
    assert "DeviceAllow=char-nvidia-frontend rw" in text
    assert _exposure(merged) <= MAX_EXPOSURE


@pytest.mark.skipif(_systemd_analyze_missing() is not None,
                    reason=_systemd_analyze_missing() or "")
def test_unit_passes_systemd_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; point it at /bin/true since shardmesh is not
    # installed under /opt on the test machine.
    unit = tmp_path / "shardmesh-agent.service"
    unit.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/bin/true", UNIT.read_text()))
    drop_dir = tmp_path / "shardmesh-agent.service.d"
    drop_dir.mkdir()
    shutil.copy(GPU_DROP_IN, drop_dir / "gpu.conf")
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown key" not in result.stderr
    assert "Unknown section" not in result.stderr
