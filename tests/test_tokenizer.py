"""The packaged tokenizer shared by an agent's threads must not stall the event loop."""

from __future__ import annotations

import asyncio
import time

from tokenizers import Tokenizer

from coordinator.zoo import SharedTokenizer, minilm_model_dir, tokenize_batch
from helpers import loop_gaps


async def test_shared_tokenizer_second_call_leaves_loop_running() -> None:
    """A short text queued behind a long one waits off the loop, which keeps its timers."""
    raw = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    tokenizer = SharedTokenizer(raw, 128)
    async with loop_gaps(0.01) as gaps:
        started = time.perf_counter()
        long_call = asyncio.create_task(asyncio.to_thread(tokenizer, ["word " * 400_000]))
        await asyncio.sleep(0.1)
        short = await asyncio.to_thread(tokenizer, ["A man is eating food."])
        long_result = await long_call
        long_s = time.perf_counter() - started

    assert long_result["input_ids"].shape == (1, 128)  # truncated to the model's length
    assert short["input_ids"].tolist() == tokenize_batch(raw, ["A man is eating food."], 128)["input_ids"].tolist()
    # Without the lock, the second call stalls the loop for most of long_s (2.8 s measured).
    assert max(gaps) < max(0.3, long_s / 3), (max(gaps), long_s)
