"""An app whose route wraps its own paced text stream with ``Producer.stream_response``, run by
tests/library/test_stream_response.py as a real uvicorn process (``tests.library.wrapped_app:app``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

import fanline

WORDS = [f" word{i}" for i in range(60)]
PACE_S = 0.02  # 60 words in about 1.2 s: a client that leaves early leaves mid-answer

producer = fanline.Producer()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with producer:
        yield


app = FastAPI(lifespan=lifespan)


async def words() -> AsyncIterator[str]:
    yield "<think>"  # not special: just text
    for word in WORDS:
        await asyncio.sleep(PACE_S)
        yield word


@app.post("/text")
async def text(request: Request) -> Response:
    return await producer.stream_response(words(), model="wrapped", request=request)


@app.post("/ai-sdk")
async def ai_sdk(request: Request) -> Response:
    return await producer.stream_response(words(), model="wrapped", request=request, transport="ai-sdk")
