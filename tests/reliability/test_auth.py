"""Access control: API keys, per-generation watch tokens, owner-only cancel, no credential in the logs, CORS.

One pod with two API keys (alpha and beta), an explicit watch-token secret (so a
test can sign a token that has expired), CORS for one origin, and debug logging,
the most talkative level, for the log check.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import StackFactory
from tests.support import Stack, WsRead, chat_body, read_sse, read_ws, ws_url

# Fresh for each session, so finding one in a log file cannot be an old run's leftover.
KEY_A = f"fk-alpha-{uuid.uuid4().hex}"
KEY_B = f"fk-beta-{uuid.uuid4().hex}"
WRONG_KEY = f"fk-typo-{uuid.uuid4().hex}"
SECRET = f"watch-secret-{uuid.uuid4().hex}"
ORIGIN = "https://app.example"


@pytest.fixture
def auth_stack(stack_factory: StackFactory) -> Stack:
    return stack_factory(
        apis=1,
        demo_tokens_per_s="200",
        api_keys=f"{KEY_A}, {KEY_B}",
        watch_token_secret=SECRET,
        cors_origins=ORIGIN,
        log_level="debug",
    )


@pytest.fixture
async def anonymous(auth_stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_stack.url, timeout=30) as client:
        yield client


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error: dict[str, Any] = response.json()["error"]
    assert error["message"] and error["type"] and error["code"]
    return error


async def start(client: httpx.AsyncClient, key: str = KEY_A, max_tokens: int = 5) -> tuple[str, str]:
    """A generation created with ``key``: (its id, its watch token)."""
    response = await client.post(
        "/v1/generations", json=chat_body("auth", stream=False, max_tokens=max_tokens), headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    created = response.json()
    return created["id"], created["watch_token"]


def signed(gen_id: str, expiry: int, secret: str = SECRET) -> str:
    """A watch token in the documented format (api/auth.py), signed with the pod's secret."""
    return f"{gen_id}.{signed_v1(gen_id, expiry, secret)}"


def signed_v1(gen_id: str, expiry: int, secret: str = SECRET) -> str:
    """A watch token of the first format, ``<expiry>.<signature>`` (still accepted for its generation)."""
    mac = hmac.new(secret.encode(), f"{gen_id}|{expiry}".encode(), hashlib.sha256).digest()
    return f"{expiry}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def ws_refused(url: str) -> int:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=10):
            pass
    return refused.value.response.status_code


# -- API keys -----------------------------------------------------------------------


async def test_without_a_valid_api_key_everything_but_health_is_401(anonymous: httpx.AsyncClient) -> None:
    gen_id, _ = await start(anonymous)
    requests = [
        ("POST", "/v1/chat/completions", chat_body(max_tokens=3)),
        ("POST", "/v1/generations", chat_body(max_tokens=3)),
        ("GET", f"/v1/generations/{gen_id}", None),
        ("GET", f"/v1/generations/{gen_id}/events", None),
        ("POST", f"/v1/generations/{gen_id}/cancel", None),
        ("GET", "/metrics", None),
    ]
    for headers in ({}, {"Authorization": KEY_A}, {"Authorization": f"Basic {KEY_A}"}):  # no bearer at all
        for method, path, body in requests:
            assert_error(await anonymous.request(method, path, json=body, headers=headers), 401)
    for method, path, body in requests:  # a wrong one: 401 authentication_error everywhere, naming the scheme
        response = await anonymous.request(method, path, json=body, headers=bearer(WRONG_KEY))
        assert assert_error(response, 401)["type"] == "authentication_error", (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer"), (method, path)
    assert (await anonymous.get("/healthz")).status_code == 200
    assert (await anonymous.get("/readyz")).status_code == 200
    assert await ws_refused(ws_url(str(anonymous.base_url), gen_id)) == 401
    assert await ws_refused(ws_url(str(anonymous.base_url), gen_id, token=WRONG_KEY)) == 401
    # Either key works.
    for key in (KEY_A, KEY_B):
        response = await anonymous.post("/v1/chat/completions", json=chat_body(max_tokens=3), headers=bearer(key))
        assert response.status_code == 200, response.text


# -- watch tokens ---------------------------------------------------------------------


async def test_a_watch_token_reads_its_generation_on_every_transport(
    auth_stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    gen_id, token = await start(anonymous, max_tokens=20)
    events = f"/v1/generations/{gen_id}/events"
    as_bearer = await read_sse(anonymous, "GET", events, headers=bearer(token))
    as_query = await read_sse(anonymous, "GET", events, params={"token": token})
    info_response = await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(token))
    assert info_response.status_code == 200, info_response.text
    info = info_response.json()
    assert as_bearer.done and as_query.done and as_bearer.text == as_query.text == info["content"] != ""
    ndjson_response = await anonymous.get(events, headers={"Accept": "application/x-ndjson", **bearer(token)})
    assert ndjson_response.status_code == 200 and ndjson_response.text.rstrip().endswith('"done":true}')
    ws = await read_ws(ws_url(auth_stack.url, gen_id, token=token), WsRead())
    assert ws.done and ws.close_code == 1000
    # The streaming endpoint hands out the same kind of token in a header.
    async with anonymous.stream(
        "POST", "/v1/chat/completions", json=chat_body(max_tokens=3), headers=bearer(KEY_B)
    ) as response:
        header_token = response.headers["x-fanline-watch-token"]
        other_id = response.headers["x-fanline-generation-id"]
        await response.aread()
    assert (await anonymous.get(f"/v1/generations/{other_id}", params={"token": header_token})).status_code == 200


async def test_a_watch_token_grants_nothing_else(auth_stack: Stack, anonymous: httpx.AsyncClient) -> None:
    gen_id, token = await start(anonymous, max_tokens=400)  # 2 s at 200 tokens/s: running meanwhile
    other_id, other_token = await start(anonymous, key=KEY_B)
    # Another generation's token: 403 on every read.
    assert_error(await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(other_token)), 403)
    assert_error(await anonymous.get(f"/v1/generations/{gen_id}/events", headers=bearer(other_token)), 403)
    assert_error(await anonymous.get(f"/v1/generations/{gen_id}/events", params={"token": other_token}), 403)
    assert await ws_refused(ws_url(auth_stack.url, gen_id, token=other_token)) == 403
    # A watch token is not an API key: it creates nothing, lists no metrics, cancels nothing. It is a
    # valid credential that does not cover these, so 403 permission_error (not 401).
    for method, path in (
        ("POST", "/v1/generations"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/metrics"),
        ("POST", f"/v1/generations/{gen_id}/cancel"),
        ("POST", "/v1/ai-sdk/chat"),
        ("GET", "/v1/ai-sdk/chat/some-chat/stream"),
        ("POST", "/v1/ai-sdk/chat/some-chat/stop"),
    ):
        body = chat_body(max_tokens=3) if method == "POST" else None
        response = await anonymous.request(method, path, json=body, headers=bearer(token))
        assert assert_error(response, 403)["type"] == "permission_error", (method, path)
    # ... not over the WebSocket either: the cancel message is answered with an error and the stream goes on.
    ws = await read_ws(ws_url(auth_stack.url, gen_id, token=token), WsRead(), send=['{"type": "cancel"}'])
    assert ws.done and ws.replies and ws.replies[0]["error"]["type"] == "permission_error"
    # Another API key cannot cancel it; the key that created it can.
    assert_error(await anonymous.post(f"/v1/generations/{gen_id}/cancel", headers=bearer(KEY_B)), 403)
    final = (await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(KEY_A))).json()
    assert final["status"] == "completed"
    assert (await anonymous.post(f"/v1/generations/{other_id}/cancel", headers=bearer(KEY_B))).status_code in (
        202,
        409,  # it may already have finished
    )


async def test_expired_or_tampered_watch_tokens_are_refused(auth_stack: Stack, anonymous: httpx.AsyncClient) -> None:
    gen_id, token = await start(anonymous)
    _, expiry, signature = token.split(".")
    assert signed(gen_id, int(expiry)) == token  # the documented format, so the forgeries below are meaningful
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    # Not a valid credential at all: 401 authentication_error.
    invalid = [
        signed(gen_id, int(time.time()) - 1),  # expired
        f"{gen_id}.{int(expiry) + 3600}.{signature}",  # a later expiry under the old signature
        f"{gen_id}.{expiry}.{flipped}",
        f"{gen_id}.{expiry}.",
        f"{uuid.uuid4().hex}.{expiry}.{signature}",  # this signature, claimed for another id
        token + "x",
        "garbage",
        signed(gen_id, int(expiry), secret="another secret"),  # another deployment's token
        signed_v1(uuid.uuid4().hex, int(expiry)),  # the first format names no id: it cannot be checked elsewhere
    ]
    # A valid token for another generation: 403 permission_error.
    other = signed(uuid.uuid4().hex, int(expiry))
    for bad, status in [*((b, 401) for b in invalid), (other, 403)]:
        for response in (
            await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(bad)),
            await anonymous.get(f"/v1/generations/{gen_id}/events", params={"token": bad}),
            await anonymous.get(
                f"/v1/generations/{gen_id}/events", headers={"Accept": "application/x-ndjson", **bearer(bad)}
            ),
        ):
            assert response.status_code == status, (bad, response.status_code)
            assert_error(response, status)
        assert await ws_refused(ws_url(auth_stack.url, gen_id, token=bad)) == status, bad
    # The genuine one works, and so does a token of the first format for its own generation.
    assert (await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(token))).status_code == 200
    old = signed_v1(gen_id, int(expiry))
    assert (await anonymous.get(f"/v1/generations/{gen_id}", headers=bearer(old))).status_code == 200


# -- logs ----------------------------------------------------------------------------------


def log_text(stack: Stack) -> str:
    return "\n".join(path.read_text(errors="replace") for path in Path(stack.log_dir).glob("*.log"))


async def test_api_keys_and_the_secret_never_appear_in_the_logs(
    auth_stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    # Keys as they are meant to be sent (the Authorization header), accepted or refused, on every endpoint.
    gen_id, _ = await start(anonymous, key=KEY_B)
    for key in (KEY_A, KEY_B, WRONG_KEY):
        await anonymous.post("/v1/chat/completions", json=chat_body(max_tokens=2), headers=bearer(key))
        await anonymous.get(f"/v1/generations/{gen_id}/events", headers=bearer(key))
        await anonymous.post(f"/v1/generations/{gen_id}/cancel", headers=bearer(key))
        await anonymous.post("/v1/generations", content=b"{not json", headers=bearer(key))
        await anonymous.get("/metrics", headers=bearer(key))
        with contextlib.suppress(InvalidStatus):
            async with connect(ws_url(auth_stack.url, gen_id), additional_headers=bearer(key), open_timeout=10) as ws:
                await ws.recv()
    text = log_text(auth_stack)
    assert f"/v1/generations/{gen_id}/events" in text  # the requests were logged (access lines), keys aside
    for secret in (KEY_A, KEY_B, WRONG_KEY, SECRET):
        assert secret not in text, f"a credential is in the logs under {auth_stack.log_dir}"


async def test_credentials_in_query_strings_never_appear_in_the_logs(
    auth_stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    """EventSource and WebSocket clients must send their credential as ``?token=``: a watch token
    (read access for days) or an API key. An access log that records the query records the credential."""
    gen_id, token = await start(anonymous)
    for credential in (token, KEY_A):
        await read_sse(anonymous, "GET", f"/v1/generations/{gen_id}/events", params={"token": credential})
        await read_ws(ws_url(auth_stack.url, gen_id, token=credential), WsRead())
    text = log_text(auth_stack)
    signature = token.partition(".")[2]
    assert signature not in text, f"a watch token is in the logs under {auth_stack.log_dir}"
    assert KEY_A not in text, f"an API key is in the logs under {auth_stack.log_dir}"


# -- CORS ---------------------------------------------------------------------------------


async def test_cors_answers_only_the_configured_origin(anonymous: httpx.AsyncClient) -> None:
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    allowed = await anonymous.options("/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    simple = await anonymous.get("/healthz", headers={"Origin": ORIGIN})
    assert simple.headers["access-control-allow-origin"] == ORIGIN
    assert "x-fanline-generation-id" in simple.headers["access-control-expose-headers"].lower()

    other = await anonymous.options("/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers
    assert (
        "access-control-allow-origin"
        not in (await anonymous.get("/healthz", headers={"Origin": "https://evil.example"})).headers
    )


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    response = await client.options("/v1/chat/completions", headers=preflight)
    assert not any(name.startswith("access-control-") for name in response.headers)
    response = await client.get("/healthz", headers={"Origin": ORIGIN})
    assert not any(name.startswith("access-control-") for name in response.headers)
    assert orjson.loads(response.content) == {"status": "ok"}


async def test_the_openai_sdk_raises_authentication_error_for_a_wrong_key_and_permission_denied_for_a_token(
    auth_stack: Stack, anonymous: httpx.AsyncClient
) -> None:
    """Issue 13: a wrong key was answered 403, which the SDK raises as PermissionDeniedError."""
    _, token = await start(anonymous)
    request = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for credential, error in ((WRONG_KEY, openai.AuthenticationError), (token, openai.PermissionDeniedError)):
        async with openai.AsyncOpenAI(base_url=f"{auth_stack.url}/v1", api_key=credential, max_retries=0) as sdk:
            with pytest.raises(error):
                await sdk.chat.completions.create(**request)  # type: ignore[call-overload]
    async with openai.AsyncOpenAI(base_url=f"{auth_stack.url}/v1", api_key=KEY_A, max_retries=0) as sdk:
        done = await sdk.chat.completions.create(**request)  # type: ignore[call-overload]
        assert done.choices[0].message.content
