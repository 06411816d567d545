"""Tie a process's life to its parent's: the worker dies if the proxy dies, even by SIGKILL.

An internal worker calls ``die_with_parent`` (the kernel SIGKILLs it when the proxy goes).

An external server (llama-server, vLLM, a shell script, ...) runs under
``python -m proxy.worker.guard PARENT_PID -- cmd args...``. The kernel's parent-death signal is
cleared in forked children, so a ``cmd`` such as ``bash -c "helper & exec server"`` would leave
``helper`` behind if the guard only set it and exec'd (issue 11, item 12). So the guard stays: it
becomes a child subreaper (orphans below it are re-parented to it, not to init), starts ``cmd`` in
its own process group (the proxy started the guard with a new session), and

- when the proxy dies (its parent-death signal, SIGUSR1 here), SIGKILLs every process below it and
  its whole process group, then exits;
- when ``cmd`` exits (SIGTERM to the group from the proxy, or on its own), kills what ``cmd`` left
  behind and exits with ``cmd``'s status.

The proxy's SIGTERM to the group reaches ``cmd`` directly; the guard itself ignores it and waits.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")


def _prctl(option: int, value: int) -> None:
    if _LINUX:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(option, value, 0, 0, 0)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` when our parent exits; exit now if it already has."""
    _prctl(_PR_SET_PDEATHSIG, sig)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc's children lists), nearest first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def kill_all_below() -> None:
    """SIGKILL every process below this one and every other member of its process group."""
    me = os.getpid()
    for pid in descendants(me):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)  # this process too: it is on its way out
    except ProcessLookupError:
        pass


def _reap_all() -> None:
    """Collect every exited child (orphans re-parented to us included) without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def guard(parent_pid: int, cmd: list[str]) -> int:
    """Run ``cmd`` under the guard; its exit status (128 + signal when it was killed by one)."""

    def parent_gone(signum: int, frame: FrameType | None) -> None:
        kill_all_below()
        os._exit(1)

    signal.signal(signal.SIGUSR1, parent_gone)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's SIGTERM is for cmd; we wait for it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    die_with_parent(parent_pid, signal.SIGUSR1)

    def child_setup() -> None:  # cmd dies at once if the guard is SIGKILLed
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    try:
        child = subprocess.Popen(cmd, preexec_fn=child_setup)
    except OSError as exc:
        sys.stderr.write(f"cannot start {cmd[0]}: {exc}\n")
        return 127
    returncode = child.wait()
    _reap_all()
    for pid in descendants(os.getpid()):  # what cmd left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap_all()
    return _status(returncode)


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m proxy.worker.guard PARENT_PID -- cmd [args...]\n")
        raise SystemExit(2)
    raise SystemExit(guard(int(argv[0]), argv[2:]))


if __name__ == "__main__":
    main(sys.argv[1:])
