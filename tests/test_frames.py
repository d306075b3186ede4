"""Frame encoder/decoder, HELLO negotiation and data-plane header checks, all without sockets."""

from __future__ import annotations

import struct
import sys

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import HandshakeError, LimitExceeded, ProtocolError
from protocol.frames import MAGIC, PREFIX, Frame, FrameDecoder, encode_frame
from protocol.handshake import ClientHandshake, ServerHandshake, choose_version
from protocol.limits import KiB, Limits, MiB
from protocol.messages import KEY_EPOCH, KEY_RID, DataHeader, MsgType, is_data_plane


def _join(pieces: list[bytes | memoryview]) -> bytes:
    return b"".join(bytes(piece) for piece in pieces)


def _frame_bytes(msg_type: MsgType, header: dict, payload: bytes = b"", limits: Limits = Limits()) -> bytes:
    return _join(encode_frame(msg_type, header, [payload] if payload else [], limits=limits))


def _raw_frame(magic=MAGIC, version=1, flags=0, msg_type=int(MsgType.PING), header=b"\x80", payload=b"", header_len=None, payload_len=None) -> bytes:
    prefix = PREFIX.pack(
        magic,
        version,
        flags,
        msg_type,
        len(header) if header_len is None else header_len,
        len(payload) if payload_len is None else payload_len,
    )
    return prefix + header + payload


def _drain(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


SAMPLE = [
    (MsgType.PING, {"n": 1}, b""),
    (MsgType.ACTIVATION, {"rid": "r1", "tensors": []}, bytes(range(256)) * 300),
    (MsgType.HEARTBEAT, {"incarnation": 7, "bin": b"\x00\x01"}, b"xyz"),
]


def test_frame_roundtrip_in_one_feed() -> None:
    data = b"".join(_frame_bytes(*item) for item in SAMPLE)
    decoder = FrameDecoder()
    decoder.feed(data)
    frames = _drain(decoder)
    assert [(f.msg_type, f.header, bytes(f.payload)) for f in frames] == SAMPLE
    assert decoder.bytes_received == len(data)


def test_frame_byte_at_a_time() -> None:
    data = b"".join(_frame_bytes(*item) for item in SAMPLE)
    decoder = FrameDecoder()
    frames = []
    for index in range(len(data)):
        decoder.feed(data[index : index + 1])
        frames.extend(_drain(decoder))
    assert [(f.msg_type, f.header, bytes(f.payload)) for f in frames] == SAMPLE


def test_frame_trailing_data_kept_for_next_frame() -> None:
    first = _frame_bytes(MsgType.PING, {"n": 1})
    second = _frame_bytes(MsgType.PONG, {"n": 2})
    decoder = FrameDecoder()
    decoder.feed(first + second[:7])
    assert decoder.next_frame().header == {"n": 1}
    assert decoder.next_frame() is None
    decoder.feed(second[7:])
    frame = decoder.next_frame()
    assert frame.msg_type == MsgType.PONG
    assert frame.offset == len(first)
    decoder.eof()


@pytest.mark.parametrize("cut", [1, PREFIX.size - 1, PREFIX.size, PREFIX.size + 3, -1])
def test_frame_truncated_raises_on_eof(cut: int) -> None:
    data = _frame_bytes(MsgType.ACTIVATION, {"k": "v" * 10}, b"p" * 100)
    decoder = FrameDecoder(peer="10.0.0.9:4000")
    decoder.feed(data[:cut])
    assert decoder.next_frame() is None
    with pytest.raises(ProtocolError) as info:
        decoder.eof()
    assert info.value.field in {"prefix", "header", "payload"}
    assert info.value.offset == len(data[:cut])
    assert "10.0.0.9:4000" in str(info.value)


@pytest.mark.parametrize(
    ("raw", "field", "offset"),
    [
        (_raw_frame(magic=b"HTTP"), "magic", 0),
        (_raw_frame(version=9), "version", 4),
        (_raw_frame(flags=1), "flags", 5),
        (_raw_frame(msg_type=999), "msg_type", 6),
        (_raw_frame(header=b"", header_len=0), "header_len", 8),
        (_raw_frame(header_len=2**31), "header_len", 8),
        (_raw_frame(payload_len=70 * KiB), "payload_len", 12),
        (_raw_frame(msg_type=int(MsgType.ACTIVATION), payload_len=2**40), "payload_len", 12),
        (_raw_frame(header=b"\x91\x01"), "header", PREFIX.size),
        (_raw_frame(header=b"\xc1"), "header", PREFIX.size),
        (_raw_frame(header=b"\x81\x01\x02"), "header", PREFIX.size),
        (_raw_frame(header=b"\x80\x80"), "header", PREFIX.size),
        (_raw_frame(header=b"\xdd\xff\xff\xff\xff"), "header", PREFIX.size),
        (_raw_frame(header=b"\xc6\xff\xff\xff\xff"), "header", PREFIX.size),
        (_raw_frame(header=b"\xd6\xff\x00\x00\x00\x00"), "header", PREFIX.size),
    ],
    ids=[
        "magic",
        "version",
        "flags",
        "msg_type",
        "empty_header",
        "huge_header",
        "control_too_big",
        "payload_too_big",
        "header_not_map",
        "header_invalid_byte",
        "header_int_key",
        "header_extra_data",
        "header_array_bomb",
        "header_bin_bomb",
        "header_ext",
    ],
)
def test_frame_malformed_names_field_and_offset(raw: bytes, field: str, offset: int) -> None:
    leading = _frame_bytes(MsgType.PING, {})
    decoder = FrameDecoder(peer="peer-a")
    with pytest.raises(ProtocolError) as info:
        decoder.feed(leading + raw)
    assert info.value.field == field
    assert info.value.offset == len(leading) + offset
    assert info.value.peer == "peer-a"
    # The valid frame before the bad one is still delivered, then the error repeats.
    assert decoder.next_frame().msg_type == MsgType.PING
    with pytest.raises(ProtocolError):
        decoder.next_frame()
    with pytest.raises(ProtocolError):
        decoder.feed(b"more")


def test_frame_limits_checked_before_allocation() -> None:
    decoder = FrameDecoder(Limits(max_payload_bytes=1 * MiB))
    with pytest.raises(LimitExceeded):
        decoder.feed(_raw_frame(msg_type=int(MsgType.ACTIVATION), payload_len=2 * MiB)[: PREFIX.size])
    assert decoder.buffered_bytes < 1 * MiB


def test_frame_encode_rejects_oversize_control_frame() -> None:
    with pytest.raises(LimitExceeded) as info:
        encode_frame(MsgType.HEARTBEAT, {}, [bytes(64 * KiB)])
    assert info.value.peer == "local"


def test_frame_encode_passes_buffers_without_copy() -> None:
    payload = bytearray(b"abc" * 1000)
    pieces = encode_frame(MsgType.ACTIVATION, {}, [payload])
    assert isinstance(pieces[1], memoryview)
    assert pieces[1].obj is payload


def test_frame_decoder_version_pinned_after_handshake() -> None:
    decoder = FrameDecoder(versions=(1, 2))
    decoder.set_version(2)
    with pytest.raises(ProtocolError) as info:
        decoder.feed(_frame_bytes(MsgType.PING, {}))
    assert info.value.field == "version"


def _feed_via_buffers(decoder: FrameDecoder, data: bytes, chunk: int) -> list[memoryview]:
    """Feed like asyncio.BufferedProtocol: write into get_buffer(), report with buffer_updated()."""
    handed = []
    position = 0
    while position < len(data):
        buffer = decoder.get_buffer(-1)
        handed.append(buffer)
        take = min(len(buffer), chunk, len(data) - position)
        buffer[:take] = data[position : position + take]
        decoder.buffer_updated(take)
        position += take
    return handed


def test_frame_buffered_path_writes_into_payload() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    data = _frame_bytes(MsgType.ACTIVATION, {"x": 1}, payload) + _frame_bytes(MsgType.PING, {})
    decoder = FrameDecoder()
    handed = _feed_via_buffers(decoder, data, chunk=100_000)
    frame = decoder.next_frame()
    assert bytes(frame.payload) == payload
    assert decoder.next_frame().msg_type == MsgType.PING
    # Most of the payload was written by the "transport" straight into the frame's buffer.
    direct = [view for view in handed if view.obj is frame.payload.obj]
    assert len(direct) >= 8


def test_frame_pool_reuses_buffer_once_unreferenced() -> None:
    data = _frame_bytes(MsgType.ACTIVATION, {}, b"a" * (256 * KiB))
    decoder = FrameDecoder()
    decoder.feed(data)
    first = decoder.next_frame()
    first_buffer_id = id(first.payload.obj)
    alias = first.payload[10:20]
    del first
    decoder.feed(data)
    second = decoder.next_frame()
    assert id(second.payload.obj) != first_buffer_id  # `alias` still pins the first buffer
    assert bytes(alias) == b"a" * 10
    del alias, second
    decoder.feed(data)
    third = decoder.next_frame()
    assert id(third.payload.obj) == first_buffer_id
    assert sys.getrefcount(third.payload.obj) > 2


# -- fuzzing ------------------------------------------------------------------------------------

FUZZ_LIMITS = Limits(max_payload_bytes=256 * KiB, max_header_bytes=4 * KiB)
# Everything the decoder may hold at once under FUZZ_LIMITS: the frame in progress, the scratch
# buffer, and decoded frames whose total is bounded by the input size.
FUZZ_MEMORY_BOUND = FUZZ_LIMITS.max_payload_bytes + FUZZ_LIMITS.max_header_bytes + 512 * KiB

VALID_STREAM = b"".join(_frame_bytes(*item, limits=Limits()) for item in SAMPLE[:1] + SAMPLE[2:]) + _frame_bytes(
    MsgType.ACTIVATION, {"rid": "r", "tensors": [{"name": "x", "dtype": "float32", "shape": [4], "nbytes": 16}]}, b"\x01" * 16
)


def _run_decoder(data: bytes, chunks: list[int]) -> None:
    decoder = FrameDecoder(FUZZ_LIMITS, peer="fuzz")
    position = 0
    index = 0
    try:
        while position < len(data):
            size = chunks[index % len(chunks)] if chunks else len(data)
            index += 1
            decoder.feed(data[position : position + size])
            position += size
            assert decoder.buffered_bytes <= FUZZ_MEMORY_BOUND + len(data)
            for frame in _drain(decoder):
                assert isinstance(frame, Frame)
                assert isinstance(frame.header, dict)
        decoder.eof()
    except ProtocolError as error:
        assert error.peer == "fuzz"
        assert error.field is not None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), chunks=st.lists(st.integers(1, 64), max_size=8))
def test_frame_fuzz_random_bytes(data: bytes, chunks: list[int]) -> None:
    _run_decoder(data, chunks)
    _run_decoder(MAGIC + b"\x01" + data, chunks)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID_STREAM) - 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, len(VALID_STREAM)),
    chunks=st.lists(st.integers(1, 32), max_size=4),
)
def test_frame_fuzz_mutated_frames(edits: list[tuple[int, int]], cut: int, chunks: list[int]) -> None:
    data = bytearray(VALID_STREAM)
    for position, value in edits:
        data[position] = value
    _run_decoder(bytes(data[:cut]) + bytes(data[cut:]), chunks)
    _run_decoder(bytes(data[:cut]), chunks)


# -- HELLO negotiation --------------------------------------------------------------------------


def _decode_one(pieces: list[bytes | memoryview]) -> Frame:
    decoder = FrameDecoder()
    decoder.feed(_join(pieces))
    return decoder.next_frame()


def test_handshake_agrees_on_highest_common_version() -> None:
    client = ClientHandshake("control", versions=(1, 2, 3))
    server = ServerHandshake(versions=(1, 2))
    reply = server.receive(_decode_one(client.hello_frame()))
    assert server.version == 2
    assert server.plane == "control"
    assert client.receive(_decode_one(reply)) == 2


def test_handshake_version_mismatch_is_clear() -> None:
    client = ClientHandshake("data", versions=(3,))
    server = ServerHandshake(versions=(1, 2))
    with pytest.raises(HandshakeError) as info:
        server.receive(_decode_one(client.hello_frame()))
    assert info.value.field == "versions"
    assert "no common protocol version" in str(info.value)
    error_frame = _decode_one(server.error_frame(info.value))
    with pytest.raises(HandshakeError) as client_info:
        client.receive(error_frame)
    assert "no common protocol version" in str(client_info.value)


def test_handshake_rejects_unknown_plane() -> None:
    server = ServerHandshake(planes=("control",))
    with pytest.raises(HandshakeError) as info:
        server.receive(_decode_one(ClientHandshake("data").hello_frame()))
    assert info.value.field == "plane"


def test_handshake_rejects_downgraded_reply() -> None:
    client = ClientHandshake("data", versions=(1, 2))
    reply = encode_frame(MsgType.HELLO, {"versions": [1, 2], "plane": "data", "version": 1}, version=1)
    with pytest.raises(HandshakeError) as info:
        client.receive(_decode_one(reply))
    assert info.value.field == "version"


def test_handshake_choose_version_picks_max() -> None:
    assert choose_version((1, 2, 5), (2, 5, 7)) == 5


# -- message table and data-plane header --------------------------------------------------------


def test_messages_values_unique_and_planes() -> None:
    values = [member.value for member in MsgType]
    assert len(values) == len(set(values))
    assert is_data_plane(MsgType.ACTIVATION)
    assert not is_data_plane(MsgType.HEARTBEAT)
    assert not is_data_plane(MsgType.ELECTION)


def test_data_header_roundtrip_through_frame() -> None:
    routing = DataHeader(epoch=3, plan=12, rid="req-1", hop=2, ttl_ms=1500)
    frame = _decode_one(encode_frame(MsgType.ACTIVATION, routing.to_header(extra="x")))
    assert DataHeader.from_header(frame.header) == routing
    assert frame.header["extra"] == "x"


@pytest.mark.parametrize(
    ("change", "field"),
    [({KEY_EPOCH: -1}, KEY_EPOCH), ({KEY_EPOCH: "3"}, KEY_EPOCH), ({KEY_RID: ""}, KEY_RID), ({"hop": True}, "hop")],
)
def test_data_header_invalid_field(change: dict, field: str) -> None:
    header = DataHeader(epoch=1, plan=1, rid="r", hop=0, ttl_ms=10).to_header()
    header.update(change)
    with pytest.raises(ProtocolError) as info:
        DataHeader.from_header(header, peer="p")
    assert info.value.field == field


def test_frame_header_msgpack_bin_limit() -> None:
    header = msgpack.packb({"blob": b"x" * (17 * KiB)}, use_bin_type=True)
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError) as info:
        decoder.feed(_raw_frame(msg_type=int(MsgType.ACTIVATION), header=header))
    assert info.value.field == "header"


def test_frame_prefix_layout() -> None:
    data = _frame_bytes(MsgType.PONG, {"a": 1}, b"zz")
    magic, version, flags, msg_type, header_len, payload_len = struct.unpack_from("<4sBBHIQ", data)
    assert (magic, version, flags, msg_type, payload_len) == (b"SHMF", 1, 0, int(MsgType.PONG), 2)
    assert header_len == len(msgpack.packb({"a": 1}))
