"""The framework examples in examples/ (issue 12), each run as a real app process (uvicorn) with
its framework's own offline model: LangGraph with LangChain's fake chat model, pydantic-ai's
TestModel, and the ``openai`` SDK and the OpenAI Agents SDK pointed at the local OpenAI-wire
stand-in. A client reads the app's answer, drops mid-way, and a second client resumes it
exactly on a fanline API pod."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from fanline.cli.valkey import stop_process
from tests.conftest import OUTPUT, StackFactory
from tests.support import (
    Received,
    Stack,
    read_sse,
    read_sse_at,
    read_ws,
    settled_at,
    start_asgi_app,
    text_of,
    wait_until,
    ws_url,
)
from tests.upstream import Upstream

PROMPT = "tell me how rivers reach the sea and come back as rain"
ANSWER = "Rivers carry rain back to the sea, and the sea gives it back to the sky as clouds."


@dataclass
class App:
    name: str
    url: str
    model: str
    expected: str


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as started:
        yield started


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(apis=1, workers=0)


@pytest.fixture(scope="module")
def apps(upstream: Upstream, redis_url: str) -> Iterator[dict[str, App]]:
    """Each example app, started once per backend: the same code a user runs with uvicorn."""
    env = {
        "FANLINE_REDIS_URL": redis_url,
        "OPENAI_BASE_URL": upstream.base_url,
        "OPENAI_API_KEY": "unused-by-the-stand-in",
    }
    words = " ".join(PROMPT.split()) + " "
    specs = {
        "langgraph_app": ("langgraph", ANSWER),
        "pydantic_ai_app": ("pydantic-ai", ANSWER),
        "openai_app": ("ok", words),
        "openai_agents_app": ("ok", words),
    }
    processes: list[subprocess.Popen[bytes]] = []
    started: dict[str, App] = {}
    try:
        for name, (model, expected) in specs.items():
            process, url = start_asgi_app(f"examples.{name}:app", env, OUTPUT / "examples" / f"{name}.log")
            processes.append(process)
            started[name] = App(name, url, model, expected)
        yield started
    finally:
        for process in processes:
            stop_process(process)


def chat_body(app: App, prompt: str = PROMPT) -> dict[str, object]:
    return {"model": app.model, "messages": [{"role": "user", "content": prompt}]}


@pytest.mark.parametrize("name", ["langgraph_app", "pydantic_ai_app", "openai_app", "openai_agents_app"])
async def test_an_example_streams_through_fanline_and_resumes_on_a_pod(
    name: str, apps: dict[str, App], stack: Stack
) -> None:
    app = apps[name]
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        first = await read_sse(client, "POST", "/chat", json=chat_body(app), stop_after=1)  # then drops
    assert first.gen_id and len(first.ids) == 1
    rest = await read_sse_at(stack.url, first.gen_id, Received(), last_event_id=first.ids[-1])
    assert rest.done and not rest.errors
    assert first.text + rest.text == app.expected
    info = await settled_at(stack.url, first.gen_id)
    assert info["status"] == "completed" and info["content"] == app.expected
    whole = await read_sse_at(stack.url, first.gen_id, Received())
    assert whole.ids == first.ids + rest.ids  # no gap, no duplicate across the two clients
    ws = await read_ws(ws_url(stack.url, first.gen_id, last_event_id=first.ids[-1]))
    assert ws.done and ws.ids[:-1] == rest.ids[:-1] and text_of(ws.chunks) == rest.text


async def test_a_viewers_cancel_closes_the_apps_upstream_stream(
    apps: dict[str, App], stack: Stack, upstream: Upstream
) -> None:
    """A viewer on a fanline pod cancels; the app's generator is closed, and with it the
    ``openai`` SDK's stream: the model server sees its client leave."""
    app = apps["openai_app"]
    prompt = "a long answer to cancel"
    received = Received()
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        reading = asyncio.create_task(
            read_sse(client, "POST", "/chat", json={**chat_body(app, prompt), "model": "hold"}, received=received)
        )
        seen = await upstream.request(prompt)
        await wait_until(lambda: bool(received.gen_id), "the app's response headers")
        async with httpx.AsyncClient(timeout=30) as pod:
            response = await pod.post(f"{stack.url}/v1/generations/{received.gen_id}/cancel")
            assert response.status_code == 202, response.text
        assert await seen.client_left()
        await asyncio.wait_for(reading, 30)
    assert received.finish_reason == "cancelled" and received.done
    assert (await settled_at(stack.url, received.gen_id))["status"] == "cancelled"


async def test_the_app_answers_ndjson_when_asked(apps: dict[str, App]) -> None:
    app = apps["pydantic_ai_app"]
    async with httpx.AsyncClient(base_url=app.url, timeout=30) as client:
        response = await client.post("/chat", json=chat_body(app), headers={"Accept": "application/x-ndjson"})
    lines = [orjson.loads(line) for line in response.content.splitlines()]
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert lines[-1]["done"] is True
    assert text_of([line["chunk"] for line in lines[:-1]]) == ANSWER
