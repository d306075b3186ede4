"""Transport benchmark: shardmesh FrameConnection against a raw asyncio socket, two processes.

For each payload size it measures, in the same run:
  raw    asyncio streams with a 4-byte length prefix (the ceiling: no header, no codec)
  plain  FrameConnection without TLS (tensor codec, msgpack header, BufferedProtocol receive)
  tls    FrameConnection with mutual TLS 1.3
Throughput: a stream of messages, then one acknowledged message to close the measurement.
Latency: one message at a time, each acknowledged by a 4-byte (raw) or small-frame reply.
Every measurement is bounded by a message count and a time budget. The server runs in a child
process that is stopped by its pid at the end. The last line is a JSON summary with the
ratios plain/raw and tls/raw per size.

Usage: .venv/bin/python bench/transport.py [--seconds 0.8] [--repeats 3] [--loop uvloop]
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

from protocol.limits import MiB
from protocol.messages import MsgType
from protocol.stream import FrameConnection, open_connection, start_server
from protocol.tensors import decode_frame_tensors
from protocol.tls import init_cluster, issue_node, load_credentials

HOST = "127.0.0.1"
SIZES = (64, 64 * 1024, 1 * MiB, 16 * MiB)
ACK_FLAG = 0x8000_0000
LENGTH = struct.Struct("<I")
MAX_MESSAGES = 50_000
LATENCY_MAX_SAMPLES = 500


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


# NOTE: `readexactly` allocates a fresh bytes object per message, so above 1 MiB this baseline is
# slower than a raw receiver that reuses its buffer would be.
async def _raw_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            (word,) = LENGTH.unpack(await reader.readexactly(4))
            size = word & ~ACK_FLAG
            if size:
                await reader.readexactly(size)
            if word & ACK_FLAG:
                writer.write(LENGTH.pack(0))
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
    raw = await asyncio.start_server(_raw_handler, HOST, 0)
    plain = await start_server(HOST, 0, creds=None, handler=_frame_handler)
    tls = await start_server(HOST, 0, creds=load_credentials(data_dir / "server"), handler=_frame_handler)
    ports = {"raw": raw.sockets[0].getsockname()[1], "plain": plain.port, "tls": tls.port}
    print(json.dumps(ports), flush=True)
    # Serve until the parent closes our stdin or stops us.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- client -------------------------------------------------------------------------------------


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

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


async def _client(ports: dict[str, int], data_dir: Path, seconds: float, repeats: int) -> dict[tuple[str, int], list[tuple[float, float]]]:
    creds = load_credentials(data_dir / "client")
    results: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for mode in ("raw", "plain", "tls"):
            if mode == "raw":
                client: RawClient | FrameClient = RawClient(*await asyncio.open_connection(HOST, ports["raw"]))
            else:
                client = FrameClient(await open_connection(HOST, ports[mode], creds=creds if mode == "tls" else None))
            for size in SIZES:
                tensor = torch.randint(0, 256, (size,), dtype=torch.uint8)
                view = memoryview(tensor.numpy())
                if isinstance(client, RawClient):
                    raw_client = client

                    async def send(ack: bool) -> None:
                        await raw_client.send(view, ack)
                else:
                    frame_client = client

                    async def send(ack: bool) -> None:
                        await frame_client.send(tensor, ack)

                results.setdefault((mode, size), []).append(await _measure(send, size, seconds))
            client.close()
    return results


def _label(size: int) -> str:
    if size >= MiB:
        return f"{size // MiB}MiB"
    if size >= 1024:
        return f"{size // 1024}KiB"
    return f"{size}B"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.8, help="time budget per throughput measurement, seconds")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all modes and sizes; medians are reported")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop for both processes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    loop_name = _install_loop(args.loop)
    torch.set_num_threads(1)

    if args.serve:
        asyncio.run(_serve(args.data_dir))
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

    print(f"loop={loop_name} repeats={args.repeats} (medians)")
    print(f"{'size':>7} {'mode':>6} {'MiB/s':>9} {'latency us':>11} {'ratio':>6}")
    ratios: dict[str, dict[str, float]] = {"plain": {}, "tls": {}}
    for size in SIZES:
        raw_throughput = statistics.median(t for t, _ in results[("raw", size)])
        for mode in ("raw", "plain", "tls"):
            throughput = statistics.median(t for t, _ in results[(mode, size)])
            latency = statistics.median(l for _, l in results[(mode, size)])
            ratio = throughput / raw_throughput
            if mode != "raw":
                ratios[mode][_label(size)] = round(ratio, 3)
            print(f"{_label(size):>7} {mode:>6} {throughput:9.1f} {latency:11.1f} {ratio:6.2f}")
    summary = {
        "bench": "transport",
        "loop": loop_name,
        "ratio_vs_raw": ratios,
        "goal_16MiB_plain_ratio": 0.85,
        "goal_met": ratios["plain"]["16MiB"] >= 0.85,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
