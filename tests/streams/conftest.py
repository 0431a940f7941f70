"""Fixtures of the Durable Streams tests: the conformance suite's npm project, a round-robin
TCP balancer in front of several API pods, and ``fanline up`` as a real process."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from fanline.cli.valkey import free_port, stop_process
from tests.support import REPO, wait_http_ok

CONFORMANCE = REPO / "conformance"


def node_and_npm() -> tuple[str, str]:
    """Node.js and npm, with conformance/ installed (``npm ci`` when node_modules is missing).

    Not a skip: without Node the conformance suite cannot run, and that is a failure.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node is not None and npm is not None, "Node.js 20+ and npm are needed (apt-get install nodejs npm)"
    if not (CONFORMANCE / "node_modules" / ".package-lock.json").exists():
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=CONFORMANCE, check=True, timeout=300)
    return node, npm


class Balancer:
    """Round-robin TCP balancer: each new connection goes to the next pod (a thread of its own)."""

    def __init__(self, targets: list[tuple[str, int]]) -> None:
        self.targets = targets
        self.port = free_port()
        self.connections = [0] * len(targets)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="balancer", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        self._thread.start()
        assert self._started.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        turns = itertools.cycle(range(len(self.targets)))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            n = next(turns)
            self.connections[n] += 1
            try:
                pod_r, pod_w = await asyncio.open_connection(*self.targets[n])
            except OSError:
                client_w.close()
                return
            await asyncio.gather(pipe(client_r, pod_w), pipe(pod_r, client_w))

        server = self._loop.run_until_complete(asyncio.start_server(handle, "127.0.0.1", self.port))
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()


def balancer_for(urls: list[str]) -> Balancer:
    targets = []
    for url in urls:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        targets.append((host, int(port)))
    return Balancer(targets).start()


@pytest.fixture(scope="module")
def fanline_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``fanline up`` (embedded Valkey, one API pod, one worker) as a user starts it; its URL."""
    cwd = tmp_path_factory.mktemp("up")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANLINE_")}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(cwd / "up.log", "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "fanline.cli", "up", "--port", str(port), "--workers", "1"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_http_ok(url + "/readyz", up, timeout=60)
        yield url
    finally:
        stop_process(up)
