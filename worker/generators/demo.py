"""The demo generator: deterministic text from the prompt (same prompt and seed, same text).

Paced by ``FANLINE_DEMO_TOKENS_PER_S`` (0: no delay). Without ``max_tokens`` it
writes 24–63 tokens and stops ("stop"); with it, exactly ``max_tokens`` ("length").

So that the full delta format can be tried without a model: with
``reasoning_effort`` set it first "thinks" (``reasoning_content`` deltas), and with
``tools`` it ends by calling the first tool (a ``tool_calls`` delta whose arguments
arrive in fragments; finish_reason "tool_calls").
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator

import orjson

from fanline.shared.events import Delta
from fanline.shared.requests import ChatCompletionRequest
from fanline.worker.generators import GenerationContext

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


def _first_tool(request: ChatCompletionRequest) -> str | None:
    for tool in request.tools or ():
        function = tool.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            return name
    return None


async def demo(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
    prompt = request.prompt_text()
    # With max_tokens the demo writes exactly that many tokens and stops for "length"
    # (so tests and the benchmark choose a generation's size); else a natural length.
    limit = request.token_limit
    count = natural_length(prompt, request.seed) if limit is None else limit
    ctx.finish_reason = "stop" if limit is None else "length"
    rate = ctx.settings.demo_tokens_per_s
    interval = 1.0 / rate if rate > 0 else 0.0
    loop = asyncio.get_running_loop()
    start = loop.time()
    step = 0

    async def pace() -> None:
        nonlocal step
        if interval:
            # Sleep to a schedule rather than a fixed gap, so the pace holds under load.
            delay = start + step * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
        step += 1

    if request.reasoning_effort not in (None, "none"):
        for token in demo_tokens("reasoning:" + prompt, request.seed, 8):
            await pace()
            yield {"reasoning_content": token}
    for token in demo_tokens(prompt, request.seed, count):
        await pace()
        yield {"content": token}
    tool = _first_tool(request)
    if tool is not None:
        arguments = '{"query": ' + orjson.dumps(prompt[:40]).decode() + "}"
        call_id = "call_" + hashlib.sha256(f"{request.seed}:{prompt}".encode()).hexdigest()[:24]
        await pace()
        yield {
            "tool_calls": [{"index": 0, "id": call_id, "type": "function", "function": {"name": tool, "arguments": ""}}]
        }
        for i in range(0, len(arguments), 8):
            await pace()
            yield {"tool_calls": [{"index": 0, "function": {"arguments": arguments[i : i + 8]}}]}
        ctx.finish_reason = "tool_calls"
    ctx.usage = {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": count,
        "total_tokens": len(prompt.split()) + count,
    }
