"""Browser-side tests: the demo page (Playwright + Chromium), the JS client and the AI SDK (Node).

They share one stack whose worker runs ``thinking_demo`` below (a plugin
generator, loaded by the worker as ``tests.web:thinking_demo``), so reasoning can
be tested without an upstream model.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fanline.shared.events import Delta
from fanline.shared.requests import ChatCompletionRequest
from fanline.worker.generators import GenerationContext
from fanline.worker.generators.demo import demo

if TYPE_CHECKING:
    from tests.support import Stack

REPO = Path(__file__).resolve().parent.parent.parent
JS = REPO / "js"

# 200 tokens/s: an 800-token answer streams for 4 s, long enough to act on mid-stream.
WEB_STACK = {"generator": "tests.web:thinking_demo", "demo_tokens_per_s": "200"}

REASONING = "Let me think about the fan out. Every viewer reads the same stream. "


async def thinking_demo(request: ChatCompletionRequest, ctx: GenerationContext) -> AsyncIterator[Delta]:
    """The demo generator, preceded by ``delta.reasoning_content`` when the prompt starts with "think"."""
    if request.prompt_text().lower().startswith("think"):
        for word in REASONING.split(" ")[:-1]:
            yield {"reasoning_content": word + " "}
    async for delta in demo(request, ctx):
        yield delta


def web_stack(stack_factory: Callable[..., Stack]) -> Stack:
    """Two API pods and a worker running ``thinking_demo``; shared by the tests in this folder."""
    return stack_factory(apis=2, workers=1, **WEB_STACK)


def run_node_tests(files: list[str], env: dict[str, str], timeout: float = 100.0) -> None:
    """``node --test`` on files under js/test (after ``npm ci`` if js/node_modules is missing); all must pass."""
    node = shutil.which("node")
    assert node is not None, "Node.js 20+ is needed for the JS tests (apt-get install nodejs)"
    if not (JS / "node_modules" / ".package-lock.json").exists():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install js/ (apt-get install npm)"
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=JS, check=True, timeout=300)
    result = subprocess.run(
        [node, "--test", "--test-reporter=tap", *files],
        cwd=JS,
        env={**os.environ, **env, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = re.search(r"^# pass (\d+)$", result.stdout, re.M)
    assert passed and int(passed.group(1)) > 0 and re.search(r"^# fail 0$", result.stdout, re.M), output
