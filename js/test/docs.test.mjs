// The JSX examples of the README (the React hook, and useChat with the AI SDK), compiled
// as they are with esbuild and rendered by React against a real stack. Relative URLs
// resolve against the stack, as they would against the page's origin in a browser.
import assert from "node:assert/strict";
import { mkdtemp, readFile, writeFile } from "node:fs/promises";
import { register } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { fileURLToPath, pathToFileURL } from "node:url";

import { transform } from "esbuild";

import { baseUrl, collectConsoleErrors, generation, until } from "./support.mjs";

register("./resolve-from-js.mjs", import.meta.url);
const React = await import("react");
const { create } = await import("react-test-renderer");

globalThis.IS_REACT_ACT_ENVIRONMENT = false; // the examples render as the stream arrives
const logged = collectConsoleErrors();

// A browser resolves "/v1/..." against the page; here, against the stack. The test also
// notes the generation id of each response (the examples do not need it; the test does).
const realFetch = globalThis.fetch;
const generations = [];
globalThis.fetch = async (url, init) => {
  const response = await realFetch(new URL(String(url), baseUrl()), init);
  const id = response.headers.get("x-fanline-generation-id");
  if (id) generations.push(id);
  return response;
};

const DOCS = fileURLToPath(new URL("../../README.md", import.meta.url));
const STATIC = new URL("../../api/static/", import.meta.url);

/** The fenced block after `<!-- tested: name ... -->`, compiled and imported as a module. */
async function example(name) {
  const markdown = await readFile(DOCS, "utf8");
  const match = new RegExp(`<!-- tested: ${name}\\b[^>]*-->\\s*\`\`\`(\\w+)\\n([\\s\\S]*?)\`\`\``).exec(markdown);
  assert.ok(match, `README.md has a block marked "tested: ${name}"`);
  const source = match[2].replace(/from "\.\/(fanline[\w-]*\.js)"/g, (_, file) => `from "${new URL(file, STATIC)}"`);
  const { code } = await transform(source, { loader: "jsx", jsx: "automatic", format: "esm" });
  const dir = await mkdtemp(join(tmpdir(), "fanline-docs-"));
  const file = join(dir, `${name}.mjs`);
  await writeFile(file, code);
  return import(pathToFileURL(file).href);
}

async function render(element) {
  const listeners = new Set();
  const subscribe = (listener) => {
    listeners.add(listener);
    return () => listeners.delete(listener);
  };
  // Every commit in the tree (React's Profiler reports them) lets the test re-read it.
  const notify = () => queueMicrotask(() => {
    for (const listener of listeners) listener();
  });
  let committed = false;
  const stop = subscribe(() => (committed = true));
  const renderer = create(React.createElement(React.Profiler, { id: "example", onRender: notify }, element));
  await until(subscribe, () => committed, "the first render");
  stop();
  return { renderer, subscribe };
}

const text = (node) =>
  typeof node === "string" ? node : (node.children ?? []).map((child) => text(child)).join("");

const articleText = (article) =>
  article.findAllByType("p").map((p) => p.children.join("")).join("");

test("docs: the useFanlineChat example sends, streams and ends done", async () => {
  const { Chat } = await example("react");
  const { renderer, subscribe } = await render(React.createElement(Chat));
  const root = renderer.root;
  const input = () => root.findByProps({ "aria-label": "Message" });
  const status = () => root.findByProps({ role: "status" }).children.join("");
  input().props.onChange({ target: { value: "hello from the docs" } });
  await until(subscribe, () => input().props.value !== "", "the input");
  root.findByType("form").props.onSubmit({ preventDefault() {} });
  await until(subscribe, () => status() === "done", "done");
  const [user, assistant] = root.findAllByType("li");
  assert.equal(user.children.join(""), "hello from the docs");
  const content = assistant.children.filter((c) => typeof c === "string").join("");
  assert.equal(content, (await generation(baseUrl(), generations.at(-1))).content);
  assert.equal(input().props.value, "");
  renderer.unmount();
  assert.deepEqual(logged, []);
});

test("docs: the useChat example asks and streams; after a reload, resume replays the answer", async () => {
  const { Chat } = await example("ai-sdk");
  const id = `docs-${process.pid}-${Date.now()}`;
  const first = await render(React.createElement(Chat, { id, initialMessages: [] }));
  const button = (view, label) => view.renderer.root.find((n) => n.type === "button" && n.children.join("") === label);
  await until(first.subscribe, () => !button(first, "Ask").props.disabled, "ready");
  button(first, "Ask").props.onClick();
  const articles = (view) => view.renderer.root.findAllByType("article");
  await until(
    first.subscribe,
    () => articles(first).length === 2 && !button(first, "Ask").props.disabled,
    "the answer",
  );
  const info = await generation(baseUrl(), generations.at(-1));
  assert.equal(articles(first)[1].props.className, "assistant");
  assert.equal(articleText(articles(first)[1]), info.content);
  first.renderer.unmount();

  // A reload without stored messages: resume: true replays the chat's latest answer.
  const second = await render(React.createElement(Chat, { id, initialMessages: [] }));
  await until(
    second.subscribe,
    () => articles(second).length === 1 && articleText(articles(second)[0]) === info.content,
    "the replayed answer",
  );
  assert.equal(articles(second)[0].props.className, "assistant");
  second.renderer.unmount();
  assert.deepEqual(logged, []);
});
