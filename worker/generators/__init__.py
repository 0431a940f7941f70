"""Generators: where tokens come from.

A generator is an async iterator of deltas for one request. It may end its last
delta with ``finish_reason`` ("stop" or "length") and may set ``usage`` on the
context; raising ``GenerationFailed`` ends the generation with that error.

    async def my_generator(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
        yield {"content": "Hello"}
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from shared.events import Delta
from shared.requests import ChatCompletionRequest
from shared.settings import Settings


@dataclass
class GenerationContext:
    gen_id: str
    settings: Settings
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Generator(Protocol):
    def __call__(self, request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]: ...


def load_generator(name: str) -> Generator:
    """``demo``, or ``package.module:callable``."""
    if name == "demo":
        from worker.generators.demo import demo

        return demo
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(f"unknown generator {name!r}: use 'demo' or 'package.module:callable'")
    generator: Generator = getattr(importlib.import_module(module_name), attr)
    return generator
