"""``fanline up``: the whole platform on one machine.

Starts (or uses, when ``FANLINE_REDIS_URL`` is set) Redis, one API process and N
workers; Ctrl-C or SIGTERM stops everything it started. Children also get SIGTERM
if this process dies (Linux), so nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fanline.cli.valkey import EmbeddedValkey, die_with_parent
from fanline.shared.settings import Settings

STOP_TIMEOUT_S = 15.0


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C reaches only this supervisor, which stops the children in order.
    return subprocess.Popen(
        [sys.executable, "-m", "fanline.cli", *args],
        env=env,
        start_new_session=True,
        preexec_fn=die_with_parent,
        stdin=subprocess.DEVNULL,
    )


def _wait_ready(url: str, children: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(c.poll() is not None for c in children):
            return False
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def up(settings: Settings, host: str, port: int, workers: int, data_dir: str) -> int:
    env = dict(os.environ)
    valkey: EmbeddedValkey | None = None
    if "FANLINE_REDIS_URL" not in os.environ:
        valkey = EmbeddedValkey(Path(data_dir) / "valkey")
        print(f"fanline: starting embedded Valkey (data in {valkey.data_dir})", file=sys.stderr)
        valkey.start()
        env["FANLINE_REDIS_URL"] = valkey.url
    redis_url = env["FANLINE_REDIS_URL"]

    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    children: list[subprocess.Popen[bytes]] = []
    code = 0
    try:
        children.append(_spawn(["api", "--host", host, "--port", str(port)], env))
        children += [_spawn(["worker"], env) for _ in range(workers)]
        base = f"http://{host}:{port}"
        if not _wait_ready(base, children):
            print("fanline: the API did not become ready; stopping", file=sys.stderr)
            return 1
        print(
            f"\nfanline is up: {base}/  (Redis {redis_url.rsplit('@', 1)[-1]}, {workers} worker(s))\n"
            f'  try:  fanline chat "tell me a story" --url {base}\n'
            "  Ctrl-C stops everything.\n",
            file=sys.stderr,
            flush=True,
        )
        while not stopping:
            if any(c.poll() is not None for c in children):
                print("fanline: a process exited unexpectedly; stopping the rest", file=sys.stderr)
                code = 1
                break
            time.sleep(0.2)
    finally:
        _stop_all(children)
        if valkey is not None:
            valkey.stop()
        print("fanline: stopped", file=sys.stderr)
    return code


def _stop_all(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"fanline: pid {child.pid} did not stop in {STOP_TIMEOUT_S:.0f} s; killing it", file=sys.stderr)
            child.kill()
            child.wait()
