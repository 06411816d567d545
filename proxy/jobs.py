"""Async jobs (RunPod's serverless queue): accepted into SQLite before they are answered, run in turn per
model, kept after they finish for ``jobs.ttl``.

A job is never lost once accepted: it is written (stdlib ``sqlite3``, WAL, one connection used from one
thread at a time: every call runs in a worker thread, never on the event loop) before ``submit`` returns;
a restart puts the jobs that were waiting or running back in the queue, in their order. A model runs at
most ``parallel`` jobs at once (the rest are ``IN_QUEUE``); each job runs through ``execute``, which the
HTTP edge supplies (``proxy.api.jobs``: the model's usual route, called in-process, so a job takes the
same lease, queue and lifecycle as any request). Jobs belong to their owner (a hash of the key that made
them): anyone else gets ``NotFound``. No HTTP here.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import anyio.to_thread

from proxy.clock import Clock
from proxy.errors import Conflict, NotFound, QueueFull

log = logging.getLogger("proxy.jobs")

P = ParamSpec("P")
T = TypeVar("T")


class Status(enum.StrEnum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


FINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


@dataclass(frozen=True)
class Job:
    id: str
    model: str
    owner: str
    role: int  # the owner's role (proxy.auth.Role), for the call the job makes
    input: dict[str, Any]
    status: Status
    created: float  # wall clock, seconds
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: str | None = None

    def view(self) -> dict[str, Any]:
        """RunPod's job object: id, status, delayTime and executionTime (ms), output or error."""
        out: dict[str, Any] = {"id": self.id, "status": self.status.value}
        if self.started is not None:
            out["delayTime"] = round((self.started - self.created) * 1000)
            if self.finished is not None:
                out["executionTime"] = round((self.finished - self.started) * 1000)
        if self.status is Status.COMPLETED:
            out["output"] = self.output
        if self.error is not None:
            out["error"] = self.error
        return out


@dataclass(frozen=True)
class Outcome:
    """What a job's run gave: COMPLETED with its output, or FAILED with an error."""

    status: Status
    output: Any = None
    error: str | None = None


# (job, cancelled) -> its outcome; ``cancelled`` is set when the job is cancelled while it runs
Execute = Callable[[Job, asyncio.Event], Awaitable[Outcome]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    role INTEGER NOT NULL,
    input TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    output TEXT,
    error TEXT,
    retries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, finished);
"""
_COLUMNS = "id, model, owner, role, input, status, created, started, finished, output, error"


def _job(row: tuple[Any, ...]) -> Job:
    jid, model, owner, role, inp, status, created, started, finished, output, error = row
    return Job(
        id=jid,
        model=model,
        owner=owner,
        role=role,
        input=json.loads(inp),
        status=Status(status),
        created=created,
        started=started,
        finished=finished,
        output=json.loads(output) if output is not None else None,
        error=error,
    )


class JobStore:
    """The jobs table. Blocking: call from a thread (``Jobs`` does). ``None``: an in-memory database."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path) if path else ":memory:", check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            if path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # accepted means on disk
            self._db.executescript(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "retries" not in columns:  # a database from before /retry
                self._db.execute("ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL)",
                (job.id, job.model, job.owner, job.role, json.dumps(job.input), job.status.value, job.created),
            )

    def get(self, jid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (jid,)).fetchone()
        return _job(row) if row else None

    def started(self, jid: str, when: float) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, started = ? WHERE id = ? AND status = ?",
                (Status.IN_PROGRESS, when, jid, Status.IN_QUEUE),
            )

    def finish(self, jid: str, outcome: Outcome, when: float) -> None:
        output = json.dumps(outcome.output) if outcome.output is not None else None
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, finished = ?, output = ?, error = ? WHERE id = ? AND finished IS NULL",
                (outcome.status.value, when, output, outcome.error, jid),
            )

    def requeue(self, jid: str) -> bool:
        """A failed job back in the queue, as it was submitted (its output, error and times cleared)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, started = NULL, finished = NULL, output = NULL, error = NULL, "
                "retries = retries + 1 WHERE id = ? AND status = ?",
                (Status.IN_QUEUE, jid, Status.FAILED),
            )
        return cur.rowcount == 1

    def unfinished(self) -> list[Job]:
        """Jobs that were waiting or running when the proxy stopped, back in the queue, in their order."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, started = NULL WHERE status = ?", (Status.IN_QUEUE, Status.IN_PROGRESS)
            )
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE status = ? ORDER BY seq", (Status.IN_QUEUE,)
            ).fetchall()
        return [_job(r) for r in rows]

    def purge(self, before: float) -> int:
        """Delete jobs that finished before ``before``."""
        with self._lock:
            cur = self._db.execute("DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (before,))
        return cur.rowcount

    def finished_counts(self, model: str) -> dict[str, int]:
        """Finished jobs of a model by status, and ``retried``: its jobs (kept, in any state) that were retried."""
        with self._lock:
            rows = self._db.execute(
                "SELECT status, COUNT(*) FROM jobs WHERE model = ? AND finished IS NOT NULL GROUP BY status", (model,)
            ).fetchall()
            (retried,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE model = ? AND retries > 0", (model,)
            ).fetchone()
        return {**{status: n for status, n in rows}, "retried": retried}


class Jobs:
    """The queue: accepts, runs (``parallel`` at a time per model), cancels and reports jobs."""

    def __init__(
        self,
        store: JobStore,
        execute: Execute,
        clock: Clock,
        *,
        parallel_of: Callable[[str], int],
        max_queued: int,
        ttl: float,
    ) -> None:
        self._store = store
        self._execute = execute
        self._clock = clock
        self._parallel_of = parallel_of
        self._max_queued = max_queued
        self._ttl = ttl
        self._queues: dict[str, collections.deque[Job]] = collections.defaultdict(collections.deque)
        self._running: dict[str, dict[str, asyncio.Event]] = collections.defaultdict(dict)  # model -> id -> cancel
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, asyncio.Event] = {}  # id -> set when the job is final (for runsync)
        self._closing = False

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    # -- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Purge expired jobs, put unfinished ones back in the queue and start them."""
        await self._db(self._store.purge, self._clock.time() - self._ttl)
        jobs = await self._db(self._store.unfinished)
        if jobs:
            log.info("jobs: %d unfinished jobs back in the queue", len(jobs))
        for job in jobs:
            self._queues[job.model].append(job)
        for model in list(self._queues):
            self._kick(model)

    async def close(self) -> None:
        """Stop running jobs without recording an outcome: the next start runs them again."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._db(self._store.close)

    # -- the queue ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return sum(len(q) for q in self._queues.values()) + sum(len(r) for r in self._running.values())

    def _check_room(self) -> None:
        """503 with Retry-After past ``jobs.max_queued`` jobs waiting or running."""
        if self.pending >= self._max_queued:
            raise QueueFull(f"{self.pending} jobs are already waiting or running; try again later", retry_after=5)

    def counts(self, model: str) -> tuple[int, int]:
        """(waiting, running) jobs for a model."""
        return len(self._queues.get(model, ())), len(self._running.get(model, {}))

    async def finished_counts(self, model: str) -> dict[str, int]:
        return await self._db(self._store.finished_counts, model)

    async def submit(self, model: str, owner: str, role: int, job_input: dict[str, Any]) -> Job:
        """Accept a job (on disk before this returns); 503 past ``jobs.max_queued``."""
        self._check_room()
        job = Job(
            id=str(uuid.uuid4()),
            model=model,
            owner=owner,
            role=role,
            input=job_input,
            status=Status.IN_QUEUE,
            created=self._clock.time(),
        )
        await self._db(self._store.add, job)
        self._queues[model].append(job)
        self._kick(model)
        return job

    def _kick(self, model: str) -> None:
        if self._closing:
            return
        queue, running = self._queues[model], self._running[model]
        while queue and len(running) < max(1, self._parallel_of(model)):
            job = queue.popleft()
            running[job.id] = asyncio.Event()
            task = asyncio.create_task(self._run(job, running[job.id]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, job: Job, cancelled: asyncio.Event) -> None:
        try:
            await self._db(self._store.started, job.id, self._clock.time())
            if cancelled.is_set():
                return
            try:
                outcome = await self._execute(job, cancelled)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the job fails; the queue goes on
                log.exception("job %s (%s) failed", job.id, job.model)
                outcome = Outcome(Status.FAILED, error=f"{type(exc).__name__}: {exc}")
            if cancelled.is_set():
                return  # cancel recorded it
            await self._db(self._store.finish, job.id, outcome, self._clock.time())
            self._final(job.id)
            await self._db(self._store.purge, self._clock.time() - self._ttl)
        finally:
            self._running[job.model].pop(job.id, None)
            self._kick(job.model)

    def _final(self, jid: str) -> None:
        event = self._done.pop(jid, None)
        if event is not None:
            event.set()

    # -- a client's view ---------------------------------------------------------------------
    async def get(self, jid: str, owner: str, model: str | None = None) -> Job:
        job = await self._db(self._store.get, jid)
        expired = job is not None and job.finished is not None and job.finished < self._clock.time() - self._ttl
        if job is None or expired or job.owner != owner or (model is not None and job.model != model):
            raise NotFound(f"no job '{jid}'")
        return job

    async def wait(self, jid: str, timeout: float) -> None:
        """Until the job is final or ``timeout`` seconds pass."""
        event = self._done.setdefault(jid, asyncio.Event())
        job = await self._db(self._store.get, jid)
        if job is None or job.status in FINAL:
            self._done.pop(jid, None)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def retry(self, jid: str, owner: str, model: str) -> Job:
        """A FAILED job back in the queue with the same id and input (RunPod's /retry); 409 for any other."""
        job = await self.get(jid, owner, model)
        if job.status is not Status.FAILED:
            raise Conflict(f"job '{jid}' is {job.status.value}: only a FAILED job can be retried")
        self._check_room()
        if not await self._db(self._store.requeue, jid):  # retried twice at once: the other one won
            raise Conflict(f"job '{jid}' is already back in the queue")
        job = await self.get(jid, owner, model)
        self._queues[model].append(job)
        self._kick(model)
        log.info("job %s (%s): retried", jid, model)
        return job

    async def purge_queue(self, owner: str, model: str) -> int:
        """Cancel this owner's jobs that wait for ``model`` (RunPod's /purge-queue); running ones go on."""
        queue = self._queues.get(model)
        if not queue:
            return 0
        mine = [job for job in queue if job.owner == owner]
        for job in mine:
            queue.remove(job)
        when = self._clock.time()
        for job in mine:
            await self._db(self._store.finish, job.id, Outcome(Status.CANCELLED), when)
            self._final(job.id)
        if mine:
            log.info("jobs for %s: %d waiting jobs purged", model, len(mine))
        return len(mine)

    async def cancel(self, jid: str, owner: str, model: str | None = None) -> Job:
        """Cancel a waiting or running job (a running one's request is abandoned, as by a client that
        went away); a finished job stays as it is."""
        job = await self.get(jid, owner, model)
        if job.status in FINAL:
            return job
        queue = self._queues.get(job.model)
        if queue is not None:
            for waiting in list(queue):
                if waiting.id == jid:
                    queue.remove(waiting)
        running = self._running.get(job.model, {}).get(jid)
        if running is not None:
            running.set()
        await self._db(self._store.finish, jid, Outcome(Status.CANCELLED), self._clock.time())
        self._final(jid)
        log.info("job %s (%s): cancelled", jid, job.model)
        return await self.get(jid, owner)
