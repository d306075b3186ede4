"""Cluster CA, node credentials and mutual TLS between real endpoints on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import stat
from pathlib import Path

import pytest
import torch
from helpers import make_cluster

from protocol.errors import AuthenticationError, ConnectionClosed, CredentialsError
from protocol.frames import encode_frame
from protocol.messages import MsgType
from protocol.stream import FrameConnection, open_connection, start_server
from protocol.tensors import decode_frame_tensors
from protocol.tls import (
    NodeCredentials,
    RejectionLog,
    client_ssl_context,
    init_cluster,
    issue_node,
    load_credentials,
    make_csr,
    rejection_counts,
    revoke,
    sign_csr,
)

HOST = "127.0.0.1"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_tls_init_cluster_layout(tmp_path: Path) -> None:
    creds = init_cluster(tmp_path / "a", node_id="alpha", cluster_id="blue")
    tls_dir = tmp_path / "a" / "tls"
    assert (creds.node_id, creds.cluster_id, creds.holds_ca) == ("alpha", "blue", True)
    assert _mode(tls_dir) == 0o700
    assert _mode(tls_dir / "node.key") == 0o600
    assert _mode(tls_dir / "ca.key") == 0o600
    assert sorted(p.name for p in tls_dir.iterdir()) == ["ca.key", "ca.pem", "node.key", "node.pem", "revoked.json"]
    with pytest.raises(CredentialsError):
        init_cluster(tmp_path / "a", node_id="alpha", cluster_id="blue")


def test_tls_issue_node_key_stays_in_target(tmp_path: Path) -> None:
    first = init_cluster(tmp_path / "a", node_id="alpha", cluster_id="blue")
    second = issue_node(tmp_path / "a", tmp_path / "b", "beta")
    assert (second.node_id, second.cluster_id, second.holds_ca) == ("beta", "blue", False)
    assert not (tmp_path / "b" / "tls" / "ca.key").exists()
    assert _mode(second.key_path) == 0o600
    assert second.key_path.read_bytes() != first.key_path.read_bytes()
    assert second.serial != first.serial


def test_tls_sign_csr_checks_node_id(tmp_path: Path) -> None:
    init_cluster(tmp_path / "a", node_id="alpha", cluster_id="blue")
    csr = make_csr(tmp_path / "b", "beta")
    with pytest.raises(CredentialsError, match="does not match"):
        sign_csr(tmp_path / "a", csr, node_id="gamma")


def test_tls_load_rejects_readable_key(tmp_path: Path) -> None:
    creds = init_cluster(tmp_path / "a", node_id="alpha", cluster_id="blue")
    os.chmod(creds.key_path, 0o644)
    with pytest.raises(CredentialsError, match="chmod 600"):
        load_credentials(tmp_path / "a")


def test_tls_invalid_node_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="node id"):
        init_cluster(tmp_path / "a", node_id="bad/id", cluster_id="blue")


def test_tls_revoke_persists(tmp_path: Path) -> None:
    nodes = make_cluster(tmp_path, 2)
    revoke(tmp_path / "node0", nodes[1].serial)
    assert nodes[1].serial in load_credentials(tmp_path / "node0").revoked


async def _echo(connection: FrameConnection) -> None:
    while True:
        frame = await connection.recv()
        header = {"from": connection.peer.node_id if connection.peer else None, **frame.header}
        await connection.send(MsgType.RESULT, header, [frame.payload])


async def test_tls_endpoints_exchange_frames(tmp_path: Path) -> None:
    server_creds, client_creds, _ = make_cluster(tmp_path, 3)
    async with await start_server(HOST, 0, creds=server_creds, handler=_echo) as server:
        connection = await open_connection(HOST, server.port, creds=client_creds, expected_node_id="node0")
        async with connection:
            assert connection.peer.node_id == "node0"
            assert connection.peer.cluster_id == "test-cluster"
            tensor = torch.randn(256, 1024)
            for index in range(3):
                await connection.send_tensors(MsgType.ACTIVATION, {"i": index}, {"h": tensor})
                reply = await connection.recv()
                assert reply.header["from"] == "node1"
                assert reply.header["i"] == index
                assert torch.equal(decode_frame_tensors(reply)["h"], tensor)
            assert connection.bytes_sent > 3 * tensor.numel() * 4
            # Activations of several tensors, small enough to be joined into one write on TLS.
            for rows in (1, 4, 16):
                tensors = {"h": torch.randn(rows, 16, 384), "mask": torch.ones(rows, 16, dtype=torch.int64)}
                await connection.send_tensors(MsgType.ACTIVATION, {"i": rows}, tensors)
                decoded = decode_frame_tensors(await connection.recv())
                assert all(torch.equal(decoded[name], tensor) for name, tensor in tensors.items())


async def _expect_server_rejection(server_creds: NodeCredentials, client_creds: NodeCredentials, reason: str) -> None:
    calls: list[FrameConnection] = []

    async def handler(connection: FrameConnection) -> None:
        calls.append(connection)

    before = rejection_counts[reason]
    async with await start_server(HOST, 0, creds=server_creds, handler=handler) as server:
        with pytest.raises((AuthenticationError, ConnectionClosed)):
            await open_connection(HOST, server.port, creds=client_creds)
        for _ in range(100):
            if rejection_counts[reason] > before:
                break
            await asyncio.sleep(0.01)
    assert rejection_counts[reason] == before + 1
    assert calls == []


async def _foreign_tls_client(port: int, foreign: NodeCredentials, ours: NodeCredentials, local_host: str = HOST) -> bytes:
    """Connect with a certificate from another CA while trusting ours, as an attacker's client would.

    Returns what the server sent before closing.
    """
    context = client_ssl_context(foreign)
    context.load_verify_locations(cafile=str(ours.ca_path))
    reader, writer = await asyncio.open_connection(HOST, port, ssl=context, local_addr=(local_host, 0))
    writer.write(b"".join(bytes(piece) for piece in encode_frame(MsgType.HELLO, {"versions": [1], "plane": "data"})))
    try:
        return await asyncio.wait_for(reader.read(), timeout=5)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_tls_rejects_other_ca(tmp_path: Path) -> None:
    ours = make_cluster(tmp_path / "ours", 1)[0]
    theirs = make_cluster(tmp_path / "theirs", 1, cluster_id="other")[0]
    before = rejection_counts["unknown_ca"]
    async with await start_server(HOST, 0, creds=ours, handler=_echo) as server:
        assert await _foreign_tls_client(server.port, theirs, ours) == b""
        # The client verifies the server first in TLS 1.3, so our own client rejects theirs too.
        with pytest.raises(AuthenticationError) as info:
            await open_connection(HOST, server.port, creds=theirs)
    assert info.value.reason == "unknown_ca"
    assert rejection_counts["unknown_ca"] == before + 2


async def test_tls_rejects_expired_client(tmp_path: Path) -> None:
    server_creds = make_cluster(tmp_path, 1)[0]
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = issue_node(tmp_path / "node0", tmp_path / "old", "old", valid_for=datetime.timedelta(days=1), not_before=long_ago)
    await _expect_server_rejection(server_creds, expired, "expired")


async def test_tls_rejects_revoked_client(tmp_path: Path) -> None:
    server_creds, client_creds = make_cluster(tmp_path, 2)
    server_creds = server_creds.with_revoked(revoke(tmp_path / "node0", client_creds.serial))
    await _expect_server_rejection(server_creds, client_creds, "revoked")


async def test_tls_client_rejects_expired_server(tmp_path: Path) -> None:
    make_cluster(tmp_path, 1)
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = issue_node(tmp_path / "node0", tmp_path / "old", "old", valid_for=datetime.timedelta(days=1), not_before=long_ago)
    client_creds = issue_node(tmp_path / "node0", tmp_path / "new", "new")
    async with await start_server(HOST, 0, creds=expired, handler=_echo) as server:
        with pytest.raises(AuthenticationError) as info:
            await open_connection(HOST, server.port, creds=client_creds)
    assert info.value.reason == "expired"


async def test_tls_client_rejects_wrong_node(tmp_path: Path) -> None:
    server_creds, client_creds = make_cluster(tmp_path, 2)
    before = rejection_counts["wrong_node"]
    async with await start_server(HOST, 0, creds=server_creds, handler=_echo) as server:
        with pytest.raises(AuthenticationError) as info:
            await open_connection(HOST, server.port, creds=client_creds, expected_node_id="node7")
    assert info.value.reason == "wrong_node"
    assert rejection_counts["wrong_node"] == before + 1


async def test_tls_rejects_plaintext_client(tmp_path: Path) -> None:
    server_creds = make_cluster(tmp_path, 1)[0]
    before = rejection_counts["plaintext"]
    async with await start_server(HOST, 0, creds=server_creds, handler=_echo) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        hello = encode_frame(MsgType.HELLO, {"versions": [1], "plane": "data"})
        writer.write(b"".join(bytes(piece) for piece in hello))
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed without a reply
        writer.close()
    assert rejection_counts["plaintext"] == before + 1


async def test_tls_plaintext_client_api_rejected(tmp_path: Path) -> None:
    server_creds = make_cluster(tmp_path, 1)[0]
    async with await start_server(HOST, 0, creds=server_creds, handler=_echo) as server:
        with pytest.raises((ConnectionClosed, ConnectionError)):
            await open_connection(HOST, server.port, creds=None)


async def test_tls_handshake_timeout(tmp_path: Path) -> None:
    server_creds = make_cluster(tmp_path, 1)[0]
    before = rejection_counts["handshake_timeout"]
    async with await start_server(HOST, 0, creds=server_creds, handler=_echo, handshake_timeout_s=0.3) as server:
        reader, writer = await asyncio.open_connection(HOST, server.port)
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""
        writer.close()
    assert rejection_counts["handshake_timeout"] == before + 1


def test_tls_rejection_log_once_per_address(caplog: pytest.LogCaptureFixture) -> None:
    log = RejectionLog(max_seen=2)
    caplog.set_level(logging.DEBUG, logger="protocol.tls")
    for address in ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.1"]:
        log.record(address, "expired", "certificate has expired")
    levels = [(r.getMessage().split()[2], r.levelno) for r in caplog.records]
    assert levels == [
        ("address=10.0.0.1", logging.WARNING),
        ("address=10.0.0.1", logging.DEBUG),
        ("address=10.0.0.1", logging.DEBUG),
        ("address=10.0.0.2", logging.WARNING),
        ("address=10.0.0.3", logging.WARNING),
        ("address=10.0.0.1", logging.WARNING),  # forgotten: max_seen=2
    ]
    assert log.counts["expired"] == 6


async def test_tls_rejection_logged_once_per_peer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ours = make_cluster(tmp_path / "ours", 1)[0]
    theirs = make_cluster(tmp_path / "theirs", 1, cluster_id="other")[0]
    caplog.set_level(logging.DEBUG, logger="protocol.tls")
    # A source address no other test uses, so this run's first rejection is the first for it.
    is_uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    source = "127.0.0.6" if is_uvloop else "127.0.0.5"
    async with await start_server(HOST, 0, creds=ours, handler=_echo) as server:
        for _ in range(3):
            await _foreign_tls_client(server.port, theirs, ours, local_host=source)
        await asyncio.sleep(0.05)
    lines = [r for r in caplog.records if f"address={source} " in r.getMessage() and "reason=unknown_ca" in r.getMessage()]
    assert len(lines) == 3
    assert [r.levelno for r in lines] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
