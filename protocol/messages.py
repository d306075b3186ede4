"""Message types, protocol versions and the common header fields of the data plane.

The message-type numbers are part of the wire contract: the table below is append-only, a number
is never reused or renumbered, and a retired type keeps its slot with a comment. A frame's type
also decides which size limit applies (see `is_data_plane`): control-plane frames are small and
latency-sensitive, data-plane frames carry tensors.

Protocol versions: peers exchange the versions they speak in HELLO and use the highest common one.
- 1: the first version; fixed 20-byte frame prefix, msgpack header, raw payload.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from protocol.errors import ProtocolError

__all__ = [
    "CONTROL_PLANE",
    "DATA_PLANE",
    "DataHeader",
    "KEY_EPOCH",
    "KEY_HOP",
    "KEY_PLAN",
    "KEY_RID",
    "KEY_TENSORS",
    "KEY_TTL_MS",
    "MsgType",
    "PLANES",
    "PROTOCOL_VERSIONS",
    "is_data_plane",
]

# Versions this build speaks, lowest first.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)

# Each connection carries one plane, named in HELLO. Control frames on their own connection do
# not queue behind a 16 MiB activation.
CONTROL_PLANE = "control"
DATA_PLANE = "data"
PLANES: tuple[str, ...] = (CONTROL_PLANE, DATA_PLANE)


class MsgType(enum.IntEnum):
    """Frame message types. Append only; never reuse or renumber a value."""

    HELLO = 1  # handshake: {"versions": [int], "plane": str, "version": int (reply only)}
    ERROR = 2  # {"code": str, "message": str}; the sender closes the connection afterwards
    PING = 3
    PONG = 4
    HEARTBEAT = 5
    LEAVE = 6
    MEMBER_INFO = 7
    INDIRECT_PROBE = 8
    INDIRECT_PROBE_ACK = 9
    ELECTION = 10  # one election-core message dict
    COMMAND = 11  # coordinator command; carries epoch, coordinator id and plan version
    COMMAND_ACK = 12
    REPORT = 13
    BLOB_REQUEST = 14
    BLOB_CHUNK = 15
    ACTIVATION = 16
    HOP_ACK = 17
    HOP_REFUSE = 18
    RESULT = 19
    PROGRESS = 20
    RESEND = 21
    CANCEL = 22
    BANDWIDTH_PROBE = 23
    BANDWIDTH_ECHO = 24


_DATA_PLANE_TYPES = frozenset(
    {
        MsgType.BLOB_REQUEST,
        MsgType.BLOB_CHUNK,
        MsgType.ACTIVATION,
        MsgType.HOP_ACK,
        MsgType.HOP_REFUSE,
        MsgType.RESULT,
        MsgType.PROGRESS,
        MsgType.RESEND,
        MsgType.CANCEL,
        MsgType.BANDWIDTH_PROBE,
        MsgType.BANDWIDTH_ECHO,
    }
)


def is_data_plane(msg_type: int) -> bool:
    """Return True for types that may carry a large payload (limited by max_payload_bytes).

    Every other type is a control-plane type whose whole frame must fit max_control_frame_bytes.
    """
    return msg_type in _DATA_PLANE_TYPES


# Header keys shared by every data-plane message. Short names because they travel in every frame.
KEY_EPOCH = "epoch"  # coordinator term that issued the plan; stale epochs are rejected
KEY_PLAN = "plan"  # plan version the route was built from
KEY_RID = "rid"  # request id, unique per gateway
KEY_HOP = "hop"  # index of the segment boundary this frame crosses (0 = gateway to first stage)
KEY_TTL_MS = "ttl_ms"  # remaining time budget in milliseconds when the frame was sent
KEY_TENSORS = "tensors"  # tensor metadata list from protocol.tensors.encode_tensors

# The deadline travels as a remaining budget, not a wall-clock instant, because agents' clocks
# are not synchronized. Each hop subtracts the time it kept the request.
_MAX_TTL_MS = 24 * 3600 * 1000
_MAX_RID_LEN = 128


@dataclasses.dataclass(frozen=True, slots=True)
class DataHeader:
    """Routing fields every data-plane frame carries."""

    epoch: int
    plan: int
    rid: str
    hop: int
    ttl_ms: int

    def to_header(self, **extra: Any) -> dict[str, Any]:
        """Build a frame header dict from these fields plus message-specific `extra` keys."""
        header: dict[str, Any] = {
            KEY_EPOCH: self.epoch,
            KEY_PLAN: self.plan,
            KEY_RID: self.rid,
            KEY_HOP: self.hop,
            KEY_TTL_MS: self.ttl_ms,
        }
        header.update(extra)
        return header

    @classmethod
    def from_header(cls, header: dict[str, Any], *, peer: str | None = None) -> DataHeader:
        """Read and validate the routing fields of a received header.

        Raises ProtocolError naming the first missing or invalid field.
        """
        epoch = _require_int(header, KEY_EPOCH, 0, 2**63 - 1, peer)
        plan = _require_int(header, KEY_PLAN, 0, 2**63 - 1, peer)
        hop = _require_int(header, KEY_HOP, 0, 65535, peer)
        ttl_ms = _require_int(header, KEY_TTL_MS, 0, _MAX_TTL_MS, peer)
        rid = header.get(KEY_RID)
        if not isinstance(rid, str) or not rid or len(rid) > _MAX_RID_LEN:
            raise ProtocolError(
                f"header field {KEY_RID!r} must be a non-empty string of at most {_MAX_RID_LEN} characters",
                field=KEY_RID,
                value=rid,
                peer=peer,
            )
        return cls(epoch=epoch, plan=plan, rid=rid, hop=hop, ttl_ms=ttl_ms)


def _require_int(header: dict[str, Any], key: str, low: int, high: int, peer: str | None) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(
            f"header field {key!r} must be an int in [{low}, {high}]",
            field=key,
            value=value,
            peer=peer,
        )
    return value
