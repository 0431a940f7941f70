"""``Producer.stream_response`` (issue 12): an app's route, run as a real uvicorn process, wraps
its own stream; the generation goes on when its client leaves, and other viewers follow it on
the API pods. The framework examples (tests/examples) cover the frameworks."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import orjson
import pytest

from fanline.cli.valkey import stop_process
from tests.conftest import OUTPUT, StackFactory
from tests.library.wrapped_app import WORDS
from tests.support import Received, Stack, read_sse, read_sse_at, settled_at, start_asgi_app

EXPECTED = "<think>" + "".join(WORDS)


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(apis=1, workers=0)


@pytest.fixture(scope="module")
def app_url(redis_url: str) -> Iterator[str]:
    env = {"FANLINE_REDIS_URL": redis_url}
    process, url = start_asgi_app("tests.library.wrapped_app:app", env, OUTPUT / "wrapped-app.log")
    try:
        yield url
    finally:
        stop_process(process)


async def test_the_generation_goes_on_when_its_client_leaves(app_url: str, stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        first = await read_sse(client, "POST", "/text", stop_after=2)  # then leaves, mid-answer
    info = await settled_at(stack.url, first.gen_id)
    assert info["status"] == "completed" and info["content"] == EXPECTED
    rest = await read_sse_at(stack.url, first.gen_id, Received(), last_event_id=first.ids[-1])
    assert first.text + rest.text == EXPECTED
    assert len(rest.ids) > 10  # most of it was produced after the first client had gone


async def test_the_ai_sdk_transport_streams_ui_message_parts(app_url: str, stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=app_url, timeout=30) as client:
        response = await client.post("/ai-sdk")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    gen_id = response.headers["x-fanline-generation-id"]
    datas = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    parts = [orjson.loads(d) for d in datas[:-1]]
    assert parts[0] == {"type": "start", "messageId": f"msg-{gen_id}", "messageMetadata": {"generationId": gen_id}}
    assert "".join(p["delta"] for p in parts if p["type"] == "text-delta") == EXPECTED
    assert parts[-1]["type"] == "finish" and parts[-1]["finishReason"] == "stop"
    assert (await settled_at(stack.url, gen_id))["content"] == EXPECTED
