"""``fanline`` entry point: parses the command line and hands over to the right part."""

from __future__ import annotations

import argparse
import logging
import sys

DEFAULT_URL = "http://127.0.0.1:8000"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanline", description="Stream LLM output to many clients at once.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole platform on this machine (embedded Valkey, API, workers)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--data-dir", default=".fanline", help="where the embedded Valkey keeps its data")

    api = sub.add_parser("api", help="run one API pod (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)

    sub.add_parser("worker", help="run one worker process (arq)")

    chat = sub.add_parser("chat", help="start a generation and print it as it streams")
    chat.add_argument("prompt")
    chat.add_argument("--url", default=DEFAULT_URL)
    chat.add_argument("--model", default="demo")
    chat.add_argument("--max-tokens", type=int, default=None)

    watch = sub.add_parser("watch", help="watch (or resume) a generation")
    watch.add_argument("gen_id")
    watch.add_argument("--url", default=DEFAULT_URL)
    watch.add_argument("--last-event-id", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from shared.settings import Settings

    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "up":
        from cli.up import up

        return up(settings, args.host, args.port, args.workers, args.data_dir)
    if args.command == "api":
        from api.server import run as run_api

        run_api(settings, args.host, args.port)
        return 0
    if args.command == "worker":
        from worker.main import run

        run(settings)
        return 0
    from cli import client

    if args.command == "chat":
        return client.chat(args.url, args.prompt, args.model, args.max_tokens)
    return client.watch(args.url, args.gen_id, args.last_event_id)


if __name__ == "__main__":
    sys.exit(main())
