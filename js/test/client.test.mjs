// fanline.js against a real stack: chat, resume after a dropped connection, watch, cancel, errors.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ChatSession, FanlineError, cancel, chat, getGeneration, watch } from "../../api/static/fanline.js";
import { baseUrl, cuttingProxy, generation, until } from "./support.mjs";

const body = (prompt, max_tokens) => ({ model: "demo", messages: [{ role: "user", content: prompt }], max_tokens });

test("chat() streams a generation; the deltas add up to its final content", async () => {
  const url = baseUrl();
  let text = "";
  const statuses = [];
  const result = await chat(body("node client", 40), {
    baseUrl: url,
    onDelta: (delta) => (text += delta.content ?? ""),
    onStatus: (status) => statuses.push(status),
  });
  const info = await generation(url, result.id);
  assert.match(result.id, /^[0-9a-f]{32}$/);
  assert.equal(info.status, "completed");
  assert.equal(result.content, info.content);
  assert.equal(text, info.content);
  assert.equal(result.finishReason, "length");
  assert.equal(statuses.at(0), "connecting");
  assert.equal(statuses.at(-1), "done");
});

test("chat() resumes with Last-Event-ID when the connection drops mid-frame", async () => {
  const url = baseUrl();
  const proxy = await cuttingProxy(url, { cutAfter: 1500 });
  try {
    let text = "";
    const ids = [];
    const statuses = [];
    const result = await chat(body("dropped connection", 300), {
      baseUrl: proxy.url,
      onDelta: (delta, { id }) => {
        text += delta.content ?? "";
        ids.push(id);
      },
      onStatus: (status) => statuses.push(status),
    });
    assert.ok(proxy.cut, "the proxy cut the first connection");
    const info = await generation(url, result.id);
    assert.equal(text, info.content, "no gap and no duplicate across the drop");
    assert.equal(result.content, info.content);
    assert.equal(new Set(ids).size, ids.length);
    assert.ok(statuses.includes("reconnecting"));
    const resume = proxy.requests.find((head) => head.startsWith(`GET /v1/generations/${result.id}/events`));
    assert.ok(resume, `a resume request was made: ${proxy.requests.map((h) => h.split("\r\n")[0])}`);
    const sent = /\r\nlast-event-id: (\S+)/i.exec(resume);
    assert.ok(sent, "the resume carried Last-Event-ID");
    assert.ok(ids.indexOf(sent[1]) >= 0 && ids.indexOf(sent[1]) < ids.length - 1, "resumed after an event it had");
  } finally {
    await proxy.close();
  }
});

test("watch() from a last event id on the other pod continues exactly", async () => {
  const url = baseUrl();
  const controller = new AbortController();
  let first = "";
  let lastId = null;
  let count = 0;
  let id = null;
  await assert.rejects(
    chat(body("watch me", 200), {
      baseUrl: url,
      signal: controller.signal,
      onGeneration: (gen) => (id = gen),
      onDelta: (delta, event) => {
        first += delta.content ?? "";
        lastId = event.id;
        if (++count === 5) controller.abort(); // the reader leaves; the generation goes on
      },
    }),
    (error) => error.name === "AbortError",
  );
  const rest = await watch(id, { baseUrl: baseUrl(2), lastEventId: lastId });
  const info = await generation(url, id);
  assert.equal(first + rest.content, info.content);
  const whole = await watch(id, { baseUrl: baseUrl(2) });
  assert.equal(whole.content, info.content, "a late viewer from the start gets everything");
});

test("cancel() ends the stream for the viewer with finish_reason cancelled", async () => {
  const url = baseUrl();
  let cancelled = null;
  const result = await chat(body("stop me", 5000), {
    baseUrl: url,
    onDelta: (_delta, { result: so_far }) => {
      if (!cancelled && so_far.content) cancelled = cancel(so_far.id, { baseUrl: url });
    },
  });
  await cancelled;
  assert.equal(result.finishReason, "cancelled");
  const info = await getGeneration(result.id, { baseUrl: url });
  assert.equal(info.status, "cancelled");
  assert.equal(result.content, info.content);
});

test("errors are FanlineErrors with the API's status and code", async () => {
  const url = baseUrl();
  await assert.rejects(watch("0".repeat(32), { baseUrl: url }), (error) => {
    assert.ok(error instanceof FanlineError);
    assert.equal(error.status, 404);
    assert.equal(error.code, "generation_not_found");
    return true;
  });
  await assert.rejects(chat({ model: "demo", messages: [] }, { baseUrl: url }), (error) => error.status === 400);
});

test("reasoning_content is kept apart from content", async () => {
  const url = baseUrl();
  let reasoning = "";
  const result = await chat(body("think first, then answer", 20), {
    baseUrl: url,
    onDelta: (delta) => (reasoning += delta.reasoning_content ?? ""),
  });
  assert.ok(result.reasoning.startsWith("Let me think"), result.reasoning);
  assert.equal(reasoning, result.reasoning);
  assert.equal(result.content, (await generation(url, result.id)).content);
  assert.ok(!result.content.includes("Let me think"));
});

test("ChatSession: send, then a second session restored from the first resumes after its last event", async () => {
  const url = baseUrl();
  const session = new ChatSession({ baseUrl: url });
  const sending = session.send("a conversation", { max_tokens: 200 });
  await until(session.subscribe, () => (session.getSnapshot().messages[1]?.content ?? "").length > 20, "some text");
  session.detach(); // e.g. the page unloads
  await sending;
  const saved = session.getSnapshot();
  assert.ok(saved.lastEventId);
  const restored = new ChatSession({ baseUrl: url, ...JSON.parse(JSON.stringify(saved)) });
  await restored.resume();
  const snapshot = restored.getSnapshot();
  const info = await generation(url, saved.generationId);
  assert.equal(snapshot.status, "done");
  assert.deepEqual(
    snapshot.messages.map((m) => [m.role, m.content]),
    [
      ["user", "a conversation"],
      ["assistant", info.content],
    ],
  );
  // A follow-up sends the history.
  await restored.send("and then?", { max_tokens: 5 });
  assert.equal(restored.getSnapshot().messages.length, 4);
  assert.equal(restored.getSnapshot().status, "done");
});
