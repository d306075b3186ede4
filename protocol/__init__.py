"""shardmesh wire protocol: frames, messages, tensor codec, mutual TLS and the asyncio adapter.

The modules `frames`, `messages`, `handshake` and `tensors` turn bytes into values and back
without touching a socket. `stream` wraps them in asyncio transports, and `tls` manages the
cluster CA, node credentials and peer identity. This package imports neither
`nodeagent` nor `coordinator`.
"""

from protocol.errors import AuthenticationError, ConnectionClosed, CredentialsError, HandshakeError, LimitExceeded, ProtocolError
from protocol.frames import Frame, FrameDecoder, encode_frame
from protocol.limits import Limits
from protocol.messages import PROTOCOL_VERSIONS, DataHeader, MsgType, is_data_plane

__all__ = [
    "PROTOCOL_VERSIONS",
    "AuthenticationError",
    "ConnectionClosed",
    "CredentialsError",
    "DataHeader",
    "Frame",
    "FrameDecoder",
    "HandshakeError",
    "LimitExceeded",
    "Limits",
    "MsgType",
    "ProtocolError",
    "encode_frame",
    "is_data_plane",
]
