"""A LangGraph agent whose answer streams through fanline: resumable on any API pod, shareable.

    FANLINE_REDIS_URL=redis://127.0.0.1:6379/0 uvicorn examples.langgraph_app:app --port 8100
    curl -N 127.0.0.1:8100/chat -d '{"messages": [{"role": "user", "content": "hi"}]}'

The graph is one model node; the model is LangChain's ``GenericFakeChatModel`` so the example
runs offline (and in the test suite). Put your own chat model and nodes in its place:
``stream_mode="messages"`` yields the model's tokens wherever in the graph they come from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypedDict

from fastapi import FastAPI, Request, Response
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, AnyMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

import fanline

ANSWER = "Rivers carry rain back to the sea, and the sea gives it back to the sky as clouds."

producer = fanline.Producer()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with producer:
        yield


app = FastAPI(lifespan=lifespan)


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_graph() -> Any:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=ANSWER)]))

    async def call_model(state: State) -> dict[str, list[AnyMessage]]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", call_model)
    graph.add_edge(START, "model")
    graph.add_edge("model", END)
    return graph.compile()


async def answer(messages: list[dict[str, str]]) -> AsyncIterator[str]:
    graph = build_graph()  # one per request here: the fake model answers once
    async for message, _metadata in graph.astream({"messages": messages}, stream_mode="messages"):
        if isinstance(message, AIMessageChunk) and isinstance(message.content, str):
            yield message.content


@app.post("/chat")
async def chat(request: Request) -> Response:
    body = await request.json()
    return await producer.stream_response(answer(body["messages"]), model="langgraph", request=request)
