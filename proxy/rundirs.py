"""Runtime directories (``$TMPDIR/llm-proxy-*``, one per proxy, holding its workers' sockets): each live
proxy holds an flock on a ``proxy.lock`` inside its own; at start-up, the directories whose lock nobody
holds (their proxy was killed) are removed. A directory without the lock file (an older proxy) is
stale only when it has sockets and none of them answers."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path

log = logging.getLogger("proxy")

PREFIX = "llm-proxy-"
LOCK = "proxy.lock"


def hold(runtime_dir: Path) -> int:
    """Take this proxy's lock on its runtime dir; the lock lasts as long as the process (or the fd)."""
    fd = os.open(runtime_dir / LOCK, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _stale(directory: Path) -> bool:
    lock = directory / LOCK
    if lock.exists():
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # its proxy is alive
        finally:
            os.close(fd)
        return True
    sockets = list(directory.glob("*.sock"))
    return bool(sockets) and not any(_answers(s) for s in sockets)


def sweep(root: Path | None = None, keep: Path | None = None) -> list[Path]:
    """Remove the runtime dirs of proxies that are gone; returns them."""
    removed = []
    for directory in Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        if directory == keep or not directory.is_dir():
            continue
        with contextlib.suppress(OSError):
            if _stale(directory):
                shutil.rmtree(directory)
                removed.append(directory)
    if removed:
        log.info("removed %d runtime dir(s) left by proxies that were killed", len(removed))
    return removed
