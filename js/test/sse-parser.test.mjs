// The SSE parser of fanline.js, fed adversarial chunkings: every event must come out
// whole, once, in order, whatever the read boundaries (the bug of the usual
// "split each read on \n" hook).
import assert from "node:assert/strict";
import { test } from "node:test";

import { SSEParser, readEvents } from "../../api/static/fanline.js";

const encoder = new TextEncoder();

// What fanline sends, with everything that makes chunking hard: multi-byte UTF-8
// (2, 3 and 4 bytes), a heartbeat comment without a blank line, the retry line,
// a multi-line data field, and [DONE].
const chunk = (n, content) =>
  JSON.stringify({ id: "chatcmpl-x", object: "chat.completion.chunk", choices: [{ index: 0, delta: { content }, finish_reason: null }] });
const CONTENTS = ["Grüße ", "🌊 fan-out ", "日本語の", "テキスト ", "naïve café — ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ", "end."];
const STREAM =
  "retry: 1000\n" +
  CONTENTS.map((c, i) => `id: ${i + 1}-0\ndata: ${chunk(i, c)}\n\n` + (i === 2 ? ": ping\n" : "")).join("") +
  "id: 8-0\ndata: line one\ndata: line two\n\n" +
  `id: 9-0\ndata: [DONE]\n\n`;
const BYTES = encoder.encode(STREAM);

const EXPECTED = [
  ...CONTENTS.map((c, i) => ({ id: `${i + 1}-0`, event: "message", data: chunk(i, c) })),
  { id: "8-0", event: "message", data: "line one\nline two" },
  { id: "9-0", event: "message", data: "[DONE]" },
];

function parseAll(pieces) {
  const parser = new SSEParser();
  const events = [];
  for (const piece of pieces) events.push(...parser.feed(piece));
  events.push(...parser.end());
  return { events, parser };
}

function cut(bytes, positions) {
  const pieces = [];
  let start = 0;
  for (const p of [...positions].sort((a, b) => a - b)) {
    pieces.push(bytes.slice(start, p));
    start = p;
  }
  pieces.push(bytes.slice(start));
  return pieces;
}

// A small deterministic PRNG, so a failure names a reproducible seed.
function mulberry32(seed) {
  return () => {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

test("the whole stream in one read", () => {
  const { events, parser } = parseAll([BYTES]);
  assert.deepEqual(events, EXPECTED);
  assert.equal(parser.retry, 1000);
});

test("a frame split over two reads, at every byte (inside UTF-8 characters too)", () => {
  for (let i = 1; i < BYTES.length; i++) {
    assert.deepEqual(parseAll(cut(BYTES, [i])).events, EXPECTED, `split at byte ${i}`);
  }
});

test("one byte per read", () => {
  const pieces = Array.from(BYTES, (b) => Uint8Array.of(b));
  assert.deepEqual(parseAll(pieces).events, EXPECTED);
});

test("random chunkings, 500 seeds", () => {
  for (let seed = 1; seed <= 500; seed++) {
    const random = mulberry32(seed);
    const positions = new Set();
    const count = 1 + Math.floor(random() * 40);
    while (positions.size < count) positions.add(1 + Math.floor(random() * (BYTES.length - 1)));
    assert.deepEqual(parseAll(cut(BYTES, positions)).events, EXPECTED, `seed ${seed}`);
  }
});

test("several frames in one read come out in order, and a partial one waits", () => {
  const parser = new SSEParser();
  const first = parser.feed(encoder.encode("id: 1-0\ndata: a\n\nid: 2-0\ndata: b\n\nid: 3-0\nda"));
  assert.deepEqual(first.map((e) => [e.id, e.data]), [["1-0", "a"], ["2-0", "b"]]);
  const rest = parser.feed(encoder.encode("ta: c\n\n"));
  assert.deepEqual(rest.map((e) => [e.id, e.data]), [["3-0", "c"]]);
});

test("CRLF and CR line ends, with \\r and \\n in different reads", () => {
  const crlf = encoder.encode("id: 1-0\r\ndata: x\r\n\r\nid: 2-0\rdata: y\r\rid: 3-0\ndata: z\n\n");
  const want = [
    ["1-0", "x"],
    ["2-0", "y"],
    ["3-0", "z"],
  ];
  for (let i = 1; i < crlf.length; i++) {
    const got = parseAll(cut(crlf, [i])).events.map((e) => [e.id, e.data]);
    assert.deepEqual(got, want, `split at byte ${i}`);
  }
  // "\r" then "\n" in the next read is one line end, not a line end and a blank line.
  const parser = new SSEParser();
  assert.deepEqual(parser.feed("data: a\r"), []);
  assert.deepEqual(parser.feed("\ndata: b\r\n"), []);
  assert.deepEqual(parser.feed("\r\n").map((e) => e.data), ["a\nb"]);
});

test("comments, heartbeats without a blank line, unknown fields and fields without a value", () => {
  const { events } = parseAll([": ping\n: ping\nid: 5-0\nfoo: bar\ndata\ndata:  two spaces\n\n"]);
  assert.deepEqual(events, [{ id: "5-0", event: "message", data: "\n two spaces" }]);
});

test("a blank line with no data dispatches nothing; the id carries over as in EventSource", () => {
  const { events } = parseAll(["id: 7-0\n\ndata: later\n\n"]);
  assert.deepEqual(events, [{ id: "7-0", event: "message", data: "later" }]);
});

test("an event cut off by the end of the stream is not dispatched", () => {
  const { events } = parseAll(["id: 1-0\ndata: whole\n\nid: 2-0\ndata: cut"]);
  assert.deepEqual(events.map((e) => e.data), ["whole"]);
});

test("a byte order mark at the start is dropped, even split over reads", () => {
  const bom = Uint8Array.of(0xef, 0xbb, 0xbf, ...encoder.encode("data: x\n\n"));
  assert.deepEqual(parseAll(cut(bom, [1])).events.map((e) => e.data), ["x"]);
  assert.deepEqual(parseAll(cut(bom, [2, 5])).events.map((e) => e.data), ["x"]);
});

test("readEvents over a ReadableStream with random chunks", async () => {
  const random = mulberry32(42);
  const pieces = [];
  for (let i = 0; i < BYTES.length; ) {
    const n = 1 + Math.floor(random() * 64);
    pieces.push(BYTES.slice(i, i + n));
    i += n;
  }
  const body = new ReadableStream({
    pull(controller) {
      if (pieces.length) controller.enqueue(pieces.shift());
      else controller.close();
    },
  });
  const events = [];
  for await (const event of readEvents(body)) events.push(event);
  assert.deepEqual(events, EXPECTED);
});

test("aborting readEvents ends the read with the abort reason", async () => {
  const body = new ReadableStream({
    start(controller) {
      controller.enqueue(encoder.encode("id: 1-0\ndata: a\n\n"));
    },
  });
  const controller = new AbortController();
  const seen = [];
  await assert.rejects(
    (async () => {
      for await (const event of readEvents(body, { signal: controller.signal })) {
        seen.push(event.data);
        controller.abort(new Error("gone"));
      }
    })(),
    /gone/,
  );
  assert.deepEqual(seen, ["a"]);
});
