"""Size limits for everything a peer can declare on the wire.

Every length field is compared with one of these limits before a single byte is allocated for
it, so a peer that declares a 4 GiB header costs us 20 bytes of parsing, not 4 GiB of memory.
The worst case a connection can pin is about `max_header_bytes + max_payload_bytes` for the frame
being received, plus whatever the stream adapter keeps queued (see protocol.stream).
"""

from __future__ import annotations

import dataclasses

KiB = 1024
MiB = 1024 * KiB

__all__ = ["KiB", "Limits", "MiB"]


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Wire limits shared by the frame decoder, the tensor codec and the stream adapter."""

    # Whole frame (fixed prefix + header + payload) for every control-plane message type.
    # Heartbeats, votes and registry entries are a few hundred bytes; 64 KiB leaves room for a
    # registry snapshot of a few hundred models while keeping a control connection's worst-case
    # buffer small enough that thousands of peers cost megabytes, not gigabytes.
    max_control_frame_bytes: int = 64 * KiB

    # Encoded msgpack header of any frame. Data-plane headers carry tensor metadata (name, dtype,
    # shape) for at most `max_tensors_per_frame` tensors, about 100 bytes each, so 64 KiB fits
    # 256 tensors with room to spare.
    max_header_bytes: int = 64 * KiB

    # Raw payload of one data-plane frame (the concatenated tensor bytes). 256 MiB holds a batch
    # of 8 x 2048 tokens x 4096 hidden in float32 (256 MiB exactly); larger activations must be
    # split by the sender. Raise it for bigger models; each receiving connection may pin this much.
    max_payload_bytes: int = 256 * MiB

    # msgpack decode limits. The header is already bounded by max_header_bytes, but msgpack
    # pre-sizes containers from the declared count, so a 5-byte array header that claims 2**32
    # items would allocate gigabytes before failing. These caps reject such headers at once.
    # Binary and string values in headers are ids, names and error text, so 16 KiB is plenty.
    # Arrays contain tensor metadata and shapes, and maps contain one message's fields.
    max_bin_len: int = 16 * KiB
    max_str_len: int = 16 * KiB
    max_array_len: int = 1024
    max_map_len: int = 256

    # Tensor metadata. Activations of the models shardmesh splits have at most 5 dimensions
    # (batch, channels, depth, height, width), so 16 leaves room. 256 tensors per frame covers a
    # transformer boundary that carries hidden states plus per-layer caches.
    max_tensor_dims: int = 16
    max_tensors_per_frame: int = 256

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive int, got {value!r}")
