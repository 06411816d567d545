"""A real redis-server for the cluster's tests: its own port and directory, no persistence, killed after.

Debian's ``redis-server`` (scripts/setup.sh installs it); never the system service."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.harness import free_port, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``start()``, ``stop()`` (SIGKILL: its data goes with it, as with a crash) and ``start()`` again on the
    same port; ``url`` for clients."""

    def __init__(self, root: Path, also: tuple[str, ...] = ()) -> None:
        self.root = root
        self.also = also  # more addresses it listens on, besides 127.0.0.1
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.also,
                # on an address of its own beside loopback (a test's veth), taking clients there too
                *(["--protected-mode", "no"] if self.also else []),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.root),
                "--daemonize",
                "no",
                "--logfile",
                str(self.root / "redis.log"),
            ],
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: _answers(self.port), timeout=10)
        return self

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung Redis, or a cut link)."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
        wait_until(lambda: not _answers(self.port), timeout=10)
