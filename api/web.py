"""The browser side: the demo page at ``/`` and the JS client (filled in by the web-page issue)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
