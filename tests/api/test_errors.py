"""Bad input gets the OpenAI error body with a fitting status, and the pod keeps serving (guarantee 6)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import StackFactory
from tests.support import Stack, assert_error, chat_body, read_sse

_MISSING = object()


def body(**changes: Any) -> bytes:
    """A valid chat request with ``changes`` applied (``_MISSING`` removes a field)."""
    request = chat_body("errors", stream=False, max_tokens=3)
    for name, value in changes.items():
        if value is _MISSING:
            request.pop(name, None)
        else:
            request[name] = value
    return orjson.dumps(request)


async def assert_serving(client: httpx.AsyncClient) -> None:
    """A normal request, end to end, right after the bad one."""
    response = await client.post("/v1/chat/completions", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    completion = response.json()
    assert completion["object"] == "chat.completion"
    assert len(completion["choices"][0]["message"]["content"].split()) == 3


@pytest.fixture
async def finished(client: httpx.AsyncClient) -> str:
    """The id of a generation that has ended."""
    received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("finished", max_tokens=3))
    assert received.done
    return received.gen_id


# -- request bodies --------------------------------------------------------------

BAD_BODIES: dict[str, bytes] = {
    "malformed_json": b'{"model": "demo", "messages": [',
    "empty_body": b"",
    "not_utf8": b'{"model": "\xff\xfe"}',
    "json_array": b'[{"model": "demo"}]',
    "json_string": b'"hello"',
    "json_null": b"null",
    "json_number": b"42",
    "stream_as_string": body(stream="yes"),
    "stream_as_int": body(stream=1),
    "max_tokens_as_string": body(max_tokens="5"),
    "max_tokens_as_float": body(max_tokens=2.5),
    "max_tokens_as_bool": body(max_tokens=True),
    "messages_as_string": body(messages="hi"),
    "message_as_string": body(messages=["hi"]),
    "message_without_role": body(messages=[{"content": "hi"}]),
    "message_with_unknown_role": body(messages=[{"role": "wizard", "content": "hi"}]),
    "model_as_number": body(model=5),
    "temperature_as_string": body(temperature="hot"),
    "temperature_out_of_range": body(temperature=7),
    "include_usage_as_string": body(stream_options={"include_usage": "yes"}),
    "missing_messages": body(messages=_MISSING),
    "empty_messages": body(messages=[]),
    "missing_model": body(model=_MISSING),
    "n_is_2": body(n=2),
    "max_tokens_over_limit": body(max_tokens=10**9),
    "max_completion_tokens_over_limit": body(max_completion_tokens=10**9),
    "max_tokens_zero": body(max_tokens=0),
    "max_tokens_negative": body(max_tokens=-5),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
async def test_bad_chat_request_is_400(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post(
        "/v1/chat/completions", content=BAD_BODIES[name], headers={"content-type": "application/json"}
    )
    error = assert_error(response, 400)
    assert error["type"] == "invalid_request_error"
    await assert_serving(client)


@pytest.mark.parametrize("name", ["malformed_json", "json_array", "stream_as_string", "n_is_2", "max_tokens_zero"])
async def test_bad_generation_request_is_400(client: httpx.AsyncClient, name: str) -> None:
    response = await client.post(
        "/v1/generations", content=BAD_BODIES[name], headers={"content-type": "application/json"}
    )
    assert_error(response, 400)
    await assert_serving(client)


async def test_unknown_fields_are_ignored(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", content=body(logit_bias={"1": 2}, some_future_field=[1]))
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"][0]["message"]["content"].split()) == 3


# -- body size ---------------------------------------------------------------------


@pytest.fixture
def small_body_stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(apis=1, max_body_bytes="2048", demo_tokens_per_s="0")


@pytest.fixture
async def small_body_client(small_body_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=small_body_stack.url, timeout=30) as client:
        yield client


def big_body(size: int) -> bytes:
    return body(messages=[{"role": "user", "content": "x" * size}])


async def test_body_over_the_limit_is_413(small_body_client: httpx.AsyncClient) -> None:
    assert len(body()) < 2048  # the follow-up request fits
    response = await small_body_client.post("/v1/chat/completions", content=big_body(4096))
    assert "content-length" in response.request.headers
    assert_error(response, 413)
    await assert_serving(small_body_client)


async def test_chunked_body_over_the_limit_is_413(small_body_client: httpx.AsyncClient) -> None:
    data = big_body(8192)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    response = await small_body_client.post("/v1/generations", content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_error(response, 413)
    await assert_serving(small_body_client)


async def raw_request(url: str, head: bytes, body_part: bytes) -> tuple[int, dict[str, Any]]:
    """Sends a request head and part of a body that never ends; returns the status and JSON body of the answer."""
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    try:
        writer.write(head + body_part)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        headers: dict[str, str] = {}
        while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        payload = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return int(status_line.split()[1]), orjson.loads(payload)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_limit_is_enforced_while_reading_a_chunked_body_that_never_ends(small_body_stack: Stack) -> None:
    """The 413 comes while the client is still sending: the body is never buffered whole first."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    part = big_body(4096)
    status, answer = await raw_request(small_body_stack.url, head, b"%x\r\n%s\r\n" % (len(part), part))
    assert status == 413
    assert answer["error"]["code"] and answer["error"]["message"]


async def test_declared_content_length_over_the_limit_is_413_before_the_body(small_body_stack: Stack) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    status, answer = await raw_request(small_body_stack.url, head, b'{"model": ')
    assert status == 413
    assert answer["error"]["code"] and answer["error"]["message"]
    async with httpx.AsyncClient(base_url=small_body_stack.url, timeout=30) as client:
        await assert_serving(client)


# -- generation ids and event ids ---------------------------------------------------

GENERATION_URLS = [
    ("GET", "/v1/generations/{}"),
    ("GET", "/v1/generations/{}/events"),
    ("POST", "/v1/generations/{}/cancel"),
]
MALFORMED_GEN_IDS = ["nothex", "z" * 32, "A" * 32, "a" * 31, "a" * 33, "a" * 5000]


@pytest.mark.parametrize(("method", "url"), GENERATION_URLS)
async def test_unknown_generation_is_404(client: httpx.AsyncClient, method: str, url: str) -> None:
    response = await client.request(method, url.format(uuid.uuid4().hex))
    assert_error(response, 404)
    await assert_serving(client)


@pytest.mark.parametrize(("method", "url"), GENERATION_URLS)
async def test_malformed_generation_id_is_400(client: httpx.AsyncClient, method: str, url: str) -> None:
    for gen_id in MALFORMED_GEN_IDS:
        response = await client.request(method, url.format(gen_id))
        assert_error(response, 400)
    await assert_serving(client)


async def ws_refusal(url: str) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=10):
            pass
    response = refused.value.response
    return response.status_code, orjson.loads(response.body or b"{}")


async def test_websocket_bad_ids_are_refused_at_the_handshake(stack: Stack, finished: str) -> None:
    base = stack.url.replace("http://", "ws://", 1)
    status, answer = await ws_refusal(f"{base}/v1/generations/{uuid.uuid4().hex}/ws")
    assert status == 404 and answer["error"]["code"]
    status, answer = await ws_refusal(f"{base}/v1/generations/{'z' * 32}/ws")
    assert status == 400 and answer["error"]["code"]
    for bad in ("abc", "999999-0"):
        status, answer = await ws_refusal(f"{base}/v1/generations/{finished}/ws?last_event_id={bad}")
        assert status == 400 and answer["error"]["code"]


MALFORMED_EVENT_IDS = ["abc", "5", "5-1", "-1-0", "1-0-0", "1.5-0", "9" * 40 + "-0", "0x10-0"]


@pytest.mark.parametrize("where", ["header", "query"])
async def test_malformed_last_event_id_is_400(client: httpx.AsyncClient, finished: str, where: str) -> None:
    for bad in MALFORMED_EVENT_IDS:
        if where == "header":
            response = await client.get(f"/v1/generations/{finished}/events", headers={"Last-Event-ID": bad})
        else:
            response = await client.get(f"/v1/generations/{finished}/events", params={"last_event_id": bad})
        assert_error(response, 400)
    await assert_serving(client)


@pytest.mark.parametrize("where", ["header", "query"])
async def test_last_event_id_beyond_the_last_event_is_400(client: httpx.AsyncClient, finished: str, where: str) -> None:
    beyond = "999999-0"
    if where == "header":
        response = await client.get(f"/v1/generations/{finished}/events", headers={"Last-Event-ID": beyond})
    else:
        response = await client.get(f"/v1/generations/{finished}/events", params={"last_event_id": beyond})
    assert_error(response, 400)
    await assert_serving(client)


# -- routes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        ("GET", "/v1/nope", 404),
        ("POST", "/v1/completions", 404),
        ("GET", "/v1/generations", 405),
        ("GET", "/v1/chat/completions", 405),
    ],
)
async def test_unknown_route_or_method_gets_the_error_shape(
    client: httpx.AsyncClient, method: str, url: str, status: int
) -> None:
    assert_error(await client.request(method, url), status)
    await assert_serving(client)
