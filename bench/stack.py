"""The processes under test, on free loopback ports, and their CPU and memory from /proc.

    stack = Stack(work_dir, paces=[0, 50], pods=2)
    stack.start(["fanline", "baseline"])   # Valkey, worker(s) per demo pace, API pods of each system
    stack.pods("fanline")[0].port
    stack.stop()           # everything it started, also on error (and the children die with us)

Each demo pace (tokens/s) has a worker of its own on a queue of its own, so the run
chooses a generation's event rate by the queue it enqueues the job on. The API pods
enqueue on the pace-0 queue (time to first token uses the no-delay demo).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fanline.cli.valkey import EmbeddedValkey, free_port, spawn_logged, stop_process

REPO = Path(__file__).resolve().parent.parent
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

# Redis client names (CLIENT SETNAME, from the URL) of each kind of process.
CLIENT_NAMES = {"fanline": "fanline-api", "baseline": "baseline"}
WORKER_CLIENT = "fanline-worker"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE_KIB


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid) if self.alive() else 0.0

    def rss_kib(self) -> int:
        return rss_kib(self.pid) if self.alive() else 0

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.popen, timeout)


@dataclass
class Stack:
    work_dir: Path
    paces: list[float]
    pods: int = 2
    max_jobs: int = 200
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    valkey: EmbeddedValkey | None = None
    workers_per_pace: int = 1
    workers: dict[float, list[Proc]] = field(default_factory=dict)
    systems: dict[str, list[Proc]] = field(default_factory=lambda: {"fanline": [], "baseline": []})
    extra: list[Proc] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        assert self.valkey is not None
        return self.valkey.url

    def queue_for(self, pace: float) -> str:
        return f"fanline:bench:{self.run_id}:pace{pace:g}"

    def pods_of(self, system: str) -> list[Proc]:
        return self.systems[system]

    def named_url(self, client_name: str) -> str:
        """The Redis URL with a client name: CLIENT LIST then tells whose commands are whose."""
        return f"{self.redis_url}?client_name={client_name}"

    def _env(self, pace: float, client_name: str) -> dict[str, str]:
        return {
            **os.environ,
            "FANLINE_REDIS_URL": self.named_url(client_name),
            "FANLINE_QUEUE_REDIS_URL": self.redis_url,
            "FANLINE_QUEUE_NAME": self.queue_for(pace),
            "FANLINE_DEMO_TOKENS_PER_S": f"{pace:g}",
            "FANLINE_WORKER_MAX_JOBS": str(self.max_jobs),
            "FANLINE_LOG_LEVEL": "warning",
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str], port: int = 0) -> Proc:
        popen = spawn_logged([sys.executable, *args], env, self.work_dir / "logs" / f"{name}.log", REPO)
        return Proc(name, popen, port)

    # -- starting ----------------------------------------------------------

    def start(self, systems: list[str]) -> None:
        # Baseline viewers hold a Valkey connection each: raise maxclients to what the fd cap allows.
        self.valkey = EmbeddedValkey(self.work_dir / "valkey", persistent=False, extra_args=["--maxclients", "19500"])
        self.valkey.start()
        for pace in self.paces:
            self.workers[pace] = [
                self._spawn(f"worker-pace{pace:g}-{i}", ["-m", "fanline.cli", "worker"], self._env(pace, WORKER_CLIENT))
                for i in range(self.workers_per_pace)
            ]
        pending: list[Proc] = []
        for system in systems:
            for _ in range(self.pods):
                pending.append(self.start_pod(system, wait=False))
        for proc in pending:
            wait_healthy(proc)
        self._wait_workers()

    def start_pod(self, system: str, *, wait: bool = True, extra: bool = False) -> Proc:
        """An API pod of ``system``; ``extra`` pods (the idle scenario's fresh ones) are not in ``pods_of``."""
        port = free_port()
        n = len(self.systems[system]) + len(self.extra)
        if system == "fanline":
            args = ["-m", "fanline.cli", "api", "--port", str(port)]
        else:
            args = [
                "-m",
                "fanline.bench.baseline",
                "--port",
                str(port),
                "--redis-url",
                self.named_url(CLIENT_NAMES[system]),
            ]
        proc = self._spawn(f"{system}-pod{n}", args, self._env(0, CLIENT_NAMES[system]), port)
        (self.extra if extra else self.systems[system]).append(proc)
        if wait:
            wait_healthy(proc)
        return proc

    def _wait_workers(self, timeout: float = 30.0) -> None:
        """Until every worker runs its main loop (arq's health key) and listens for wake-ups."""
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for proc in self.worker_processes():
                    if not proc.alive():
                        raise RuntimeError(f"{proc.name} exited; see {self.work_dir / 'logs'}")
                healthy = all(client.exists(self.queue_for(p) + ":health-check") for p in self.workers)
                _, listeners = client.execute_command("PUBSUB", "NUMSUB", "fanline:wake")  # type: ignore[no-untyped-call]
                if healthy and listeners >= len(self.worker_processes()):
                    return
                time.sleep(0.05)
        finally:
            client.close()
        raise TimeoutError(f"workers not ready within {timeout} s; see {self.work_dir / 'logs'}")

    # -- stopping ----------------------------------------------------------

    def stop(self) -> None:
        procs = [*self.extra, *self.systems["fanline"], *self.systems["baseline"], *self.worker_processes()]
        for proc in procs:  # SIGTERM to all first: they drain in parallel
            if proc.alive():
                proc.popen.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.stop()
        if self.valkey is not None:
            self.valkey.stop()

    def worker_processes(self) -> list[Proc]:
        return [proc for procs in self.workers.values() for proc in procs]


def wait_healthy(proc: Proc, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", proc.port), timeout=1.0) as conn:
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                if conn.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{proc.name} did not answer /healthz within {timeout} s")
