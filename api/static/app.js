// The demo page: a ChatSession from fanline.js, rendered without a framework.
//
// State that survives a reload lives in sessionStorage (the conversation, the
// streaming generation's id and the id of the last event shown); the URL hash
// carries the generation id (#g=…, and with auth on its watch token, &t=…),
// which is also the share link. The API key stays in memory only. On load:
//   #g=ID and this tab was showing ID → restore, resume strictly after the last event shown
//   #g=ID otherwise                   → a shared link: watch ID from its first event
import { ChatSession } from "./fanline.js";

const STORE = "fanline:demo";
const $ = (id) => document.getElementById(id);
const els = {
  status: $("status"),
  statusText: $("status-text"),
  notice: $("notice"),
  empty: $("empty"),
  messages: $("messages"),
  share: $("share"),
  shareLink: $("share-link"),
  copy: $("copy"),
  form: $("composer"),
  prompt: $("prompt"),
  send: $("send"),
  stop: $("stop"),
  model: $("model"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
};

const STREAMING = new Set(["connecting", "live", "reconnecting"]);
const LABELS = { idle: "ready", connecting: "connecting…", live: "live", reconnecting: "reconnecting…", done: "done" };

// #g=<generation id>[&t=<watch token>]
function fromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const id = params.get("g");
  return { id: id && /^[0-9a-f]{32}$/.test(id) ? id : null, token: params.get("t") };
}

function hashGeneration() {
  return fromHash().id;
}

function loadStored() {
  try {
    return JSON.parse(sessionStorage.getItem(STORE) || "null");
  } catch {
    return null;
  }
}

function shareHash(id, token) {
  return `#g=${id}` + (token ? `&t=${encodeURIComponent(token)}` : "");
}

function shareUrl(id, token) {
  return `${location.origin}${location.pathname}${shareHash(id, token)}`;
}

// -- rendering ------------------------------------------------------------------

const rendered = []; // one entry per message: { li, content, reasoning, details }

function messageNode(message) {
  const li = document.createElement("li");
  li.className = `message ${message.role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : "Assistant";
  li.append(who);
  const entry = { li, content: null, reasoning: null, details: null };
  if (message.role === "assistant") {
    const details = document.createElement("details");
    details.className = "reasoning";
    details.hidden = true;
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning-text";
    details.append(summary, reasoning);
    li.append(details);
    entry.details = details;
    entry.reasoning = reasoning;
  }
  const content = document.createElement("div");
  content.className = "content";
  li.append(content);
  entry.content = content;
  return entry;
}

function renderMessages(messages) {
  while (rendered.length > messages.length) rendered.pop().li.remove();
  messages.forEach((message, i) => {
    let entry = rendered[i];
    if (!entry || !entry.li.classList.contains(message.role)) {
      if (entry) entry.li.remove();
      entry = messageNode(message);
      rendered[i] = entry;
      els.messages.append(entry.li);
    }
    if (entry.content.textContent !== message.content) entry.content.textContent = message.content;
    if (message.role === "assistant") {
      entry.li.dataset.generationId = message.id || "";
      entry.li.dataset.finishReason = message.finishReason || "";
      const reasoning = message.reasoning || "";
      entry.details.hidden = reasoning === "";
      if (entry.reasoning.textContent !== reasoning) entry.reasoning.textContent = reasoning;
    }
  });
  els.empty.hidden = messages.length > 0;
}

function stateOf(snapshot) {
  if (snapshot.status === "error") return "error";
  if (snapshot.status === "done") {
    const last = snapshot.messages[snapshot.messages.length - 1];
    return last && last.finishReason === "cancelled" ? "cancelled" : "done";
  }
  return snapshot.status;
}

let stopping = false;

function render(snapshot) {
  renderMessages(snapshot.messages);
  const state = stateOf(snapshot);
  const streaming = STREAMING.has(snapshot.status);
  els.status.dataset.state = state;
  let label = LABELS[state] || state;
  if (state === "cancelled") label = "cancelled";
  if (state === "error") label = `error: ${snapshot.error?.message || "failed"}`;
  if (streaming && stopping) label = "stopping…";
  if (els.statusText.textContent !== label) els.statusText.textContent = label;
  els.messages.setAttribute("aria-busy", String(streaming));
  els.send.disabled = streaming;
  els.stop.disabled = !streaming || !snapshot.generationId || stopping;
  if (!streaming) stopping = false;
  if (snapshot.generationId) {
    const link = shareUrl(snapshot.generationId, snapshot.watchToken);
    if (els.shareLink.value !== link) els.shareLink.value = link;
    els.share.hidden = false;
    const hash = shareHash(snapshot.generationId, snapshot.watchToken);
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }
}

function notice(text) {
  els.notice.textContent = text;
  els.notice.hidden = !text;
}

// -- the session ------------------------------------------------------------------

const stored = loadStored();
const wanted = hashGeneration();
const restoring = stored && stored.generationId && stored.generationId === wanted;
const keep = stored && (restoring || !wanted);
const session = new ChatSession({
  body: {},
  messages: keep ? stored.messages : [],
  generationId: keep ? stored.generationId : null,
  lastEventId: keep ? stored.lastEventId : null,
  watchToken: keep ? stored.watchToken : null,
  onError: (error) => console.warn("fanline:", error.message),
});

session.subscribe((snapshot) => {
  render(snapshot);
  const { messages, generationId, lastEventId, status, watchToken } = snapshot;
  try {
    // Never the API key: only what resumes this one answer (the watch token reads only it).
    sessionStorage.setItem(STORE, JSON.stringify({ messages, generationId, lastEventId, status, watchToken }));
  } catch {
    // storage full or disabled: the page works, it just cannot resume after a reload
  }
});

render(session.getSnapshot());

if (restoring && STREAMING.has(stored.status)) {
  notice("Resuming where this page left off.");
  session.resume(); // strictly after the last event this tab showed
} else if (wanted && !restoring) {
  notice("Watching a shared answer: everything so far, then live.");
  session.resume(wanted, null, { watchToken: fromHash().token });
}

window.addEventListener("hashchange", () => {
  const { id, token } = fromHash();
  if (id && id !== session.getSnapshot().generationId && !session.busy) {
    notice("Watching a shared answer: everything so far, then live.");
    session.resume(id, null, { watchToken: token });
  }
});

// -- controls ---------------------------------------------------------------------

els.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = els.prompt.value.trim();
  if (!text || session.busy) return;
  const extra = { model: els.model.value.trim() || "demo" };
  const max = Number.parseInt(els.maxTokens.value, 10);
  if (Number.isInteger(max) && max > 0) extra.max_tokens = max;
  els.prompt.value = "";
  notice("");
  session.options.apiKey = els.apiKey.value.trim() || undefined;
  session.send(text, extra);
});

els.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    els.form.requestSubmit();
  }
});

els.stop.addEventListener("click", async () => {
  stopping = true;
  session.options.apiKey = els.apiKey.value.trim() || undefined; // only the key that started it may stop it
  render(session.getSnapshot());
  try {
    await session.stop();
  } catch (error) {
    stopping = false;
    notice(`Could not stop: ${error.message}`);
    render(session.getSnapshot());
  }
});

els.copy.addEventListener("click", async () => {
  try {
    await navigator.clipboard.writeText(els.shareLink.value);
    els.copy.textContent = "Copied";
  } catch {
    els.shareLink.select(); // no clipboard access (plain http): let the user copy it
    els.copy.textContent = "Press Ctrl+C";
  }
  setTimeout(() => (els.copy.textContent = "Copy link"), 2000);
});

window.addEventListener("offline", () => notice("The network is gone; the answer resumes when it is back."));
window.addEventListener("online", () => notice(""));
