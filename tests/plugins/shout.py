"""The example plugin of worker/generators/__init__.py and the README, word for word."""

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
