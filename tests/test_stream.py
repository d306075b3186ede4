"""FrameConnection over real loopback sockets (plaintext): framing, backpressure, errors, options."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import torch

from protocol.errors import ConnectionClosed, HandshakeError, ProtocolError
from protocol.frames import encode_frame
from protocol.limits import MiB
from protocol.messages import MsgType
from protocol.stream import FrameConnection, FrameServer, open_connection, start_server
from protocol.tensors import decode_frame_tensors

HOST = "127.0.0.1"


async def _echo(connection: FrameConnection) -> None:
    while True:
        frame = await connection.recv()
        await connection.send(MsgType.RESULT, frame.header, [frame.payload])


async def raw_client(port: int, plane: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain socket that sends HELLO and reads the reply, so a test can write any bytes next."""
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"".join(bytes(piece) for piece in encode_frame(MsgType.HELLO, {"versions": [1], "plane": plane})))
    await asyncio.wait_for(reader.read(20), timeout=5)  # the server's HELLO reply
    return reader, writer


@pytest.fixture
async def echo_server() -> AsyncIterator[FrameServer]:
    server = await start_server(HOST, 0, creds=None, handler=_echo)
    yield server
    server.close()
    await server.wait_closed()


async def test_stream_large_tensor_roundtrip(echo_server: FrameServer) -> None:
    async with await open_connection(HOST, echo_server.port, creds=None) as connection:
        tensor = torch.randn(4, 1024, 1024)  # 16 MiB
        await connection.send_tensors(MsgType.ACTIVATION, {"rid": "r"}, {"x": tensor, "m": torch.ones(3, dtype=torch.bool)})
        reply = await connection.recv()
        decoded = decode_frame_tensors(reply)
        assert torch.equal(decoded["x"], tensor)
        assert decoded["m"].tolist() == [True, True, True]
        assert connection.version == 1
        assert connection.plane == "data"
        assert connection.peer is None


async def test_stream_many_frames_in_order(echo_server: FrameServer) -> None:
    async with await open_connection(HOST, echo_server.port, creds=None, plane="control") as connection:
        for index in range(500):
            await connection.send(MsgType.PING, {"i": index})
        received = [(await connection.recv()).header["i"] for _ in range(500)]
        assert received == list(range(500))
        assert connection.frames_sent == 501  # HELLO included
        assert connection.frames_received == 501
        assert connection.stats()["bytes_received"] == connection.bytes_received > 0


async def test_stream_backpressure_blocks_send() -> None:
    release = asyncio.Event()

    async def slow_reader(connection: FrameConnection) -> None:
        await release.wait()
        while True:
            await connection.recv()

    async with await start_server(HOST, 0, creds=None, handler=slow_reader) as server:
        async with await open_connection(HOST, server.port, creds=None, write_high_water=64 * 1024) as connection:
            payload = bytes(1 * MiB)
            sent = 0
            blocked = False
            for _ in range(256):  # at most 256 MiB, far beyond socket buffers
                try:
                    await asyncio.wait_for(connection.send(MsgType.ACTIVATION, {}, [payload]), timeout=0.5)
                except TimeoutError:
                    blocked = True
                    break
                sent += 1
            assert blocked, f"send never waited after {sent} MiB"
            assert sent < 128
            release.set()


async def test_stream_version_mismatch(echo_server: FrameServer) -> None:
    with pytest.raises(HandshakeError, match="no common protocol version"):
        await open_connection(HOST, echo_server.port, creds=None, versions=(42,))


async def test_stream_plane_not_served() -> None:
    async with await start_server(HOST, 0, creds=None, handler=_echo, planes=("control",)) as server:
        with pytest.raises(HandshakeError, match="plane"):
            await open_connection(HOST, server.port, creds=None, plane="data")


async def test_stream_protocol_error_reaches_handler() -> None:
    errors: list[BaseException] = []

    async def handler(connection: FrameConnection) -> None:
        try:
            await connection.recv()
        except ProtocolError as error:
            errors.append(error)

    async with await start_server(HOST, 0, creds=None, handler=handler) as server:
        reader, writer = await raw_client(server.port, "data")
        writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(20))
        await writer.drain()
        await asyncio.wait_for(reader.read(), timeout=5)
        writer.close()
        for _ in range(100):
            if errors:
                break
            await asyncio.sleep(0.01)
    assert len(errors) == 1
    assert errors[0].field == "magic"


async def test_stream_peer_close_ends_recv(echo_server: FrameServer) -> None:
    connection = await open_connection(HOST, echo_server.port, creds=None)
    waiting = asyncio.create_task(connection.recv())
    await asyncio.sleep(0.05)
    for server_side in list(echo_server.connections):
        server_side.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(waiting, timeout=5)
    with pytest.raises(ConnectionClosed):
        await connection.send(MsgType.PING, {})
    connection.close()
    await connection.wait_closed()


async def test_stream_socket_options(echo_server: FrameServer) -> None:
    async with await open_connection(HOST, echo_server.port, creds=None, user_timeout_s=7) as connection:
        sock = connection._protocol.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000


async def test_stream_server_close_cancels_handlers() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(connection: FrameConnection) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    server = await start_server(HOST, 0, creds=None, handler=handler)
    connection = await open_connection(HOST, server.port, creds=None)
    await asyncio.wait_for(started.wait(), timeout=5)
    server.close()
    await asyncio.wait_for(server.wait_closed(), timeout=5)
    assert cancelled.is_set()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(connection.recv(), timeout=5)
    connection.close()


async def test_stream_deliver_to_pushes_frames_in_order() -> None:
    """Frames decoded before and after the switch reach the handler once each, in order."""
    received: list[int] = []
    ended: list[BaseException] = []
    switched = asyncio.Event()

    async def handler(connection: FrameConnection) -> None:
        first = await connection.recv()
        received.append(first.header["i"])
        await asyncio.sleep(0.1)  # more frames arrive and are decoded before the switch
        connection.deliver_to(lambda frame: received.append(frame.header["i"]))
        switched.set()
        try:
            await connection.wait_ended()
        except (ConnectionClosed, ProtocolError) as exc:
            ended.append(exc)

    async with await start_server(HOST, 0, creds=None, handler=handler) as server:
        async with await open_connection(HOST, server.port, creds=None, plane="control") as connection:
            for index in range(50):
                await connection.send(MsgType.PING, {"i": index})
            await asyncio.wait_for(switched.wait(), timeout=5)
            for index in range(50, 300):
                await connection.send(MsgType.PING, {"i": index})
            for _ in range(500):
                if len(received) == 300:
                    break
                await asyncio.sleep(0.01)
        for _ in range(500):
            if ended:
                break
            await asyncio.sleep(0.01)
    assert received == list(range(300))
    assert len(ended) == 1 and isinstance(ended[0], ConnectionClosed)


@pytest.mark.parametrize("fault", ["handler raises", "malformed bytes"])
async def test_stream_deliver_to_errors_end_the_connection(fault: str) -> None:
    """A handler error or a malformed frame closes the connection; wait_ended names the cause."""
    seen: list[int] = []
    ended: list[BaseException] = []

    def on_frame(frame) -> None:
        seen.append(frame.header["i"])
        if fault == "handler raises" and frame.header["i"] == 2:
            raise ValueError("handler rejected frame 2")

    async def handler(connection: FrameConnection) -> None:
        connection.deliver_to(on_frame)
        try:
            await connection.wait_ended()
        except (ConnectionClosed, ProtocolError) as exc:
            ended.append(exc)

    async with await start_server(HOST, 0, creds=None, handler=handler) as server:
        reader, writer = await raw_client(server.port, "control")
        for index in range(4):
            writer.write(b"".join(bytes(piece) for piece in encode_frame(MsgType.PING, {"i": index})))
        await writer.drain()
        if fault == "malformed bytes":
            await asyncio.sleep(0.2)  # the good frames arrive in reads of their own
            writer.write(b"GET / HTTP/1.1\r\n\r\n" + bytes(20))
            await writer.drain()
        await asyncio.wait_for(reader.read(), timeout=5)  # the server closes the connection
        writer.close()
        for _ in range(100):
            if ended:
                break
            await asyncio.sleep(0.01)
    assert len(ended) == 1
    if fault == "handler raises":
        assert seen == [0, 1, 2]
        assert isinstance(ended[0], ConnectionClosed) and "closed" in str(ended[0])
        assert isinstance(ended[0].__cause__ or getattr(ended[0], "cause", None), ValueError)
    else:
        assert seen == [0, 1, 2, 3]
        assert isinstance(ended[0], ProtocolError) and ended[0].field == "magic"
