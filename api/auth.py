"""Access control: bearer API keys, and per-generation watch tokens.

With ``FANLINE_API_KEYS`` empty, auth is off (development): the 128-bit random
generation id is the capability to watch. With keys set:

- every endpoint but /healthz, /readyz and the static page needs
  ``Authorization: Bearer <api key>``;
- a generation's *watch token* grants read access to that one generation (its
  events over SSE/NDJSON/WS, and its status): as the bearer, or as ``?token=``
  for EventSource and WebSocket clients, which cannot set headers;
- only the key that created a generation can cancel it.

A watch token is ``<gen_id>.<expiry>.<HMAC-SHA256(secret, gen_id|expiry)>`` (base64url);
tokens of the first format, ``<expiry>.<signature>``, are still accepted for their own
generation. The secret is ``FANLINE_WATCH_TOKEN_SECRET``, or derived from the API keys when
unset (so every pod with the same keys agrees). Comparisons are constant-time;
keys are never logged.

Statuses (the ``openai`` SDK's AuthenticationError and PermissionDeniedError): a missing
credential, or one that is neither an API key nor a valid watch token (wrong, expired,
tampered, signed with another secret), is 401 ``authentication_error``; a valid credential
that does not cover the request (a watch token for another generation, a watch token where
an API key is needed, another key's generation to cancel) is 403 ``permission_error``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from starlette.requests import HTTPConnection

from fanline.shared.errors import Forbidden, Unauthorized
from fanline.shared.settings import Settings

GEN_HEADER = "X-Fanline-Generation-Id"
WATCH_TOKEN_HEADER = "X-Fanline-Watch-Token"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Auth:
    def __init__(self, settings: Settings) -> None:
        self._keys = [k.encode() for k in settings.api_key_list]
        secret = settings.watch_token_secret.encode() or hashlib.sha256(b"\n".join(sorted(self._keys))).digest()
        self._secret = secret
        self._ttl_s = settings.watch_token_ttl_s

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    @staticmethod
    def owner_of(key: str) -> str:
        """A stable, non-reversible name for a key, stored with the generations it creates."""
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def _bearer(self, conn: HTTPConnection) -> str | None:
        header = conn.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None

    def _is_key(self, candidate: str) -> bool:
        raw = candidate.encode()
        found = False
        for key in self._keys:  # no early exit: the time taken does not say which key matched
            found |= hmac.compare_digest(raw, key)
        return found

    def require_key(self, conn: HTTPConnection) -> str:
        """The caller's owner name ("" with auth off); 401 without a valid API key, 403 for a watch token.

        A WebSocket may carry it as ``?token=`` (its cancel message); plain HTTP only as the bearer.
        """
        if not self.enabled:
            return ""
        bearer = self._bearer(conn)
        if bearer is None and conn.scope["type"] == "websocket":  # browsers cannot set a WebSocket's headers
            bearer = conn.query_params.get("token") or None
        if bearer is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not self._is_key(bearer):
            if self._token_generation(bearer) is not None:
                raise Forbidden(
                    "a watch token only reads its generation: this needs an API key", code="api_key_required"
                )
            raise Unauthorized("invalid API key", code="invalid_api_key")
        return self.owner_of(bearer)

    def require_read(self, conn: HTTPConnection, gen_id: str) -> None:
        """An API key, or this generation's watch token (bearer or ``?token=``)."""
        if not self.enabled:
            return
        candidates = [c for c in (self._bearer(conn), conn.query_params.get("token")) if c]
        if not candidates:
            raise Unauthorized(
                "missing credentials: an API key or this generation's watch token", code="missing_api_key"
            )
        for candidate in candidates:
            if self._is_key(candidate) or self.check_watch_token(candidate, gen_id):
                return
        if any(self._token_generation(candidate) is not None for candidate in candidates):
            raise Forbidden("this watch token is for another generation", code="forbidden")
        raise Unauthorized(
            "invalid credentials: neither an API key nor a valid watch token (expired or altered?)",
            code="invalid_credentials",
        )

    def creation_headers(self, gen_id: str) -> dict[str, str]:
        """The headers of a response that created a generation: its id, and its watch token when auth is on."""
        headers = {GEN_HEADER: gen_id}
        if self.enabled:
            headers[WATCH_TOKEN_HEADER] = self.watch_token(gen_id)
        return headers

    def watch_token(self, gen_id: str) -> str:
        expiry = int(time.time() + self._ttl_s)
        return f"{gen_id}.{expiry}.{self._sign(gen_id, expiry)}"

    def check_watch_token(self, token: str, gen_id: str) -> bool:
        """Whether ``token`` is a valid, unexpired watch token for ``gen_id`` (either format)."""
        parts = token.split(".")
        if len(parts) == 3 and not hmac.compare_digest(parts[0].encode(), gen_id.encode()):
            return False
        return len(parts) in (2, 3) and self._valid(gen_id, parts[-2], parts[-1])

    def _token_generation(self, token: str) -> str | None:
        """The generation a valid, unexpired watch token of the current format is for, else None."""
        parts = token.split(".")
        return parts[0] if len(parts) == 3 and self._valid(parts[0], parts[1], parts[2]) else None

    def _valid(self, gen_id: str, expiry_text: str, signature: str) -> bool:
        if not expiry_text.isdigit() or int(expiry_text) < time.time():
            return False
        return hmac.compare_digest(signature.encode(), self._sign(gen_id, int(expiry_text)).encode())

    def _sign(self, gen_id: str, expiry: int) -> str:
        return _b64(hmac.new(self._secret, f"{gen_id}|{expiry}".encode(), hashlib.sha256).digest())
