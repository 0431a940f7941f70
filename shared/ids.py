"""Generation ids (128-bit random, the capability to watch) and event ids (stream entry ids)."""

from __future__ import annotations

import re
import secrets

from fanline.shared.errors import InvalidRequest

_GEN_ID = re.compile(r"[0-9a-f]{32}")
_EVENT_ID = re.compile(r"([0-9]{1,18})-0")  # not \d: it matches non-ASCII digits too


def new_generation_id() -> str:
    return secrets.token_hex(16)


def is_generation_id(value: str) -> bool:
    return _GEN_ID.fullmatch(value) is not None


def event_id(seq: int) -> str:
    """Events are numbered 1, 2, 3… within a generation; the stream entry id is ``<seq>-0``.

    Explicit ids make publishing idempotent (a retried XADD of an id that exists
    is refused by Redis) and make gaps visible to a resuming viewer.
    """
    return f"{seq}-0"


def parse_event_id(value: str) -> int:
    """The sequence number inside a client's ``Last-Event-ID``; 0 means "from the start"."""
    match = _EVENT_ID.fullmatch(value.strip())
    if match is None:
        raise InvalidRequest(
            f"malformed event id {value[:64]!r}: expected an id from this API, like '12-0'",
            code="invalid_last_event_id",
            param="Last-Event-ID",
        )
    return int(match.group(1))
