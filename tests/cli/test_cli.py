"""The ``fanline`` command as a user runs it: ``up`` with its embedded Valkey, ``chat``, ``watch``, and a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
from httpx_sse import connect_sse

from fanline.cli.valkey import free_port
from tests.support import Received, wait_http_ok

FANLINE = str(Path(sys.executable).with_name("fanline"))


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [FANLINE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, result.stderr
    return result


def start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/<pid>/stat), or None once it is gone (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live process below ``root``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        started = start_time(pid)
        if started is not None:
            found[pid] = started
        todo += children.get(pid, [])
    return found


def read_events(url: str, gen_id: str) -> Received:
    received = Received(gen_id=gen_id)
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        connect_sse(client, "GET", f"/v1/generations/{gen_id}/events") as source,
    ):
        for sse in source.iter_sse():
            received.ids.append(sse.id)
            if sse.data == "[DONE]":
                received.done = True
                break
            received.chunks.append(orjson.loads(sse.data))
    return received


def test_up_chat_watch_and_a_clean_stop(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANLINE_")}
    env["FANLINE_DEMO_TOKENS_PER_S"] = "200"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [FANLINE, "up", "--port", str(port), "--workers", "1"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_http_ok(url + "/readyz", up, timeout=60)
        assert (tmp_path / ".fanline" / "valkey").is_dir()

        chat = run_cli("chat", "hello", "--url", url, cwd=tmp_path, env=env)
        last_line = chat.stderr.strip().splitlines()[-1]
        assert last_line.startswith("generation ")
        gen_id = last_line.split()[1]
        info = httpx.get(f"{url}/v1/generations/{gen_id}", timeout=30).json()
        events = read_events(url, gen_id)
        assert events.done
        assert info["status"] == "completed"
        assert info["content"] != ""
        assert chat.stdout == info["content"] + "\n"

        watch = run_cli("watch", gen_id, "--url", url, cwd=tmp_path, env=env)
        assert watch.stdout == info["content"] + "\n"

        middle = len(events.chunks) // 2
        rest = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in events.chunks[middle + 1 :] if c["choices"]
        )
        assert rest and rest != info["content"]
        resumed = run_cli("watch", gen_id, "--url", url, "--last-event-id", events.ids[middle], cwd=tmp_path, env=env)
        assert resumed.stdout == rest + "\n"

        children = descendants(up.pid)
        assert len(children) >= 3  # Valkey, the API, one worker
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0, log.read_text()
        left = [pid for pid, started in children.items() if start_time(pid) == started]
        assert left == [], log.read_text()
        assert f"{url}/" in log.read_text()  # the demo page's address was printed
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
