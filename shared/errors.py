"""One exception tree, mapped once to the OpenAI error body at the edge (api/errors.py).

FanlineError                      500 server_error
├── InvalidRequest                400 invalid_request_error
├── Unauthorized                  401 authentication_error
├── Forbidden                     403 permission_error
├── NotFound                      404 not_found_error
├── RequestTimeout                408 invalid_request_error
├── Conflict                      409 conflict_error
├── MethodNotAllowed              405 invalid_request_error
├── Gone                          410 not_found_error
├── PayloadTooLarge               413 invalid_request_error
├── RateLimited                   429 rate_limit_error (with a Retry-After)
├── Unavailable                   503 service_unavailable
└── GenerationFailed              a generation's terminal error (not an HTTP status)

Stopped                           a producer must stop publishing (not an HTTP status)
├── Cancelled                     a viewer cancelled the generation
└── Disowned                      no longer this producer's: reaped as worker_lost, or lost by Redis
"""

from __future__ import annotations

from typing import Any


class FanlineError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param
        # Response headers the error carries (the Durable Streams protocol's, e.g. Producer-Epoch).
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(FanlineError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Unauthorized(FanlineError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(FanlineError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(FanlineError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(FanlineError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Gone(FanlineError):
    status = 410
    type = "not_found_error"
    code = "gone"


class RequestTimeout(FanlineError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class Conflict(FanlineError):
    status = 409
    type = "conflict_error"
    code = "conflict"


class PayloadTooLarge(FanlineError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class RateLimited(FanlineError):
    """Over a per-key limit; ``retry_after`` (whole seconds) becomes the ``Retry-After`` header."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, retry_after)


class Unavailable(FanlineError):
    status = 503
    type = "service_unavailable"
    code = "unavailable"


class GenerationFailed(FanlineError):
    """Raised by a generator; becomes the generation's terminal error event."""

    code = "generation_failed"


class Stopped(Exception):
    """The producer of a generation must stop publishing it (fanline.Producer raises these from ``add``)."""


class Cancelled(Stopped):
    """A viewer cancelled the generation (``POST /v1/generations/{id}/cancel``, or a WebSocket cancel)."""


class Disowned(Stopped):
    """The generation is no longer this producer's to write: a reaper ended it as ``worker_lost``
    (its heartbeats stopped reaching Redis), or Redis lost it. Nothing more is written."""
