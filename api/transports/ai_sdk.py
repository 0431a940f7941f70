"""The Vercel AI SDK's UI message stream (``ai`` 5 and later; header ``x-vercel-ai-ui-message-stream: v1``).

SSE ``data:`` lines of JSON chunks, then ``data: [DONE]``:

    start {messageId, messageMetadata: {generationId}}   ─┐ the preamble,
    start-step                                           ─┘ sent at once
    reasoning-start / reasoning-delta… / reasoning-end      delta.reasoning_content (or .reasoning)
    text-start / text-delta… / text-end                     delta.content, and delta.refusal (the refusal is
                                                            the answer the user reads; the SDK has no part for it)
    tool-input-start / tool-input-delta…                    delta.tool_calls: a call's first fragment (id, name),
    tool-input-available {input}  (or tool-input-error)     then its argument fragments; the parsed arguments
                                                            once the choice finishes
    error {errorText}                                       a terminal error event, or a drain hint
    finish-step, finish {finishReason, messageMetadata}     at the end event
    [DONE]

Deliberate deviation from the other transports: a part must be opened
(``text-start``) before its deltas and closed after, so the frame of an event
depends on the events before it. A UI message stream therefore always starts at
the generation's first event (the SDK's resume is a replay: its
``DefaultChatTransport`` resets the message on the replayed ``start``), and each
response keeps that little state and encodes per viewer. A chat has one or two
viewers, so this costs nothing the hub's fan-out would save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from fanline.api.hub import HistoryGone
from fanline.shared import events
from fanline.shared.events import Event

# fanline's finish_reason → the AI SDK's FinishReason.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "cancelled": "other",
}

HEADERS = {"x-vercel-ai-ui-message-stream": "v1"}

RECONNECT = "fanline: the stream was interrupted by the server; call resumeStream() to continue"


def message_id(gen_id: str) -> str:
    """The assistant message's id: stable, so a replay replaces the message instead of adding one."""
    return f"msg-{gen_id}"


@dataclass(slots=True)
class _ToolCall:
    id: str
    name: str
    arguments: str = ""


def _data(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


class UIMessageStream:
    """One response's encoder: which part is open, and how many parts so far."""

    name = "ai_sdk"  # the metrics label
    media_type = b"text/event-stream; charset=utf-8"
    # No event ids in this stream, so a blank line after the comment is harmless.
    heartbeat = b": ping\n\n"
    shared_frames = False  # a viewer's frames depend on what it was sent before

    def __init__(self, gen_id: str) -> None:
        self.gen_id = gen_id
        self.preamble = _data(
            {"type": "start", "messageId": message_id(gen_id), "messageMetadata": {"generationId": gen_id}}
        ) + _data({"type": "start-step"})
        self._open: str | None = None  # "text" | "reasoning"
        self._part_id = ""
        self._tools: dict[int, _ToolCall] = {}  # by the delta's tool call index, until the choice finishes
        self._parts = 0
        self._finish_reason: str | None = None
        self._usage: dict[str, Any] | None = None
        self._failed = False

    def frame(self, event: Event) -> bytes:
        if event.kind == events.END:
            return self._end()
        if event.kind == events.ERROR:
            self._failed = True
            error = orjson.loads(event.data).get("error") or {}
            return self._close() + _data(
                {"type": "error", "errorText": str(error.get("message") or "generation failed")}
            )
        chunk = orjson.loads(event.data)
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        out = b""
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content")
            if not isinstance(reasoning, str):
                reasoning = delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out += self._delta("reasoning", reasoning)
            for field in ("content", "refusal"):
                text = delta.get(field)
                if isinstance(text, str) and text:
                    out += self._delta("text", text)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                out += self._close() + self._tools_available()
        return out

    def error(self, exc: HistoryGone) -> bytes:
        return self._close() + _data({"type": "error", "errorText": exc.message}) + b"data: [DONE]\n\n"

    def reconnect(self, last_seq: int) -> bytes:
        # This pod is going away (drain) or lost Redis mid-stream. The AI SDK has no
        # "reconnect" chunk: end with an error the app can answer with resumeStream().
        return self._close() + _data({"type": "error", "errorText": RECONNECT})

    def _delta(self, kind: str, text: str) -> bytes:
        out = b""
        if self._open != kind:
            out += self._close()
            self._parts += 1
            self._part_id = f"{kind}-{self._parts}"
            self._open = kind
            out += _data({"type": f"{kind}-start", "id": self._part_id})
        return out + _data({"type": f"{kind}-delta", "id": self._part_id, "delta": text})

    def _tool_delta(self, call: dict[str, Any]) -> bytes:
        """OpenAI streams a tool call as fragments sharing an ``index``: the first carries the call's
        id and function name, the rest pieces of the JSON arguments."""
        index = call.get("index", 0)
        function = call.get("function") or {}
        arguments = function.get("arguments") if isinstance(function, dict) else None
        out = b""
        tool = self._tools.get(index)
        if tool is None:
            out += self._close()
            name = function.get("name") if isinstance(function, dict) else None
            tool = self._tools[index] = _ToolCall(str(call.get("id") or f"call-{self.gen_id}-{index}"), str(name or ""))
            out += _data({"type": "tool-input-start", "toolCallId": tool.id, "toolName": tool.name})
        if isinstance(arguments, str) and arguments:
            tool.arguments += arguments
            out += _data({"type": "tool-input-delta", "toolCallId": tool.id, "inputTextDelta": arguments})
        return out

    def _tools_available(self) -> bytes:
        out = b""
        for tool in self._tools.values():
            chunk: dict[str, Any] = {"toolCallId": tool.id, "toolName": tool.name}
            try:
                chunk["input"] = orjson.loads(tool.arguments or "{}")
                chunk["type"] = "tool-input-available"
            except orjson.JSONDecodeError:
                chunk["input"] = tool.arguments
                chunk["type"] = "tool-input-error"
                chunk["errorText"] = "the model's tool call arguments are not valid JSON"
            out += _data(chunk)
        self._tools.clear()
        return out

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        kind, self._open = self._open, None
        return _data({"type": f"{kind}-end", "id": self._part_id})

    def _end(self) -> bytes:
        metadata: dict[str, Any] = {"generationId": self.gen_id, "finishReason": self._finish_reason}
        if self._usage is not None:
            metadata["usage"] = self._usage
        reason = "error" if self._failed else FINISH_REASONS.get(self._finish_reason or "", "other")
        return (
            self._close()
            + self._tools_available()
            + _data({"type": "finish-step"})
            + _data({"type": "finish", "finishReason": reason, "messageMetadata": metadata})
            + b"data: [DONE]\n\n"
        )
