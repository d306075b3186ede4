"""Tensor codec: torch tensors to frame metadata plus raw payload buffers, and back.

Problem: activations cross the network on every hop, so encoding must not copy what it does not
have to, must keep every dtype bit-exact (bfloat16 and float8 included, NaN payloads included),
and decoding must treat the metadata as hostile.

Options rejected:
- `torch.save`/pickle: executes code on load, so it never touches the network path.
- numpy as the carrier: numpy has no bfloat16 or float8 dtypes, so those would need a side
  channel anyway.
- safetensors: a good file format, but it serializes into one joined bytes object.

Rule chosen: each tensor becomes one metadata entry `{"name", "dtype", "shape", "nbytes"}` in the
frame header and one buffer in the payload: the tensor's contiguous storage, in native
little-endian byte order, as a zero-copy memoryview. Each tensor starts at a multiple of
`ALIGNMENT` bytes from the payload start (zero padding in between), so views of the receive buffer
are aligned for every dtype. Non-contiguous inputs (transposed, strided, expanded) are made
contiguous first, which is the one copy the kernel cannot avoid. Decoding builds tensors that are
views of the receive buffer; see protocol.frames for who owns that buffer.

Byte order: the wire format is little-endian. Every host shardmesh runs on (x86-64, aarch64) is
little-endian, so the codec sends native bytes and refuses to import on a big-endian host rather
than convert silently.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any

import torch

from protocol.errors import LimitExceeded, ProtocolError
from protocol.frames import Frame
from protocol.limits import Limits
from protocol.messages import KEY_TENSORS

if sys.byteorder != "little":  # pragma: no cover - no big-endian host to run on
    raise ImportError(
        "protocol.tensors sends native tensor bytes as little-endian; this host is big-endian. "
        "Byte swapping is not implemented."
    )

__all__ = [
    "ALIGNMENT",
    "DTYPE_BY_TAG",
    "decode_frame_tensors",
    "decode_tensors",
    "encode_tensors",
    "tensor_from_json",
    "tensor_to_json",
]

# 64 bytes: a cache line, and a multiple of every element size (complex128 is 16 bytes).
ALIGNMENT = 64
_PADDING = bytes(ALIGNMENT)
_DEFAULT_LIMITS = Limits()
_MAX_NAME_LEN = 256

# Wire tags are torch's own dtype names. The table is keyed by name so a torch build that lacks
# a newer dtype still imports; tags are never renamed.
_DTYPE_NAMES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "complex32",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
)
DTYPE_BY_TAG: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in _DTYPE_NAMES if isinstance(getattr(torch, name, None), torch.dtype)
}
_TAG_BY_DTYPE: dict[torch.dtype, str] = {dtype: tag for tag, dtype in DTYPE_BY_TAG.items()}

# Integer dtypes of each element size. Reinterpreting an exotic dtype (bits8, float8, ...) as the
# integer of the same size lets `.contiguous()` copy it even where torch has no copy kernel for it.
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# Quantized dtypes also need scale and zero point, which this codec does not carry.
_QUANTIZED = {getattr(torch, name) for name in ("qint8", "quint8", "qint32", "quint4x2", "quint2x4") if hasattr(torch, name)}


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def _contiguous_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """Return the tensor's elements as a flat contiguous uint8 tensor, copying only if needed."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        # NOTE: device tensors are staged through host memory; pinned buffers could overlap the
        # copy with the send, but no GPU runs this path yet.
        tensor = tensor.cpu()
    if tensor.is_complex():
        tensor = tensor.resolve_conj().resolve_neg()
    if not tensor.is_contiguous():
        same_size_int = _INT_OF_SIZE.get(tensor.element_size())
        if same_size_int is not None:
            tensor = tensor.view(same_size_int).contiguous()
        else:
            tensor = tensor.contiguous()
    return tensor.reshape(-1).view(torch.uint8)


def encode_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[memoryview]]:
    """Encode named tensors as (metadata list, payload buffers) for one frame.

    Contiguous CPU tensors are not copied: each buffer is a memoryview of the tensor's memory and
    keeps the tensor alive. Do not modify a tensor in place until the frame has been written.
    Raises ValueError for a dtype the codec cannot carry (quantized) or a non-strided layout.
    """
    meta: list[dict[str, Any]] = []
    buffers: list[memoryview] = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN:
            raise ValueError(f"tensor name must be a non-empty str of at most {_MAX_NAME_LEN} characters, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.dtype in _QUANTIZED or tensor.dtype not in _TAG_BY_DTYPE:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which the wire codec does not carry")
        if tensor.layout != torch.strided:
            raise ValueError(f"tensor {name!r} has layout {tensor.layout}; convert it with .to_dense() first")
        flat = _contiguous_bytes(tensor)
        nbytes = flat.numel()
        if nbytes:
            # Empty tensors take no bytes and no padding.
            start = _align(offset)
            if start > offset:
                buffers.append(memoryview(_PADDING)[: start - offset])
            buffers.append(memoryview(flat.numpy()))
            offset = start + nbytes
        meta.append({"name": name, "dtype": _TAG_BY_DTYPE[tensor.dtype], "shape": list(tensor.shape), "nbytes": nbytes})
    return meta, buffers


def decode_tensors(
    meta: Any,
    payload: memoryview | bytearray | bytes,
    *,
    limits: Limits | None = None,
    peer: str | None = None,
    offset: int = 0,
) -> dict[str, torch.Tensor]:
    """Decode tensors described by `meta` from `payload`.

    The result aliases `payload` when it is writable (no copy); a read-only payload is copied once.
    `offset` is the stream offset of the payload's first byte, used in error messages.
    Raises ProtocolError (or LimitExceeded) naming the field, value, offset and peer for any
    inconsistency: unknown dtype, bad shape, byte count not matching the shape, overlapping or
    trailing bytes, bool bytes other than 0 and 1.
    """
    limits = limits or _DEFAULT_LIMITS
    view = memoryview(payload)
    if view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    if not isinstance(meta, list):
        raise ProtocolError("tensor metadata must be a list", field=KEY_TENSORS, value=type(meta).__name__, offset=offset, peer=peer)
    if len(meta) > limits.max_tensors_per_frame:
        raise LimitExceeded(
            f"frame lists more tensors than max_tensors_per_frame={limits.max_tensors_per_frame}",
            field=KEY_TENSORS,
            value=len(meta),
            offset=offset,
            peer=peer,
        )
    layout = []
    position = 0
    names: set[str] = set()
    for index, entry in enumerate(meta):
        name, dtype, shape, nbytes = _check_entry(entry, index, names, limits, peer, offset + position)
        start = _align(position) if nbytes else position
        if start + nbytes > view.nbytes:
            raise ProtocolError(
                f"tensor {name!r} needs bytes [{start}, {start + nbytes}) but the payload has {view.nbytes}; "
                f"the payload is shorter than its entries say",
                field="payload",
                value=nbytes,
                offset=offset + start,
                peer=peer,
            )
        layout.append((name, dtype, shape, start, nbytes))
        position = start + nbytes
    if position != view.nbytes:
        raise ProtocolError(
            f"payload has {view.nbytes} bytes but the tensor metadata accounts for {position}",
            field="payload_len",
            value=view.nbytes,
            offset=offset + position,
            peer=peer,
        )

    if view.readonly and view.nbytes:
        view = memoryview(bytearray(view))
    base = torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else None
    result: dict[str, torch.Tensor] = {}
    for name, dtype, shape, start, nbytes in layout:
        if nbytes == 0 or base is None:
            result[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = base[start : start + nbytes]
        if dtype == torch.bool and bool((raw > 1).any()):
            raise ProtocolError(
                f"bool tensor {name!r} contains bytes other than 0 and 1",
                field=f"{KEY_TENSORS}.{name}",
                value=int(raw.max()),
                offset=offset + start,
                peer=peer,
            )
        result[name] = raw.view(dtype).reshape(shape)
    return result


def _check_entry(
    entry: Any, index: int, names: set[str], limits: Limits, peer: str | None, offset: int
) -> tuple[str, torch.dtype, tuple[int, ...], int]:
    prefix = f"{KEY_TENSORS}[{index}]"

    def fail(message: str, field: str, value: Any, error: type[ProtocolError] = ProtocolError) -> ProtocolError:
        return error(message, field=f"{prefix}.{field}" if field else prefix, value=value, offset=offset, peer=peer)

    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "nbytes"}:
        raise fail("tensor metadata entry must be a map with keys name, dtype, shape, nbytes", "", entry)
    name = entry["name"]
    if not isinstance(name, str) or not name or len(name) > _MAX_NAME_LEN:
        raise fail(f"tensor name must be a non-empty string of at most {_MAX_NAME_LEN} characters", "name", name)
    if name in names:
        raise fail("duplicate tensor name", "name", name)
    names.add(name)
    dtype = DTYPE_BY_TAG.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise fail("unknown dtype tag", "dtype", entry["dtype"])
    shape = entry["shape"]
    if not isinstance(shape, list):
        raise fail("shape must be a list of ints", "shape", shape)
    if len(shape) > limits.max_tensor_dims:
        raise fail(f"shape has more than max_tensor_dims={limits.max_tensor_dims} dimensions", "shape", len(shape), LimitExceeded)
    numel = 1
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise fail("shape dimensions must be non-negative ints", "shape", shape)
        numel *= dim
        # Checked per dimension so a shape like [2**62, 2**62, ...] stops early.
        if numel * dtype.itemsize > limits.max_payload_bytes:
            raise fail(
                f"shape needs more than max_payload_bytes={limits.max_payload_bytes} bytes", "shape", shape, LimitExceeded
            )
    expected = numel * dtype.itemsize
    nbytes = entry["nbytes"]
    if nbytes != expected or not isinstance(nbytes, int) or isinstance(nbytes, bool):
        raise fail(f"tensor {name!r}: nbytes is {nbytes!r}, but shape {shape} of {entry['dtype']} takes {expected} bytes",
                   "nbytes", nbytes)
    return name, dtype, tuple(shape), nbytes


def decode_frame_tensors(frame: Frame, *, limits: Limits | None = None, peer: str | None = None) -> dict[str, torch.Tensor]:
    """Decode the tensors of a protocol.frames.Frame whose header has a "tensors" list."""
    return decode_tensors(frame.header.get(KEY_TENSORS, []), frame.payload, limits=limits, peer=peer, offset=frame.payload_offset)


# -- JSON form for the HTTP API -----------------------------------------------------------------

_JSON_INTS = {"bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"}
_JSON_FLOATS = {
    "float16",
    "bfloat16",
    "float32",
    "float64",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
}
_JSON_COMPLEX = {"complex32", "complex64", "complex128"}


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """Convert a tensor to `{"dtype", "shape", "data"}` with nested lists.

    Complex elements become `[real, imag]` pairs. Floats are exact: float64 holds every value of
    the narrower float types. Sub-byte and bit dtypes have no JSON form and raise ValueError.
    """
    tag = _TAG_BY_DTYPE.get(tensor.dtype)
    tensor = tensor.detach().cpu()
    if tag in _JSON_INTS:
        data = tensor.tolist()
    elif tag in _JSON_FLOATS:
        data = tensor.to(torch.float64).tolist()
    elif tag in _JSON_COMPLEX:
        data = torch.view_as_real(tensor.resolve_conj().to(torch.complex128)).tolist()
    else:
        raise ValueError(f"dtype {tensor.dtype} has no JSON form; send it over the binary codec")
    return {"dtype": tag, "shape": list(tensor.shape), "data": data}


def tensor_from_json(obj: Any, *, limits: Limits | None = None, peer: str | None = None) -> torch.Tensor:
    """Build a tensor from the JSON form of `tensor_to_json`.

    Raises ProtocolError naming the field for an unknown dtype, a bad shape, more elements than
    max_payload_bytes allows, or data whose nesting does not match the shape.
    """
    limits = limits or _DEFAULT_LIMITS
    if not isinstance(obj, dict):
        raise ProtocolError("tensor must be a JSON object with dtype, shape, data", field="tensor", value=type(obj).__name__, peer=peer)
    tag = obj.get("dtype")
    if tag not in _JSON_INTS | _JSON_FLOATS | _JSON_COMPLEX:
        raise ProtocolError(
            "unknown or non-JSON dtype; use one of " + ", ".join(sorted(_JSON_INTS | _JSON_FLOATS | _JSON_COMPLEX)),
            field="dtype",
            value=tag,
            peer=peer,
        )
    dtype = DTYPE_BY_TAG[tag]
    shape = obj.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > limits.max_tensor_dims
        or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape)
    ):
        raise ProtocolError(
            f"shape must be a list of at most {limits.max_tensor_dims} non-negative ints", field="shape", value=shape, peer=peer
        )
    numel = math.prod(shape)
    if numel * dtype.itemsize > limits.max_payload_bytes:
        raise LimitExceeded(
            f"tensor needs more than max_payload_bytes={limits.max_payload_bytes} bytes", field="shape", value=shape, peer=peer
        )
    data = obj.get("data")
    if not isinstance(data, list) and shape:
        raise ProtocolError("data must be a nested list matching shape", field="data", value=type(data).__name__, peer=peer)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    try:
        if tag in _JSON_COMPLEX:
            tensor = torch.view_as_complex(torch.tensor(data, dtype=torch.float64)).to(dtype)
        elif tag in _JSON_FLOATS:
            tensor = torch.tensor(data, dtype=torch.float64).to(dtype)
        else:
            tensor = torch.tensor(data, dtype=dtype)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ProtocolError(f"data does not form a {tag} tensor: {exc}", field="data", value=None, peer=peer) from exc
    if list(tensor.shape) != shape:
        raise ProtocolError(f"data has shape {list(tensor.shape)}, expected {shape}", field="data", value=list(tensor.shape), peer=peer)
    return tensor
