// fanline.js — the browser (and Node 18+) client for fanline. An ES module with no dependencies.
//
//   import { chat, watch, cancel } from "/static/fanline.js";
//   const result = await chat({ model: "demo", messages: [{ role: "user", content: "hi" }] }, {
//     onDelta: (delta) => out.textContent += delta.content ?? "",
//   });
//   result.content, result.finishReason, result.id (the generation id), result.lastEventId
//
// Every event the server sends carries an id. The client remembers the id of the
// last event it handed to you; when the connection drops (network loss, a pod
// draining, a stalled socket) it reconnects to GET /v1/generations/{id}/events
// with that id in Last-Event-ID and carries on, so you see each event exactly once.
//
// The SSE parser follows the WHATWG event-stream rules: a frame may be split over
// any number of reads, one read may hold many frames, lines may end in \n, \r\n or
// \r (even with the \r and \n in different reads), and a multi-byte UTF-8
// character may be split between reads.

/** An error from fanline: an HTTP error body, or an error event in the stream. */
export class FanlineError extends Error {
  constructor(message, { status = 0, code = null, type = null, result = null } = {}) {
    super(message);
    this.name = "FanlineError";
    this.status = status; // HTTP status, or 0 for an error event in the stream
    this.code = code; // e.g. "generation_not_found", "worker_lost"
    this.type = type;
    this.result = result; // what was received before the error, for an error event
  }
}

// -- the SSE parser ------------------------------------------------------------

/**
 * An incremental text/event-stream parser.
 *
 *   const parser = new SSEParser();
 *   for (const event of parser.feed(bytes)) { event.id, event.event, event.data }
 *
 * `feed` takes Uint8Array or string pieces, cut anywhere. Events come out once
 * their terminating blank line has arrived; an event cut off by the end of the
 * stream is never dispatched (as in EventSource).
 */
export class SSEParser {
  constructor() {
    this.decoder = new TextDecoder("utf-8");
    this.buffer = ""; // text not yet split into lines
    this.data = [];
    this.eventType = "";
    this.lastEventId = ""; // as EventSource: persists from event to event
    this.retry = null; // the server's reconnection delay, ms
    this.started = false; // a leading BOM is dropped
  }

  feed(piece) {
    let text = typeof piece === "string" ? piece : this.decoder.decode(piece, { stream: true });
    if (!this.started && text.length > 0) {
      this.started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    }
    this.buffer += text;
    const events = [];
    let start = 0;
    const buffer = this.buffer;
    for (;;) {
      const lf = buffer.indexOf("\n", start);
      const cr = buffer.indexOf("\r", start);
      if (lf === -1 && cr === -1) break;
      let end;
      let next;
      if (cr !== -1 && (lf === -1 || cr < lf)) {
        if (cr === buffer.length - 1) break; // a \r at the very end: a \n may follow in the next read
        end = cr;
        next = buffer[cr + 1] === "\n" ? cr + 2 : cr + 1;
      } else {
        end = lf;
        next = lf + 1;
      }
      this.#line(buffer.slice(start, end), events);
      start = next;
    }
    this.buffer = buffer.slice(start);
    return events;
  }

  /** The stream ended: flush the decoder. An incomplete event is discarded. */
  end() {
    const rest = this.decoder.decode();
    const events = rest ? this.feed(rest) : [];
    if (this.buffer.endsWith("\r")) {
      this.buffer = this.buffer.slice(0, -1);
      this.#line("", events); // "\r" was a line end after all; blank line dispatches
      this.buffer = "";
    }
    this.buffer = "";
    this.data = [];
    this.eventType = "";
    return events;
  }

  #line(line, events) {
    if (line === "") {
      if (this.data.length > 0) {
        events.push({ id: this.lastEventId, event: this.eventType || "message", data: this.data.join("\n") });
      }
      this.data = [];
      this.eventType = "";
      return;
    }
    if (line.charCodeAt(0) === 58 /* ":" */) return; // a comment (the server's heartbeat)
    const colon = line.indexOf(":");
    let field = line;
    let value = "";
    if (colon !== -1) {
      field = line.slice(0, colon);
      value = line.slice(colon + 1);
      if (value.charCodeAt(0) === 32 /* " " */) value = value.slice(1);
    }
    switch (field) {
      case "data":
        this.data.push(value);
        break;
      case "id":
        if (!value.includes("\0")) this.lastEventId = value;
        break;
      case "event":
        this.eventType = value;
        break;
      case "retry":
        if (/^\d+$/.test(value)) this.retry = Number(value);
        break;
      default: // unknown fields are ignored
    }
  }
}

/**
 * Reads a fetch Response body as SSE events. Aborting `signal` ends the read with its reason;
 * `onBytes` is called on every read (heartbeats included), for stall detection.
 */
export async function* readEvents(body, { signal, onBytes } = {}) {
  const parser = new SSEParser();
  const reader = body.getReader();
  const aborted = () => reader.cancel(signal.reason).catch(() => {});
  signal?.addEventListener("abort", aborted, { once: true });
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (signal?.aborted) throw signal.reason;
      if (done) break;
      onBytes?.();
      yield* parser.feed(value);
    }
    yield* parser.end();
  } finally {
    signal?.removeEventListener("abort", aborted);
    reader.cancel().catch(() => {});
  }
}

// -- requests -------------------------------------------------------------------

function url(baseUrl, path) {
  return (baseUrl || "").replace(/\/+$/, "") + path;
}

function authHeaders(options) {
  const headers = { ...(options.headers || {}) };
  if (options.apiKey) headers.authorization = `Bearer ${options.apiKey}`;
  return headers;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status line
  }
  const error = body && body.error ? body.error : {};
  return new FanlineError(error.message || `HTTP ${response.status} ${response.statusText}`, {
    status: response.status,
    code: error.code || null,
    type: error.type || null,
  });
}

// A status that is worth retrying: the pod is draining, Redis is away, rate limits.
function retryable(status) {
  return status === 429 || status === 502 || status === 503 || status === 504;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const timer = setTimeout(done, ms);
    function done() {
      signal?.removeEventListener("abort", aborted);
      resolve();
    }
    function aborted() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    signal?.addEventListener("abort", aborted, { once: true });
  });
}

// In a browser that says it is offline, wait for it to come back (or for `ms`).
function waitOnline(ms, signal) {
  const nav = globalThis.navigator;
  if (!nav || nav.onLine !== false || typeof globalThis.addEventListener !== "function") {
    return sleep(ms, signal);
  }
  return new Promise((resolve, reject) => {
    const timer = setTimeout(done, Math.max(ms, 5000));
    function done() {
      clearTimeout(timer);
      globalThis.removeEventListener("online", done);
      signal?.removeEventListener("abort", aborted);
      resolve();
    }
    function aborted() {
      done();
      reject(signal.reason);
    }
    globalThis.addEventListener("online", done, { once: true });
    signal?.addEventListener("abort", aborted, { once: true });
  });
}

function abortError(signal) {
  return signal.reason ?? new DOMException("The operation was aborted.", "AbortError");
}

// -- following a generation -----------------------------------------------------

const STALL_MS = 40000; // the server sends a heartbeat at least every 15 s
const MAX_BACKOFF_MS = 5000;

/** What the client has received of one generation so far. */
function emptyResult(id, lastEventId) {
  return { id, content: "", reasoning: "", finishReason: null, usage: null, lastEventId: lastEventId || null, error: null };
}

function apply(result, chunk) {
  if (chunk.usage) result.usage = chunk.usage;
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return null;
  const delta = choice.delta || {};
  if (typeof delta.content === "string") result.content += delta.content;
  const reasoning = typeof delta.reasoning_content === "string" ? delta.reasoning_content : delta.reasoning;
  if (typeof reasoning === "string") result.reasoning += reasoning;
  if (choice.finish_reason) result.finishReason = choice.finish_reason;
  return delta;
}

/**
 * Follows generation `id` to its end, resuming after `lastEventId`; `first` is an
 * already open response (the POST of chat()). Resolves with the result.
 */
async function follow(generationId, first, options) {
  let id = generationId;
  const { signal, onDelta, onChunk, onStatus, baseUrl } = options;
  const fetchFn = options.fetch || globalThis.fetch.bind(globalThis);
  const result = emptyResult(id, options.lastEventId);
  let response = first;
  let failures = 0;
  const status = (s) => onStatus?.(s, result);

  for (;;) {
    if (signal?.aborted) throw abortError(signal);
    // One controller per connection: aborted by the caller's signal, by the
    // browser going offline, or by a stall (no bytes, not even a heartbeat).
    const attempt = new AbortController();
    const forward = () => attempt.abort(signal.reason);
    signal?.addEventListener("abort", forward, { once: true });
    const offline = () => attempt.abort(new FanlineError("the browser went offline"));
    const hasWindowEvents = typeof globalThis.addEventListener === "function" && globalThis.navigator;
    if (hasWindowEvents) globalThis.addEventListener("offline", offline);
    let stall = null;
    const armStall = () => {
      clearTimeout(stall);
      stall = setTimeout(() => attempt.abort(new FanlineError("the stream stalled")), options.stallMs || STALL_MS);
    };
    try {
      if (!response) {
        status(failures === 0 && !result.lastEventId ? "connecting" : "reconnecting");
        const headers = { accept: "text/event-stream", ...authHeaders(options) };
        if (result.lastEventId) headers["last-event-id"] = result.lastEventId;
        armStall();
        response = await fetchFn(url(baseUrl, `/v1/generations/${encodeURIComponent(id)}/events`), {
          headers,
          signal: attempt.signal,
          cache: "no-store",
        });
        if (!response.ok) {
          const error = await errorFrom(response);
          if (!retryable(response.status)) throw error;
          throw Object.assign(error, { retry: true });
        }
      }
      status("live");
      armStall();
      let gotEvent = false;
      for await (const event of readEvents(response.body, { signal: attempt.signal, onBytes: armStall })) {
        if (event.data === "[DONE]") {
          if (event.id) result.lastEventId = event.id;
          if (result.error) {
            throw new FanlineError(result.error.message || "the generation failed", {
              code: result.error.code || null,
              type: result.error.type || null,
              result,
            });
          }
          status("done");
          return result;
        }
        let payload;
        try {
          payload = JSON.parse(event.data);
        } catch {
          continue; // not ours (a proxy's comment in data?): skip rather than fail the stream
        }
        if (event.id) result.lastEventId = event.id;
        if (!id && typeof payload.id === "string" && payload.id.startsWith("chatcmpl-")) {
          id = result.id = payload.id.slice("chatcmpl-".length); // the header was not readable (CORS)
          options.onGeneration?.(id, { watchToken: null });
        }
        gotEvent = true;
        failures = 0;
        if (payload.error) {
          result.error = payload.error;
          continue; // [DONE] follows
        }
        const delta = apply(result, payload);
        onChunk?.(payload, { id: event.id, result });
        if (delta) onDelta?.(delta, { id: event.id, chunk: payload, result });
      }
      // Ended without [DONE]: the pod went away (drain) or a proxy cut us off.
      if (!gotEvent) failures += 1;
    } catch (error) {
      if (signal?.aborted) throw abortError(signal);
      if (error instanceof FanlineError && error.status && !error.retry) throw error;
      if (error instanceof FanlineError && error.result) throw error;
      failures += 1;
    } finally {
      clearTimeout(stall);
      signal?.removeEventListener("abort", forward);
      if (hasWindowEvents) globalThis.removeEventListener("offline", offline);
    }
    response = null;
    if (!id) throw new FanlineError("the connection dropped before the generation id was known");
    status("reconnecting");
    // The first retry after a working stream is immediate; then back off, with jitter.
    const delay = failures <= 1 ? 0 : Math.min(MAX_BACKOFF_MS, 500 * 2 ** (failures - 2)) * (0.5 + Math.random() / 2);
    await waitOnline(delay, signal);
  }
}

/**
 * Starts a chat completion and streams it.
 *
 * body: an OpenAI Chat Completions request (`stream: true` is set for you).
 * options: { onDelta(delta, {id, chunk, result}), onChunk, onStatus(status, result),
 *            onGeneration(id, {watchToken}), signal, baseUrl, apiKey, headers, fetch }
 * status is "connecting" | "live" | "reconnecting" | "done".
 * Aborting `signal` stops reading; it does not stop the generation (see cancel()).
 */
export async function chat(body, options = {}) {
  const fetchFn = options.fetch || globalThis.fetch.bind(globalThis);
  options.onStatus?.("connecting", emptyResult(null, null));
  const response = await fetchFn(url(options.baseUrl, "/v1/chat/completions"), {
    method: "POST",
    headers: { "content-type": "application/json", accept: "text/event-stream", ...authHeaders(options) },
    body: JSON.stringify({ ...body, stream: true }),
    signal: options.signal,
  });
  if (!response.ok) throw await errorFrom(response);
  const id = response.headers.get("x-fanline-generation-id");
  // With auth on: read access to this one generation, for sharing (watch(id, { apiKey: watchToken })).
  const watchToken = response.headers.get("x-fanline-watch-token");
  if (id) options.onGeneration?.(id, { watchToken });
  const result = await follow(id, response, { ...options, lastEventId: null });
  return Object.assign(result, { watchToken });
}

/**
 * Watches generation `id` from the start, or resumes it strictly after `lastEventId`.
 * Same options and result as chat().
 */
export function watch(id, options = {}) {
  options.onGeneration?.(id, { watchToken: null });
  return follow(id, null, options);
}

/** Stops a generation; every viewer gets a last chunk with finish_reason "cancelled". */
export async function cancel(id, options = {}) {
  const fetchFn = options.fetch || globalThis.fetch.bind(globalThis);
  const response = await fetchFn(url(options.baseUrl, `/v1/generations/${encodeURIComponent(id)}/cancel`), {
    method: "POST",
    headers: authHeaders(options),
  });
  if (!response.ok && response.status !== 409) throw await errorFrom(response); // 409: it had already finished
  return response.json();
}

/** GET /v1/generations/{id}: status, content so far, finish_reason, usage. */
export async function getGeneration(id, options = {}) {
  const fetchFn = options.fetch || globalThis.fetch.bind(globalThis);
  const response = await fetchFn(url(options.baseUrl, `/v1/generations/${encodeURIComponent(id)}`), {
    headers: authHeaders(options),
    cache: "no-store",
  });
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

// -- a chat session: the state behind the demo page and the React hook ------------

/**
 * A conversation with one generation streaming at a time, as a small store:
 *
 *   const session = new ChatSession({ baseUrl, body: { model: "demo" } });
 *   session.subscribe(() => render(session.getSnapshot()));
 *   await session.send("hello");
 *
 * The snapshot is { messages, status, error, generationId, lastEventId, watchToken }:
 * each message is { role, content } and assistant messages also have { id,
 * reasoning, finishReason }; status is "idle" | "connecting" | "live" |
 * "reconnecting" | "done" | "error"; watchToken (auth on) grants read access to
 * generationId, for sharing. A new snapshot object is made on every change.
 *
 * To restore a session (after a reload), pass the saved { messages,
 * generationId, lastEventId, watchToken } as options and call resume().
 */
export class ChatSession {
  constructor(options = {}) {
    this.options = options;
    this.listeners = new Set();
    this.controller = null;
    this.detached = false;
    // What the current stream continues: a resumed stream brings only what follows its last event id.
    this.base = { content: "", reasoning: "" };
    this.snapshot = {
      messages: options.messages ? [...options.messages] : [],
      status: "idle",
      error: null,
      generationId: options.generationId ?? null, // restoring: the generation to resume()
      lastEventId: options.lastEventId ?? null,
      watchToken: options.watchToken ?? null, // with auth on: read access to generationId (share it)
    };
    // Bound, so they can be handed around (React, event handlers).
    this.subscribe = this.subscribe.bind(this);
    this.getSnapshot = this.getSnapshot.bind(this);
    this.send = this.send.bind(this);
    this.stop = this.stop.bind(this);
    this.resume = this.resume.bind(this);
    this.detach = this.detach.bind(this);
    this.attach = this.attach.bind(this);
  }

  subscribe(listener) {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  getSnapshot() {
    return this.snapshot;
  }

  get busy() {
    return this.controller !== null;
  }

  #set(changes) {
    this.snapshot = { ...this.snapshot, ...changes };
    for (const listener of this.listeners) listener(this.snapshot);
  }

  #updateAssistant(result) {
    const messages = [...this.snapshot.messages];
    const last = messages[messages.length - 1];
    const message = {
      role: "assistant",
      id: result.id,
      content: this.base.content + result.content,
      reasoning: this.base.reasoning + result.reasoning,
      finishReason: result.finishReason,
    };
    if (last && last.role === "assistant" && (last.id === result.id || last.id == null)) {
      messages[messages.length - 1] = message;
    } else {
      messages.push(message);
    }
    this.#set({ messages, generationId: result.id, lastEventId: result.lastEventId });
  }

  async #run(start) {
    const controller = new AbortController();
    this.controller = controller;
    this.detached = false;
    const options = {
      ...this.options,
      signal: controller.signal,
      onGeneration: (id, { watchToken }) =>
        this.#set(watchToken ? { generationId: id, watchToken } : { generationId: id }),
      onStatus: (status) => {
        if (this.controller === controller) this.#set({ status });
      },
      onChunk: (_chunk, { result }) => {
        this.#updateAssistant(result);
        this.options.onChunk?.(_chunk, { result });
      },
    };
    try {
      const result = await start(options);
      this.#updateAssistant(result);
      this.#set({ status: "done", error: null });
      this.options.onFinish?.(this.#lastAssistant());
      return result;
    } catch (error) {
      if (controller.signal.aborted) return null; // detached: the generation goes on without us
      if (error.result) this.#updateAssistant(error.result);
      this.#set({ status: "error", error });
      this.options.onError?.(error);
      return null;
    } finally {
      if (this.controller === controller) this.controller = null;
    }
  }

  #lastAssistant() {
    const messages = this.snapshot.messages;
    const last = messages[messages.length - 1];
    return last && last.role === "assistant" ? last : null;
  }

  /** Sends a user message (a string) with the conversation so far; streams the answer. */
  send(text, extraBody = {}) {
    if (this.controller) return Promise.reject(new FanlineError("a generation is already streaming in this session"));
    const history = this.snapshot.messages
      .filter((m) => m.role !== "assistant" || m.content)
      .map((m) => ({ role: m.role, content: m.content }));
    const user = { role: "user", content: text };
    this.base = { content: "", reasoning: "" };
    this.#set({
      messages: [...this.snapshot.messages, user],
      error: null,
      lastEventId: null,
      generationId: null,
      watchToken: null,
    });
    const body = { model: "demo", ...(this.options.body || {}), ...extraBody, messages: [...history, user] };
    return this.#run((options) => chat(body, options));
  }

  /**
   * Follows a generation: by default this session's own (after an error or a
   * detach), from its last event id; or any generation by id (a shared link),
   * from `lastEventId` or from the start, with its `watchToken` when auth is on.
   * A restored session (messages given to the constructor, e.g. from
   * sessionStorage after a reload) resumes its last assistant message.
   */
  resume(generationId = this.snapshot.generationId, lastEventId, { watchToken } = {}) {
    if (!generationId) return Promise.resolve(null);
    if (this.controller) return Promise.reject(new FanlineError("a generation is already streaming in this session"));
    const own = generationId === this.snapshot.generationId;
    const from = lastEventId !== undefined ? lastEventId : own ? this.snapshot.lastEventId : null;
    const last = this.#lastAssistant();
    const messages = [...this.snapshot.messages];
    if (last && last.id === generationId && from) {
      this.base = { content: last.content, reasoning: last.reasoning || "" };
    } else {
      this.base = { content: "", reasoning: "" };
      const message = { role: "assistant", id: generationId, content: "", reasoning: "", finishReason: null };
      if (last && last.id === generationId) messages[messages.length - 1] = message;
      else messages.push(message);
    }
    const token = watchToken ?? (own ? this.snapshot.watchToken : null);
    this.#set({ messages, generationId, lastEventId: from, error: null, watchToken: token });
    // Without an API key of its own, a viewer reads with the generation's watch token.
    const auth = token && !this.options.apiKey ? { apiKey: token } : {};
    return this.#run((options) => watch(generationId, { ...options, ...auth, lastEventId: from }));
  }

  /** Cancels the streaming generation for every viewer (it ends with finish_reason "cancelled"). */
  async stop() {
    const id = this.snapshot.generationId;
    if (!id) return null;
    return cancel(id, this.options);
  }

  /** Stops reading without cancelling (unmount, navigation); attach() picks up where it left. */
  detach() {
    if (!this.controller) return;
    this.detached = true;
    const controller = this.controller;
    this.controller = null;
    controller.abort();
  }

  attach() {
    if (this.detached && !this.controller) {
      this.detached = false;
      return this.resume();
    }
    return Promise.resolve(null);
  }
}
