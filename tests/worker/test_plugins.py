"""Plugin generators in real workers: by ``package.module:callable``, by entry point name, and a bad name."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fanline.cli.valkey import stop_process
from fanline.worker.generators import load_generator
from fanline.worker.generators.demo import demo
from fanline.worker.generators.openai import openai
from tests.conftest import OUTPUT, StackFactory
from tests.plugins.shout import shout
from tests.support import Stack, chat_body, generation, read_sse, spawn

# A plugin distribution as pip would install it: a module and its dist-info with the entry point.
PLUGIN_MODULE = """
from collections.abc import AsyncIterator

async def reverse(request, ctx) -> AsyncIterator[dict]:
    words = request.prompt_text().split()
    yield {"reasoning_content": f"reversing {len(words)} words"}
    for word in reversed(words):
        yield {"content": word + " "}
    ctx.finish_reason = "length"
"""
ENTRY_POINTS = "[fanline.generators]\nreverse = fanline_reverse_plugin:reverse\n"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A directory that holds an installed plugin; on PYTHONPATH, ``reverse`` is a fanline.generators entry point."""
    site = tmp_path_factory.mktemp("site")
    (site / "fanline_reverse_plugin.py").write_text(PLUGIN_MODULE)
    dist_info = site / "fanline_reverse_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fanline-reverse-plugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)


@pytest.fixture(scope="module")
def entry_point_stack(redis_url: str, plugin_path: str) -> Iterator[Stack]:
    env = {"PYTHONPATH": plugin_path, "FANLINE_GENERATOR": "reverse", "FANLINE_WORKER_GRACE_S": "0"}
    stack = Stack(redis_url, OUTPUT / f"plugins-entry-point-{uuid.uuid4().hex[:6]}", env)
    try:
        yield stack.start(apis=1, workers=1)
    finally:
        stack.stop()


async def test_a_module_callable_plugin_generates(stack_factory: StackFactory) -> None:
    stack = stack_factory(apis=1, generator="tests.plugins.shout:shout", worker_grace_s="0")
    body = chat_body("hello plugin world", stream_options={"include_usage": True})
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=body)
        info = await generation(client, received.gen_id)
        failed = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("   "))
        failed_info = await generation(client, failed.gen_id)
    assert received.done and received.errors == []
    assert received.text == info["content"] == "HELLO PLUGIN WORLD "
    assert received.finish_reason == info["finish_reason"] == "stop"
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert info["usage"] == usage
    assert [c["usage"] for c in received.chunks if not c["choices"]] == [usage]
    # A plugin's GenerationFailed is the generation's error, with the plugin's code and message.
    assert failed.done and failed.errors == [
        {"message": "nothing to shout", "type": "server_error", "param": None, "code": "empty_prompt"}
    ]
    assert failed_info["status"] == "failed" and failed_info["error"]["code"] == "empty_prompt"


async def test_an_entry_point_plugin_is_loaded_by_its_name(entry_point_stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=entry_point_stack.url, timeout=30) as client:
        received = await read_sse(client, "POST", "/v1/chat/completions", json=chat_body("one two three"))
        info = await generation(client, received.gen_id)
    assert received.done and received.errors == []
    assert received.text == info["content"] == "three two one "
    assert info["reasoning"] == "reversing 3 words"
    assert received.finish_reason == info["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("no-such-generator", "unknown generator 'no-such-generator'"),
        ("tests.plugins.shout:whisper", "cannot load generator 'tests.plugins.shout:whisper'"),
        ("tests.plugins.no_such_module:gen", "cannot load generator 'tests.plugins.no_such_module:gen'"),
    ],
)
def test_a_worker_with_a_bad_generator_name_exits_saying_why(
    redis_url: str, plugin_path: str, tmp_path: Path, name: str, says: str
) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": plugin_path,
        "FANLINE_REDIS_URL": redis_url,
        "FANLINE_QUEUE_NAME": f"fanline:test:{uuid.uuid4().hex[:8]}",
        "FANLINE_GENERATOR": name,
    }
    log = tmp_path / "worker.log"
    worker = spawn(["worker"], env, log)
    try:
        code = worker.wait(30)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop_process(worker)
    output = log.read_text()
    assert code not in (0, None), output
    assert says in output, output
    if name == "no-such-generator":
        assert "reverse" in output  # the installed entry points are listed


def test_builtin_names_win_and_module_paths_resolve() -> None:
    assert load_generator("demo") is demo
    assert load_generator("openai") is openai
    assert load_generator("tests.plugins.shout:shout") is shout
