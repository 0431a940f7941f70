"""Generators: where tokens come from.

``FANLINE_GENERATOR`` names one:

    demo                     deterministic text from the prompt (worker/generators/demo.py)
    openai                   any OpenAI-compatible upstream (worker/generators/openai.py)
    package.module:callable  a plugin, imported from the worker's Python path
    NAME                     a plugin installed under the entry-point group ``fanline.generators``

A generator is called once per generation with the request and a context, and
returns an async iterator of deltas: the fields of an OpenAI chunk's ``delta``
(``content``, ``reasoning_content`` / ``reasoning``, ``refusal``, ``tool_calls``
fragments), plus the choice's ``logprobs`` under that key. They are published as
they are; consecutive plain-text deltas may be coalesced into one event.

- End by returning. Set ``ctx.finish_reason`` ("stop", "length", "tool_calls",
  "content_filter"…; default "stop") and ``ctx.usage`` before that.
- Fail by raising ``shared.errors.GenerationFailed(message, code=...)``: viewers
  get an error event with that message and code, and the generation is "failed".
  Any other exception fails it too, with code "generation_failed".
- Cancellation is asyncio cancellation: when the generation is cancelled (a
  client's cancel, no viewer for FANLINE_IDLE_CANCEL_S, a worker stopping past its
  grace period), ``asyncio.CancelledError`` is raised where the generator awaits.
  Release what it holds with ``async with`` or ``try/finally``, and let the error
  propagate. A generator that never awaits is stopped between two deltas.

An example plugin (``FANLINE_GENERATOR=myplugin.shout:shout``, or installed as an
entry point: ``[project.entry-points."fanline.generators"] shout = "myplugin.shout:shout"``
and ``FANLINE_GENERATOR=shout``):

    from collections.abc import AsyncIterator

    from fanline.shared.errors import GenerationFailed
    from fanline.shared.events import Delta
    from fanline.shared.requests import ChatCompletionRequest
    from fanline.worker.generators import GenerationContext

    async def shout(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
        words = request.prompt_text().split()
        if not words:
            raise GenerationFailed("nothing to shout", code="empty_prompt")
        for word in words:
            yield {"content": word.upper() + " "}
        ctx.usage = {"prompt_tokens": len(words), "completion_tokens": len(words), "total_tokens": 2 * len(words)}
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Protocol

from fanline.shared.events import Delta
from fanline.shared.requests import ChatCompletionRequest
from fanline.shared.settings import Settings

ENTRY_POINT_GROUP = "fanline.generators"


@dataclass
class GenerationContext:
    """What a generator gets besides the request, and what it reports back (finish_reason, usage)."""

    gen_id: str
    settings: Settings
    finish_reason: str = "stop"
    usage: dict[str, Any] | None = None  # OpenAI usage: counts, and nested details (completion_tokens_details…)
    extra: dict[str, object] = field(default_factory=dict)


class Generator(Protocol):
    def __call__(self, request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]: ...


def load_generator(name: str) -> Generator:
    """``demo``, ``openai``, ``package.module:callable``, or the name of a ``fanline.generators`` entry point."""
    if name == "demo":
        from fanline.worker.generators.demo import demo

        return demo
    if name == "openai":
        from fanline.worker.generators.openai import openai

        return openai
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            target: object = importlib.import_module(module_name)
            for part in attr.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"cannot load generator {name!r}: {exc}") from exc
        return _checked(name, target)
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ValueError(
            f"unknown generator {name!r}: use 'demo', 'openai', 'package.module:callable', or an installed "
            f"{ENTRY_POINT_GROUP} entry point ({', '.join(installed) or 'none installed'})"
        )
    entry_point = next(iter(found))
    try:
        target = entry_point.load()
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load generator {name!r} ({entry_point.value}): {exc}") from exc
    return _checked(name, target)


def _checked(name: str, target: object) -> Generator:
    if not callable(target):
        raise ValueError(f"generator {name!r} is not callable: {target!r}")
    generator: Generator = target
    return generator
