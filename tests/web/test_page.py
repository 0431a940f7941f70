"""The demo page at ``/`` in headless Chromium (Debian's ``chromium`` driven by Playwright),
against real API pods and a worker: streaming, reasoning, the share link, network loss,
reload and stop. A failing test leaves a screenshot of each page in test-output/web/."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest
from playwright.async_api import Browser, BrowserContext, Locator, Page, Request, async_playwright, expect

from tests.conftest import OUTPUT, StackFactory
from tests.support import Stack, generation, generation_at
from tests.web import REASONING, REPO, WEB_STACK, web_stack

# Debian's chromium (apt-get install chromium); Playwright never downloads a browser here.
CHROMIUM = os.environ.get("FANLINE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_MS = 30_000  # an upper bound for awaited page states, never a pace
SOME_TEXT = re.compile(r"\S.{20,}", re.S)
GEN_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"no {CHROMIUM}: apt-get install chromium, or set FANLINE_TEST_CHROMIUM"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
def web(stack_factory: StackFactory) -> Stack:
    return web_stack(stack_factory)


@dataclass
class Viewer:
    """One person with the page open: a browser context of its own, and what the page said."""

    context: BrowserContext
    page: Page
    problems: list[str] = field(default_factory=list)  # console errors and warnings, uncaught errors
    requests: list[Request] = field(default_factory=list)

    def note_console(self, kind: str, text: str) -> None:
        if kind in ("error", "warning"):
            self.problems.append(f"{kind}: {text}")

    @property
    def answer(self) -> Locator:
        return self.page.locator("#messages li.assistant").last

    async def ask(self, prompt: str, max_tokens: int, api_key: str = "") -> None:
        options = self.page.locator("details.options")
        if not await options.get_attribute("open"):
            await options.locator("summary").click()
        await self.page.get_by_label("Max tokens").fill(str(max_tokens))
        await self.page.get_by_label("API key").fill(api_key)
        await self.page.get_by_label("Message").fill(prompt)
        await self.page.get_by_role("button", name="Send").click()

    async def state(self, state: str) -> None:
        await expect(self.page.locator("#status")).to_have_attribute("data-state", state, timeout=WAIT_MS)

    async def some_text(self) -> None:
        await expect(self.answer.locator(".content")).to_have_text(SOME_TEXT, timeout=WAIT_MS)

    async def generation_id(self) -> str:
        await expect(self.answer).to_have_attribute("data-generation-id", GEN_ID, timeout=WAIT_MS)
        gen_id = await self.answer.get_attribute("data-generation-id")
        assert gen_id is not None
        return gen_id

    async def text(self) -> str:
        return await self.answer.locator(".content").text_content() or ""

    def resumes(self, gen_id: str) -> list[str]:
        """The Last-Event-ID of each request that resumed ``gen_id`` through its events endpoint."""
        return [
            r.headers.get("last-event-id", "")
            for r in self.requests
            if r.url.split("?")[0].endswith(f"/v1/generations/{gen_id}/events")
        ]


Open = Callable[..., Awaitable[Viewer]]


@contextlib.asynccontextmanager
async def viewers(browser: Browser, name: str) -> AsyncIterator[Open]:
    """Opens pages; on failure, screenshots every one of them to test-output/web/<test>-<n>.png."""
    opened: list[Viewer] = []

    async def open_page(url: str, bypass_csp: bool = False) -> Viewer:
        context = await browser.new_context(viewport={"width": 1100, "height": 800}, bypass_csp=bypass_csp)
        page = await context.new_page()
        viewer = Viewer(context, page)
        page.on("console", lambda m: viewer.note_console(m.type, m.text))
        page.on("pageerror", lambda e: viewer.problems.append(f"uncaught: {e}"))
        page.on("request", lambda r: viewer.requests.append(r))
        opened.append(viewer)
        await page.goto(url)
        return viewer

    try:
        yield open_page
    except BaseException:
        folder = OUTPUT / "web"
        folder.mkdir(parents=True, exist_ok=True)
        for n, viewer in enumerate(opened):
            with contextlib.suppress(Exception):
                await viewer.page.screenshot(path=folder / f"{name}-{n}.png", full_page=True)
        raise
    finally:
        for viewer in opened:
            with contextlib.suppress(Exception):
                await viewer.context.close()


async def test_page_loads_clean_streams_and_shows_reasoning_apart(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "load") as open_page:
        me = await open_page(web.url + "/")
        page = me.page
        await expect(page).to_have_title("fanline")
        await expect(page.get_by_role("status")).to_have_text("ready")
        await expect(page.get_by_role("button", name="Stop")).to_be_disabled()
        await me.ask("think about streams", 30)
        await me.state("done")
        gen_id = await me.generation_id()
        info = await generation_at(web.url, gen_id)
        assert info["status"] == "completed"
        assert await me.text() == info["content"] != ""
        reasoning = me.answer.locator(".reasoning-text")
        await expect(reasoning).to_be_visible()
        assert await reasoning.text_content() == info["reasoning"] == REASONING
        assert REASONING.strip() not in info["content"]
        await expect(page.get_by_role("status")).to_have_text("done")
        # Narrow screens: nothing overflows sideways.
        await page.set_viewport_size({"width": 360, "height": 740})
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await expect(page.get_by_role("button", name="Send")).to_be_visible()
        assert me.problems == []


async def test_share_link_shows_the_same_answer_to_a_second_viewer_on_another_pod(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "share") as open_page:
        me = await open_page(web.url + "/")
        await me.ask("share this answer", 400)
        await me.some_text()
        gen_id = await me.generation_id()
        link = await me.page.get_by_role("textbox", name="Share this answer").input_value()
        assert link == f"{web.url}/#g={gen_id}"
        friend = await open_page(link.replace(web.url, web.api_urls[1]))
        await expect(friend.answer.locator(".content")).to_have_text(SOME_TEXT, timeout=WAIT_MS)
        await me.state("done")
        await friend.state("done")
        info = await generation_at(web.url, gen_id)
        assert await me.text() == await friend.text() == info["content"]
        assert friend.resumes(gen_id) == [""], "the viewer watched from the first event"
        assert me.problems == friend.problems == []


async def test_network_loss_mid_stream_then_back_completes_exactly(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "offline") as open_page:
        me = await open_page(web.url + "/")
        await me.ask("lose the network", 800)
        await me.some_text()
        gen_id = await me.generation_id()
        await me.context.set_offline(True)
        await me.state("reconnecting")
        await me.context.set_offline(False)
        await me.state("done")
        info = await generation_at(web.url, gen_id)
        assert await me.text() == info["content"]
        resumed_after = me.resumes(gen_id)
        assert resumed_after and all(re.fullmatch(r"\d+-0", i) for i in resumed_after), resumed_after


async def test_reload_mid_stream_resumes_after_the_last_event_shown(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "reload") as open_page:
        me = await open_page(web.url + "/")
        await me.ask("reload the page", 800)
        await me.some_text()
        gen_id = await me.generation_id()
        await me.page.reload()
        await me.state("done")
        info = await generation_at(web.url, gen_id)
        assert me.page.url == f"{web.url}/#g={gen_id}"
        await expect(me.page.locator("#messages li.user")).to_have_text(re.compile("reload the page"))
        assert await me.text() == info["content"]
        resumed_after = me.resumes(gen_id)
        assert len(resumed_after) == 1 and re.fullmatch(r"\d+-0", resumed_after[0]), resumed_after
        assert me.problems == []


async def test_stop_cancels_the_generation(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "stop") as open_page:
        me = await open_page(web.url + "/")
        await me.ask("a very long answer", 5000)
        await expect(me.answer.locator(".content")).not_to_be_empty(timeout=WAIT_MS)
        gen_id = await me.generation_id()
        await me.page.get_by_role("button", name="Stop").click()
        await me.state("cancelled")
        info = await generation_at(web.url, gen_id)
        assert info["status"] == "cancelled"
        assert info["finish_reason"] == "cancelled"
        await expect(me.answer).to_have_attribute("data-finish-reason", "cancelled")
        assert await me.text() == info["content"]
        await expect(me.page.get_by_role("button", name="Send")).to_be_enabled()
        assert me.problems == []


def docs_example(name: str) -> str:
    """The fenced block after ``<!-- tested: name ... -->`` in the README."""
    markdown = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- tested: {name}\b[^>]*-->\s*```\w+\n(.*?)```", markdown, re.S)
    assert match, f"README.md has no block marked 'tested: {name}'"
    return match.group(1)


async def test_docs_eventsource_example_resumes_after_a_reload(browser: Browser, web: Stack) -> None:
    async with httpx.AsyncClient(base_url=web.url, timeout=30) as client:
        created = await client.post("/v1/generations", json={"model": "demo", "max_tokens": 300, "messages": [
            {"role": "user", "content": "eventsource"}]})  # fmt: skip
    gen_id = created.json()["id"]
    script = f"const genId = {json.dumps(gen_id)};\n" + docs_example("eventsource")
    add_answer = "document.body.insertAdjacentHTML('beforeend', '<pre id=\"answer\"></pre>')"
    async with viewers(browser, "docs-eventsource") as open_page:
        # The docs' code is injected as an inline script: this page is opened without its CSP.
        me = await open_page(web.url + "/", bypass_csp=True)
        await me.page.evaluate(add_answer)
        await me.page.add_script_tag(content=script)
        await expect(me.page.locator("#answer")).to_have_text(SOME_TEXT, timeout=WAIT_MS)
        await me.page.evaluate("source.close()")  # the page goes away mid-answer...
        before = await me.page.locator("#answer").text_content() or ""
        await me.page.reload()  # ...and comes back: the same code resumes after the stored id
        await me.page.evaluate(add_answer)
        await me.page.add_script_tag(content=script)
        await expect(me.page.locator("#answer.done")).to_be_attached(timeout=WAIT_MS)
        after = await me.page.locator("#answer").text_content() or ""
        info = await generation_at(web.url, gen_id)
        assert before and after
        assert before + after == info["content"]
        assert me.resumes(gen_id)[-1] == "", "EventSource sent no header; the id went in ?last_event_id="
        assert any("last_event_id=" in r.url for r in me.requests)


async def test_docs_js_client_example_runs_in_the_page(browser: Browser, web: Stack) -> None:
    async with viewers(browser, "docs-js-client") as open_page:
        me = await open_page(web.url + "/", bypass_csp=True)
        await me.page.evaluate("document.body.insertAdjacentHTML('beforeend', '<pre id=\"answer\"></pre>')")
        outcome = "window.example = { id: result.id, rest: rest.content, stopped: stopped.finishReason };"
        code = docs_example("js-client") + "\n" + outcome + "\n"
        await me.page.add_script_tag(content=code, type="module")
        await me.page.wait_for_function("window.example !== undefined", timeout=WAIT_MS)
        example = await me.page.evaluate("window.example")
        info = await generation_at(web.url, example["id"])
        assert await me.page.locator("#answer").text_content() == info["content"] != ""
        await expect(me.page.locator("#answer")).to_have_attribute("data-status", "done")
        assert example["rest"] == ""
        assert example["stopped"] == "cancelled"
        assert me.problems == []


async def test_with_api_keys_the_share_link_carries_a_watch_token(
    browser: Browser, stack_factory: StackFactory
) -> None:
    secured = stack_factory(apis=1, workers=1, api_keys="web-test-key", **WEB_STACK)
    async with viewers(browser, "auth") as open_page:
        stranger = await open_page(secured.url + "/")
        await stranger.ask("no key", 10)
        await stranger.state("error")
        await expect(stranger.page.get_by_role("status")).to_have_text(re.compile("API key"))

        me = await open_page(secured.url + "/")
        await me.ask("share with a token", 400, api_key="web-test-key")
        await me.some_text()
        gen_id = await me.generation_id()
        link = await me.page.get_by_role("textbox", name="Share this answer").input_value()
        assert link.startswith(f"{secured.url}/#g={gen_id}&t=")
        friend = await open_page(link)  # no API key: the watch token in the link is enough
        await me.state("done")
        await friend.state("done")
        headers = {"authorization": "Bearer web-test-key"}
        async with httpx.AsyncClient(base_url=secured.url, headers=headers, timeout=30) as client:
            info = await generation(client, gen_id)
        assert await me.text() == await friend.text() == info["content"]
        assert me.problems == friend.problems == []
