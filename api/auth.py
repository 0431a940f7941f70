"""Access control: bearer API keys, and per-generation watch tokens.

With ``FANLINE_API_KEYS`` empty, auth is off (development): the 128-bit random
generation id is the capability to watch. With keys set:

- every endpoint but /healthz, /readyz and the static page needs
  ``Authorization: Bearer <api key>``;
- a generation's *watch token* grants read access to that one generation (its
  events over SSE/NDJSON/WS, and its status): as the bearer, or as ``?token=``
  for EventSource and WebSocket clients, which cannot set headers;
- only the key that created a generation can cancel it.

A watch token is ``<expiry>.<HMAC-SHA256(secret, gen_id|expiry)>`` (base64url).
The secret is ``FANLINE_WATCH_TOKEN_SECRET``, or derived from the API keys when
unset (so every pod with the same keys agrees). Comparisons are constant-time;
keys are never logged.
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
        """The caller's owner name ("" with auth off); 401 without a valid API key."""
        if not self.enabled:
            return ""
        bearer = self._bearer(conn)
        if bearer is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if not self._is_key(bearer):
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
        raise Forbidden("this key or watch token does not grant access to this generation", code="forbidden")

    def creation_headers(self, gen_id: str) -> dict[str, str]:
        """The headers of a response that created a generation: its id, and its watch token when auth is on."""
        headers = {GEN_HEADER: gen_id}
        if self.enabled:
            headers[WATCH_TOKEN_HEADER] = self.watch_token(gen_id)
        return headers

    def watch_token(self, gen_id: str) -> str:
        expiry = int(time.time() + self._ttl_s)
        return f"{expiry}.{self._sign(gen_id, expiry)}"

    def check_watch_token(self, token: str, gen_id: str) -> bool:
        expiry_text, _, signature = token.partition(".")
        if not expiry_text.isdigit() or int(expiry_text) < time.time():
            return False
        return hmac.compare_digest(signature.encode(), self._sign(gen_id, int(expiry_text)).encode())

    def _sign(self, gen_id: str, expiry: int) -> str:
        return _b64(hmac.new(self._secret, f"{gen_id}|{expiry}".encode(), hashlib.sha256).digest())
