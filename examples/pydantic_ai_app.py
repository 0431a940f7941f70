"""A pydantic-ai agent whose answer streams through fanline: resumable on any API pod, shareable.

    FANLINE_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.pydantic_ai_app:app --port 8100
    curl -N 127.0.0.1:8100/chat -d '{"messages": [{"role": "user", "content": "hi"}]}'

The agent's model is pydantic-ai's ``TestModel`` so the example runs offline (and in the test
suite); give the Agent a real model (``"openai:gpt-4o"``, ...) and nothing else changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

import fanline

ANSWER = "Rivers carry rain back to the sea, and the sea gives it back to the sky as clouds."

producer = fanline.Producer()
agent = Agent(TestModel(custom_output_text=ANSWER), instructions="Answer in one sentence.")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with producer:
        yield


app = FastAPI(lifespan=lifespan)


async def answer(prompt: str) -> AsyncIterator[str]:
    async with agent.run_stream(prompt) as result:
        async for text in result.stream_text(delta=True):
            yield text


@app.post("/chat")
async def chat(request: Request) -> Response:
    body = await request.json()
    prompt = body["messages"][-1]["content"]
    return await producer.stream_response(answer(prompt), model="pydantic-ai", request=request)
