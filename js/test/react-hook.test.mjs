// useFanlineChat() rendered by React (react-test-renderer) against a real stack.
import assert from "node:assert/strict";
import { register } from "node:module";
import { test } from "node:test";

import { baseUrl, collectConsoleErrors, generation, until } from "./support.mjs";

register("./resolve-from-js.mjs", import.meta.url);
const React = await import("react");
const { act, create } = await import("react-test-renderer");
const { useFanlineChat } = await import("../../api/static/fanline-react.js");

globalThis.IS_REACT_ACT_ENVIRONMENT = true;
const logged = collectConsoleErrors();

const h = React.createElement;

// A component as an app would write it; `expose` hands the hook's value to the test.
function Chat({ options, expose }) {
  const chat = useFanlineChat(options);
  expose(chat);
  return h(
    "ol",
    { "aria-busy": String(["connecting", "live", "reconnecting"].includes(chat.status)) },
    chat.messages.map((m, i) => h("li", { key: i, className: m.role }, m.content)),
  );
}

async function mount(options, { strict = false } = {}) {
  let value = null;
  let renderer;
  const element = h(Chat, { options, expose: (v) => (value = v) });
  await act(async () => {
    renderer = create(strict ? h(React.StrictMode, null, element) : element);
  });
  const subscribe = (fn) => value.session.subscribe(fn);
  return { renderer, get chat() { return value; }, subscribe };
}

function renderedText(renderer, role) {
  return renderer.root.findAll((node) => node.type === "li" && node.props.className === role).map((n) => n.props.children);
}

test("useFanlineChat: send streams into messages and status ends done (StrictMode)", async () => {
  const url = baseUrl();
  const view = await mount({ baseUrl: url }, { strict: true });
  assert.equal(view.chat.status, "idle");
  await act(async () => {
    await view.chat.send("hello from react", { max_tokens: 60 });
  });
  const { generationId, status } = view.chat;
  assert.equal(status, "done");
  const info = await generation(url, generationId);
  assert.deepEqual(renderedText(view.renderer, "assistant"), [info.content]);
  assert.deepEqual(renderedText(view.renderer, "user"), ["hello from react"]);
  await act(async () => view.renderer.unmount());
  assert.deepEqual(logged, []);
});

test("useFanlineChat: stop cancels the generation; resume(id) follows a shared one", async () => {
  const url = baseUrl();
  const view = await mount({ baseUrl: url });
  let sending;
  await act(async () => {
    sending = view.chat.send("a long answer", { max_tokens: 5000 });
  });
  await act(() => until(view.subscribe, () => (view.chat.messages[1]?.content ?? "") !== "", "the first token"));
  const viewer = await mount({ baseUrl: baseUrl(2) });
  let watching;
  await act(async () => {
    watching = viewer.chat.resume(view.chat.generationId);
  });
  await act(async () => {
    await view.chat.stop();
    await sending;
    await watching;
  });
  const info = await generation(url, view.chat.generationId);
  assert.equal(info.status, "cancelled");
  for (const v of [view, viewer]) {
    assert.equal(v.chat.status, "done");
    assert.equal(v.chat.messages.at(-1).finishReason, "cancelled");
    assert.deepEqual(renderedText(v.renderer, "assistant"), [info.content]);
  }
  await act(async () => {
    view.renderer.unmount();
    viewer.renderer.unmount();
  });
  assert.deepEqual(logged, []);
});

test("useFanlineChat: unmounting mid-stream detaches; a remount of the session resumes after its last event", async () => {
  const url = baseUrl();
  const view = await mount({ baseUrl: url });
  let sending;
  await act(async () => {
    sending = view.chat.send("remount", { max_tokens: 300 });
  });
  await act(() => until(view.subscribe, () => (view.chat.messages[1]?.content ?? "").length > 20, "some text"));
  const session = view.chat.session;
  await act(async () => view.renderer.unmount()); // detaches: the generation goes on
  await sending;
  const partial = session.getSnapshot();
  assert.ok(partial.lastEventId);
  // The same session attached again (what a remount in StrictMode does) picks up after lastEventId.
  await act(async () => {
    await session.attach();
  });
  const info = await generation(url, partial.generationId);
  assert.equal(session.getSnapshot().status, "done");
  assert.equal(session.getSnapshot().messages[1].content, info.content);
  assert.deepEqual(logged, []);
});
