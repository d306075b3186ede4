"""asyncio adapter: FrameConnection over TCP, optionally mutual TLS.

Problem: the sans-I/O decoder needs a transport that feeds it without extra copies, applies
backpressure both ways, surfaces a dead peer within seconds, and never lets a frame from an
unauthenticated peer reach the decoder.

Options rejected:
- asyncio streams (StreamReader/StreamWriter): `readexactly` copies every payload out of the
  reader's internal buffer into a fresh bytes object, which costs page faults on 16 MiB frames.
- `transport.writelines`: on Python 3.11's default loop it joins the buffers into one bytes
  object, copying every tensor; each piece is written with `transport.write` instead.
- `loop.create_server(ssl=...)`: a failed TLS handshake never reaches our code there, so it
  could be neither logged per peer nor counted. `loop.start_tls` after a plain accept races on
  uvloop, which starts reading right after `connection_made` and can hand the ClientHello to
  the wrong protocol.

Rule chosen: an `asyncio.BufferedProtocol` whose `get_buffer` hands the transport the decoder's
payload buffer, so large payloads are read (or decrypted) straight into place. The server accepts
sockets itself and runs TLS through `loop.connect_accepted_socket` with a handshake timeout, so
failures raise in our code, where they are classified, logged once per peer and counted
(protocol.tls.rejection_counts). Until the peer's
certificate identity is checked, received bytes go into a stash of at most
`max_control_frame_bytes` that is not parsed. Then both sides exchange HELLO
(protocol.handshake) to agree on a protocol version and the plane.

Backpressure: `send` writes a whole frame, then awaits drain while the transport's buffer is
above `write_high_water` bytes, so at most one frame plus the high-water mark is buffered per
connection. Reading pauses while `max_queued_frames` decoded frames wait for `recv`.

Socket options (Linux names): TCP_NODELAY because frames are latency-sensitive messages, not a
byte stream; SO_KEEPALIVE with idle 5 s, interval 2 s, 3 probes, so an idle connection to a dead
host fails in about 11 s; TCP_USER_TIMEOUT (default 10 s) so unacknowledged data to a dead peer
fails the connection within that time instead of after the kernel's 15 minutes of retries.
The failure detector's heartbeats are the fast path; these are the backstop. Works on the
default loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import torch

from protocol.errors import AuthenticationError, ConnectionClosed, HandshakeError, ProtocolError
from protocol.frames import Frame, FrameDecoder, encode_frame
from protocol.handshake import ClientHandshake, ServerHandshake
from protocol.limits import KiB, Limits, MiB
from protocol.messages import DATA_PLANE, KEY_TENSORS, PLANES, PROTOCOL_VERSIONS
from protocol.tensors import encode_tensors
from protocol.tls import (
    NodeCredentials,
    PeerIdentity,
    classify_tls_error,
    client_ssl_context,
    peer_identity,
    rejections,
    server_ssl_context,
)

__all__ = ["FrameConnection", "FrameServer", "open_connection", "start_server"]

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_S = 5.0
USER_TIMEOUT_S = 10.0
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
# 1 MiB keeps a 16 MiB frame streaming (the kernel send buffer takes a few MiB more) while a
# stalled peer pins at most one frame plus 1 MiB.
WRITE_HIGH_WATER = 1 * MiB
MAX_QUEUED_FRAMES = 32
# Frames up to this size are joined into one buffer before writing. On a TLS connection every
# write is encrypted into records anyway, so one joined write of an activation is cheaper than a
# write per tensor. A 24-60 KiB activation's round trip fell from about 200-240 us to 180-220 us
# (uvloop, loopback, one process, 2-core x86-64 VM).
_JOIN_MAX_BYTES = 16 * KiB
_JOIN_MAX_BYTES_TLS = 256 * KiB
# Accepted connections still in TLS or HELLO; more are dropped at once so a flood of idle
# sockets cannot hold memory for long.
MAX_PENDING_HANDSHAKES = 64

Handler = Callable[["FrameConnection"], Awaitable[None]]


def _tune_socket(transport: asyncio.BaseTransport, user_timeout_s: float | None, peer: str) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    options: list[tuple[int, int, int]] = [
        (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
    ]
    if hasattr(socket, "TCP_KEEPIDLE"):
        options += [
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES),
        ]
    if user_timeout_s and hasattr(socket, "TCP_USER_TIMEOUT"):
        options.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(user_timeout_s * 1000)))
    for level, option, value in options:
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            logger.warning("setsockopt(%s, %s) failed peer=%s: %s", level, option, peer, exc)


class _FrameProtocol(asyncio.BufferedProtocol):
    """Protocol that feeds a FrameDecoder, stashing bytes unparsed until the peer is authenticated."""

    def __init__(
        self,
        limits: Limits,
        *,
        authenticated: bool,
        max_queued_frames: int = MAX_QUEUED_FRAMES,
        write_high_water: int = WRITE_HIGH_WATER,
    ) -> None:
        self.limits = limits
        self.peer = "unknown"
        self.decoder = FrameDecoder(limits)
        self.transport: asyncio.Transport | None = None
        self._authenticated = authenticated
        self._stash = bytearray()
        self._stash_view = memoryview(bytearray(16 * KiB))
        self._max_queued_frames = max_queued_frames
        self._write_high_water = write_high_water
        self._reading_paused = False
        self._writing_paused = False
        self._frame_waiter: asyncio.Future[None] | None = None
        # Set by FrameConnection.deliver_to: called after input instead of waking a reader.
        self.push: Callable[[], None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.close_cause: BaseException | None = None

    # -- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance check here.
        self.transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        self.decoder.peer = self.peer
        transport.set_write_buffer_limits(high=self._write_high_water, low=self._write_high_water // 4)

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self._authenticated:
            return self._stash_view
        return self.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if not self._authenticated:
            self._stash += self._stash_view[:nbytes]
            if len(self._stash) > self.limits.max_control_frame_bytes:
                self.fail(
                    ProtocolError(
                        "peer sent more than max_control_frame_bytes before authentication finished",
                        field="stash",
                        value=len(self._stash),
                        offset=0,
                        peer=self.peer,
                    )
                )
            return
        try:
            self.decoder.buffer_updated(nbytes)
        except ProtocolError as error:
            self.fail(error)
            return
        self._after_input()

    def eof_received(self) -> bool:
        try:
            self.decoder.eof()
        except ProtocolError as error:
            self.close_cause = error
        self._wake_reader()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self.close_cause is None:
            self.close_cause = exc
        self._wake_reader()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionClosed(f"connection to {self.peer} lost while sending", cause=exc))
        self._drain_waiters.clear()
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- used by FrameConnection and the server ---------------------------------------------------

    def authenticate(self) -> None:
        """Let bytes reach the decoder; called once the peer's identity has been checked."""
        self._authenticated = True
        stash, self._stash = bytes(self._stash), bytearray()
        if stash:
            try:
                self.decoder.feed(stash)
            except ProtocolError as error:
                self.fail(error)
                return
            self._after_input()

    def fail(self, error: BaseException) -> None:
        if self.close_cause is None:
            self.close_cause = error
        logger.warning("closing connection peer=%s: %s", self.peer, error)
        if self.transport is not None:
            self.transport.abort()
        self._wake_reader()

    def _after_input(self) -> None:
        if self.push is not None:
            self.push()
            return
        self._wake_reader()
        if not self._reading_paused and self.decoder.pending_frames >= self._max_queued_frames and self.transport:
            self._reading_paused = True
            self.transport.pause_reading()

    def frame_taken(self) -> None:
        if self._reading_paused and self.decoder.pending_frames <= self._max_queued_frames // 2 and self.transport:
            self._reading_paused = False
            self.transport.resume_reading()

    def _wake_reader(self) -> None:
        waiter = self._frame_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_readable(self) -> None:
        if self._frame_waiter is not None and not self._frame_waiter.done():
            raise RuntimeError("another task is already waiting in recv() on this connection")
        self._frame_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._frame_waiter
        finally:
            self._frame_waiter = None

    async def drain(self) -> None:
        if not self._writing_paused:
            return
        if self.closed:
            raise ConnectionClosed(f"connection to {self.peer} is closed", cause=self.close_cause)
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    async def wait_lost(self) -> None:
        await asyncio.shield(self._lost)


class FrameConnection:
    """A framed, optionally authenticated connection to one peer.

    `peer` is the identity from the peer's certificate (None on plaintext connections). `send`
    may be called from several tasks (each frame is written whole, without awaiting in between);
    `recv` from one task at a time.
    """

    def __init__(self, protocol: _FrameProtocol, *, peer: PeerIdentity | None, limits: Limits) -> None:
        self._protocol = protocol
        self.peer = peer
        self.peer_address = protocol.peer
        self.limits = limits
        self.version: int | None = None
        self.plane: str | None = None
        self.bytes_sent = 0
        self.frames_sent = 0
        self.frames_received = 0
        self._closing = False
        transport = protocol.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        self._join_max_bytes = _JOIN_MAX_BYTES_TLS if tls else _JOIN_MAX_BYTES

    def __repr__(self) -> str:
        node = self.peer.node_id if self.peer else None
        return f"<FrameConnection peer={node} address={self.peer_address} plane={self.plane}>"

    @property
    def bytes_received(self) -> int:
        return self._protocol.decoder.bytes_received

    def stats(self) -> dict[str, int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
        }

    def is_closing(self) -> bool:
        return self._closing or self._protocol.closed

    def _write(self, pieces: list[bytes | memoryview]) -> None:
        transport = self._protocol.transport
        if self.is_closing() or transport is None or transport.is_closing():
            raise ConnectionClosed(f"connection to {self.peer_address} is closed", cause=self._protocol.close_cause)
        size = sum(len(piece) for piece in pieces)
        if len(pieces) > 1 and size <= self._join_max_bytes:
            # Copying a small frame into one buffer is cheaper than a second send() call.
            transport.write(b"".join(pieces))
        else:
            for piece in pieces:
                transport.write(piece)
        self.bytes_sent += size
        self.frames_sent += 1

    async def send(
        self, msg_type: int, header: dict[str, Any], buffers: Iterable[bytes | bytearray | memoryview] = ()
    ) -> None:
        """Send one frame; waits while the write buffer is above the high-water mark.

        Payload buffers are written without copying by this layer; do not modify them until
        this call returns. Raises ConnectionClosed if the connection is closed.
        """
        pieces = encode_frame(msg_type, header, buffers, limits=self.limits, version=self.version or 1)
        self._write(pieces)
        await self._protocol.drain()

    def send_now(
        self, msg_type: int, header: dict[str, Any], buffers: Iterable[bytes | bytearray | memoryview] = ()
    ) -> bool:
        """Write one frame at once, without a task or an await; return False to say "use send".

        False means the write buffer is above the high-water mark, so the caller must wait in
        ``send`` for the buffer to drain rather than queue more. The frame is not written then.
        Raises ConnectionClosed if the connection is closed.
        """
        if self._protocol._writing_paused:
            return False
        self._write(encode_frame(msg_type, header, buffers, limits=self.limits, version=self.version or 1))
        return True

    async def send_tensors(self, msg_type: int, header: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Send `tensors` in one frame; their metadata goes in the header under "tensors"."""
        meta, buffers = encode_tensors(tensors)
        await self.send(msg_type, {**header, KEY_TENSORS: meta}, buffers)

    async def recv(self) -> Frame:
        """Return the next frame. Raises ProtocolError for malformed input, ConnectionClosed at the end."""
        protocol = self._protocol
        while True:
            try:
                frame = protocol.decoder.next_frame()
            except ProtocolError:
                protocol.fail(protocol.decoder.error or ProtocolError("decoder failed"))
                raise
            if frame is not None:
                self.frames_received += 1
                protocol.frame_taken()
                return frame
            if protocol.closed or self._closing or (protocol.transport and protocol.transport.is_closing()):
                self._raise_ended()
            await protocol.wait_readable()

    def _raise_ended(self) -> None:
        """Raise why the connection ended: its ProtocolError, or ConnectionClosed."""
        cause = self._protocol.close_cause
        if isinstance(cause, ProtocolError):
            raise cause
        raise ConnectionClosed(f"connection to {self.peer_address} closed", cause=cause)

    def deliver_to(self, handler: Callable[[Frame], None]) -> None:
        """Hand every frame to ``handler`` as soon as it is decoded, instead of through `recv`.

        Frames already decoded go first, in order. The handler runs in the transport's data
        callback, so one frame costs one function call: no future, no task step and no extra loop
        pass, which are a measurable part of an activation's hop. The handler must not block. An
        exception from it closes the connection with that exception as the cause. After this
        call, wait for the end with `wait_ended`, not `recv`.
        """
        self._protocol.push = functools.partial(self._push_frames, handler)
        self._push_frames(handler)

    def _push_frames(self, handler: Callable[[Frame], None]) -> None:
        protocol = self._protocol
        decoder = protocol.decoder
        while True:
            try:
                frame = decoder.next_frame()
            except ProtocolError:
                protocol.fail(decoder.error or ProtocolError("decoder failed"))
                return
            if frame is None:
                # Reading may have been paused while frames waited for recv() before the switch.
                protocol.frame_taken()
                return
            self.frames_received += 1
            try:
                handler(frame)
            except Exception as exc:  # the handler's error ends this connection, not the loop
                protocol.fail(exc)
                return

    async def wait_ended(self) -> None:
        """Wait until the connection ends, then raise its cause as `recv` would (for `deliver_to`)."""
        await self._protocol.wait_lost()
        self._raise_ended()

    def close(self) -> None:
        """Flush buffered frames and close. Safe to call more than once."""
        self._closing = True
        transport = self._protocol.transport
        if transport is not None and not transport.is_closing():
            transport.close()
        self._protocol._wake_reader()

    def abort(self) -> None:
        """Close at once, dropping buffered frames."""
        self._closing = True
        if self._protocol.transport is not None:
            self._protocol.transport.abort()
        self._protocol._wake_reader()

    async def wait_closed(self) -> None:
        await self._protocol.wait_lost()

    async def __aenter__(self) -> FrameConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def open_connection(
    host: str,
    port: int,
    *,
    creds: NodeCredentials | None,
    expected_node_id: str | None = None,
    limits: Limits | None = None,
    plane: str = DATA_PLANE,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    user_timeout_s: float | None = USER_TIMEOUT_S,
    write_high_water: int = WRITE_HIGH_WATER,
    versions: Iterable[int] = PROTOCOL_VERSIONS,
) -> FrameConnection:
    """Connect, run TLS (unless `creds` is None: plaintext, for tests and benchmarks), check the
    server's identity and exchange HELLO.

    Raises OSError if the TCP connect fails, AuthenticationError if TLS or the identity check
    fails (including the server rejecting our certificate), HandshakeError if HELLO fails, and
    TimeoutError if TLS plus HELLO take longer than `handshake_timeout_s`.
    """
    limits = limits or Limits()
    loop = asyncio.get_running_loop()
    address = f"{host}:{port}"
    protocol = _FrameProtocol(limits, authenticated=creds is None, write_high_water=write_high_water)
    context = client_ssl_context(creds) if creds is not None else None
    async with asyncio.timeout(handshake_timeout_s):
        try:
            await loop.create_connection(
                lambda: protocol,
                host,
                port,
                ssl=context,
                server_hostname=host if context else None,
                ssl_handshake_timeout=handshake_timeout_s if context else None,
            )
        except ssl.SSLError as exc:
            reason = classify_tls_error(exc)
            rejections.record(host, reason, str(exc), node_id=expected_node_id)
            raise AuthenticationError(f"TLS handshake with {address} failed: {exc}", reason=reason, peer=address) from exc
        assert protocol.transport is not None
        _tune_socket(protocol.transport, user_timeout_s, address)
        identity: PeerIdentity | None = None
        if creds is not None:
            try:
                identity = peer_identity(
                    protocol.transport.get_extra_info("ssl_object"), creds, expected_node_id=expected_node_id, peer=address
                )
            except AuthenticationError as exc:
                rejections.record(host, exc.reason, exc.message, node_id=expected_node_id)
                protocol.transport.abort()
                raise
            protocol.authenticate()
        connection = FrameConnection(protocol, peer=identity, limits=limits)
        handshake = ClientHandshake(plane, versions=versions, limits=limits, peer=address)
        try:
            connection._write(handshake.hello_frame())
            reply = await connection.recv()
            version = handshake.receive(reply)
        except ConnectionClosed as exc:
            connection.abort()
            if isinstance(exc.cause, ssl.SSLError):
                # In TLS 1.3 the server checks our certificate after our side of the handshake
                # finished; its rejection arrives as an alert on the first read.
                reason = classify_tls_error(exc.cause)
                rejections.record(host, reason, str(exc.cause), node_id=expected_node_id)
                raise AuthenticationError(f"server {address} rejected this node: {exc.cause}", reason=reason, peer=address) from exc
            raise
        except ProtocolError:
            connection.abort()
            raise
    protocol.decoder.set_version(version)
    connection.version = version
    connection.plane = plane
    logger.debug("connected peer=%s address=%s plane=%s version=%d", identity and identity.node_id, address, plane, version)
    return connection


class FrameServer:
    """Listening socket plus the tasks serving its connections; see `start_server`."""

    def __init__(
        self,
        *,
        creds: NodeCredentials | None,
        handler: Handler,
        limits: Limits,
        planes: Iterable[str],
        handshake_timeout_s: float,
        user_timeout_s: float | None,
        write_high_water: int,
        max_pending_handshakes: int,
    ) -> None:
        # Replace to apply a new revocation list to later connections.
        # NOTE: connections already open are not re-checked; the caller must close them.
        self.creds = creds
        self._handler = handler
        self.limits = limits
        self._planes = tuple(planes)
        self._handshake_timeout_s = handshake_timeout_s
        self._user_timeout_s = user_timeout_s
        self._write_high_water = write_high_water
        self._max_pending = max_pending_handshakes
        self._pending = 0
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections: set[FrameConnection] = set()
        self.host = ""
        self.port = 0

    def _make_protocol(self) -> _FrameProtocol:
        return _FrameProtocol(self.limits, authenticated=False, write_high_water=self._write_high_water)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listener)
            except OSError as exc:
                # EMFILE and friends: log, back off briefly, keep serving existing connections.
                logger.warning("accept failed on %s:%d: %s; retrying in 0.1 s", self.host, self.port, exc)
                await asyncio.sleep(0.1)
                continue
            label = f"{address[0]}:{address[1]}"
            if self._pending >= self._max_pending:
                rejections.record(address[0], "too_many_handshakes", f"{self._pending} handshakes in progress")
                sock.close()
                continue
            task = loop.create_task(self._serve(sock, label), name=f"shardmesh-conn-{label}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, address: str) -> None:
        connection: FrameConnection | None = None
        self._pending += 1
        try:
            connection = await self._accept(sock, address)
        finally:
            self._pending -= 1
        if connection is None:
            return
        self.connections.add(connection)
        node_id = connection.peer.node_id if connection.peer else None
        try:
            await self._handler(connection)
        except (ConnectionClosed, ProtocolError) as exc:
            logger.info("connection ended peer=%s address=%s: %s", node_id, connection.peer_address, exc)
        except Exception:
            # The handler is application code; a bug in it must end this connection, not the server.
            logger.exception("connection handler failed peer=%s address=%s", node_id, connection.peer_address)
        finally:
            self.connections.discard(connection)
            connection.close()

    async def _accept(self, sock: socket.socket, address: str) -> FrameConnection | None:
        """Run TLS, the identity check and HELLO; return None (after logging) on any failure.

        TLS runs through `connect_accepted_socket` so that a failed handshake raises here, where
        it can be logged per peer and counted.
        """
        loop = asyncio.get_running_loop()
        host = address.rsplit(":", 1)[0]
        creds = self.creds
        protocol = self._make_protocol()
        identity: PeerIdentity | None = None
        try:
            async with asyncio.timeout(self._handshake_timeout_s):
                try:
                    await loop.connect_accepted_socket(
                        lambda: protocol,
                        sock,
                        ssl=server_ssl_context(creds) if creds is not None else None,
                        ssl_handshake_timeout=self._handshake_timeout_s if creds is not None else None,
                    )
                except (ssl.SSLError, ConnectionError) as exc:
                    rejections.record(host, classify_tls_error(exc), str(exc) or type(exc).__name__)
                    sock.close()
                    return None
                assert protocol.transport is not None
                if creds is not None:
                    try:
                        identity = peer_identity(protocol.transport.get_extra_info("ssl_object"), creds, peer=address)
                    except AuthenticationError as exc:
                        rejections.record(host, exc.reason, exc.message)
                        protocol.transport.abort()
                        return None
                _tune_socket(protocol.transport, self._user_timeout_s, address)
                protocol.authenticate()
                connection = FrameConnection(protocol, peer=identity, limits=self.limits)
                handshake = ServerHandshake(planes=self._planes, limits=self.limits, peer=address)
                hello = await connection.recv()
                try:
                    reply = handshake.receive(hello)
                except HandshakeError as exc:
                    logger.warning("HELLO rejected peer=%s address=%s: %s", identity and identity.node_id, address, exc)
                    connection._write(handshake.error_frame(exc))
                    connection.close()
                    return None
                connection._write(reply)
        except TimeoutError:
            rejections.record(host, "handshake_timeout", f"no TLS and HELLO within {self._handshake_timeout_s} s")
            if protocol.transport is not None:
                protocol.transport.abort()
            sock.close()
            return None
        except (ConnectionClosed, ProtocolError) as exc:
            logger.warning("handshake failed peer=%s address=%s: %s", identity and identity.node_id, address, exc)
            if protocol.transport is not None:
                protocol.transport.abort()
            return None
        assert handshake.version is not None
        protocol.decoder.set_version(handshake.version)
        connection.version = handshake.version
        connection.plane = handshake.plane
        logger.debug(
            "accepted peer=%s address=%s plane=%s version=%d", identity and identity.node_id, address, connection.plane, connection.version
        )
        return connection

    def close(self) -> None:
        """Stop listening and cancel every connection task (their connections are closed)."""
        if self._accept_task is not None:
            self._accept_task.cancel("FrameServer closed")
        if self._listener is not None:
            self._listener.close()
        for task in list(self._tasks):
            task.cancel("FrameServer closed")
        for connection in list(self.connections):
            connection.abort()

    async def wait_closed(self) -> None:
        if self._accept_task is not None:
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> FrameServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def start_server(
    host: str,
    port: int,
    *,
    creds: NodeCredentials | None,
    handler: Handler,
    limits: Limits | None = None,
    planes: Iterable[str] = PLANES,
    handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
    user_timeout_s: float | None = USER_TIMEOUT_S,
    write_high_water: int = WRITE_HIGH_WATER,
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
) -> FrameServer:
    """Listen on host:port (port 0 picks a free port, read it from `.port`).

    Each accepted connection runs TLS (unless `creds` is None), the identity check and HELLO,
    then `await handler(connection)`; the connection is closed when the handler returns. The
    server owns the handler tasks: `close()` cancels them and `wait_closed()` awaits them.
    """
    server = FrameServer(
        creds=creds,
        handler=handler,
        limits=limits or Limits(),
        planes=planes,
        handshake_timeout_s=handshake_timeout_s,
        user_timeout_s=user_timeout_s,
        write_high_water=write_high_water,
        max_pending_handshakes=max_pending_handshakes,
    )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=128)
    listener.setblocking(False)
    server._listener = listener
    sockname = listener.getsockname()
    server.host, server.port = sockname[0], sockname[1]
    server._accept_task = asyncio.get_running_loop().create_task(
        server._accept_loop(listener), name=f"shardmesh-accept-{server.port}"
    )
    logger.info("listening on %s:%d tls=%s", server.host, server.port, creds is not None)
    return server


