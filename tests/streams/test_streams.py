"""Durable Streams on real API pods (api/streams.py, shared/streams.py), beyond the official suite:

- one stream created on pod 1, appended on pod 2, read live (long-poll and SSE) on pod 3;
- the real clients: PyPI ``durable-streams`` and npm ``@durable-streams/client``;
- auth: writes need an API key, reads a key or the stream's watch token;
- limits: body size, stream size; TTL expiry; bad input gets its status and the pod keeps serving;
- fanline's generations as read-only JSON streams, resumed from an offset on another pod.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from typing import Any

import httpx
import orjson
import pytest
from durable_streams import AsyncDurableStream, astream

from fanline.shared.streams import offset_of
from tests.conftest import StackFactory
from tests.streams.conftest import CONFORMANCE, node_and_npm
from tests.support import Stack, assert_error, create, generation_at, settled_at, text_of, wait_until


def _path() -> str:
    return f"/v1/streams/test/{uuid.uuid4().hex}"


@pytest.fixture
def pods(stack_factory: StackFactory) -> Stack:
    """Three API pods and a worker (the demo at 200 tokens/s)."""
    return stack_factory(apis=3, workers=1, demo_tokens_per_s="200")


def event_was_control(found: list[tuple[str, str]]) -> bool:
    return bool(found) and found[-1][0] == "control"


async def _sse_events(client: httpx.AsyncClient, url: str, until: int) -> list[tuple[str, str]]:
    """(event, data) of an SSE read until ``until`` data events and the control event after the last."""
    found: list[tuple[str, str]] = []
    async with client.stream("GET", url) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event, data = "", []
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:])
            elif not line and event:
                found.append((event, "\n".join(data)))
                event, data = "", []
                if event_was_control(found) and sum(1 for e, _ in found if e == "data") >= until:
                    return found
    return found


async def test_a_stream_created_on_one_pod_appended_on_another_is_read_live_on_a_third(pods: Stack) -> None:
    one, two, three = pods.api_urls
    path = _path()
    async with httpx.AsyncClient(timeout=30) as client:
        created = await client.put(one + path, content=b"[]", headers={"Content-Type": "application/json"})
        assert created.status_code == 201, created.text
        start = created.headers["Stream-Next-Offset"]
        assert start == offset_of(0)

        # A long-poll on pod 3 parks (nothing yet); an SSE reader on pod 3 too.
        poll = asyncio.ensure_future(client.get(f"{three}{path}?offset={start}&live=long-poll"))
        sse = asyncio.ensure_future(_sse_events(client, f"{three}{path}?offset={start}&live=sse", until=2))

        async def both_parked_in_the_hub() -> bool:
            text = (await client.get(three + "/metrics")).text
            return "fanline_hub_topics 1.0" in text and not poll.done()

        await wait_until(both_parked_in_the_hub, "the long-poll and the SSE reader to wait on pod 3's hub")
        appended = await client.post(two + path, content=b'{"n": 1}', headers={"Content-Type": "application/json"})
        assert appended.status_code == 204, appended.text
        response = await poll
        assert response.status_code == 200, response.text
        assert response.json() == [{"n": 1}]
        assert response.headers["Stream-Next-Offset"] == offset_of(1)
        closing = await client.post(
            two + path, content=b'[{"n": 2}]', headers={"Content-Type": "application/json", "Stream-Closed": "true"}
        )
        assert closing.status_code == 204 and closing.headers["Stream-Closed"] == "true"
        events = await asyncio.wait_for(sse, 20)
        data = [json.loads(d) for e, d in events if e == "data"]
        assert data == [[{"n": 1}], [{"n": 2}]]
        controls = [json.loads(d) for e, d in events if e == "control"]
        assert controls[-1]["streamNextOffset"] == offset_of(2)

        # Catch-up on pod 1 sees all of it, closed; a long-poll at the tail answers at once.
        read = await client.get(f"{one}{path}?offset=-1")
        assert read.json() == [{"n": 1}, {"n": 2}] and read.headers["Stream-Closed"] == "true"
        tail = await client.get(f"{one}{path}?offset={offset_of(2)}&live=long-poll")
        assert tail.status_code == 204 and tail.headers["Stream-Closed"] == "true"


async def test_the_python_client_writes_on_one_pod_and_resumes_on_another(pods: Stack) -> None:
    one, two, _ = pods.api_urls
    path = _path()
    handle = await AsyncDurableStream.create(one + path, content_type="text/plain")
    try:
        for word in ("alpha ", "beta ", "gamma"):
            await handle.append(word)
    finally:
        await handle.aclose()
    async with astream(two + path, live=False) as res:
        text = await res.read_text()
        offset = res.offset
    assert text == "alpha beta gamma"
    assert offset == offset_of(3)
    async with httpx.AsyncClient(timeout=30) as client:
        await client.post(one + path, content=b" delta", headers={"Content-Type": "text/plain"})
    async with astream(two + path, offset=offset, live=False) as res:
        assert await res.read_text() == " delta"


def _node(env: dict[str, str]) -> dict[str, Any]:
    node, _ = node_and_npm()
    result = subprocess.run(
        [node, "client-check.mjs"],
        cwd=CONFORMANCE,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


async def test_the_js_client_writes_reads_and_watches_a_generation(pods: Stack) -> None:
    one, two, _ = pods.api_urls
    path = _path()
    gen_id = await create(httpx.AsyncClient(base_url=one, timeout=30), max_tokens=40)
    out = await asyncio.to_thread(
        _node,
        {"DS_URL": one + path, "DS_URL_2": two + path, "GEN_URL": f"{two}/v1/streams/generations/{gen_id}"},
    )
    assert out["items"] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert out["offset"] == offset_of(3) and out["after"] == []
    info = await settled_at(one, gen_id)
    assert text_of(out["chunks"]) == info["content"]


async def test_a_generation_resumes_from_an_offset_on_another_pod_without_gap_or_duplicate(pods: Stack) -> None:
    one, two, three = pods.api_urls
    async with httpx.AsyncClient(base_url=one, timeout=30) as client:
        gen_id = await create(client, max_tokens=300)  # 1.5 s at 200 tokens/s
    url = f"/v1/streams/generations/{gen_id}"
    chunks: list[dict[str, Any]] = []
    offsets: list[str] = []
    offset = "-1"
    closed = False
    for n in range(2000):  # long-polls, each on the next pod, each from the last offset
        base = (one, two, three)[n % 3]
        async with httpx.AsyncClient(timeout=30) as client:
            response = await client.get(f"{base}{url}?offset={offset}&live=long-poll")
        assert response.status_code in (200, 204), response.text
        if response.status_code == 200:
            chunks += response.json()
            offsets.append(response.headers["Stream-Next-Offset"])
        offset = response.headers["Stream-Next-Offset"]
        if response.headers.get("Stream-Closed") == "true":
            closed = True
            break
    assert closed
    assert offsets == sorted(set(offsets))  # strictly increasing
    info = await settled_at(one, gen_id)
    assert text_of(chunks) == info["content"]
    # Each message is the generation's chunk, and the offsets count its events.
    async with httpx.AsyncClient(timeout=30) as client:
        whole = await client.get(f"{three}{url}?offset=-1")
        events = await client.get(f"{three}/v1/generations/{gen_id}/events", headers={"Accept": "application/x-ndjson"})
        lines = [orjson.loads(line) for line in events.text.splitlines() if line.strip()]
        assert whole.json() == [line["chunk"] for line in lines if "chunk" in line]
        assert whole.headers["Stream-Next-Offset"] == offset_of(int(lines[-1]["id"].split("-")[0]) - 1)
        for method in ("PUT", "POST", "DELETE"):
            refused = await client.request(method, f"{three}{url}", content=b"[]")
            assert_error(refused, 405)
        head = await client.head(f"{three}{url}")
        assert head.status_code == 200 and head.headers["Stream-Closed"] == "true"
        assert (await client.get(f"{three}/v1/streams/generations/{'0' * 32}?offset=-1")).status_code == 404
    assert (await generation_at(one, gen_id))["status"] == "completed"


async def test_auth_writes_need_a_key_reads_a_key_or_the_streams_watch_token(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, workers=0, api_keys="sk-one,sk-two")
    path, other = _path(), _path()
    key = {"Authorization": "Bearer sk-one", "Content-Type": "text/plain"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        assert_error(await client.put(path, headers={"Content-Type": "text/plain"}), 401)
        assert_error(await client.put(path, headers={"Authorization": "Bearer nope"}), 401)
        created = await client.put(path, content=b"hi", headers=key)
        assert created.status_code == 201
        token = created.headers["X-Fanline-Watch-Token"]
        other_token = (await client.put(other, headers=key)).headers["X-Fanline-Watch-Token"]
        assert (await client.get(f"{path}?offset=-1", headers=key)).text == "hi"
        assert (await client.get(f"{path}?offset=-1", headers={"Authorization": f"Bearer {token}"})).text == "hi"
        assert (await client.get(f"{path}?offset=-1&token={token}")).text == "hi"  # EventSource
        assert_error(await client.get(f"{path}?offset=-1"), 401)
        assert_error(await client.get(f"{path}?offset=-1&token={other_token}"), 403)
        watch_token = {"Authorization": f"Bearer {token}", "Content-Type": "text/plain"}
        assert_error(await client.post(path, content=b"x", headers=watch_token), 403)
        assert_error(await client.delete(path, headers={"Authorization": f"Bearer {token}"}), 403)
        assert (await client.post(path, content=b"!", headers=key)).status_code == 204


async def test_body_and_stream_size_limits_then_the_pod_keeps_serving(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, workers=0, ds_max_body_bytes="2048", ds_max_stream_bytes="4096")
    path = _path()
    plain = {"Content-Type": "application/octet-stream"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        assert (await client.put(path, headers=plain)).status_code == 201
        assert_error(await client.post(path, content=b"x" * 2049, headers=plain), 413)
        for _ in range(2):
            assert (await client.post(path, content=b"x" * 2000, headers=plain)).status_code == 204
        assert_error(await client.post(path, content=b"x" * 200, headers=plain), 413, "stream_too_large")
        read = await client.get(f"{path}?offset=-1")
        assert len(read.content) == 4000 and read.headers["Stream-Next-Offset"] == offset_of(2)
        assert (await client.get("/readyz")).status_code == 200


async def test_a_stream_expires_after_its_ttl_since_the_last_access(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, workers=0)
    path = _path()
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        created = await client.put(
            path, content=b"soon gone", headers={"Content-Type": "text/plain", "Stream-TTL": "1"}
        )
        assert created.status_code == 201
        head = await client.head(path)
        assert head.headers["Stream-TTL"] == "1"

        async def gone() -> bool:
            return (await client.head(path)).status_code == 404  # HEAD does not extend the TTL

        await wait_until(gone, "the stream to expire", within=10)
        assert_error(await client.get(f"{path}?offset=-1"), 404)
        assert (await client.put(path, headers={"Content-Type": "text/plain"})).status_code == 201  # the path is free


async def test_bad_input_gets_the_protocols_status_and_the_pod_keeps_serving(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, workers=0)
    path = _path()
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        assert (await client.put(path, headers=json_type)).status_code == 201
        for offset in ("abc", "1_", "../../etc", "-2", ""):
            assert_error(await client.get(path, params={"offset": offset}), 400)
        assert_error(await client.get(f"{path}?offset=-1&offset=-1"), 400)
        assert_error(await client.get(f"{path}?live=long-poll"), 400)  # live needs an offset
        assert_error(await client.post(path, content=b"{nope", headers=json_type), 400, "invalid_json")
        assert_error(await client.post(path, content=b"[]", headers=json_type), 400)
        assert_error(await client.post(path, content=b"x", headers={"Content-Type": "text/plain"}), 409)
        assert_error(await client.post(path, content=b""), 400)
        producer = {**json_type, "Producer-Id": "p", "Producer-Epoch": "0"}
        assert_error(await client.post(path, content=b"1", headers=producer), 400)  # no Producer-Seq
        assert_error(await client.post(path, content=b"1", headers={**producer, "Producer-Seq": "1e3"}), 400)
        assert (await client.post(path, content=b"1", headers={**producer, "Producer-Seq": "0"})).status_code == 200
        assert (await client.post(path, content=b"1", headers={**producer, "Producer-Seq": "0"})).status_code == 204
        gap = await client.post(path, content=b"2", headers={**producer, "Producer-Seq": "5"})
        assert_error(gap, 409)
        assert gap.headers["Producer-Expected-Seq"] == "1"
        assert_error(await client.put(path, headers={"Content-Type": "text/plain"}), 409)  # exists, other type
        assert_error(
            await client.put(_path(), headers={"Stream-TTL": "1", "Stream-Expires-At": "2030-01-01T00:00:00Z"}), 400
        )
        assert_error(await client.put(_path(), headers={"Stream-TTL": "-1"}), 400)
        assert_error(await client.get("/v1/streams/no/such/stream?offset=-1"), 404)
        assert (await client.get(f"{path}?offset=-1")).json() == [1]
