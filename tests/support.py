"""Helpers for tests that run real processes: Redis/Valkey servers, API pods, workers.

stack = Stack(redis_url, tmp_dir, env={"FANLINE_DEMO_TOKENS_PER_S": "0"})
stack.start(apis=2, workers=1)
... stack.api_urls[0] ...
stack.stop()
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse

from cli.valkey import die_with_parent, free_port

REPO = Path(__file__).resolve().parent.parent


def spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A ``fanline`` subcommand as a real process, its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )


def wait_http_ok(url: str, process: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout} s")


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class Stack:
    """API pods and workers on one Redis, with a queue of their own."""

    redis_url: str
    log_dir: Path
    env_overrides: dict[str, str] = field(default_factory=dict)
    apis: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api_urls: list[str] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "FANLINE_REDIS_URL": self.redis_url,
            "FANLINE_QUEUE_NAME": f"fanline:test:{uuid.uuid4().hex[:8]}",
            "FANLINE_LOG_LEVEL": "warning",
            **self.env_overrides,
        }

    @property
    def url(self) -> str:
        return self.api_urls[0]

    def start_api(self) -> str:
        port = free_port()
        n = len(self.apis)
        process = spawn(["api", "--port", str(port)], self.env, self.log_dir / f"api{n}.log")
        url = f"http://127.0.0.1:{port}"
        wait_http_ok(url + "/readyz", process)
        self.apis.append(process)
        self.api_urls.append(url)
        return url

    def start_worker(self) -> subprocess.Popen[bytes]:
        process = spawn(["worker"], self.env, self.log_dir / f"worker{len(self.workers)}.log")
        self.workers.append(process)
        return process

    def start(self, apis: int = 2, workers: int = 1) -> Stack:
        for _ in range(workers):
            self.start_worker()
        for _ in range(apis):
            self.start_api()
        return self

    def stop(self) -> None:
        for process in self.apis + self.workers:
            stop_process(process)


# -- clients ------------------------------------------------------------------


def chat_body(
    prompt: str = "hello", *, stream: bool = True, max_tokens: int | None = None, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "demo", "stream": stream, "messages": [{"role": "user", "content": prompt}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


@dataclass
class Received:
    """What one SSE viewer got."""

    ids: list[str] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    gen_id: str = ""

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c.get("choices"))

    @property
    def finish_reason(self) -> str | None:
        reasons = [c["choices"][0]["finish_reason"] for c in self.chunks if c.get("choices")]
        return next((r for r in reversed(reasons) if r), None)


async def read_sse(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    received: Received | None = None,
    stop_after: int | None = None,
    **kwargs: Any,
) -> Received:
    """Reads an SSE stream into ``received``; stops after ``stop_after`` events if given (a dropped client)."""
    received = received or Received()
    async with aconnect_sse(client, method, url, **kwargs) as source:
        assert source.response.status_code == 200, (await source.response.aread()).decode()
        received.gen_id = received.gen_id or source.response.headers.get("x-fanline-generation-id", "")
        count = 0
        async for sse in source.aiter_sse():
            if sse.data == "[DONE]":
                received.done = True
                if sse.id:
                    received.ids.append(sse.id)
                return received
            payload = orjson.loads(sse.data)
            if sse.id:
                received.ids.append(sse.id)
            if "error" in payload:
                received.errors.append(payload["error"])
            else:
                received.chunks.append(payload)
            count += 1
            if stop_after is not None and count >= stop_after:
                return received
    return received


async def generation(client: httpx.AsyncClient, gen_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/generations/{gen_id}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
