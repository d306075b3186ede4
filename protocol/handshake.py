"""HELLO exchange: agree on a protocol version and a plane, without I/O.

After TLS (or directly on a plaintext test connection) the client sends HELLO with the versions
it speaks and the plane ("control" or "data") the connection is for. The server picks the highest
version both speak and replies HELLO with its own versions and the chosen one, or replies ERROR
and closes when there is none or the plane is unknown. The client checks that the server chose
exactly what it would have chosen, so a buggy or downgraded reply is rejected.

HELLO and handshake ERROR frames always carry frame version `HELLO_FRAME_VERSION` (1), whatever
the peers end up agreeing on, so that any two versions of shardmesh can read each other's HELLO.
Identity is not part of HELLO: on TLS connections it comes from the peer's certificate only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from protocol.errors import HandshakeError
from protocol.frames import Frame, encode_frame
from protocol.limits import Limits
from protocol.messages import PLANES, PROTOCOL_VERSIONS, MsgType

__all__ = [
    "HELLO_FRAME_VERSION",
    "ClientHandshake",
    "Hello",
    "ServerHandshake",
    "choose_version",
    "parse_hello",
]

HELLO_FRAME_VERSION = 1
_MAX_VERSIONS = 32


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """A parsed HELLO header."""

    versions: tuple[int, ...]
    plane: str
    version: int | None = None  # the version the server chose; only in the reply


def choose_version(local: Iterable[int], remote: Iterable[int], *, peer: str | None = None) -> int:
    """Return the highest version in both lists, or raise HandshakeError naming both lists."""
    local_set = set(local)
    remote_list = sorted(set(remote))
    common = local_set.intersection(remote_list)
    if not common:
        raise HandshakeError(
            f"no common protocol version: this node speaks {sorted(local_set)}, the peer speaks "
            f"{remote_list}; upgrade the older node",
            field="versions",
            value=remote_list,
            peer=peer,
        )
    return max(common)


def parse_hello(frame: Frame, *, peer: str | None = None) -> Hello:
    """Validate a received HELLO frame. An ERROR frame is raised as HandshakeError with its text."""
    if frame.msg_type == MsgType.ERROR:
        raise HandshakeError(
            f"peer rejected the handshake: {frame.header.get('message')!r}",
            field="code",
            value=frame.header.get("code"),
            offset=frame.offset,
            peer=peer,
        )
    if frame.msg_type != MsgType.HELLO:
        raise HandshakeError(
            "expected HELLO as the first frame", field="msg_type", value=frame.msg_type.name, offset=frame.offset, peer=peer
        )
    header = frame.header
    versions = header.get("versions")
    if (
        not isinstance(versions, list)
        or not 0 < len(versions) <= _MAX_VERSIONS
        or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 256 for v in versions)
    ):
        raise HandshakeError(
            f"HELLO versions must be a list of 1 to {_MAX_VERSIONS} ints in [1, 255]",
            field="versions",
            value=versions,
            offset=frame.offset,
            peer=peer,
        )
    plane = header.get("plane")
    if plane not in PLANES:
        raise HandshakeError(
            f"HELLO plane must be one of {list(PLANES)}", field="plane", value=plane, offset=frame.offset, peer=peer
        )
    chosen = header.get("version")
    if chosen is not None and (not isinstance(chosen, int) or isinstance(chosen, bool)):
        raise HandshakeError("HELLO version must be an int", field="version", value=chosen, offset=frame.offset, peer=peer)
    return Hello(versions=tuple(versions), plane=plane, version=chosen)


def _hello_frame(header: dict[str, Any], limits: Limits) -> list[bytes | memoryview]:
    return encode_frame(MsgType.HELLO, header, limits=limits, version=HELLO_FRAME_VERSION)


class ClientHandshake:
    """Client side: `hello_frame()` to send, then `receive(frame)` returns the agreed version."""

    def __init__(
        self, plane: str, *, versions: Iterable[int] = PROTOCOL_VERSIONS, limits: Limits | None = None, peer: str | None = None
    ) -> None:
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {list(PLANES)}, got {plane!r}")
        self.plane = plane
        self.versions = tuple(sorted(set(versions)))
        self.limits = limits or Limits()
        self.peer = peer
        self.version: int | None = None

    def hello_frame(self) -> list[bytes | memoryview]:
        return _hello_frame({"versions": list(self.versions), "plane": self.plane}, self.limits)

    def receive(self, frame: Frame) -> int:
        hello = parse_hello(frame, peer=self.peer)
        expected = choose_version(self.versions, hello.versions, peer=self.peer)
        if hello.version != expected or hello.plane != self.plane:
            raise HandshakeError(
                f"server reply chose version {hello.version} on plane {hello.plane!r}; expected version "
                f"{expected} on plane {self.plane!r}",
                field="version",
                value=hello.version,
                offset=frame.offset,
                peer=self.peer,
            )
        self.version = expected
        return expected


class ServerHandshake:
    """Server side: `receive(client HELLO)` returns the reply frame to send.

    On failure it raises HandshakeError; `error_frame(error)` builds the ERROR frame to send
    before closing.
    """

    def __init__(
        self,
        *,
        planes: Iterable[str] = PLANES,
        versions: Iterable[int] = PROTOCOL_VERSIONS,
        limits: Limits | None = None,
        peer: str | None = None,
    ) -> None:
        self.planes = frozenset(planes)
        self.versions = tuple(sorted(set(versions)))
        self.limits = limits or Limits()
        self.peer = peer
        self.version: int | None = None
        self.plane: str | None = None

    def receive(self, frame: Frame) -> list[bytes | memoryview]:
        hello = parse_hello(frame, peer=self.peer)
        if hello.plane not in self.planes:
            raise HandshakeError(
                f"this server accepts planes {sorted(self.planes)}", field="plane", value=hello.plane, offset=frame.offset, peer=self.peer
            )
        self.version = choose_version(self.versions, hello.versions, peer=self.peer)
        self.plane = hello.plane
        return _hello_frame({"versions": list(self.versions), "plane": hello.plane, "version": self.version}, self.limits)

    def error_frame(self, error: HandshakeError) -> list[bytes | memoryview]:
        code = "version_mismatch" if error.field == "versions" else "bad_hello"
        # The text is cut so the ERROR frame always fits the control-frame limit.
        return encode_frame(
            MsgType.ERROR, {"code": code, "message": str(error)[:1000]}, limits=self.limits, version=HELLO_FRAME_VERSION
        )
