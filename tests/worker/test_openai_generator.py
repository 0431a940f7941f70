"""FANLINE_GENERATOR=openai on real workers.

Happy paths: fanline behind fanline (the demo stack is an OpenAI-compatible server).
Delta fidelity and every failure: behind the stand-in upstream of tests/upstream.py,
which speaks the OpenAI wire format and misbehaves on command (the request's model).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from fanline.shared.keys import Meta
from tests.conftest import StackFactory
from tests.support import Received, Stack, chat_body, create, generation, read_sse, watch
from tests.upstream import FIDELITY_DELTAS, FIDELITY_USAGE, FIRST_WORDS, Upstream

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
    },
}
# Longest silence the stand-in's stack accepts from its upstream: what the stall cases wait.
STAND_IN_TIMEOUT_S = "1.5"


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    with Upstream() as server:
        yield server


@pytest.fixture
def proxied(stack_factory: StackFactory, stack: Stack) -> Stack:
    """One API pod and a worker whose upstream is ``stack`` (the demo generator), model mapped to "demo"."""
    return stack_factory(
        apis=1,
        generator="openai",
        upstream_base_url=stack.url + "/v1",
        upstream_model="demo",
        upstream_api_key="sk-unused-the-upstream-has-auth-off",
        upstream_timeout_s="30",
        worker_grace_s="0",
    )


@pytest.fixture
def behind_stand_in(stack_factory: StackFactory, upstream: Upstream) -> Stack:
    """One API pod and a worker streaming from the stand-in; the client's model picks its behaviour."""
    return stack_factory(
        apis=1,
        generator="openai",
        upstream_base_url=upstream.base_url,
        upstream_api_key="sk-stand-in",
        upstream_timeout_s=STAND_IN_TIMEOUT_S,
        worker_grace_s="0",
    )


async def upstream_generation(redis: aioredis.Redis, prompt: str, ours: str) -> tuple[str, dict[str, Any]]:
    """The id of the generation the upstream stack ran for ``prompt``, and the request it was given.

    Both stacks share the test Redis, so the upstream's generation is the other one with this prompt.
    """
    found = []
    async for key in redis.scan_iter(match="fanline:*:meta", count=1000):
        gen_id = key.decode().split(":")[2]
        stored = await redis.hget(key, Meta.REQUEST)  # type: ignore[misc]
        if gen_id != ours and stored is not None and orjson.loads(stored)["messages"][-1].get("content") == prompt:
            found.append((gen_id, orjson.loads(stored)))
    assert len(found) == 1, f"the upstream ran {len(found)} generations for {prompt!r}"
    return found[0]


def deltas(received: Received) -> list[dict[str, Any]]:
    """The viewer's deltas, without the role and the empty delta of the final chunk."""
    found = []
    for chunk in received.chunks:
        for choice in chunk["choices"]:
            delta = {k: v for k, v in choice["delta"].items() if k != "role"}
            if delta or choice["logprobs"] is not None:
                found.append({**delta, "logprobs": choice["logprobs"]})
    return found


def assembled(received: Received) -> dict[str, Any]:
    """What a viewer's stream adds up to, field by field."""
    found = deltas(received)
    usage = [c["usage"] for c in received.chunks if not c["choices"]]
    return {
        "content": "".join(d.get("content", "") for d in found),
        "reasoning": "".join(d.get("reasoning_content", "") for d in found),
        "tool_calls": [call for d in found for call in d.get("tool_calls", [])],
        "finish_reason": received.finish_reason,
        "usage": usage,
    }


def unique(prompt: str) -> str:
    return f"{prompt} {uuid.uuid4().hex[:12]}"


# -- fanline behind fanline --------------------------------------------------------


async def test_fanline_behind_fanline_streams_what_the_upstream_generated(
    proxied: Stack, stack: Stack, redis: aioredis.Redis
) -> None:
    prompt = unique("behind fanline")
    body = chat_body(
        prompt, max_tokens=20, model="client-model", seed=7, temperature=0.4, top_p=0.9, stop=["never"], user="u-1",
        reasoning_effort="low", tools=[TOOL], stream_options={"include_usage": True},
    )  # fmt: skip
    async with (
        httpx.AsyncClient(base_url=proxied.url, timeout=30) as ours,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as theirs,
    ):
        received = await read_sse(ours, "POST", "/v1/chat/completions", json=body)
        up_id, forwarded = await upstream_generation(redis, prompt, received.gen_id)
        upstream_stream = await read_sse(theirs, "GET", f"/v1/generations/{up_id}/events")
        ours_info = await generation(ours, received.gen_id)
        theirs_info = await generation(theirs, up_id)

    assert received.done and received.errors == []
    assert received.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    # The generation's record is the upstream's, field for field.
    assert theirs_info["status"] == ours_info["status"] == "completed"
    for name in ("content", "reasoning", "tool_calls", "finish_reason", "usage"):
        assert ours_info[name] == theirs_info[name], name
    assert theirs_info["finish_reason"] == "tool_calls" and theirs_info["reasoning"] and theirs_info["content"]
    assert [call["function"]["name"] for call in theirs_info["tool_calls"]] == ["lookup"]
    # And so is the stream: text, reasoning, every tool-call fragment, finish_reason, the usage chunk.
    assert assembled(received) == assembled(upstream_stream)
    assert assembled(received)["usage"] == [theirs_info["usage"]]
    # The upstream got the client's messages and parameters, the mapped model, streaming with usage.
    assert ours_info["model"] == "client-model"
    assert forwarded["model"] == "demo"
    assert forwarded["stream"] is True and forwarded["stream_options"] == {"include_usage": True}
    for name in ("messages", "max_tokens", "seed", "temperature", "top_p", "stop", "user", "reasoning_effort", "tools"):
        assert forwarded[name] == body[name], name


async def test_fanline_behind_fanline_answers_without_streaming(
    proxied: Stack, stack: Stack, redis: aioredis.Redis
) -> None:
    prompt = unique("behind fanline, whole")
    body = chat_body(prompt, stream=False, max_tokens=12, reasoning_effort="high", tools=[TOOL])
    async with (
        httpx.AsyncClient(base_url=proxied.url, timeout=30) as ours,
        httpx.AsyncClient(base_url=stack.url, timeout=30) as theirs,
    ):
        response = await ours.post("/v1/chat/completions", json=body)
        up_id, forwarded = await upstream_generation(redis, prompt, response.headers["x-fanline-generation-id"])
        theirs_info = await generation(theirs, up_id)
    assert response.status_code == 200, response.text
    answer = response.json()
    message = answer["choices"][0]["message"]
    assert message["content"] == theirs_info["content"]
    assert message["reasoning_content"] == theirs_info["reasoning"]
    assert message["tool_calls"] == theirs_info["tool_calls"]
    assert answer["choices"][0]["finish_reason"] == theirs_info["finish_reason"] == "tool_calls"
    assert answer["usage"] == theirs_info["usage"]
    assert forwarded["stream"] is True  # the worker always streams from its upstream


# -- delta fidelity, behind the stand-in ------------------------------------------------


async def test_every_delta_field_is_republished_as_the_upstream_sent_it(
    behind_stand_in: Stack, upstream: Upstream
) -> None:
    prompt = unique("fidelity")
    body = chat_body(prompt, model="fidelity", logprobs=True, top_logprobs=0, stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=behind_stand_in.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=body)
        gen_id = received.gen_id
        # A viewer resuming after the third event gets exactly the rest.
        resumed = await read_sse(
            client, "GET", f"/v1/generations/{gen_id}/events", headers={"Last-Event-ID": received.ids[2]}
        )
        info = await generation(client, gen_id)
    seen = await upstream.request(prompt)

    sent = [
        {**{k: v for k, v in delta.items() if v is not None and k != "role"}, "logprobs": logprobs}
        for delta, logprobs in FIDELITY_DELTAS
    ]
    assert received.done and received.errors == []
    assert deltas(received) == sent  # nulls and the role aside, every field as sent, one event each
    assert received.finish_reason == "content_filter"
    assert [c["usage"] for c in received.chunks if not c["choices"]] == [FIDELITY_USAGE]
    assert resumed.ids == received.ids[3:] and resumed.chunks == received.chunks[3:]
    assert info["status"] == "completed" and info["finish_reason"] == "content_filter"
    assert info["content"] == "Hello"
    assert info["reasoning"] == "Let me think about it."
    assert info["tool_calls"] == [
        {"id": "call_standin1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "fan"}'}}
    ]
    assert info["usage"] == FIDELITY_USAGE
    # What the stand-in received: the key as a bearer token, the request's own model and parameters.
    assert seen.headers["authorization"] == "Bearer sk-stand-in"
    assert seen.body["model"] == "fidelity" and seen.body["logprobs"] is True and seen.body["top_logprobs"] == 0
    assert seen.body["stream"] is True and seen.body["stream_options"] == {"include_usage": True}
    assert seen.body["messages"] == body["messages"]
    assert seen.finished


async def test_an_upstream_that_does_not_stream_is_republished_whole(behind_stand_in: Stack) -> None:
    async with httpx.AsyncClient(base_url=behind_stand_in.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body(unique("whole"), model="json"))
        info = await generation(client, received.gen_id)
    assert received.done and received.errors == []
    assert info["status"] == "completed" and info["finish_reason"] == "tool_calls"
    assert (info["content"], info["reasoning"]) == ("Whole answer.", "Short.")
    assert info["tool_calls"] == [
        {"id": "call_json1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
    ]
    assert info["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# -- failures ------------------------------------------------------------------------

PARTIAL = "".join(FIRST_WORDS)  # what the misbehaving modes stream before they misbehave


@pytest.mark.parametrize(
    ("mode", "code", "says", "before"),
    [
        ("status-401", "upstream_unauthorized", ["401", "Incorrect API key", "invalid_api_key"], ""),
        ("status-429", "upstream_rate_limited", ["429", "retry after 20 s", "rate_limit_exceeded"], ""),
        ("status-404", "upstream_bad_request", ["404", "does not exist", "model_not_found"], ""),
        ("status-500", "upstream_error", ["500", "error while processing"], ""),
        ("status-503", "upstream_error", ["503", "upstream connect error"], ""),
        ("html", "upstream_error", ["text/html", "instead of an event stream", "<title>Welcome"], ""),
        ("error-mid-stream", "upstream_error", ["mid-stream", "error while processing", "internal_error"], PARTIAL),
        ("stall", "upstream_timeout", [f"nothing for {STAND_IN_TIMEOUT_S} s"], PARTIAL),
        ("stall-head", "upstream_timeout", [f"nothing for {STAND_IN_TIMEOUT_S} s"], ""),
        ("cut", "upstream_disconnected", ["dropped", "incomplete"], PARTIAL),
        ("truncate", "upstream_disconnected", ["ended before the answer was complete"], PARTIAL),
    ],
)
async def test_an_upstream_failure_ends_the_stream_with_its_code_and_message(
    behind_stand_in: Stack, upstream: Upstream, mode: str, code: str, says: list[str], before: str
) -> None:
    prompt = unique(mode)
    async with httpx.AsyncClient(base_url=behind_stand_in.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body(prompt, model=mode))
        info = await generation(client, received.gen_id)
    await upstream.request(prompt)
    assert received.done, "the viewer's stream must end with [DONE]"
    assert len(received.errors) == 1
    error = received.errors[0]
    assert error["code"] == code
    for fragment in says:
        assert fragment in error["message"]
    assert received.text == info["content"] == before  # what came before the failure is kept, nothing is added
    assert received.finish_reason is None
    assert info["status"] == "failed"
    assert info["error"] == {"message": error["message"], "code": code}


async def test_a_refused_connection_fails_as_unreachable(stack_factory: StackFactory, upstream: Upstream) -> None:
    refused = stack_factory(apis=1, generator="openai", upstream_base_url=upstream.refusing_base_url)
    async with httpx.AsyncClient(base_url=refused.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("anyone there?"))
        info = await generation(client, received.gen_id)
    assert received.done and received.text == ""
    assert [e["code"] for e in received.errors] == ["upstream_unreachable"]
    assert "Connection refused" in received.errors[0]["message"]
    assert upstream.refusing_base_url + "/chat/completions" in received.errors[0]["message"]
    assert info["status"] == "failed" and info["error"]["code"] == "upstream_unreachable"


# -- cancel ---------------------------------------------------------------------------


async def test_cancel_closes_the_upstream_request(behind_stand_in: Stack, upstream: Upstream) -> None:
    prompt = unique("a very long answer")
    async with httpx.AsyncClient(base_url=behind_stand_in.url, timeout=30) as client:
        gen_id = await create(client, prompt=prompt, model="hold")
        streaming = asyncio.Event()
        viewer = asyncio.ensure_future(watch(client, gen_id, streaming))
        await asyncio.wait_for(streaming.wait(), 20)
        seen = await upstream.request(prompt)
        assert not seen.closed_by_client.is_set()  # the upstream is answering, connection open

        cancel = await client.post(f"/v1/generations/{gen_id}/cancel")
        assert cancel.status_code == 202, cancel.text
        received = await asyncio.wait_for(viewer, 20)
        info = await generation(client, gen_id)

    assert await seen.client_left(), "the worker did not close its upstream connection after the cancel"
    assert not seen.finished  # it left in the middle of the answer: the model can stop
    assert received.done and received.errors == [] and received.finish_reason == "cancelled"
    assert info["status"] == "cancelled"
    assert received.text == info["content"] != ""
