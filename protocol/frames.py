"""Frame encoding and a sans-I/O frame decoder.

Problem: peers exchange small control messages and large tensors over one byte stream each. The
decoder must cut that stream into frames whatever the read sizes are (one byte, a frame and a half,
many frames at once). It must reject hostile length fields before it allocates anything, and land
large payloads in memory without an extra copy.

Options rejected:
- One msgpack object per frame with the tensor bytes inside: packing 16 MiB into a msgpack bin
  costs a copy plus page faults on a fresh buffer (about 10 ms), and unpacking costs another copy.
- A bare length prefix: no room for a version, a message type or a sanity check of where we are
  in the stream, so a desynchronized stream is parsed as garbage rather than rejected.

Rule chosen: a fixed 20-byte little-endian prefix, then a msgpack header, then raw payload bytes:

    offset  size  field
    0       4     magic b"SHMF"
    4       1     protocol version (agreed in HELLO)
    5       1     flags (none defined yet; every bit must be 0)
    6       2     message type (protocol.messages.MsgType)
    8       4     header length, bytes of msgpack (at least 1: an empty map)
    12      8     payload length, bytes of raw payload (0 if none)

All limits (protocol.limits.Limits) are checked on the prefix alone, before any allocation. The
header must decode to a map with string keys. Encoding returns a list of buffers (prefix and header
joined, then the caller's payload buffers untouched) so the transport can write tensor memory
directly.

Receive buffers and ownership: payloads of 64 KiB or more go into buffers from a small pool. The
transport writes straight into the payload buffer through `get_buffer`/`buffer_updated`, so large
payloads are copied once, from the socket (or TLS record) into their final place. A pooled buffer
is reused only when the pool holds the sole reference to it, which CPython's reference count
tells exactly. Whoever holds the Frame, its payload view, a slice of it, or a tensor from
protocol.tensors.decode_tensors therefore owns the bytes for as long as they keep that object,
and nothing needs to be released by hand. Drop every reference (or copy) once you are done to let
the next frame reuse the memory.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import struct
import sys
from collections.abc import Iterable
from typing import Any

import msgpack

from protocol.errors import LimitExceeded, ProtocolError
from protocol.limits import KiB, Limits, MiB
from protocol.messages import PROTOCOL_VERSIONS, MsgType, is_data_plane

__all__ = [
    "MAGIC",
    "PREFIX",
    "Frame",
    "FrameDecoder",
    "encode_frame",
]

logger = logging.getLogger(__name__)

MAGIC = b"SHMF"
PREFIX = struct.Struct("<4sBBHIQ")
KNOWN_FLAGS = 0

# Byte offset of each prefix field, used in error messages.
_FIELD_OFFSETS = {
    "magic": 0,
    "version": 4,
    "flags": 5,
    "msg_type": 6,
    "header_len": 8,
    "payload_len": 12,
}

# Payloads at least this large are received through the pool and written to directly by the
# transport. Smaller ones are copied out of the scratch buffer: one recv() per tiny frame would
# cost more than the copy.
_ZERO_COPY_MIN_BYTES = 64 * KiB
# Scratch buffer handed to the transport between large payloads. 256 KiB equals the read size
# asyncio's selector transport uses for plain protocols (`max_size` in Python 3.11).
_SCRATCH_BYTES = 256 * KiB
# References to a pooled buffer while the pool inspects it: the pool's list and the argument of
# sys.getrefcount. Any extra reference is a live Frame, memoryview or tensor.
# NOTE: this relies on CPython reference counting; an interpreter without exact refcounts
# (PyPy, free-threaded builds) would need an explicit release call instead.
_POOL_ONLY_REFS = 2

_STATE_PREFIX = "prefix"
_STATE_HEADER = "header"
_STATE_PAYLOAD = "payload"

_DEFAULT_LIMITS = Limits()


@dataclasses.dataclass(slots=True, eq=False)
class Frame:
    """One decoded frame. `payload` may alias a pooled receive buffer (see module docstring)."""

    msg_type: MsgType
    version: int
    header: dict[str, Any]
    payload: memoryview
    flags: int = 0
    offset: int = 0  # stream offset of the frame's first byte
    payload_offset: int = 0  # stream offset of the payload's first byte


def _check_sizes(
    msg_type: int,
    header_len: int,
    payload_len: int,
    limits: Limits,
    *,
    frame_offset: int | None,
    peer: str,
) -> None:
    def at(field: str) -> int | None:
        return None if frame_offset is None else frame_offset + _FIELD_OFFSETS[field]

    if header_len < 1:
        raise ProtocolError(
            "header length must be at least 1 (an empty msgpack map)",
            field="header_len",
            value=header_len,
            offset=at("header_len"),
            peer=peer,
        )
    if header_len > limits.max_header_bytes:
        raise LimitExceeded(
            f"header length is above max_header_bytes={limits.max_header_bytes}",
            field="header_len",
            value=header_len,
            offset=at("header_len"),
            peer=peer,
        )
    if is_data_plane(msg_type):
        if payload_len > limits.max_payload_bytes:
            raise LimitExceeded(
                f"payload length is above max_payload_bytes={limits.max_payload_bytes}; "
                "split the tensors or raise the limit on both peers",
                field="payload_len",
                value=payload_len,
                offset=at("payload_len"),
                peer=peer,
            )
        return
    total = PREFIX.size + header_len + payload_len
    if total > limits.max_control_frame_bytes:
        raise LimitExceeded(
            f"control frame of type {MsgType(msg_type).name} is {total} bytes, above "
            f"max_control_frame_bytes={limits.max_control_frame_bytes}",
            field="payload_len",
            value=payload_len,
            offset=at("payload_len"),
            peer=peer,
        )


def _as_byte_view(buffer: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(buffer)
    if view.ndim != 1 or view.format != "B":
        # Transports slice unsent remainders by index, so every buffer must index bytes.
        view = view.cast("B")
    return view


def encode_frame(
    msg_type: int,
    header: dict[str, Any],
    buffers: Iterable[bytes | bytearray | memoryview] = (),
    *,
    limits: Limits = _DEFAULT_LIMITS,
    version: int = PROTOCOL_VERSIONS[-1],
) -> list[bytes | memoryview]:
    """Encode one frame as a list of buffers: prefix plus header, then each payload buffer.

    The payload buffers are passed through as byte memoryviews without copying; the caller must
    not modify them until the transport has written them. Raises LimitExceeded (peer "local")
    when the frame would be rejected by a receiver using the same limits.
    """
    msg_type = MsgType(msg_type)
    if not isinstance(header, dict):
        raise TypeError(f"frame header must be a dict, got {type(header).__name__}")
    header_bytes = msgpack.packb(header, use_bin_type=True)
    views = [_as_byte_view(buffer) for buffer in buffers]
    payload_len = sum(view.nbytes for view in views)
    _check_sizes(msg_type, len(header_bytes), payload_len, limits, frame_offset=None, peer="local")
    prefix = PREFIX.pack(MAGIC, version, 0, msg_type, len(header_bytes), payload_len)
    pieces: list[bytes | memoryview] = [prefix + header_bytes]
    pieces.extend(view for view in views if view.nbytes)
    return pieces


class _PayloadPool:
    """Large receive buffers kept for reuse; see the ownership rule in the module docstring."""

    def __init__(self, max_bytes: int, max_buffers: int = 4) -> None:
        self._max_bytes = max_bytes
        self._max_buffers = max_buffers
        self._buffers: list[bytearray] = []

    def acquire(self, size: int) -> bytearray:
        best: int | None = None
        for index in range(len(self._buffers)):
            length = len(self._buffers[index])
            # Accept up to twice the size needed so a pool of 16 MiB buffers is not spent on
            # 64 KiB frames.
            if size <= length <= 2 * size and sys.getrefcount(self._buffers[index]) == _POOL_ONLY_REFS:
                if best is None or length < len(self._buffers[best]):
                    best = index
        if best is not None:
            buffer = self._buffers.pop(best)
            self._buffers.append(buffer)  # most recently used last
            return buffer
        buffer = bytearray(size)
        if size <= self._max_bytes:
            self._buffers.append(buffer)
            self._evict()
        return buffer

    def _evict(self) -> None:
        # Drop the least recently used buffers from the pool; a holder keeps its own reference.
        while len(self._buffers) > self._max_buffers or self.pooled_bytes > self._max_bytes:
            self._buffers.pop(0)

    @property
    def pooled_bytes(self) -> int:
        return sum(len(buffer) for buffer in self._buffers)


class FrameDecoder:
    """Cut a byte stream into frames. No I/O: bytes go in through `feed` or the buffered-protocol
    pair `get_buffer`/`buffer_updated`, frames come out of `next_frame`.

    After the first ProtocolError the stream cannot be resynchronized: the decoder keeps the
    error, still returns frames completed before it, and then raises it from every call.
    """

    def __init__(
        self,
        limits: Limits = _DEFAULT_LIMITS,
        *,
        peer: str = "unknown",
        versions: Iterable[int] = PROTOCOL_VERSIONS,
        max_pool_bytes: int = 64 * MiB,
    ) -> None:
        self.limits = limits
        self.peer = peer
        self._versions = frozenset(versions)
        self._pool = _PayloadPool(max_pool_bytes)
        self._frames: collections.deque[Frame] = collections.deque()
        self._error: ProtocolError | None = None
        self._scratch = memoryview(bytearray(_SCRATCH_BYTES))
        self._handed_payload = False
        self.bytes_received = 0
        self._reset_frame()

    def _reset_frame(self) -> None:
        self._state = _STATE_PREFIX
        self._frame_offset = self.bytes_received
        self._prefix = bytearray(PREFIX.size)
        self._target: memoryview = memoryview(self._prefix)
        self._filled = 0
        self._version = 0
        self._flags = 0
        self._msg_type = MsgType.HELLO
        self._payload_len = 0
        self._header_len = 0
        self._header: dict[str, Any] = {}

    # -- configuration -------------------------------------------------------------------------

    def set_version(self, version: int) -> None:
        """Accept only `version` from now on (called once HELLO agreed on it)."""
        self._versions = frozenset((version,))

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Consume bytes. Raises ProtocolError on malformed input (and keeps raising after)."""
        self._raise_if_failed()
        self._consume(_as_byte_view(data))

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return a writable buffer for the next read (asyncio.BufferedProtocol contract)."""
        remaining = len(self._target) - self._filled
        if (
            self._error is None
            and self._state == _STATE_PAYLOAD
            and remaining >= _ZERO_COPY_MIN_BYTES
        ):
            self._handed_payload = True
            return self._target[self._filled :]
        self._handed_payload = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        """Account for `nbytes` written into the buffer from the last `get_buffer` call."""
        self._raise_if_failed()
        if not self._handed_payload:
            self._consume(self._scratch[:nbytes])
            return
        self._handed_payload = False
        self._filled += nbytes
        self.bytes_received += nbytes
        if self._filled == len(self._target):
            self._complete_frame()

    def eof(self) -> None:
        """Signal the end of the stream; raises ProtocolError if it cut a frame short."""
        self._raise_if_failed()
        if self._state == _STATE_PREFIX and self._filled == 0:
            return
        self._fail(
            ProtocolError(
                f"stream ended inside the frame {self._state}: got {self._filled} of "
                f"{len(self._target)} bytes",
                field=self._state,
                value=self._filled,
                offset=self.bytes_received,
                peer=self.peer,
            )
        )

    # -- output --------------------------------------------------------------------------------

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, None if more bytes are needed, or raise the error."""
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            raise self._error
        return None

    @property
    def pending_frames(self) -> int:
        return len(self._frames)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the frame in progress and for decoded frames not yet taken."""
        queued = sum(frame.payload.nbytes for frame in self._frames)
        return queued + len(self._target) + _SCRATCH_BYTES

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    # -- state machine -------------------------------------------------------------------------

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _fail(self, error: ProtocolError) -> None:
        self._error = error
        raise error

    def _consume(self, data: memoryview) -> None:
        position = 0
        size = len(data)
        while position < size:
            take = min(len(self._target) - self._filled, size - position)
            self._target[self._filled : self._filled + take] = data[position : position + take]
            self._filled += take
            self.bytes_received += take
            position += take
            if self._filled < len(self._target):
                break
            try:
                self._advance()
            except ProtocolError as error:
                self._fail(error)

    def _advance(self) -> None:
        if self._state == _STATE_PREFIX:
            self._parse_prefix()
        elif self._state == _STATE_HEADER:
            self._parse_header()
        else:
            self._complete_frame()

    def _error_at(self, message: str, field: str, value: Any) -> ProtocolError:
        return ProtocolError(
            message, field=field, value=value, offset=self._frame_offset + _FIELD_OFFSETS[field], peer=self.peer
        )

    def _parse_prefix(self) -> None:
        magic, version, flags, msg_type, header_len, payload_len = PREFIX.unpack(self._prefix)
        if magic != MAGIC:
            raise self._error_at(f"bad frame magic, expected {MAGIC!r}; the stream is not shardmesh frames or lost sync", "magic", magic)
        if version not in self._versions:
            raise self._error_at(f"unsupported protocol version, accepted {sorted(self._versions)}", "version", version)
        if flags & ~KNOWN_FLAGS:
            raise self._error_at("unknown frame flags set", "flags", flags)
        try:
            kind = MsgType(msg_type)
        except ValueError:
            raise self._error_at("unknown message type", "msg_type", msg_type) from None
        _check_sizes(kind, header_len, payload_len, self.limits, frame_offset=self._frame_offset, peer=self.peer)
        self._version = version
        self._flags = flags
        self._msg_type = kind
        self._payload_len = payload_len
        self._header_len = header_len
        self._state = _STATE_HEADER
        self._target = memoryview(bytearray(header_len))
        self._filled = 0

    def _parse_header(self) -> None:
        header_offset = self._frame_offset + PREFIX.size
        limits = self.limits
        try:
            header = msgpack.unpackb(
                self._target,
                raw=False,
                strict_map_key=True,
                max_bin_len=limits.max_bin_len,
                max_str_len=limits.max_str_len,
                max_array_len=limits.max_array_len,
                max_map_len=limits.max_map_len,
                max_ext_len=0,
            )
        except (ValueError, TypeError, OverflowError, RecursionError, msgpack.UnpackException) as exc:
            raise ProtocolError(
                f"invalid msgpack header: {exc}",
                field="header",
                value=bytes(self._target[:32]),
                offset=header_offset,
                peer=self.peer,
            ) from exc
        if not isinstance(header, dict):
            raise ProtocolError(
                "frame header must be a msgpack map",
                field="header",
                value=type(header).__name__,
                offset=header_offset,
                peer=self.peer,
            )
        for key in header:
            if not isinstance(key, str):
                raise ProtocolError(
                    "frame header keys must be strings", field="header", value=key, offset=header_offset, peer=self.peer
                )
        self._header = header
        if self._payload_len == 0:
            self._complete_frame()
            return
        if self._payload_len >= _ZERO_COPY_MIN_BYTES:
            buffer = self._pool.acquire(self._payload_len)
        else:
            buffer = bytearray(self._payload_len)
        self._state = _STATE_PAYLOAD
        self._target = memoryview(buffer)[: self._payload_len]
        self._filled = 0

    def _complete_frame(self) -> None:
        payload = self._target if self._state == _STATE_PAYLOAD else memoryview(b"")
        frame = Frame(
            msg_type=self._msg_type,
            version=self._version,
            header=self._header,
            payload=payload,
            flags=self._flags,
            offset=self._frame_offset,
            payload_offset=self._frame_offset + PREFIX.size + self._header_len,
        )
        self._frames.append(frame)
        self._reset_frame()
