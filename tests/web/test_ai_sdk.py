"""The Vercel AI SDK (the real ``ai`` and ``@ai-sdk/react`` npm packages, under Node) against
fanline's UI message stream endpoints: protocol, reasoning, resume after a cut, useChat with
``resume: true`` after a reload, and the stop endpoint (js/test/ai-sdk.test.mjs)."""

from __future__ import annotations

import httpx

from tests.conftest import StackFactory
from tests.web import run_node_tests, web_stack


def test_ai_sdk_consumes_and_resumes_fanline(stack_factory: StackFactory) -> None:
    stack = web_stack(stack_factory)
    env = {"FANLINE_URL": stack.api_urls[0], "FANLINE_URL_2": stack.api_urls[1]}
    run_node_tests(["test/ai-sdk.test.mjs"], env)


async def test_bad_requests_get_openai_errors(stack_factory: StackFactory) -> None:
    stack = web_stack(stack_factory)
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        user = b'[{"role": "user", "parts": [{"type": "text", "text": "x"}]}]'
        for body, code in [
            (b"not json", "invalid_json"),
            (b'{"messages": []}', "invalid_chat_id"),
            (b'{"id": "../x", "messages": []}', "invalid_chat_id"),
            (b'{"id": "c1", "messages": "hi"}', "invalid_value"),
            (b'{"id": "c1", "messages": [{"role": "robot", "parts": []}]}', "invalid_value"),
            (b'{"id": "c1", "max_tokens": "9", "messages": ' + user + b"}", "invalid_value"),
        ]:
            response = await client.post("/v1/ai-sdk/chat", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == code, response.text
        assert (await client.get("/v1/ai-sdk/chat/never-used/stream")).status_code == 204
        stop = await client.post("/v1/ai-sdk/chat/never-used/stop")
        assert stop.status_code == 404
        assert stop.json()["error"]["code"] == "chat_not_found"
