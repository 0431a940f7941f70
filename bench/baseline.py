"""The naive baseline: what most tutorials show for streaming a Redis Stream over SSE.

Every viewer runs its own blocking ``XREAD`` loop; one Redis client (redis-py's
connection pool) serves the process, so each blocked viewer holds a connection of
its own. Each stream entry becomes one SSE frame, sent as its own response chunk
through FastAPI's ``StreamingResponse``. (Pooled rather than opened per request, so
the connections outlive the viewers and ``CLIENT LIST`` can count their commands;
that is also what the tutorials' module-level ``redis = Redis()`` does.) It serves only viewers (generations are
written by fanline's real worker) with the same wire format as fanline on
``GET /v1/generations/{id}/events``: ``id: <seq>-0`` / ``data: <chunk>`` frames,
``data: [DONE]`` last, ``Last-Event-ID`` to resume, a 404 for an unknown generation.
It runs under the same uvicorn (uvloop, httptools) as fanline, so the comparison is
about the fan-out design, not the server stack.

    python -m fanline.bench.baseline --port 8100 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fanline.shared import keys

_BLOCK_MS = 15_000  # heartbeat interval, as fanline's
_COUNT = 100


def create_app(redis_url: str) -> FastAPI:
    app = FastAPI(title="naive baseline")
    redis = aioredis.Redis.from_url(redis_url)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/generations/{gen_id}/events", response_model=None)
    async def events(gen_id: str, request: Request) -> StreamingResponse | JSONResponse:
        if not await redis.exists(keys.meta_key(gen_id)):
            error = {"message": f"no generation {gen_id}", "type": "invalid_request_error", "code": "not_found"}
            return JSONResponse({"error": error}, status_code=404)
        last_id = request.headers.get("last-event-id") or "0-0"
        stream = keys.events_key(gen_id)

        async def frames() -> AsyncIterator[bytes]:
            cursor = last_id
            yield b"retry: 1000\n"
            while True:
                # A blocking read takes a pooled connection for itself until it returns.
                response = await redis.xread({stream: cursor}, count=_COUNT, block=_BLOCK_MS)
                if not response:
                    yield b": ping\n"
                    continue
                for entry_id, fields in response[0][1]:
                    cursor = entry_id
                    if fields.get(b"k") == b"d":
                        yield b"id: " + entry_id + b"\ndata: [DONE]\n\n"
                        return
                    yield b"id: " + entry_id + b"\ndata: " + fields[b"d"] + b"\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fanline.bench.baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(args.redis_url), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
