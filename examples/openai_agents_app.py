"""An OpenAI Agents SDK agent whose answer streams through fanline: resumable on any API pod.

    OPENAI_BASE_URL=http://127.0.0.1:11434/v1 OPENAI_API_KEY=... FANLINE_REDIS_URL=redis://127.0.0.1:6379/0 \
        uvicorn examples.openai_agents_app:app --port 8100
    curl -N 127.0.0.1:8100/chat -d '{"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}'

The agent uses the Chat Completions API of whatever ``OPENAI_BASE_URL`` points at (the test
suite points it at its local OpenAI-wire stand-in); tracing is off, so nothing else is called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agents import Agent, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from fastapi import FastAPI, Request, Response
from openai import AsyncOpenAI
from openai.types.responses import ResponseTextDeltaEvent

import fanline

set_tracing_disabled(True)
producer = fanline.Producer()
client = AsyncOpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with producer:
        yield


app = FastAPI(lifespan=lifespan)


async def answer(model: str, prompt: str) -> AsyncIterator[str]:
    agent = Agent(
        name="assistant",
        instructions="Answer briefly.",
        model=OpenAIChatCompletionsModel(model=model, openai_client=client),
    )
    result = Runner.run_streamed(agent, prompt)
    try:
        async for event in result.stream_events():
            if event.type == "raw_response_event" and isinstance(event.data, ResponseTextDeltaEvent):
                yield event.data.delta
    finally:
        result.cancel()  # a viewer cancelled, or the answer is done: stop the run


@app.post("/chat")
async def chat(request: Request) -> Response:
    body = await request.json()
    prompt = body["messages"][-1]["content"]
    return await producer.stream_response(answer(body["model"], prompt), model=body["model"], request=request)
