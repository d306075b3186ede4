"""Transport benchmark: shardmesh FrameConnection against a raw asyncio socket, two processes.

For each payload size it measures, in the same run:
  raw          the ceiling: a 4-byte length prefix and nothing else. The receiver is an
               asyncio.BufferedProtocol that reads prefixes and payloads into one preallocated
               buffer it reuses for every message. The sender writes the prefix and a memoryview
               of the payload as two writes, with the same write-buffer limits as FrameConnection.
  raw-streams  a second reference, not the ceiling: the same sender, but the receiver uses
               StreamReader.readexactly, which allocates a fresh bytes object per message.
  plain        FrameConnection without TLS (tensor codec, msgpack header, BufferedProtocol receive)
  tls          FrameConnection with mutual TLS 1.3
Throughput: a stream of messages, then one acknowledged message to close the measurement.
Latency: one message at a time, each acknowledged by a 4-byte (raw) or small-frame reply.
Every measurement is bounded by a message count and a time budget. The server runs in a child
process that is stopped by its pid at the end. The last line is a JSON summary with the
ratios plain/raw, tls/raw and raw-streams/raw per size.

With --receive-cpu it measures instead, in one process and without sockets, the CPU time each
receiver needs per message when fed 256 KiB reads: the raw receiver against FrameDecoder plus
decode_frame_tensors. That separates the framing cost from the kernel's socket copies.

Usage: .venv/bin/python bench/transport.py [--seconds 0.5] [--repeats 5] [--loop uvloop]
       .venv/bin/python bench/transport.py --receive-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import torch

from protocol.frames import FrameDecoder, encode_frame
from protocol.limits import Limits, MiB
from protocol.messages import KEY_TENSORS, MsgType
from protocol.stream import WRITE_HIGH_WATER, FrameConnection, open_connection, start_server
from protocol.tensors import decode_frame_tensors, encode_tensors
from protocol.tls import init_cluster, issue_node, load_credentials

HOST = "127.0.0.1"
SIZES = (64, 64 * 1024, 1 * MiB, 16 * MiB)
ACK_FLAG = 0x8000_0000
LENGTH = struct.Struct("<I")
MAX_MESSAGES = 50_000
LATENCY_MAX_SAMPLES = 500
MODES = ("raw", "raw-streams", "plain", "tls")
ACK = LENGTH.pack(0)
# Room after the largest message, so a read that runs past the end of one message rarely forces
# a move of the next message's first bytes to the front of the raw receiver's buffer.
RAW_SLACK_BYTES = 256 * 1024
RECEIVE_CPU_READ_BYTES = 256 * 1024


def _install_loop(name: str) -> str:
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            return "asyncio"
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        return "uvloop"
    return "asyncio"


# -- server process -----------------------------------------------------------------------------


class RawReceiver(asyncio.BufferedProtocol):
    """Receiver of the raw ceiling: length-prefixed messages read into one reused buffer.

    The buffer has room for the largest message plus `RAW_SLACK_BYTES`. `get_buffer` hands the transport
    everything after the received bytes, so a large payload is read straight into place, and
    several small messages arrive in one read. When the message being received no longer fits
    between its start and the end of the buffer, its received bytes move to the front. That
    copy is shorter than one message, and at most `RAW_SLACK_BYTES` after a message that filled
    the buffer.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes
        self._buffer = bytearray(LENGTH.size + max_message_bytes + RAW_SLACK_BYTES)
        self._view = memoryview(self._buffer)
        self._start = 0  # offset of the first byte of the message being received
        self._end = 0  # offset just past the last received byte
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        assert self._transport is not None
        start = self._start
        end = self._end + nbytes
        needed = LENGTH.size
        while end - start >= LENGTH.size:
            (word,) = LENGTH.unpack_from(self._buffer, start)
            size = word & ~ACK_FLAG
            if size > self._max_message_bytes:
                print(f"raw receiver: message length {size} exceeds the maximum {self._max_message_bytes} bytes; closing the connection", file=sys.stderr)
                self._transport.close()
                return
            needed = LENGTH.size + size
            if end - start < needed:
                break
            start += needed
            needed = LENGTH.size
            if word & ACK_FLAG:
                self._transport.write(ACK)
        if start == end:
            start = end = 0
        elif len(self._buffer) - start < needed:
            self._view[: end - start] = self._view[start:end]
            end -= start
            start = 0
        self._start, self._end = start, end


async def _raw_streams_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # `readexactly` allocates a fresh bytes object per message, whose pages fault on first touch.
    try:
        while True:
            (word,) = LENGTH.unpack(await reader.readexactly(4))
            size = word & ~ACK_FLAG
            if size:
                await reader.readexactly(size)
            if word & ACK_FLAG:
                writer.write(ACK)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def _frame_handler(connection: FrameConnection) -> None:
    while True:
        frame = await connection.recv()
        if frame.msg_type == MsgType.ACTIVATION:
            decode_frame_tensors(frame)
        if frame.header.get("ack"):
            await connection.send(MsgType.HOP_ACK, {})
        del frame


async def _serve(data_dir: Path) -> None:
    max_message_bytes = max(SIZES)
    raw = await asyncio.get_running_loop().create_server(lambda: RawReceiver(max_message_bytes), HOST, 0)
    raw_streams = await asyncio.start_server(_raw_streams_handler, HOST, 0)
    plain = await start_server(HOST, 0, creds=None, handler=_frame_handler)
    tls = await start_server(HOST, 0, creds=load_credentials(data_dir / "server"), handler=_frame_handler)
    ports = {
        "raw": raw.sockets[0].getsockname()[1],
        "raw-streams": raw_streams.sockets[0].getsockname()[1],
        "plain": plain.port,
        "tls": tls.port,
    }
    print(json.dumps(ports), flush=True)
    # Serve until the parent closes our stdin or stops us.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- client -------------------------------------------------------------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        # The same limits as FrameConnection, so both senders wait for drain at the same points.
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_HIGH_WATER // 4)

    async def send(self, payload: memoryview, ack: bool) -> None:
        self.writer.write(LENGTH.pack(len(payload) | (ACK_FLAG if ack else 0)))
        self.writer.write(payload)
        await self.writer.drain()
        if ack:
            await self.reader.readexactly(4)

    def close(self) -> None:
        self.writer.close()


class FrameClient:
    def __init__(self, connection: FrameConnection) -> None:
        self.connection = connection

    async def send(self, tensor: torch.Tensor, ack: bool) -> None:
        await self.connection.send_tensors(MsgType.ACTIVATION, {"ack": ack}, {"x": tensor})
        if ack:
            await self.connection.recv()

    def close(self) -> None:
        self.connection.close()


async def _measure(send: Callable[[bool], Awaitable[None]], size: int, seconds: float) -> tuple[float, float]:
    """Return (throughput in MiB/s, median round-trip latency in microseconds)."""
    count = max(8, min(MAX_MESSAGES, (512 * MiB) // size))
    await send(True)  # warm-up
    started = time.perf_counter()
    deadline = started + seconds
    sent = 0
    while sent < count - 1 and time.perf_counter() < deadline:
        await send(False)
        sent += 1
    await send(True)
    sent += 1
    elapsed = time.perf_counter() - started
    throughput = sent * size / elapsed / MiB

    samples = []
    deadline = time.perf_counter() + seconds / 2
    while len(samples) < LATENCY_MAX_SAMPLES and (len(samples) < 5 or time.perf_counter() < deadline):
        begin = time.perf_counter()
        await send(True)
        samples.append((time.perf_counter() - begin) * 1e6)
    return throughput, statistics.median(samples)


def _sender(client: RawClient | FrameClient, tensor: torch.Tensor) -> Callable[[bool], Awaitable[None]]:
    if isinstance(client, RawClient):
        view = memoryview(tensor.numpy())

        async def send_raw(ack: bool) -> None:
            await client.send(view, ack)

        return send_raw

    async def send_frame(ack: bool) -> None:
        await client.send(tensor, ack)

    return send_frame


async def _client(ports: dict[str, int], data_dir: Path, seconds: float, repeats: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """Measure every mode for each size in turn, round after round, over connections kept open.

    Modes of one size run back to back, in an order that rotates each round, so a burst of load
    from other processes on the shared machine falls on one mode no more often than on another.
    """
    creds = load_credentials(data_dir / "client")
    clients: dict[str, RawClient | FrameClient] = {}
    for mode in MODES:
        if mode.startswith("raw"):
            clients[mode] = RawClient(*await asyncio.open_connection(HOST, ports[mode]))
        else:
            clients[mode] = FrameClient(await open_connection(HOST, ports[mode], creds=creds if mode == "tls" else None))
    tensors = {size: torch.randint(0, 256, (size,), dtype=torch.uint8) for size in SIZES}
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for round_index in range(repeats):
            shift = round_index % len(MODES)
            order = MODES[shift:] + MODES[:shift]
            for size in SIZES:
                for mode in order:
                    send = _sender(clients[mode], tensors[size])
                    results.setdefault((mode, size), []).append(await _measure(send, size, seconds))
    finally:
        for client in clients.values():
            client.close()
    return results


class _DiscardTransport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


def _pump(get_buffer: Callable[[int], memoryview], buffer_updated: Callable[[int], None], data: bytes, after: Callable[[], None]) -> None:
    view = memoryview(data)
    position = 0
    while position < len(data):
        buffer = get_buffer(-1)
        count = min(len(buffer), RECEIVE_CPU_READ_BYTES, len(data) - position)
        buffer[:count] = view[position : position + count]
        position += count
        buffer_updated(count)
        after()


def _receive_cpu() -> dict[str, dict[str, float]]:
    """Print and return the median milliseconds per message of each receiver, sizes of 1 MiB up."""
    results: dict[str, dict[str, float]] = {"raw": {}, "plain": {}}
    print(f"receive CPU per message, {RECEIVE_CPU_READ_BYTES // 1024} KiB reads, one process (median of 5 x 10)")
    print(f"{'size':>7} {'raw ms':>8} {'plain ms':>9} {'plain-raw':>10}")
    for size in (s for s in SIZES if s >= MiB):
        tensor = torch.randint(0, 256, (size,), dtype=torch.uint8)
        meta, buffers = encode_tensors({"x": tensor})
        pieces = encode_frame(MsgType.ACTIVATION, {"ack": False, KEY_TENSORS: meta}, buffers, limits=Limits())
        frame_bytes = b"".join(bytes(piece) for piece in pieces)
        raw_bytes = LENGTH.pack(size) + tensor.numpy().tobytes()
        receiver = RawReceiver(size)
        receiver.connection_made(_DiscardTransport())  # type: ignore[arg-type]
        decoder = FrameDecoder(Limits())

        def take_frames() -> None:
            while (frame := decoder.next_frame()) is not None:
                decode_frame_tensors(frame)

        runs = {
            "raw": lambda: _pump(receiver.get_buffer, receiver.buffer_updated, raw_bytes, lambda: None),
            "plain": lambda: _pump(decoder.get_buffer, decoder.buffer_updated, frame_bytes, take_frames),
        }
        for mode, run in runs.items():
            run()  # warm-up: faults in the reused buffers
            samples = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(10):
                    run()
                samples.append((time.perf_counter() - started) / 10 * 1e3)
            results[mode][_label(size)] = round(statistics.median(samples), 3)
        raw_ms, plain_ms = results["raw"][_label(size)], results["plain"][_label(size)]
        print(f"{_label(size):>7} {raw_ms:8.2f} {plain_ms:9.2f} {plain_ms - raw_ms:10.2f}")
    return results


def _label(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB}MiB"
    if size >= 1024:
        return f"{size // 1024}KiB"
    return f"{size}B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time budget per throughput measurement, seconds")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all modes and sizes; medians are reported")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop for both processes")
    parser.add_argument("--receive-cpu", action="store_true", help="measure receive CPU per message in one process, no sockets")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    loop_name = _install_loop(args.loop)
    torch.set_num_threads(1)

    if args.serve:
        asyncio.run(_serve(args.data_dir))
        return 0
    if args.receive_cpu:
        milliseconds = _receive_cpu()
        print(json.dumps({"bench": "transport-receive-cpu", "ms_per_message": milliseconds}))
        return 0

    data_dir = Path(tempfile.mkdtemp(prefix="shardmesh-bench-"))
    server = None
    try:
        init_cluster(data_dir / "server", node_id="server", cluster_id="bench")
        issue_node(data_dir / "server", data_dir / "client", "client")
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--data-dir", str(data_dir), "--loop", loop_name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        results = asyncio.run(_client(ports, data_dir, args.seconds, args.repeats))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)

    print(f"loop={loop_name} repeats={args.repeats}; medians, and the range of the per-round ratio to raw")
    print(f"{'size':>7} {'mode':>11} {'MiB/s':>9} {'latency us':>11} {'ratio':>6} {'range':>11}")
    ratios: dict[str, dict[str, float]] = {mode: {} for mode in MODES if mode != "raw"}
    ratio_ranges: dict[str, dict[str, list[float]]] = {mode: {} for mode in MODES if mode != "raw"}
    throughputs: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    for size in SIZES:
        raw_rounds = [t for t, _ in results[("raw", size)]]
        for mode in MODES:
            rounds = [t for t, _ in results[(mode, size)]]
            throughput = statistics.median(rounds)
            latency = statistics.median(l for _, l in results[(mode, size)])
            # Each round's ratio pairs two measurements taken seconds apart, which reduces the effect of
            # slow changes in the load from other processes.
            paired = [mine / raw for mine, raw in zip(rounds, raw_rounds)]
            ratio = statistics.median(paired)
            throughputs[mode][_label(size)] = round(throughput, 1)
            if mode != "raw":
                ratios[mode][_label(size)] = round(ratio, 3)
                ratio_ranges[mode][_label(size)] = [round(min(paired), 3), round(max(paired), 3)]
            spread = f"{min(paired):.2f}-{max(paired):.2f}"
            print(f"{_label(size):>7} {mode:>11} {throughput:9.1f} {latency:11.1f} {ratio:6.2f} {spread:>11}")
    summary = {
        "bench": "transport",
        "loop": loop_name,
        "ratio_vs_raw": ratios,
        "ratio_vs_raw_range": ratio_ranges,
        "throughput_mib_s": throughputs,
        "goal_16MiB_plain_ratio": 0.85,
        "goal_met": ratios["plain"]["16MiB"] >= 0.85,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
