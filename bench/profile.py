"""Optional sampling profile (py-spy) of an API pod during a measured phase.

with Profiler(pid, out_path):   # py-spy record --format raw: Python frames, without pausing the process
    ... the phase ...
with Profiler(pid, out_path, native=True):   # C frames too (syscalls, the GC, asyncio's C parts);
    ...                                      # py-spy must pause the process for each sample
summarise(out_path)             # where the samples were: top functions, self and inclusive
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

from fanline.cli.valkey import die_with_parent


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    def __init__(self, pid: int, out: Path, *, native: bool = False) -> None:
        self.pid = pid
        self.out = out
        self.native = native
        self.rate = 100 if native else 250
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        binary = py_spy()
        if binary is None:
            return self
        self.out.parent.mkdir(parents=True, exist_ok=True)
        args = [binary, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--format", "raw"]
        args += ["--native"] if self.native else ["--nonblocking"]
        args += ["--output", str(self.out)]
        self.process = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=open(self.out.with_suffix(".log"), "wb"),
            preexec_fn=die_with_parent,
        )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def summarise(path: Path, top: int = 15) -> dict[str, Any]:
    """Self time by innermost frame and inclusive time by function, as shares of all samples."""
    if not path.exists():
        return {"error": f"no profile at {path} (is py-spy installed and allowed to attach?)"}
    own: Counter[str] = Counter()
    own_python: Counter[str] = Counter()  # the innermost Python frame (differs from ``own`` in native profiles)
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += count
        python = [f for f in frames if ".py)" in f]
        own_python[python[-1] if python else frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return {"samples": 0}

    def share(n: int) -> float:
        return round(100 * n / total, 1)

    return {
        "samples": total,
        "self_pct": [(name, share(n)) for name, n in own.most_common(top)],
        "python_self_pct": [(name, share(n)) for name, n in own_python.most_common(top)],
        "inclusive_pct": [(name, share(n)) for name, n in inclusive.most_common(top * 2)],
    }


def _short(frame: str) -> str:
    """``func (path/to/module.py:123)`` → ``func (module.py)``; line numbers would split one function."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0]
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    return f"{name} ({short})"
