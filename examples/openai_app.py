"""An existing FastAPI route that streams an OpenAI-compatible model with the ``openai`` SDK,
made resumable and shareable by fanline. The whole change is the producer, its lifespan, and
``return await producer.stream_response(...)`` instead of the app's own StreamingResponse.

    OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_API_KEY=... FANLINE_REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn examples.openai_app:app --port 8100
    curl -N 127.0.0.1:8100/chat -d '{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}'

The answer is SSE in OpenAI's chunk format, each event with an ``id:``; the header
``X-Fanline-Generation-Id`` names the generation, which any viewer watches or resumes on any
fanline API pod: ``GET /v1/generations/{id}/events`` with ``Last-Event-ID``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionChunk

import fanline

producer = fanline.Producer()  # FANLINE_REDIS_URL, as the API pods have it
client = AsyncOpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with producer:
        yield


app = FastAPI(lifespan=lifespan)


async def completion(body: dict[str, Any]) -> AsyncIterator[ChatCompletionChunk]:
    stream = await client.chat.completions.create(
        model=body["model"], messages=body["messages"], stream=True, stream_options={"include_usage": True}
    )
    async with stream:  # closed when fanline stops reading (a viewer cancelled): the upstream stops too
        async for chunk in stream:
            yield chunk


@app.post("/chat")
async def chat(request: Request) -> Response:
    body = await request.json()
    return await producer.stream_response(completion(body), model=body["model"], request=request)
