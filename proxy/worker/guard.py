"""Tie a process's life to its parent's: the worker dies if the proxy dies, even by SIGKILL.

``python -m proxy.worker.guard PARENT_PID -- cmd args...`` sets the death signal and then execs
``cmd``, so an external server (llama-server, vLLM, ...) is tied to the proxy the same way.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when our parent exits; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m proxy.worker.guard PARENT_PID -- cmd [args...]\n")
        raise SystemExit(2)
    die_with_parent(int(argv[0]))
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
