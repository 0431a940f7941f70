// The Vercel AI SDK (the real `ai` and `@ai-sdk/react` packages) against fanline's
// UI message stream endpoints: its own stream reader consumes them, and useChat
// with `resume: true` picks an answer up after a "reload".
import assert from "node:assert/strict";
import { test } from "node:test";

import { DefaultChatTransport, readUIMessageStream } from "ai";

import { baseUrl, collectConsoleErrors, generation, until } from "./support.mjs";

const React = await import("react");
const { create } = await import("react-test-renderer");
const { useChat } = await import("@ai-sdk/react");

// useChat renders as the stream arrives, outside any act() scope: the tests wait for
// those renders, as a user would, so this is not an act() environment.
globalThis.IS_REACT_ACT_ENVIRONMENT = false;
const logged = collectConsoleErrors();

const API = () => `${baseUrl()}/v1/ai-sdk/chat`;
let chats = 0;
const newChatId = () => `chat-${process.pid}-${Date.now()}-${++chats}`;
const userMessage = (text) => ({ id: `u-${++chats}`, role: "user", parts: [{ type: "text", text }] });

const answerText = (chat) => {
  const last = chat.messages.at(-1);
  return last && last.role === "assistant" ? textOf(last) : "";
};

const textOf = (message, type = "text") =>
  message.parts
    .filter((p) => p.type === type)
    .map((p) => p.text)
    .join("");

async function lastMessage(stream) {
  let message = null;
  for await (const m of readUIMessageStream({ stream, terminateOnError: true })) message = m;
  return message;
}

test("the endpoint speaks the UI message stream protocol (headers, parts, metadata)", async () => {
  const response = await fetch(API(), {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: newChatId(), messages: [userMessage("hello")], trigger: "submit-message", max_tokens: 3 }),
  });
  assert.equal(response.status, 200);
  assert.equal(response.headers.get("x-vercel-ai-ui-message-stream"), "v1");
  assert.match(response.headers.get("content-type"), /^text\/event-stream/);
  const text = await response.text();
  const types = text
    .split("\n\n")
    .filter((frame) => frame.startsWith("data: "))
    .map((frame) => frame.slice(6))
    .map((data) => (data === "[DONE]" ? data : JSON.parse(data).type));
  assert.deepEqual(types, [
    "start",
    "start-step",
    "text-start",
    "text-delta",
    "text-delta",
    "text-delta",
    "text-end",
    "finish-step",
    "finish",
    "[DONE]",
  ]);
});

test("readUIMessageStream consumes an answer with reasoning; the resume endpoint replays it", async () => {
  const transport = new DefaultChatTransport({ api: API(), body: { max_tokens: 40 } });
  const chatId = newChatId();
  const stream = await transport.sendMessages({
    chatId,
    messages: [userMessage("think, then answer")],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
  });
  const message = await lastMessage(stream);
  const id = message.metadata.generationId;
  const info = await generation(baseUrl(), id);
  assert.equal(message.role, "assistant");
  assert.equal(message.id, `msg-${id}`);
  assert.equal(textOf(message), info.content);
  assert.equal(textOf(message, "reasoning"), info.reasoning);
  assert.ok(info.reasoning.startsWith("Let me think"));
  assert.deepEqual(
    message.parts.map((p) => p.type),
    ["step-start", "reasoning", "text"],
  );
  assert.equal(message.metadata.finishReason, "length");

  const replay = await lastMessage(await transport.reconnectToStream({ chatId }));
  assert.deepEqual(replay, message, "a replay of a finished answer is the same message");
  assert.equal(await transport.reconnectToStream({ chatId: newChatId() }), null, "no answer: 204");
});

test("a tool call streams as a tool part whose input is the parsed arguments", async () => {
  const tools = [{ type: "function", function: { name: "search", parameters: { type: "object" } } }];
  const transport = new DefaultChatTransport({ api: API(), body: { max_tokens: 4, tools } });
  const chatId = newChatId();
  const stream = await transport.sendMessages({
    chatId,
    messages: [userMessage("look it up")],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
  });
  const message = await lastMessage(stream);
  const info = await generation(baseUrl(), message.metadata.generationId);
  assert.equal(info.finish_reason, "tool_calls");
  assert.deepEqual(
    message.parts.map((p) => p.type),
    ["step-start", "text", "tool-search"],
  );
  assert.equal(textOf(message), info.content);
  const [call] = info.tool_calls;
  const part = message.parts.at(-1);
  assert.equal(part.state, "input-available");
  assert.equal(part.toolCallId, call.id);
  assert.deepEqual(part.input, JSON.parse(call.function.arguments));
  assert.equal(message.metadata.finishReason, "tool_calls");

  const replay = await lastMessage(await transport.reconnectToStream({ chatId }));
  assert.deepEqual(replay, message, "a replay carries the same tool call");
});

test("a stream cut off mid-answer is resumed by reconnectToStream, exactly", async () => {
  const transport = new DefaultChatTransport({ api: API(), body: { max_tokens: 300 } });
  const chatId = newChatId();
  const controller = new AbortController();
  const stream = await transport.sendMessages({
    chatId,
    messages: [userMessage("cut me off")],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: controller.signal,
  });
  let partial = null;
  await assert.rejects(async () => {
    for await (const m of readUIMessageStream({ stream, terminateOnError: true })) {
      partial = m;
      if (textOf(m).length > 20) controller.abort(); // the connection goes away
    }
  });
  assert.ok(partial && textOf(partial).length > 20);
  const resumed = await lastMessage(await transport.reconnectToStream({ chatId }));
  const info = await generation(baseUrl(), resumed.metadata.generationId);
  assert.equal(info.status, "completed");
  assert.equal(resumed.id, partial.id);
  assert.equal(textOf(resumed), info.content);
  assert.ok(textOf(resumed).startsWith(textOf(partial)));
});

// -- useChat ---------------------------------------------------------------------

async function mountChat(options) {
  const listeners = new Set();
  let value = null;
  function Chat() {
    value = useChat(options);
    for (const listener of listeners) listener();
    return React.createElement(
      "ol",
      null,
      value.messages.map((m) => React.createElement("li", { key: m.id, className: m.role }, textOf(m))),
    );
  }
  const subscribe = (listener) => {
    listeners.add(listener);
    return () => listeners.delete(listener);
  };
  const renderer = create(React.createElement(Chat));
  await until(subscribe, () => value !== null, "the first render");
  return {
    renderer,
    subscribe,
    get chat() {
      return value;
    },
  };
}

test("useChat with resume: true picks an answer up after a reload, without a change to the app", async () => {
  const chatId = newChatId();
  const requests = [];
  let firstRequest;
  const made = new Promise((resolve) => (firstRequest = resolve));
  // The default transport, with fetch observed (not changed) to know when the first resume is answered.
  const observed = (url, init) => {
    const response = globalThis.fetch(url, init);
    requests.push({ method: init?.method ?? "GET", url: String(url), response });
    firstRequest();
    return response;
  };
  const transport = () => new DefaultChatTransport({ api: API(), body: { max_tokens: 300 }, fetch: observed });
  const first = await mountChat({ id: chatId, transport: transport(), resume: true });
  await made;
  assert.equal((await requests[0].response).status, 204, "nothing to resume yet");
  first.chat.sendMessage({ text: "think about a reload" });
  await until(first.subscribe, () => answerText(first.chat).length > 20, "some text");
  // The page goes away: in a resumable setup stop() only closes the connection.
  const saved = structuredClone(first.chat.messages);
  await first.chat.stop();
  first.renderer.unmount();

  const second = await mountChat({ id: chatId, messages: saved, transport: transport(), resume: true });
  await until(
    second.subscribe,
    () => second.chat.status === "ready" && second.chat.messages.at(-1)?.metadata?.finishReason != null,
    "the resumed answer",
  );
  const [user, answer] = second.chat.messages;
  assert.equal(second.chat.messages.length, 2);
  assert.equal(requests.at(-1).method, "GET");
  assert.equal(requests.at(-1).url, `${API()}/${chatId}/stream`);
  const info = await generation(baseUrl(), answer.metadata.generationId);
  assert.equal(info.status, "completed");
  assert.equal(user.role, "user");
  assert.equal(answer.id, saved[1].id, "the same message, completed in place");
  assert.equal(textOf(answer), info.content);
  assert.equal(textOf(answer, "reasoning"), info.reasoning);
  assert.equal(answer.metadata.finishReason, "length");
  second.renderer.unmount();
  assert.deepEqual(logged, []);
});

test("the stop endpoint cancels the answer for useChat", async () => {
  const chatId = newChatId();
  const view = await mountChat({ id: chatId, transport: new DefaultChatTransport({ api: API(), body: { max_tokens: 5000 } }) });
  view.chat.sendMessage({ text: "a long answer" });
  await until(view.subscribe, () => answerText(view.chat).length > 0, "the first token");
  const response = await fetch(`${API()}/${chatId}/stop`, { method: "POST" });
  assert.equal(response.status, 202);
  await until(view.subscribe, () => view.chat.status === "ready", "the end of the answer");
  const answer = view.chat.messages.at(-1);
  const info = await generation(baseUrl(), answer.metadata.generationId);
  assert.equal(info.status, "cancelled");
  assert.equal(answer.metadata.finishReason, "cancelled");
  assert.equal(textOf(answer), info.content);
  view.renderer.unmount();
  assert.deepEqual(logged, []);
});
