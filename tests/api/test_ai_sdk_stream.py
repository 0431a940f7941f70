"""The UI message stream encoder (api/transports/ai_sdk.py) on hand-made events: the cases the demo
generator does not produce. The real ``ai`` package reads what real generations give in
js/test/ai-sdk.test.mjs."""

from __future__ import annotations

from typing import Any

import orjson

from fanline.api.transports.ai_sdk import UIMessageStream
from fanline.shared import events
from fanline.shared.events import Event


def chunk(seq: int, delta: dict[str, Any], finish_reason: str | None = None) -> Event:
    body = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return Event(seq, events.CHUNK, orjson.dumps(body))


def parts(stream: UIMessageStream, *evs: Event) -> list[dict[str, Any]]:
    frames = b"".join(stream.frame(e) for e in evs)
    return [orjson.loads(f[6:]) for f in frames.split(b"\n\n") if f.startswith(b"data: {")]


def test_two_tool_calls_interleaved_by_index_each_get_their_own_part() -> None:
    calls = [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "search", "arguments": ""}},
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "weather", "arguments": '{"ci'}},
    ]
    out = parts(
        UIMessageStream("g1"),
        chunk(1, {"tool_calls": calls}),
        chunk(2, {"tool_calls": [{"index": 0, "function": {"arguments": '{"q": 1}'}}]}),
        chunk(3, {"tool_calls": [{"index": 1, "function": {"arguments": 'ty": "Oslo"}'}}]}, "tool_calls"),
        Event(4, events.END, b""),
    )
    assert [(p["type"], p.get("toolCallId")) for p in out] == [
        ("tool-input-start", "call_a"),
        ("tool-input-start", "call_b"),
        ("tool-input-delta", "call_b"),
        ("tool-input-delta", "call_a"),
        ("tool-input-delta", "call_b"),
        ("tool-input-available", "call_a"),
        ("tool-input-available", "call_b"),
        ("finish-step", None),
        ("finish", None),
    ]
    assert out[5]["input"] == {"q": 1} and out[5]["toolName"] == "search"
    assert out[6]["input"] == {"city": "Oslo"} and out[6]["toolName"] == "weather"
    assert out[-1]["finishReason"] == "tool-calls"


def test_tool_call_arguments_that_are_not_json_end_as_a_tool_input_error() -> None:
    call = {"index": 0, "id": "call_x", "function": {"name": "search", "arguments": "{not json"}}
    out = parts(UIMessageStream("g2"), chunk(1, {"tool_calls": [call]}, "tool_calls"), Event(2, events.END, b""))
    assert [p["type"] for p in out] == [
        "tool-input-start",
        "tool-input-delta",
        "tool-input-error",
        "finish-step",
        "finish",
    ]
    assert out[2]["input"] == "{not json" and out[2]["errorText"]


def test_a_generation_cut_off_mid_tool_call_still_closes_the_call() -> None:
    """A cancelled generation has no finish chunk with ``tool_calls``; the end event closes what is open."""
    call = {"index": 0, "id": "call_y", "function": {"name": "search", "arguments": '{"q": 2}'}}
    out = parts(UIMessageStream("g3"), chunk(1, {"tool_calls": [call]}), Event(2, events.END, b""))
    assert [p["type"] for p in out] == [
        "tool-input-start",
        "tool-input-delta",
        "tool-input-available",
        "finish-step",
        "finish",
    ]


def test_a_refusal_is_text_the_user_reads() -> None:
    out = parts(UIMessageStream("g4"), chunk(1, {"refusal": "I can't "}), chunk(2, {"refusal": "help."}, "stop"))
    assert [p["type"] for p in out] == ["text-start", "text-delta", "text-delta", "text-end"]
    assert "".join(p.get("delta", "") for p in out) == "I can't help."
