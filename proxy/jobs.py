"""Async jobs (RunPod's serverless queue): accepted into SQLite before they are answered, run in turn per
model, kept after they finish for ``jobs.ttl``.

A job is never lost once accepted: it is written (stdlib ``sqlite3``, WAL, one connection used from one
thread at a time: every call runs in a worker thread, never on the event loop) before ``submit`` returns;
a restart puts the jobs that were waiting or running back in the queue, in their order. A model runs at
most ``parallel`` jobs at once (the rest are ``IN_QUEUE``); each job runs through ``execute``, which the
HTTP edge supplies (``proxy.api.jobs``: the model's usual route, called in-process, so a job takes the
same lease, queue and lifecycle as any request). Jobs belong to their owner (a hash of the key that made
them): anyone else gets ``NotFound``; ``owner=None`` (an admin) sees every owner's. No HTTP here.

A job's input lives on disk only: the queue holds ``Entry``s (ids, owner, size), and a job's input is read
back when it runs, then dropped from its row when the job ends (COMPLETED, FAILED or CANCELLED: the output
and error are kept for the ttl). Each owner may hold at most ``max_queued_per_key`` jobs and
``max_bytes_per_key`` bytes of input waiting or running. Jobs whose model is no longer in the catalog (at
start-up, or after a reload or rescan: ``forget_missing``) end FAILED, so a start never depends on what the
table holds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import hashlib
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
from proxy.errors import Conflict, ModelNotFound, NotFound, PayloadTooLarge, QueueFull, TooManyRequests

log = logging.getLogger("proxy.jobs")

# In a cluster a job's id names the node that stores it: ``<node>~<uuid>`` (a node's name has no '~', and
# '~' needs no escaping in a URL), so a poll that reaches another node is forwarded there (proxy.api.jobs).
NODE_MARK = "~"


def node_of(job_id: str) -> str | None:
    """The node a job's id names (None: an id made without a cluster)."""
    node, mark, _ = job_id.rpartition(NODE_MARK)
    return node if mark and node else None


def owner_of_key(key: str) -> str:
    """Who owns the jobs a key makes: the key's sha256, in hex (what ``?owner=`` names)."""
    return hashlib.sha256(key.encode()).hexdigest()


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
    """A job as the table has it, without its input (read only when the job runs)."""

    id: str
    model: str
    owner: str
    role: int  # the owner's role (proxy.auth.Role), for the call the job makes
    status: Status
    created: float  # wall clock, seconds
    started: float | None = None
    finished: float | None = None
    output: Any = None
    error: str | None = None
    size: int | None = None  # bytes of its stored input; None once the input is dropped (the job ended)

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
class Entry:
    """What the proxy holds of a job that waits or runs: never its input."""

    id: str
    model: str
    owner: str
    role: int
    size: int  # bytes of its input as stored


@dataclass(frozen=True)
class Outcome:
    """What a job's run gave: COMPLETED with its output, or FAILED with an error."""

    status: Status
    output: Any = None
    error: str | None = None


# (job, its input, cancelled) -> its outcome; ``cancelled`` is set when the job is cancelled while it runs
Execute = Callable[[Job, dict[str, Any], asyncio.Event], Awaitable[Outcome]]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    model TEXT NOT NULL,
    owner TEXT NOT NULL,
    role INTEGER NOT NULL,
    input TEXT,
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
# a table from before inputs were dropped (input NOT NULL): rebuilt with the schema above
_REBUILD = """
BEGIN;
ALTER TABLE jobs RENAME TO jobs_old;
DROP INDEX IF EXISTS jobs_status;
{schema}
INSERT INTO jobs (seq, id, model, owner, role, input, status, created, started, finished, output, error, retries)
    SELECT seq, id, model, owner, role, input, status, created, started, finished, output, error, retries FROM jobs_old;
DROP TABLE jobs_old;
COMMIT;
"""
_COLUMNS = "id, model, owner, role, status, created, started, finished, output, error, length(input)"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _job(row: tuple[Any, ...]) -> Job:
    """A row as a Job; what a damaged row holds is read leniently (a job that cannot be read is FAILED)."""
    jid, model, owner, role, status, created, started, finished, output, error, size = row
    try:
        state = Status(status)
    except ValueError:
        state, error = Status.FAILED, error or f"the job's stored status {status!r} is not one the proxy knows"
    try:
        out = json.loads(output) if output is not None else None
    except ValueError:
        out = None
    return Job(
        id=str(jid),
        model=str(model),
        owner=str(owner),
        role=role if isinstance(role, int) else 0,
        status=state,
        created=_number(created) or 0.0,
        started=_number(started),
        finished=_number(finished),
        output=out,
        error=None if error is None else str(error),
        size=size if isinstance(size, int) else None,
    )


def _entry(row: tuple[Any, ...]) -> Entry | None:
    """A waiting job's row as an Entry; None when the row cannot make one (no input, a role that is no number)."""
    jid, model, owner, role, size = row
    if not isinstance(role, int) or not isinstance(size, int) or not isinstance(model, str):
        return None
    return Entry(id=str(jid), model=model, owner=str(owner), role=role, size=size)


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
            columns = {row[1]: row for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "retries" not in columns:  # a database from before /retry
                self._db.execute("ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0")
            if columns["input"][3]:  # input NOT NULL: a database from before inputs were dropped
                self._db.executescript(_REBUILD.format(schema=_SCHEMA))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, job: Job, job_input: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, model, owner, role, input, status, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.model, job.owner, job.role, job_input, job.status.value, job.created),
            )

    def get(self, jid: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (jid,)).fetchone()
        return _job(row) if row else None

    def claim(self, jid: str, when: float) -> tuple[Job, str | None] | None:
        """A waiting job marked IN_PROGRESS, with its stored input (None: not a waiting job any more)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, started = ? WHERE id = ? AND status = ?",
                (Status.IN_PROGRESS, when, jid, Status.IN_QUEUE),
            )
            if cur.rowcount != 1:
                return None
            row = self._db.execute(f"SELECT {_COLUMNS}, input FROM jobs WHERE id = ?", (jid,)).fetchone()
        return _job(row[:-1]), row[-1] if isinstance(row[-1], str) else None

    def finish(self, jid: str, outcome: Outcome, when: float) -> None:
        """The job's outcome; its input is dropped (a finished job keeps its output and error for the ttl)."""
        output = json.dumps(outcome.output) if outcome.output is not None else None
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, finished = ?, output = ?, error = ?, input = NULL "
                "WHERE id = ? AND finished IS NULL",
                (outcome.status.value, when, output, outcome.error, jid),
            )

    def requeue(self, jid: str) -> bool:
        """A failed job whose input is still kept (a database from before inputs were dropped) back in the
        queue, as it was submitted (its output, error and times cleared)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status = ?, started = NULL, finished = NULL, output = NULL, error = NULL, "
                "retries = retries + 1 WHERE id = ? AND status = ? AND input IS NOT NULL",
                (Status.IN_QUEUE, jid, Status.FAILED),
            )
        return cur.rowcount == 1

    def unfinished(self) -> tuple[list[Entry], list[str]]:
        """Jobs that were waiting or running when the proxy stopped, back in the queue, in their order (no
        input read); and the ids of those whose rows cannot make a job (to end FAILED)."""
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, started = NULL WHERE status = ?", (Status.IN_QUEUE, Status.IN_PROGRESS)
            )
            rows = self._db.execute(
                "SELECT id, model, owner, role, length(input) FROM jobs WHERE status = ? ORDER BY seq",
                (Status.IN_QUEUE,),
            ).fetchall()
        entries: list[Entry] = []
        broken: list[str] = []
        for row in rows:
            entry = _entry(row)
            if entry is None:
                broken.append(str(row[0]))
            else:
                entries.append(entry)
        return entries, broken

    def listing(self, owner: str | None, model: str | None, status: Status | None, limit: int) -> list[Job]:
        """Jobs, newest first: an owner's (None: every owner's), of a model, in a status (None: any)."""
        where, args = [], []
        for column, value in (("owner", owner), ("model", model), ("status", status)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(str(value))
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {clause} ORDER BY seq DESC LIMIT ?", (*args, limit)
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


def _parse(text: str | None) -> dict[str, Any]:
    job_input = json.loads(text) if text is not None else None
    if not isinstance(job_input, dict):
        raise ValueError("not a JSON object")
    return job_input


class Jobs:
    """The queue: accepts, runs (``parallel`` at a time per model), cancels and reports jobs."""

    def __init__(
        self,
        store: JobStore,
        execute: Execute,
        clock: Clock,
        *,
        parallel_of: Callable[[str], int],  # ModelNotFound: the model is no longer in the catalog
        max_queued: int,
        ttl: float,
        max_queued_per_key: int = 100,
        max_bytes_per_key: int = 64 * 1024 * 1024,
        node: str | None = None,  # a cluster's node: its jobs' ids name it (node_of)
    ) -> None:
        self._store = store
        self._id_prefix = node + NODE_MARK if node else ""
        self._execute = execute
        self._clock = clock
        self._parallel_of = parallel_of
        self._max_queued = max_queued
        self._max_per_key = max_queued_per_key
        self._max_bytes_per_key = max_bytes_per_key
        self._ttl = ttl
        self._queues: dict[str, collections.deque[Entry]] = collections.defaultdict(collections.deque)
        self._running: dict[str, dict[str, asyncio.Event]] = collections.defaultdict(dict)  # model -> id -> cancel
        self._live: dict[str, Entry] = {}  # every job waiting or running, by id (the per-key counts)
        self._tasks: set[asyncio.Task[None]] = set()
        self._done: dict[str, asyncio.Event] = {}  # id -> set when the job is final (for runsync)
        self._closing = False

    async def _db(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Purge expired jobs, put unfinished ones back in the queue and start them; those whose model is
        gone, or whose rows cannot be read, end FAILED."""
        await self._db(self._store.purge, self._clock.time() - self._ttl)
        entries, broken = await self._db(self._store.unfinished)
        if entries:
            log.info("jobs: %d unfinished jobs back in the queue", len(entries))
        for jid in broken:
            log.warning("job %s: its stored row cannot be read; it ends FAILED", jid)
            await self._end(jid, Outcome(Status.FAILED, error="the job's stored row could not be read"))
        for entry in entries:
            self._live[entry.id] = entry
            self._queues[entry.model].append(entry)
        await self.forget_missing()
        for model in list(self._queues):
            self._kick(model)

    async def close(self) -> None:
        """Stop running jobs without recording an outcome: the next start runs them again."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._db(self._store.close)

    async def forget_missing(self) -> None:
        """End FAILED the waiting jobs of models that are no longer in the catalog (a start, a reload, a
        rescan); a running one finishes as its request does."""
        for model, queue in list(self._queues.items()):
            if queue and self._parallel(model) is None:
                await self._fail_queue(model, f"model '{model}' is no longer configured")

    async def _fail_queue(self, model: str, error: str) -> None:
        queue = self._queues.pop(model, collections.deque())
        if queue:
            log.warning("jobs for %s: %d waiting jobs end FAILED: %s", model, len(queue), error)
        for entry in queue:
            await self._end(entry.id, Outcome(Status.FAILED, error=error))

    async def _end(self, jid: str, outcome: Outcome) -> None:
        """Record a job's outcome (its input dropped) and let go of it."""
        await self._db(self._store.finish, jid, outcome, self._clock.time())
        self._live.pop(jid, None)
        self._final(jid)

    # -- the queue ---------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._live)

    def check_room(self, owner: str, size: int) -> None:
        """Room for one more job of ``size`` input bytes from ``owner``: 503 past ``jobs.max_queued`` jobs
        waiting or running in all; 429 past the owner's ``max_queued_per_key`` jobs or
        ``max_bytes_per_key`` bytes (both with Retry-After); 413 for an input that alone is over the latter."""
        if size > self._max_bytes_per_key:
            raise PayloadTooLarge(
                f"the job's input is {size} bytes; a key may have at most {self._max_bytes_per_key} bytes of "
                "input waiting or running (jobs.max_bytes_per_key)",
                param="input",
            )
        if self.pending >= self._max_queued:
            raise QueueFull(f"{self.pending} jobs are already waiting or running; try again later", retry_after=5)
        mine = [e for e in self._live.values() if e.owner == owner]
        if len(mine) >= self._max_per_key:
            raise TooManyRequests(
                f"this key has {len(mine)} jobs waiting or running, its limit (jobs.max_queued_per_key); "
                "try again when some have finished",
                retry_after=5,
            )
        held = sum(e.size for e in mine)
        if held + size > self._max_bytes_per_key:
            raise TooManyRequests(
                f"this key's jobs waiting or running hold {held} bytes of input; {size} more would pass its "
                f"limit of {self._max_bytes_per_key} (jobs.max_bytes_per_key); try again when some have finished",
                retry_after=5,
            )

    def counts(self, model: str) -> tuple[int, int]:
        """(waiting, running) jobs for a model."""
        return len(self._queues.get(model, ())), len(self._running.get(model, {}))

    async def finished_counts(self, model: str) -> dict[str, int]:
        return await self._db(self._store.finished_counts, model)

    async def submit(self, model: str, owner: str, role: int, text: str) -> Job:
        """Accept a job whose input is ``text`` (a JSON object), on disk before this returns; 503 past
        ``jobs.max_queued``, 429 or 413 past the owner's limits. Only the job's id and size stay in memory."""
        size = len(text.encode())
        self.check_room(owner, size)
        job = Job(
            id=self._id_prefix + str(uuid.uuid4()),
            model=model,
            owner=owner,
            role=role,
            status=Status.IN_QUEUE,
            created=self._clock.time(),
            size=size,
        )
        entry = Entry(job.id, model, owner, role, size)
        self._live[job.id] = entry  # counted from now: a submit at the same time sees it
        try:
            await self._db(self._store.add, job, text)
        except BaseException:
            self._live.pop(job.id, None)
            raise
        self._queues[model].append(entry)
        self._kick(model)
        return job

    def _parallel(self, model: str) -> int | None:
        """How many jobs the model runs at once; None when it is no longer in the catalog."""
        try:
            return max(1, self._parallel_of(model))
        except ModelNotFound:
            return None

    def _kick(self, model: str) -> None:
        if self._closing:
            return
        queue, running = self._queues[model], self._running[model]
        if not queue:
            return
        parallel = self._parallel(model)
        if parallel is None:
            self._spawn(self._fail_queue(model, f"model '{model}' is no longer configured"))
            return
        while queue and len(running) < parallel:
            entry = queue.popleft()
            running[entry.id] = asyncio.Event()
            task = asyncio.create_task(self._run(entry, running[entry.id]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, entry: Entry, cancelled: asyncio.Event) -> None:
        try:
            claimed = await self._db(self._store.claim, entry.id, self._clock.time())
            if claimed is None or cancelled.is_set():
                return
            job, text = claimed
            del claimed
            try:
                job_input = await anyio.to_thread.run_sync(_parse, text)
            except ValueError:
                outcome = Outcome(Status.FAILED, error="the job's stored input could not be read")
            else:
                del text
                try:
                    outcome = await self._execute(job, job_input, cancelled)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the job fails; the queue goes on
                    log.exception("job %s (%s) failed", job.id, job.model)
                    outcome = Outcome(Status.FAILED, error=f"{type(exc).__name__}: {exc}")
                del job_input
            if cancelled.is_set():
                return  # cancel recorded it
            await self._end(job.id, outcome)
            await self._db(self._store.purge, self._clock.time() - self._ttl)
        finally:
            self._running[entry.model].pop(entry.id, None)
            if not self._closing:
                self._live.pop(entry.id, None)
            self._kick(entry.model)

    def _final(self, jid: str) -> None:
        event = self._done.pop(jid, None)
        if event is not None:
            event.set()

    # -- a client's view ---------------------------------------------------------------------
    async def get(self, jid: str, owner: str | None, model: str | None = None) -> Job:
        """A job of ``owner``'s (None: anyone's, for an admin) that has not expired; else NotFound."""
        job = await self._db(self._store.get, jid)
        expired = job is not None and job.finished is not None and job.finished < self._clock.time() - self._ttl
        if job is None or expired or (owner is not None and job.owner != owner):
            raise NotFound(f"no job '{jid}'")
        if model is not None and job.model != model:
            raise NotFound(f"no job '{jid}'")
        return job

    async def listing(
        self, owner: str | None, model: str | None = None, status: Status | None = None, limit: int = 100
    ) -> list[Job]:
        """Jobs, newest first, that have not expired: ``owner``'s (None: every owner's)."""
        horizon = self._clock.time() - self._ttl
        jobs = await self._db(self._store.listing, owner, model, status, limit)
        return [j for j in jobs if j.finished is None or j.finished >= horizon]

    async def wait(self, jid: str, timeout: float) -> None:
        """Until the job is final or ``timeout`` seconds pass."""
        event = self._done.setdefault(jid, asyncio.Event())
        job = await self._db(self._store.get, jid)
        if job is None or job.status in FINAL:
            self._done.pop(jid, None)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def retry(self, jid: str, owner: str | None, model: str) -> Job:
        """A FAILED job back in the queue with the same id and input (RunPod's /retry); 409 for any other,
        and for one whose input was dropped when it ended."""
        job = await self.get(jid, owner, model)
        if job.status is not Status.FAILED:
            raise Conflict(f"job '{jid}' is {job.status.value}: only a FAILED job can be retried")
        if job.size is None:
            raise Conflict(
                f"job '{jid}' ended: a job's input is not kept once it ends, so it cannot be retried; submit it again"
            )
        self.check_room(job.owner, job.size)
        if not await self._db(self._store.requeue, jid):  # retried twice at once: the other one won
            raise Conflict(f"job '{jid}' is already back in the queue")
        entry = Entry(job.id, job.model, job.owner, job.role, job.size)
        self._live[jid] = entry
        self._queues[model].append(entry)
        self._kick(model)
        log.info("job %s (%s): retried", jid, model)
        return await self.get(jid, owner, model)

    async def purge_queue(self, owner: str | None, model: str) -> int:
        """Cancel ``owner``'s jobs (None: everyone's) that wait for ``model`` (RunPod's /purge-queue);
        running ones go on."""
        queue = self._queues.get(model)
        if not queue:
            return 0
        chosen = [entry for entry in queue if owner is None or entry.owner == owner]
        for entry in chosen:
            queue.remove(entry)
        for entry in chosen:
            await self._end(entry.id, Outcome(Status.CANCELLED))
        if chosen:
            log.info("jobs for %s: %d waiting jobs purged", model, len(chosen))
        return len(chosen)

    async def cancel(self, jid: str, owner: str | None, model: str | None = None) -> Job:
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
        await self._end(jid, Outcome(Status.CANCELLED))
        log.info("job %s (%s): cancelled", jid, job.model)
        return await self.get(jid, owner)
