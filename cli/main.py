"""``fanline`` entry point: parses the command line and hands over to the right part."""

from __future__ import annotations

import argparse
import os
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

    chat = sub.add_parser("chat", help="start a generation and print it as it streams (Ctrl-C cancels it)")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="demo")
    chat.add_argument("--max-tokens", type=int, default=None)

    watch = sub.add_parser("watch", help="watch (or resume) a generation")
    watch.add_argument("gen_id")
    watch.add_argument("--last-event-id", default=None)

    status = sub.add_parser("status", help="show a generation's status")
    status.add_argument("gen_id")

    for client in (chat, watch, status):
        client.add_argument("--url", default=os.environ.get("FANLINE_URL", DEFAULT_URL))
        client.add_argument(
            "--api-key", default=os.environ.get("FANLINE_API_KEY"), help="bearer key (default: $FANLINE_API_KEY)"
        )

    bench = sub.add_parser("bench", help="the load benchmark (see `fanline bench -h`)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from fanline.bench.run import main as bench_main

        result: int = bench_main(argv[1:])
        return result
    args = _parser().parse_args(argv)
    from fanline.shared.logs import configure as configure_logging
    from fanline.shared.settings import Settings

    settings = Settings()
    configure_logging(settings)
    if args.command == "up":
        from fanline.cli.up import up

        return up(settings, args.host, args.port, args.workers, args.data_dir)
    if args.command == "api":
        from fanline.api.server import run as run_api

        run_api(settings, args.host, args.port)
        return 0
    if args.command == "worker":
        from fanline.worker.main import run

        run(settings)
        return 0
    from fanline.cli import client

    if args.command == "chat":
        return client.chat(args.url, args.prompt, args.model, args.max_tokens, args.api_key)
    if args.command == "watch":
        return client.watch(args.url, args.gen_id, args.last_event_id, args.api_key)
    return client.status(args.url, args.gen_id, args.api_key)


if __name__ == "__main__":
    sys.exit(main())
