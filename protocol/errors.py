"""Exceptions raised by the protocol package.

Two families meet at the connection boundary. `ProtocolError` means the bytes a peer sent broke
the wire contract. It carries the field, the offending value, the byte offset in the stream and
the peer, so one log line is enough to find the frame. `AuthenticationError` means the TLS layer
or the certificate check rejected the peer. `ConnectionClosed` means the peer went away, cleanly
or not. Everything a malformed frame can trigger is turned into `ProtocolError` before it leaves
the decoder, so callers catch exactly these types and nothing broader.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ConnectionClosed",
    "CredentialsError",
    "HandshakeError",
    "LimitExceeded",
    "ProtocolError",
]

# Values are shown with repr(); a long bytes value is cut so a log line stays readable.
_MAX_VALUE_REPR = 80


def _short_repr(value: Any) -> str:
    text = repr(value)
    if len(text) > _MAX_VALUE_REPR:
        return text[: _MAX_VALUE_REPR - 3] + "..."
    return text


class ProtocolError(Exception):
    """A peer sent bytes that violate the wire format.

    `str()` lists every context item that is set: field, value, offset (bytes from the start of
    the stream) and peer.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        offset: int | None = None,
        peer: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.value = value
        self.offset = offset
        self.peer = peer

    def __str__(self) -> str:
        parts = [self.message]
        if self.field is not None:
            parts.append(f"field={self.field}")
        if self.value is not None:
            parts.append(f"value={_short_repr(self.value)}")
        if self.offset is not None:
            parts.append(f"offset={self.offset}")
        if self.peer is not None:
            parts.append(f"peer={self.peer}")
        return " ".join(parts) if len(parts) == 1 else f"{parts[0]} ({', '.join(parts[1:])})"


class LimitExceeded(ProtocolError):
    """A declared length or count is above its configured limit; nothing was allocated for it."""


class HandshakeError(ProtocolError):
    """The HELLO exchange failed: no common protocol version, an unknown plane, or a bad reply."""


class AuthenticationError(Exception):
    """The peer failed TLS or certificate identity checks.

    `reason` is a short stable code (for example "expired", "unknown_ca", "revoked") that is
    also the key in the rejection counters.
    """

    def __init__(self, message: str, *, reason: str = "rejected", peer: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.peer = peer

    def __str__(self) -> str:
        if self.peer is None:
            return f"{self.message} (reason={self.reason})"
        return f"{self.message} (reason={self.reason}, peer={self.peer})"


class CredentialsError(Exception):
    """Local key or certificate files are missing, malformed or unsafely readable."""


class ConnectionClosed(Exception):
    """The connection is closed; `cause` is the error that closed it, if any."""

    def __init__(self, message: str = "connection closed", *, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.cause = cause

    def __str__(self) -> str:
        if self.cause is None:
            return self.message
        return f"{self.message}: {self.cause}"
