"""fanline.js under Node's test runner: the SSE parser fed adversarial chunkings; the client,
ChatSession, the React hook and the docs' JSX examples against a real stack (js/test/*.test.mjs)."""

from __future__ import annotations

from tests.conftest import StackFactory
from tests.web import run_node_tests, web_stack


def test_sse_parser_survives_any_chunking() -> None:
    run_node_tests(["test/sse-parser.test.mjs"], {})


def test_client_and_react_hook_against_the_stack(stack_factory: StackFactory) -> None:
    stack = web_stack(stack_factory)
    env = {"FANLINE_URL": stack.api_urls[0], "FANLINE_URL_2": stack.api_urls[1]}
    run_node_tests(["test/client.test.mjs", "test/react-hook.test.mjs"], env)


def test_docs_jsx_examples_run_against_the_stack(stack_factory: StackFactory) -> None:
    """The README's React and AI SDK examples, compiled as they are (js/test/docs.test.mjs)."""
    stack = web_stack(stack_factory)
    run_node_tests(["test/docs.test.mjs"], {"FANLINE_URL": stack.api_urls[0], "FANLINE_URL_2": stack.api_urls[1]})
