"""Tensor codec: every dtype and layout bit-exact, zero-copy where promised, hostile metadata rejected."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from protocol.errors import LimitExceeded, ProtocolError
from protocol.frames import FrameDecoder, encode_frame
from protocol.limits import Limits, MiB
from protocol.messages import KEY_TENSORS, MsgType
from protocol.tensors import (
    ALIGNMENT,
    DTYPE_BY_TAG,
    decode_frame_tensors,
    decode_tensors,
    encode_tensors,
    tensor_from_json,
    tensor_to_json,
)

warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")

QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor's elements in logical order, for bit-exact comparison."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor.resolve_conj()) if tensor.dtype != torch.complex32 else tensor
    same_size = _INT_OF_SIZE.get(tensor.element_size())
    if same_size is not None:
        tensor = tensor.view(same_size)
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    numel = int(np.prod(shape)) if shape else 1
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.uint8).view(torch.bool)
    raw = torch.randint(0, 256, (numel * dtype.itemsize,), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


LAYOUTS = {
    "contiguous": lambda dt: _random((3, 5), dt),
    "transposed": lambda dt: _random((4, 6), dt).t(),
    "strided_slice": lambda dt: _random((6, 8), dt)[::2, 1::3],
    "expanded": lambda dt: _random((3, 1), dt).expand(3, 4),
    "zero_dim": lambda dt: _random((), dt),
    "empty": lambda dt: _random((0, 7), dt),
    "offset_view": lambda dt: _random((10,), dt)[3:8],
}


def _roundtrip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    meta, buffers = encode_tensors(tensors)
    decoder = FrameDecoder()
    decoder.feed(b"".join(bytes(piece) for piece in encode_frame(MsgType.ACTIVATION, {KEY_TENSORS: meta}, buffers)))
    return decode_frame_tensors(decoder.next_frame(), peer="test")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tag", sorted(DTYPE_BY_TAG))
def test_tensors_roundtrip_matrix(tag: str, layout: str) -> None:
    original = LAYOUTS[layout](DTYPE_BY_TAG[tag])
    decoded = _roundtrip({"x": original})["x"]
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    assert torch.equal(_bits(decoded), _bits(original))


def test_tensors_cover_every_torch_dtype() -> None:
    all_dtypes = {str(value).removeprefix("torch.") for value in vars(torch).values() if isinstance(value, torch.dtype)}
    assert all_dtypes - QUANTIZED - set(DTYPE_BY_TAG) == set()


def test_tensors_bfloat16_two_bytes_per_element() -> None:
    meta, buffers = encode_tensors({"h": torch.randn(1000).to(torch.bfloat16)})
    assert meta[0]["nbytes"] == 2000
    assert sum(view.nbytes for view in buffers) == 2000


def test_tensors_many_aligned_and_named() -> None:
    tensors = {
        "ids": torch.arange(7, dtype=torch.int64),
        "mask": torch.ones(3, dtype=torch.bool),
        "hidden": torch.randn(2, 3, dtype=torch.float16),
        "z": torch.randn(5, dtype=torch.complex128),
    }
    meta, buffers = encode_tensors(tensors)
    decoded = _roundtrip(tensors)
    assert list(decoded) == list(tensors)
    for name in tensors:
        assert torch.equal(_bits(decoded[name]), _bits(tensors[name]))
        assert decoded[name].data_ptr() % 16 == 0
    assert [entry["name"] for entry in meta] == list(tensors)


def test_tensors_zero_copy_send_for_contiguous() -> None:
    tensor = torch.randn(1024, 1024)
    _, buffers = encode_tensors({"x": tensor})
    assert len(buffers) == 1
    assert np.frombuffer(buffers[0], dtype=np.uint8).ctypes.data == tensor.data_ptr()


def test_tensors_decode_aliases_receive_buffer() -> None:
    payload = bytearray(torch.arange(16, dtype=torch.float32).numpy().tobytes())
    meta = [{"name": "x", "dtype": "float32", "shape": [4, 4], "nbytes": 64}]
    decoded = decode_tensors(meta, memoryview(payload))["x"]
    payload[0:4] = np.float32(99.0).tobytes()
    assert decoded[0, 0].item() == 99.0


def test_tensors_large_roundtrip() -> None:
    tensor = torch.randn(4, 1024, 1024)  # 16 MiB
    decoded = _roundtrip({"big": tensor})["big"]
    assert torch.equal(decoded, tensor)


def test_tensors_quantized_rejected_on_encode() -> None:
    quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="does not carry"):
        encode_tensors({"q": quantized})


def _entry(**change: object) -> dict:
    entry = {"name": "x", "dtype": "float32", "shape": [2, 2], "nbytes": 16}
    entry.update(change)
    return entry


@pytest.mark.parametrize(
    ("meta", "payload_len", "field", "error"),
    [
        ([_entry(dtype="float99")], 16, "tensors[0].dtype", ProtocolError),
        ([_entry(dtype=7)], 16, "tensors[0].dtype", ProtocolError),
        ([_entry(shape=[-1, 2])], 16, "tensors[0].shape", ProtocolError),
        ([_entry(shape=[2**40, 2**40])], 16, "tensors[0].shape", LimitExceeded),
        ([_entry(shape=[1] * 17)], 16, "tensors[0].shape", LimitExceeded),
        ([_entry(shape="2x2")], 16, "tensors[0].shape", ProtocolError),
        ([_entry(nbytes=15)], 16, "tensors[0].nbytes", ProtocolError),
        ([_entry()], 12, "payload", ProtocolError),
        ([_entry()], 20, "payload_len", ProtocolError),
        ([_entry(), _entry()], 80, "tensors[1].name", ProtocolError),
        ([{"name": "x"}], 16, "tensors[0]", ProtocolError),
        ({"x": 1}, 16, "tensors", ProtocolError),
        ([_entry(name=f"t{i}", shape=[0], nbytes=0) for i in range(300)], 0, "tensors", LimitExceeded),
    ],
    ids=[
        "unknown_dtype",
        "dtype_not_str",
        "negative_dim",
        "huge_dims",
        "too_many_dims",
        "shape_not_list",
        "nbytes_mismatch",
        "payload_short",
        "payload_trailing",
        "duplicate_name",
        "missing_keys",
        "meta_not_list",
        "too_many_tensors",
    ],
)
def test_tensors_invalid_metadata(meta: object, payload_len: int, field: str, error: type[ProtocolError]) -> None:
    with pytest.raises(error) as info:
        decode_tensors(meta, bytearray(payload_len), limits=Limits(), peer="10.1.1.1:9", offset=1000)
    assert info.value.field == field
    assert info.value.peer == "10.1.1.1:9"
    assert info.value.offset is not None and info.value.offset >= 1000
    assert "peer=10.1.1.1:9" in str(info.value)


def test_tensors_invalid_bool_bytes() -> None:
    meta = [{"name": "m", "dtype": "bool", "shape": [4], "nbytes": 4}]
    with pytest.raises(ProtocolError) as info:
        decode_tensors(meta, bytearray(b"\x00\x01\x02\x01"), peer="p")
    assert info.value.field == "tensors.m"


def test_tensors_payload_limit_from_limits() -> None:
    meta = [{"name": "x", "dtype": "float32", "shape": [1024, 1024], "nbytes": 4 * MiB}]
    with pytest.raises(LimitExceeded):
        decode_tensors(meta, bytearray(16), limits=Limits(max_payload_bytes=1 * MiB))


def test_tensors_alignment_constant() -> None:
    meta, buffers = encode_tensors({"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(2, dtype=torch.float64)})
    assert [view.nbytes for view in buffers] == [3, ALIGNMENT - 3, 16]
    assert meta[1]["nbytes"] == 16


JSON_CASES = [
    torch.tensor([[1.5, -2.0], [float("inf"), 0.0]]),
    torch.tensor([1.0, 2.5], dtype=torch.bfloat16),
    torch.tensor([0.5], dtype=torch.float8_e4m3fn),
    torch.tensor([True, False]),
    torch.tensor([2**64 - 1], dtype=torch.uint64),
    torch.tensor([-3, 4], dtype=torch.int8),
    torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
    torch.tensor(7, dtype=torch.int32),
    torch.empty(0, 3),
]


@pytest.mark.parametrize("tensor", JSON_CASES, ids=[str(case.dtype) + str(list(case.shape)) for case in JSON_CASES])
def test_tensors_json_roundtrip(tensor: torch.Tensor) -> None:
    obj = tensor_to_json(tensor)
    decoded = tensor_from_json(obj)
    assert decoded.dtype == tensor.dtype
    assert decoded.shape == tensor.shape
    assert torch.equal(_bits(decoded), _bits(tensor))


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"dtype": "float33", "shape": [1], "data": [1]}, "dtype"),
        ({"dtype": "bits8", "shape": [1], "data": [1]}, "dtype"),
        ({"dtype": "float32", "shape": [-1], "data": [1]}, "shape"),
        ({"dtype": "float32", "shape": [2], "data": [1, 2, 3]}, "data"),
        ({"dtype": "float32", "shape": [2, 2], "data": [[1, 2], [3]]}, "data"),
        ({"dtype": "float32", "shape": [2**31, 2**31], "data": []}, "shape"),
        ([1, 2], "tensor"),
    ],
    ids=["unknown_dtype", "no_json_form", "negative_dim", "wrong_length", "ragged", "too_large", "not_object"],
)
def test_tensors_json_invalid(obj: object, field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        tensor_from_json(obj)
    assert info.value.field == field
