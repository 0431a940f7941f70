"""Logging: readable text, or one JSON object a line with ``FANLINE_LOG_FORMAT=json``.

Every line carries the generation id and the request id when they are known
(context variables set by the API's request middleware, the routes and the
worker's job). Prompts and keys are never logged; with ``FANLINE_LOG_CONTENT=1``
the worker logs prompts at debug level.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time

import orjson

from fanline.shared.settings import Settings

gen_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("gen_id", default="")
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


# Credentials that libraries may put in a log line: ?token=… in a request target
# (EventSource and WebSocket clients send watch tokens or keys there), and
# Authorization headers in debug dumps of a handshake.
_SECRETS = re.compile(r"(?i)((?:[?&]token=)|(?:authorization:\s*(?:bearer\s+)?))[^\s&\"']+")


def redact(text: str) -> str:
    return _SECRETS.sub(r"\1[redacted]", text)


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "token=" in message or "uthorization" in message:
            record.msg, record.args = redact(message), None
        gen_id, request_id = gen_id_var.get(), request_id_var.get()
        ids = " ".join(f"{k}={v}" for k, v in (("gen", gen_id), ("req", request_id)) if v)
        record.__dict__.update(gen_id=gen_id, request_id=request_id, ids=f" [{ids}]" if ids else "")
        return True


class _JSON(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ("gen_id", "request_id"):
            value = getattr(record, name, "")
            if value:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    if settings.log_format == "json":
        formatter = _JSON()
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s%(ids)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Library chatter a user does not need; uvicorn's access lines stay (with request ids).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # arq logs two lines per job, which fanline's own "generation … completed" line repeats
    # (~7 % of a worker's CPU on short generations); they stay at debug level.
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("arq.worker").setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
