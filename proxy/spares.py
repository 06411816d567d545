"""Warm spare workers: one per backend (and interpreter, and environment), started and imported ahead of need.

A model's load spends a large part of its time before its weights: the interpreter's start and the backend's
imports (llama_cpp, torch, ...) and the worker's HTTP stack. None of that needs the model's memory, so a
switch (unload A, load B) can have it done already: a spare is ``python -m proxy.worker --spare ENTRY``,
which imports, says ``{"event": "spare"}`` and waits for one line on stdin with its socket and spec; from
there it is an ordinary worker (``proxy.worker.__main__``). ``supervisor.Worker.start`` takes the spare
of its key when there is one, and asks for a new one once its own load is ready (not before: on a small box
the two would contend for the CPU).

Spares live like workers: their own process group, ``PR_SET_PDEATHSIG`` to the proxy (``--parent-pid``), so
a proxy killed by SIGKILL leaves none; ``close`` at shutdown, ``kill_sync`` at interpreter exit. Their memory
is the manager's to count (``waiting``: pid and key; the manager reads their RSS and VRAM with its probe and
kills them first when a model needs the room: ``dismiss_except``). ``limits.warm_spare: false`` makes none.

At start-up (``prestart``), the manager asks for one spare per key of its catalog, so that even the first load
of a backend pays for its weights only: started one at a time, in the catalog's order, each once the one
before has done its imports (on a small box two would contend for the CPU), and each only while the manager's
``room`` says the memory allows one more (it stops the round there).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from proxy.admission import Occupant
from proxy.config import ModelConfig
from proxy.memory import MemoryProbe, Need
from proxy.wire import output_lines

log = logging.getLogger("proxy.spares")

# a spare at start-up only while the RAM free for models (as admission counts it) stays at least this much
# beside it: spares must not leave a small box without room for a first load
HEADROOM = 512 * 2**20


@dataclass(frozen=True)
class SpareKey:
    """What a spare must share with the worker it becomes: interpreter, backend entry point, environment."""

    python: str
    entry: str
    env: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, config: ModelConfig) -> SpareKey | None:
        """The key of a model's worker (its placed config: CUDA_VISIBLE_DEVICES included); None for an
        external server, which has no spare."""
        if config.facts.entry is None or config.url is not None:
            return None
        return cls(config.python or sys.executable, config.facts.entry, tuple(sorted(config.env.items())))

    def describe(self) -> str:
        return self.entry.rpartition(".")[2].partition(":")[0]


@dataclass(eq=False)
class Spare:
    key: SpareKey
    process: asyncio.subprocess.Process
    ready: bool = False  # its imports are done (it said so)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    settled: asyncio.Event = field(default_factory=asyncio.Event)  # ready, taken or gone

    @property
    def pid(self) -> int:
        return self.process.pid


class Spares:
    """At most one spare per key. All calls from the event loop."""

    def __init__(self) -> None:
        self._spares: dict[SpareKey, Spare] = {}
        self._starting: set[SpareKey] = set()
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._prestart: asyncio.Task[None] | None = None

    # -- what the manager reads ---------------------------------------------------------------------
    def waiting(self) -> list[Spare]:
        return list(self._spares.values())

    def status(self) -> list[dict[str, object]]:
        return [
            {"backend": s.key.describe(), "pid": s.pid, "state": "waiting" if s.ready else "importing"}
            for s in self._spares.values()
        ]

    # -- their memory, as admission counts it: like a model's need, and the first to go when room is wanted --
    def is_for(self, config: ModelConfig, key: SpareKey) -> bool:
        """Would this model's worker be this spare? (Its interpreter and backend; its GPU is not known yet.)"""
        mine = SpareKey.of(config)
        return mine is not None and (mine.python, mine.entry) == (key.python, key.entry)

    def occupants(self, config: ModelConfig | None, probe: MemoryProbe) -> tuple[list[Occupant], int]:
        """The other backends' spares as occupants (their RSS and VRAM now, from ``probe``), and the RSS of
        this model's own spare: that memory is already taken on the box but becomes its worker, so it is not
        missing. ``config`` None: every spare is an occupant."""
        out, mine = [], 0
        for spare in self.waiting():
            ram = probe.rss(spare.pid) or 0
            if config is not None and self.is_for(config, spare.key):
                mine += ram
                continue
            held: list[tuple[int | None, int]] = [*sorted(probe.vram(spare.pid).items())] or [(None, 0)]
            for gpu, vram in held:
                out.append(Occupant(f"(spare {spare.key.describe()})", "spare", Need(ram, vram, "measured"), gpu))
                ram = 0  # a spare's RAM counted once, with its first GPU
        return out, mine

    def dismiss_others(self, config: ModelConfig) -> bool:
        """Stop the spares that are not this model's (their memory is wanted); True when there were any."""
        keep = next((s.key for s in self.waiting() if self.is_for(config, s.key)), None)
        return bool(self.dismiss_except(keep))

    # -- take, replenish ------------------------------------------------------------------------------
    async def take(self, key: SpareKey) -> Spare | None:
        """The spare of this key, now the caller's (its pipes free for the caller's readers); None if none."""
        spare = self._spares.pop(key, None)
        if spare is None or spare.process.returncode is not None:
            return None
        for task in spare.readers:
            task.cancel()
        await asyncio.gather(*spare.readers, return_exceptions=True)
        spare.readers = []
        log.info("warm spare %s (pid %s) taken", key.describe(), spare.pid)
        return spare

    def prestart(self, wanted: Sequence[tuple[SpareKey, Mapping[str, str]]], room: Callable[[SpareKey], bool]) -> None:
        """In the background: a spare for each key of ``wanted`` in turn, each once the one before has done
        its imports (or is gone), while ``room(key)`` says the memory allows it (the first no ends the round)."""
        if self._closed or not wanted:
            return
        self._prestart = asyncio.get_running_loop().create_task(self._start_each(list(wanted), room))

    async def _start_each(
        self, wanted: list[tuple[SpareKey, Mapping[str, str]]], room: Callable[[SpareKey], bool]
    ) -> None:
        for index, (key, env) in enumerate(wanted):
            if self._closed:
                return
            if key in self._spares or key in self._starting:
                continue
            if not room(key):
                rest = ", ".join(k.describe() for k, _ in wanted[index:])
                log.info("no warm spare at start-up for %s: the memory is short", rest)
                return
            self._starting.add(key)
            await self._spawn(key, env)
            spare = self._spares.get(key)
            if spare is not None:
                await spare.settled.wait()

    def replenish(self, key: SpareKey, env: Mapping[str, str]) -> None:
        """Start a spare of this key in the background, unless one is there or on its way."""
        if self._closed or key in self._spares or key in self._starting:
            return
        self._starting.add(key)
        task = asyncio.get_running_loop().create_task(self._spawn(key, env))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, key: SpareKey, env: Mapping[str, str]) -> None:
        argv = [key.python, "-m", "proxy.worker", "--spare", key.entry, "--parent-pid", str(os.getpid())]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=dict(env),
            )
        except OSError as exc:
            log.warning("cannot start a warm spare for %s: %s", key.describe(), exc)
            return
        finally:
            self._starting.discard(key)
        spare = Spare(key, process)
        if self._closed:
            await _end(spare)
            return
        self._spares[key] = spare
        spare.readers = [
            asyncio.create_task(self._read(spare, process.stdout)),
            asyncio.create_task(self._read(spare, process.stderr)),
        ]
        log.debug("warm spare %s starting (pid %s)", key.describe(), process.pid)

    async def _read(self, spare: Spare, stream: asyncio.StreamReader | None) -> None:
        """Its output until it is taken (import warnings, its "spare" line); at EOF, it is gone."""
        if stream is None:
            return
        try:
            async for text in output_lines(stream):
                if text.startswith('{"event": "spare"'):
                    spare.ready = True
                    spare.settled.set()
                    log.info("warm spare %s ready (pid %s)", spare.key.describe(), spare.pid)
                else:
                    log.debug("[spare %s] %s", spare.key.describe(), text)
        finally:
            spare.settled.set()  # at its end, or taken (its readers cancelled)
        if self._spares.get(spare.key) is spare:  # it exited before it was taken
            del self._spares[spare.key]
            code = await spare.process.wait()
            if not self._closed:
                log.warning("warm spare %s (pid %s) exited with code %s", spare.key.describe(), spare.pid, code)

    # -- give back ------------------------------------------------------------------------------------
    def dismiss_except(self, keep: SpareKey | None) -> list[int]:
        """SIGKILL every spare but ``keep``'s (a model needs their memory); their pids. Reaped in the background."""
        gone = [s for k, s in self._spares.items() if k != keep]
        for spare in gone:
            del self._spares[spare.key]
            _signal(spare, signal.SIGKILL)
            task = asyncio.get_running_loop().create_task(_end(spare))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            log.info("warm spare %s (pid %s) stopped: its memory is wanted", spare.key.describe(), spare.pid)
        return [s.pid for s in gone]

    async def close(self) -> None:
        self._closed = True
        if self._prestart is not None:
            self._prestart.cancel()
            await asyncio.gather(self._prestart, return_exceptions=True)
        spares, self._spares = list(self._spares.values()), {}
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(_end(s) for s in spares), return_exceptions=True)

    def kill_sync(self) -> None:
        for spare in self._spares.values():
            _signal(spare, signal.SIGKILL)


def _signal(spare: Spare, sig: int) -> None:
    if spare.process.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(spare.pid, sig)


async def _end(spare: Spare) -> None:
    """Dismiss it (stdin closed: it exits) and reap it; SIGKILL when it does not go."""
    if spare.process.stdin is not None:
        spare.process.stdin.close()
    _signal(spare, signal.SIGTERM)
    try:
        await asyncio.wait_for(spare.process.wait(), timeout=2)
    except TimeoutError:
        _signal(spare, signal.SIGKILL)
        await spare.process.wait()
    for task in spare.readers:
        task.cancel()
    await asyncio.gather(*spare.readers, return_exceptions=True)


def handoff_line(socket_path: str, spec: Mapping[str, object]) -> bytes:
    """What a spare reads on stdin to become a worker."""
    return (json.dumps({"socket": socket_path, "spec": dict(spec)}) + "\n").encode()
