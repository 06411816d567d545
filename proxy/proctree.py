"""A process and its descendants, cheaply: Linux's ``/proc/<pid>/task/<tid>/children`` lists.

psutil's ``Process.children(recursive=True)`` reads the status of every process on the machine to find the
few below one pid: milliseconds of the proxy's CPU on a busy host, and the proxy asks at every release of a
lease (``ModelManager._measure``) and at every stall check (``proxy.watchdog``). The kernel's children lists
cost a read per thread of the tree instead. Where they are missing (a kernel built without
``CONFIG_PROC_CHILDREN``, not Linux), psutil's walk it is. A child forked while the list is read may be
missed by one read; the callers (memory peaks, CPU progress) read again soon.
"""

from __future__ import annotations

import os
from typing import Any

_PROC = "/proc"


def _children(pid: int) -> list[int] | None:
    """The pids whose parent is ``pid`` (every thread's list); None when the kernel keeps no such lists."""
    try:
        tids = os.listdir(f"{_PROC}/{pid}/task")
    except OSError:
        return []  # gone
    found: list[int] = []
    for tid in tids:
        try:
            with open(f"{_PROC}/{pid}/task/{tid}/children", "rb") as f:
                found.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"{_PROC}/{pid}/task/{tid}"):
                continue  # that thread ended while we read
            return None
        except OSError:
            continue
    return found


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (children first found first). psutil.NoSuchProcess when ``pid`` is gone."""
    import psutil

    if not os.path.exists(f"{_PROC}/{pid}/task"):
        return [p.pid for p in (psutil.Process(pid), *psutil.Process(pid).children(recursive=True))]
    pids = [pid]
    i = 0
    while i < len(pids):
        below = _children(pids[i])
        if below is None:  # no children lists here: psutil's walk of every process
            proc = psutil.Process(pid)
            return [pid, *(p.pid for p in proc.children(recursive=True))]
        pids.extend(p for p in below if p not in pids)
        i += 1
    return pids


def processes(pid: int) -> list[Any]:
    """``tree(pid)`` as psutil processes (those still there)."""
    import psutil

    procs: list[Any] = [psutil.Process(pid)]  # NoSuchProcess for a pid that is gone, as psutil's walk
    for child in tree(pid)[1:]:
        try:
            procs.append(psutil.Process(child))
        except psutil.Error:
            continue  # ended since
    return procs


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of ``pid`` and its descendants so far (psutil.NoSuchProcess when it is gone)."""
    total = 0.0
    for i, p in enumerate(tree(pid)):
        try:
            with open(f"{_PROC}/{p}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            if i == 0:
                import psutil

                raise psutil.NoSuchProcess(pid) from None
            continue  # a child that ended since
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (the 14th and 15th fields)
    return total
