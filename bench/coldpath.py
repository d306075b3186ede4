"""Cold-path benchmark: the Python work of one activation transfer, warm against after a forward.

A hop's frame handling is a few dozen microseconds of Python when it runs back to back. In an
agent it runs right after the segment's forward pass, which streams the segment's weights
through the CPU caches, or after the agent idled. This bench times the same work in one process,
without sockets, in three conditions, and prints each against the back-to-back baseline:

  warm           the work repeated back to back (the baseline)
  after idle     after a 4 ms sleep, as on an agent that waits for the next request
  after forward  right after one MiniLM forward pass with one torch thread, as on an agent
                 that has just run its segment

The work is what both ends of one transfer do in Python: encode a 1 x 16 x 384 float32
activation and its int64 mask into a frame with a realistic header, then decode the frame and
its tensors. The last line is a JSON summary.

Usage: .venv/bin/python bench/coldpath.py [--samples 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator import zoo  # noqa: E402
from protocol.frames import FrameDecoder, encode_frame  # noqa: E402
from protocol.limits import Limits  # noqa: E402
from protocol.messages import MsgType  # noqa: E402
from protocol.tensors import decode_frame_tensors, encode_tensors  # noqa: E402

IDLE_S = 0.004
HEADER = {
    "epoch": 3, "plan": 5, "rid": "0123456789abcdef", "att": 1, "hop": 1,
    "route": [[0, 2, "agent-1"], [3, 4, "agent-2"], [5, 7, "agent-0"]], "ttl_ms": 29000,
    "model": "minilm", "version": "v1", "gw": "agent-0", "prio": "normal", "task": None,
}


def transfer_work(tensors: dict[str, torch.Tensor], limits: Limits) -> dict[str, torch.Tensor]:
    """Encode ``tensors`` into one frame and decode it again, as the two ends of a hop do."""
    meta, buffers = encode_tensors(tensors)
    pieces = encode_frame(MsgType.ACTIVATION, dict(HEADER, tensors=meta), buffers, limits=limits)
    decoder = FrameDecoder(limits)
    decoder.feed(b"".join(bytes(piece) for piece in pieces))
    return decode_frame_tensors(decoder.next_frame())


def time_after(between, work, samples: int) -> float:
    """p50 in microseconds of ``work()`` timed right after ``between()``."""
    times = []
    for _ in range(samples):
        between()
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200, help="timed runs per condition (10 to 10000)")
    args = parser.parse_args(argv)
    if not 10 <= args.samples <= 10_000:
        parser.error("--samples must be from 10 to 10000")
    torch.set_num_threads(1)
    spec = zoo.build_minilm()
    inputs = dict(zoo.minilm_tokenize(["Shardmesh splits a model into segments."], max_length=16, pad_to=16))
    activation = {"hidden": torch.randn(1, 16, 384), "attention_mask": inputs["attention_mask"]}
    limits = Limits()

    def work() -> None:
        transfer_work(activation, limits)

    def forward() -> None:
        with torch.no_grad():
            spec.reference(inputs)

    got = transfer_work(activation, limits)
    assert all(torch.equal(got[name], tensor) for name, tensor in activation.items())
    for _ in range(20):
        work()
    warm = time_after(lambda: None, work, args.samples)
    idle = time_after(lambda: time.sleep(IDLE_S), work, args.samples)
    cold = time_after(forward, work, args.samples)
    print(f"transfer work, p50 of {args.samples}: warm {warm:.1f} us, after {IDLE_S * 1000:.0f} ms idle "
          f"{idle:.1f} us ({idle / warm:.1f}x), after a MiniLM forward {cold:.1f} us ({cold / warm:.1f}x)")
    print(json.dumps({"bench": "coldpath", "samples": args.samples, "warm_us": round(warm, 1),
                      "after_idle_us": round(idle, 1), "after_forward_us": round(cold, 1),
                      "idle_ratio": round(idle / warm, 2), "forward_ratio": round(cold / warm, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
