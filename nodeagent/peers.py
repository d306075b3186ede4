"""Peer links: authenticated connections between agents, two planes per direction.

Each agent dials every peer it learns about (from mDNS, the static peer list, or a peer that
dialled it first) and *sends only on the connections it dialled*; connections that peers dial in
are only read. So a pair of agents is joined by four TLS streams: control and data, in each
direction. The split keeps a heartbeat from ever queueing behind a 16 MiB activation, and the
one-way rule means a peer is a member only when both directions work; a peer reachable one way is
shown as half-reachable, with the reason.

Identity always comes from the peer's certificate (checked by ``protocol.stream`` before any frame
is parsed); the first frame on a connection (MEMBER_INFO) only adds facts that a certificate
cannot carry: the peer's listen address, its process instance and incarnation.

Two live processes that present the same node id (a cloned data directory) are detected by their
differing instance ids and listen addresses: the second is refused, never merged, and reported in
status until it goes away.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.errors import AuthenticationError, ConnectionClosed, ProtocolError
from protocol.frames import Frame
from protocol.messages import MsgType
from protocol.stream import FrameConnection, open_connection, start_server

logger = logging.getLogger(__name__)

PLANES = ("control", "data")


class PeerUnavailable(ConnectionError):
    """No open outbound connection to the peer on the requested plane."""


@dataclass
class PeerState:
    """State this agent keeps about one peer node id."""

    node_id: str
    host: str | None = None
    port: int | None = None
    admin_port: int | None = None
    instance: str | None = None
    incarnation: int = 0
    sources: set[str] = field(default_factory=set)
    outbound: dict[str, FrameConnection] = field(default_factory=dict)
    inbound: dict[str, FrameConnection] = field(default_factory=dict)
    last_error: str = ""
    connected_since: float | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_member(self) -> bool:
        return "control" in self.outbound and "control" in self.inbound

    @property
    def reachability(self) -> str:
        if self.is_member:
            return "member"
        if "control" in self.outbound:
            return "half-reachable: we reach it, it has not connected to us"
        if "control" in self.inbound:
            return "half-reachable: it reaches us, we cannot connect to it" + (
                f" ({self.last_error})" if self.last_error else ""
            )
        return "unreachable" + (f": {self.last_error}" if self.last_error else "")


FrameHandler = Callable[[str, Frame], None]
LinkHandler = Callable[[str, bool], None]


class PeerLinks:
    """Owns the peer server, one dialer task per known address, and every peer connection."""

    def __init__(
        self,
        *,
        node_id: str,
        creds,
        limits,
        timing,
        member_info: Callable[[], dict],
        on_frame: FrameHandler,
        on_membership: LinkHandler,
    ) -> None:
        self.node_id = node_id
        self._creds = creds
        self._limits = limits
        self._timing = timing
        self._member_info = member_info
        self._on_frame = on_frame
        self._on_membership = on_membership
        self.peers: dict[str, PeerState] = {}
        self.duplicates: dict[str, dict] = {}
        self.failed_addresses: dict[str, str] = {}
        self._dialers: dict[tuple[str, int], asyncio.Task] = {}
        self._readers: set[asyncio.Task] = set()
        self._server = None
        self._closing = False
        self.port = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str, port: int) -> int:
        self._server = await start_server(
            host, port, creds=self._creds, handler=self._serve_inbound, limits=self._limits,
            handshake_timeout_s=self._timing.handshake_timeout_s,
        )
        self.port = self._server.port
        logger.info("peer server listening node=%s addr=%s:%d", self.node_id, host, self.port)
        return self.port

    async def close(self) -> None:
        self._closing = True
        for task in list(self._dialers.values()):
            task.cancel()
        for peer in self.peers.values():
            for conn in list(peer.outbound.values()) + list(peer.inbound.values()):
                conn.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        tasks = list(self._dialers.values()) + list(self._readers)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        logger.info("peer links closed node=%s", self.node_id)

    # ----------------------------------------------------------------- learning addresses

    def learn(self, host: str, port: int, *, node_id: str | None = None, source: str) -> None:
        """Start dialing ``host:port`` unless a dialer for it already runs."""
        if self._closing or node_id == self.node_id:
            return
        key = (host, int(port))
        if node_id is not None:
            peer = self.peers.setdefault(node_id, PeerState(node_id))
            peer.sources.add(source)
            if peer.host is None:
                peer.host, peer.port = host, int(port)
        task = self._dialers.get(key)
        if task is not None and not task.done():
            return
        self._dialers[key] = asyncio.get_running_loop().create_task(
            self._dial_loop(host, int(port), node_id, source), name=f"dial-{host}:{port}"
        )

    # ----------------------------------------------------------------- sending

    def connected(self, peer_id: str, plane: str = "control") -> bool:
        peer = self.peers.get(peer_id)
        return peer is not None and plane in peer.outbound

    def members(self) -> list[str]:
        return sorted(peer.node_id for peer in self.peers.values() if peer.is_member)

    def _outbound(self, peer_id: str, plane: str):
        peer = self.peers.get(peer_id)
        conn = peer.outbound.get(plane) if peer else None
        if conn is None:
            raise PeerUnavailable(f"no {plane} connection to peer {peer_id}")
        return conn

    async def send(self, peer_id: str, msg_type: MsgType, header: dict, buffers=(), *, plane: str = "control") -> None:
        conn = self._outbound(peer_id, plane)
        try:
            await conn.send(msg_type, header, buffers)
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            raise PeerUnavailable(f"send to peer {peer_id} on {plane} plane failed: {exc}") from exc

    def send_now(self, peer_id: str, msg_type: MsgType, header: dict, buffers=(), *, plane: str = "control") -> bool:
        """Write a frame at once; return False when the link is congested and ``send`` must wait.

        Raises PeerUnavailable when there is no connection or it is closed.
        """
        conn = self._outbound(peer_id, plane)
        try:
            return conn.send_now(msg_type, header, buffers)
        except (ConnectionClosed, ConnectionError, OSError) as exc:
            raise PeerUnavailable(f"send to peer {peer_id} on {plane} plane failed: {exc}") from exc

    def send_nowait(self, peer_id: str, msg_type: MsgType, header: dict, buffers=(), *, plane: str = "control",
                    on_error: Callable[[BaseException], None] | None = None) -> None:
        """Send without waiting: at once when the link has room, else in a tracked task.

        Writing at once saves a task and a loop pass per frame, a visible share of a data-plane
        hop. Failures are never raised: they are logged, and ``on_error(exc)`` runs on a later
        loop pass. Without ``on_error``, a peer with no connection is skipped silently.
        """
        if on_error is None and not self.connected(peer_id, plane):
            return
        try:
            if self.send_now(peer_id, msg_type, header, buffers, plane=plane):
                return
        except PeerUnavailable as exc:
            self._send_failed(peer_id, msg_type, exc, on_error, later=True)
            return
        except (ProtocolError, ValueError, TypeError) as exc:  # the frame could not be encoded (a limit, a bad value)
            logger.warning("frame not sent node=%s peer=%s type=%s: %s", self.node_id, peer_id, msg_type.name, exc)
            if on_error is not None:
                asyncio.get_running_loop().call_soon(on_error, exc)
            return
        task = asyncio.get_running_loop().create_task(
            self._send_waiting(peer_id, msg_type, header, buffers, plane, on_error))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)

    async def _send_waiting(self, peer_id: str, msg_type: MsgType, header: dict, buffers, plane: str,
                            on_error: Callable[[BaseException], None] | None) -> None:
        try:
            await self.send(peer_id, msg_type, header, buffers, plane=plane)
        except PeerUnavailable as exc:
            self._send_failed(peer_id, msg_type, exc, on_error, later=False)

    def _send_failed(self, peer_id: str, msg_type: MsgType, exc: BaseException,
                     on_error: Callable[[BaseException], None] | None, *, later: bool) -> None:
        logger.debug("send failed node=%s peer=%s type=%s: %s", self.node_id, peer_id, msg_type.name, exc)
        if on_error is None:
            return
        if later:
            asyncio.get_running_loop().call_soon(on_error, exc)
        else:
            on_error(exc)

    # ----------------------------------------------------------------- outbound

    async def _dial_loop(self, host: str, port: int, expected: str | None, source: str) -> None:
        backoff = self._timing.reconnect_backoff_min_s
        address = f"{host}:{port}"
        while not self._closing:
            peer_id = None
            try:
                control = await open_connection(
                    host, port, creds=self._creds, expected_node_id=expected, limits=self._limits,
                    handshake_timeout_s=self._timing.handshake_timeout_s,
                    user_timeout_s=self._timing.tcp_user_timeout_s, plane="control",
                )
                peer_id = control.peer.node_id
                if peer_id == self.node_id:
                    logger.info("address %s is this agent itself; not dialing it again node=%s", address, self.node_id)
                    control.close()
                    return
                peer = self.peers.setdefault(peer_id, PeerState(peer_id))
                if "control" in peer.outbound:
                    # Another address of the same peer is already connected.
                    control.close()
                    await asyncio.sleep(self._timing.reconnect_backoff_max_s)
                    continue
                data = await open_connection(
                    host, port, creds=self._creds, expected_node_id=peer_id, limits=self._limits,
                    handshake_timeout_s=self._timing.handshake_timeout_s,
                    user_timeout_s=self._timing.tcp_user_timeout_s, plane="data",
                )
                info = self._member_info()
                await control.send(MsgType.MEMBER_INFO, info)
                await data.send(MsgType.MEMBER_INFO, info)
                peer.sources.add(source)
                peer.host, peer.port = host, port
                peer.outbound = {"control": control, "data": data}
                peer.last_error = ""
                self.failed_addresses.pop(address, None)
                logger.info("connected to peer node=%s peer=%s addr=%s", self.node_id, peer_id, address)
                self._membership_changed(peer)
                backoff = self._timing.reconnect_backoff_min_s
                await self._drain_until_closed(peer_id, control, data)
            except asyncio.CancelledError:
                raise
            except (AuthenticationError, ProtocolError) as exc:
                self._record_failure(address, peer_id or expected, f"rejected: {exc}")
                backoff = self._timing.reconnect_backoff_max_s
            except (ConnectionClosed, OSError, asyncio.TimeoutError) as exc:
                self._record_failure(address, peer_id or expected, f"{type(exc).__name__}: {exc}")
            finally:
                if peer_id is not None and peer_id in self.peers:
                    peer = self.peers[peer_id]
                    was_connected = "control" in peer.outbound
                    for conn in peer.outbound.values():
                        conn.close()
                    peer.outbound = {}
                    if was_connected:
                        logger.info("lost connection to peer node=%s peer=%s", self.node_id, peer_id)
                        self._membership_changed(peer)
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._timing.reconnect_backoff_max_s)

    def _record_failure(self, address: str, peer_id: str | None, reason: str) -> None:
        if self.failed_addresses.get(address) != reason:
            logger.warning("peer connection failed node=%s addr=%s peer=%s: %s", self.node_id, address, peer_id, reason)
        self.failed_addresses[address] = reason
        if peer_id and peer_id in self.peers:
            self.peers[peer_id].last_error = reason

    async def _drain_until_closed(self, peer_id: str, *conns: FrameConnection) -> None:
        """Read outbound connections only to notice when the peer goes away."""

        async def drain(conn: FrameConnection) -> None:
            while True:
                frame = await conn.recv()
                logger.debug("ignoring frame %s on outbound link node=%s peer=%s", frame.msg_type, self.node_id, peer_id)

        tasks = [asyncio.ensure_future(drain(conn)) for conn in conns]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ----------------------------------------------------------------- inbound

    async def _serve_inbound(self, conn: FrameConnection) -> None:
        peer_id = conn.peer.node_id
        plane = getattr(conn, "plane", "control")
        task = asyncio.current_task()
        if task is not None:
            self._readers.add(task)
        registered = False
        try:
            first = await conn.recv()
            if first.msg_type != MsgType.MEMBER_INFO:
                raise ProtocolError("first frame must be MEMBER_INFO", field="msg_type", value=int(first.msg_type), peer=peer_id)
            info = first.header
            peer = self.peers.setdefault(peer_id, PeerState(peer_id))
            if self._is_duplicate(peer, info, plane):
                conn.close()
                return
            peer.instance = str(info.get("instance"))
            peer.incarnation = int(info.get("incarnation", 0))
            peer.admin_port = info.get("admin_port")
            peer.info = dict(info)
            peer.inbound[plane] = conn
            registered = True
            listen = info.get("listen")
            if isinstance(listen, (list, tuple)) and len(listen) == 2 and "control" not in peer.outbound:
                self.learn(str(listen[0]), int(listen[1]), node_id=peer_id, source="hello")
            if plane == "control":
                peer.connected_since = time.monotonic()
                self._membership_changed(peer)
            # Frames go to the handler straight from the transport's data callback.
            conn.deliver_to(functools.partial(self._on_frame, peer_id))
            await conn.wait_ended()
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            logger.warning("protocol error from peer node=%s peer=%s plane=%s: %s", self.node_id, peer_id, plane, exc)
        except Exception:
            logger.exception("inbound handler failed node=%s peer=%s plane=%s", self.node_id, peer_id, plane)
        finally:
            conn.close()
            if task is not None:
                self._readers.discard(task)
            peer = self.peers.get(peer_id)
            if registered and peer is not None and peer.inbound.get(plane) is conn:
                del peer.inbound[plane]
                if plane == "control":
                    self._membership_changed(peer)

    def _is_duplicate(self, peer: PeerState, info: dict, plane: str) -> bool:
        current = peer.inbound.get(plane)
        instance = str(info.get("instance"))
        if current is None or peer.instance in (None, instance):
            return False
        if info.get("listen") == peer.info.get("listen"):
            return False
        self.duplicates[peer.node_id] = {
            "node_id": peer.node_id,
            "live": {"instance": peer.instance, "listen": peer.info.get("listen")},
            "refused": {"instance": instance, "listen": info.get("listen")},
            "since_unix": time.time(),
        }
        logger.error(
            "refusing duplicate node id node=%s peer=%s: live instance %s at %s, second instance %s at %s; "
            "two agents share one certificate (cloned data directory?); give each machine its own with "
            "`shardmesh cert issue`",
            self.node_id, peer.node_id, peer.instance, peer.info.get("listen"), instance, info.get("listen"),
        )
        return True

    def _membership_changed(self, peer: PeerState) -> None:
        try:
            self._on_membership(peer.node_id, peer.is_member)
        except Exception:
            logger.exception("membership callback failed node=%s peer=%s", self.node_id, peer.node_id)

    def status(self) -> dict:
        return {
            "peers": {
                peer.node_id: {
                    "address": f"{peer.host}:{peer.port}" if peer.host else None,
                    "admin_port": peer.admin_port,
                    "state": peer.reachability,
                    "sources": sorted(peer.sources),
                    "incarnation": peer.incarnation,
                    "bytes_sent": sum(getattr(c, "bytes_sent", 0) for c in peer.outbound.values()),
                    "bytes_received": sum(getattr(c, "bytes_received", 0) for c in peer.inbound.values()),
                }
                for peer in self.peers.values()
            },
            "failed_addresses": dict(self.failed_addresses),
            "duplicate_node_ids": list(self.duplicates.values()),
        }
