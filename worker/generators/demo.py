"""The demo generator: deterministic text from the prompt (same prompt and seed, same text).

Paced by ``FANLINE_DEMO_TOKENS_PER_S`` (0: no delay). Without ``max_tokens`` it
writes 24–63 tokens and stops ("stop"); with it, exactly ``max_tokens`` ("length").
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

from shared.events import Delta
from shared.requests import ChatCompletionRequest
from worker.generators import GenerationContext

_WORDS = (
    "stream river token event viewer reader writer pod worker queue redis valkey "
    "cluster replay resume cursor bound buffer fan out chunk frame socket browser "
    "the a of to and in is it that for on with as at by from this we you they "
    "quick bright calm steady clear exact gentle swift light dark north south"
).split()
_PUNCT = (",", ".", ";", "!", "?")


def demo_tokens(prompt: str, seed: int | None, count: int) -> list[str]:
    digest = hashlib.sha256(f"{seed}:{prompt}".encode()).digest()
    rng = random.Random(digest)
    tokens: list[str] = []
    for i in range(count):
        word = rng.choice(_WORDS)
        if i == 0 or tokens[-1].endswith((". ", "! ", "? ")):
            word = word.capitalize()
        if rng.random() < 0.08:
            word += rng.choice(_PUNCT)
        tokens.append(word + " ")
    return tokens


def natural_length(prompt: str, seed: int | None) -> int:
    digest = hashlib.sha256(f"len:{seed}:{prompt}".encode()).digest()
    return 24 + digest[0] % 40


async def demo(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
    prompt = request.prompt_text()
    # With max_tokens the demo writes exactly that many tokens and stops for "length"
    # (so tests and the benchmark choose a generation's size); else a natural length.
    limit = request.token_limit
    count = natural_length(prompt, request.seed) if limit is None else limit
    ctx.finish_reason = "stop" if limit is None else "length"
    pace = ctx.settings.demo_tokens_per_s
    interval = 1.0 / pace if pace > 0 else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i, token in enumerate(demo_tokens(prompt, request.seed, count)):
        if interval:
            # Sleep to a schedule rather than a fixed gap, so the pace holds under load.
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        yield {"content": token}
    ctx.usage = {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": count,
        "total_tokens": len(prompt.split()) + count,
    }
