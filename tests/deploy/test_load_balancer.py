"""Through a real load balancer: Debian's nginx, run with the repository's own
deploy/nginx.conf (only its upstream servers and listen port rewritten), in front of
three real API pods and one worker on one Valkey.

- SSE passes through unbuffered: the first event reaches the client while the
  generation is still running; WebSocket upgrades pass through.
- Viewers connected through nginx survive losing pods: one API process is killed
  (SIGKILL), then another is drained (SIGTERM); every viewer resumes through nginx
  with its last event id, and its text is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from httpx_sse import aconnect_sse
from websockets.asyncio.client import connect

from fanline.cli.valkey import EmbeddedValkey, die_with_parent, free_port, stop_process
from tests.deploy import nginx_args, render_nginx_conf
from tests.support import Received, Stack, chat_body, create, generation, read_sse, wait_http_ok

OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "deploy-load-balancer"


@dataclass
class Balanced:
    url: str
    stack: Stack
    nginx: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def balanced(valkey: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balanced]:
    """nginx on a free port in front of three API pods (100 demo tokens/s) and a worker."""
    stack = Stack(valkey.url, OUTPUT, {"FANLINE_DEMO_TOKENS_PER_S": "100"})
    nginx: subprocess.Popen[bytes] | None = None
    try:
        stack.start(apis=3, workers=1)
        port = free_port()
        upstreams = [url.removeprefix("http://") for url in stack.api_urls]
        conf = render_nginx_conf(upstreams, f"127.0.0.1:{port}", tmp_path_factory.mktemp("nginx"))
        OUTPUT.mkdir(parents=True, exist_ok=True)
        with open(OUTPUT / "nginx.log", "ab") as log:
            nginx = subprocess.Popen(
                nginx_args(conf),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/readyz", nginx)
        yield Balanced(url, stack, nginx)
    finally:
        if nginx is not None:
            stop_process(nginx)
        stack.stop()


async def test_sse_is_unbuffered_and_websocket_upgrades_through_nginx(balanced: Balanced) -> None:
    async with httpx.AsyncClient(base_url=balanced.url, timeout=30) as client:
        first = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body(max_tokens=200), stop_after=1)
        # The first event is here and the generation is not over: nginx did not hold it back.
        assert (await generation(client, first.gen_id))["status"] == "running"

        rest = Received(gen_id=first.gen_id, ids=list(first.ids), chunks=list(first.chunks))
        url = f"/v1/generations/{first.gen_id}/events"
        async with client.stream("GET", url, headers={"Last-Event-ID": first.ids[-1]}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
        await read_sse(client, "GET", url, headers={"Last-Event-ID": first.ids[-1]}, received=rest)
        info = await generation(client, first.gen_id)
    assert rest.done and info["status"] == "completed"
    assert rest.text == info["content"]

    ws_url = balanced.url.replace("http://", "ws://") + f"/v1/generations/{first.gen_id}/ws"
    messages = []
    async with connect(ws_url) as websocket:
        async for message in websocket:
            messages.append(orjson.loads(message))
    assert messages[-1]["done"] is True
    chunks = [m["chunk"] for m in messages[:-1] if m["chunk"]["choices"]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == info["content"]


@dataclass
class Viewer:
    received: Received
    connections: int = 0


class Viewers:
    """SSE viewers of one generation through nginx, each resuming with its last event id
    after its stream drops (pod killed) or closes (pod drained)."""

    def __init__(self, url: str, gen_id: str, count: int) -> None:
        self.url = url
        self.gen_id = gen_id
        self.all = [Viewer(Received(gen_id=gen_id)) for _ in range(count)]
        self._changed = asyncio.Condition()
        self._tasks = [asyncio.create_task(self._watch(v)) for v in self.all]

    def least(self) -> int:
        return min(len(v.received.ids) for v in self.all)

    def most(self) -> int:
        return max(len(v.received.ids) for v in self.all)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(condition), timeout=30)
            except TimeoutError:
                pytest.fail(f"gave up waiting for {what}")

    async def finish(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self._tasks), timeout=60)

    async def _watch(self, viewer: Viewer) -> None:
        received = viewer.received
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            while not received.done and viewer.connections < 10:
                viewer.connections += 1
                headers = {"Last-Event-ID": received.ids[-1]} if received.ids else {}
                url = f"/v1/generations/{self.gen_id}/events"
                with contextlib.suppress(httpx.TransportError):  # the pod behind this stream was killed
                    async with aconnect_sse(client, "GET", url, headers=headers) as source:
                        assert source.response.status_code == 200, (await source.response.aread()).decode()
                        async for sse in source.aiter_sse():
                            self._add(received, sse.id, sse.data)
                            async with self._changed:
                                self._changed.notify_all()
                            if received.done:
                                break

    @staticmethod
    def _add(received: Received, event_id: str, data: str) -> None:
        """As tests.support.read_sse records an event."""
        if event_id:
            received.ids.append(event_id)
        if data == "[DONE]":
            received.done = True
            return
        payload = orjson.loads(data)
        (received.errors if "error" in payload else received.chunks).append(payload.get("error", payload))


async def _sse_viewers(client: httpx.AsyncClient, pod_url: str) -> int:
    """The pod's own count of its SSE viewers (its /metrics, asked directly, not through nginx)."""
    text = (await client.get(pod_url + "/metrics")).text
    match = re.search(r'^fanline_viewers\{transport="sse"\} (\S+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


async def test_viewers_resume_through_nginx_when_a_pod_is_killed_and_another_drained(balanced: Balanced) -> None:
    stack = balanced.stack
    async with httpx.AsyncClient(base_url=balanced.url, timeout=30) as client:
        gen_id = await create(client, max_tokens=500)

        viewers = Viewers(balanced.url, gen_id, 12)
        await viewers.until(lambda: viewers.least() >= 5, "every viewer's first events")
        counts = {i: await _sse_viewers(client, url) for i, url in enumerate(stack.api_urls)}
        assert sum(counts.values()) == len(viewers.all), counts

        # 1. The pod with the most viewers dies at once: its streams just break.
        killed = max(counts, key=counts.__getitem__)
        stack.apis[killed].send_signal(signal.SIGKILL)
        stack.apis[killed].wait()
        mark = viewers.most()
        await viewers.until(lambda: viewers.least() > mark + 5, "every viewer past the kill")
        assert (await generation(client, gen_id))["status"] == "running"

        # 2. Of the others, the pod with the most viewers is drained: its streams get
        # a reconnect hint and close, and the process exits.
        alive = [i for i in counts if i != killed]
        counts_after = {i: await _sse_viewers(client, stack.api_urls[i]) for i in alive}
        assert sum(counts_after.values()) == len(viewers.all), counts_after
        drained = max(counts_after, key=counts_after.__getitem__)
        assert stop_process(stack.apis[drained]) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
        mark = viewers.most()
        await viewers.until(lambda: viewers.least() > mark + 5, "every viewer past the drain")
        assert (await generation(client, gen_id))["status"] == "running"

        await viewers.finish()
        info = await generation(client, gen_id)

    assert info["status"] == "completed"
    for viewer in viewers.all:
        received = viewer.received
        assert received.done and not received.errors
        seqs = [int(event_id.split("-")[0]) for event_id in received.ids]
        assert seqs == list(range(1, len(seqs) + 1)), "a gap or a duplicate"
        assert received.ids == viewers.all[0].received.ids
        assert received.text == info["content"]
    # Everyone on the killed pod, then everyone on the drained pod, came back.
    reconnects = sum(v.connections - 1 for v in viewers.all)
    assert reconnects >= counts[killed] + counts_after[drained] > counts[killed] > 0
