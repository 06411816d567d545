"""The job queue in-process (``proxy.jobs``): a JobStore on a temporary directory, a fake ``execute`` and the
ManualClock. The real path (a live proxy, real routes) is in ``tests/test_jobs_real.py``; these are the edge
cases it cannot set up: rows written by hand (a removed model's, damaged ones), the limits' arithmetic."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from proxy.clock import ManualClock
from proxy.errors import ModelNotFound, PayloadTooLarge, QueueFull, TooManyRequests
from proxy.jobs import FINAL, Job, Jobs, JobStore, Outcome, Status


class Models:
    """The catalog as the queue sees it (``parallel_of``), and an ``execute`` that records what it runs and
    holds each job until told (``release``)."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.ran: list[tuple[str, dict[str, Any]]] = []
        self.gate = asyncio.Event()

    def parallel_of(self, name: str) -> int:
        if name not in self.names:
            raise ModelNotFound(name)
        return 1

    async def execute(self, job: Job, job_input: dict[str, Any], cancelled: asyncio.Event) -> Outcome:
        self.ran.append((job.id, job_input))
        await self.gate.wait()
        return Outcome(Status.COMPLETED, output={"echo": job_input})


def queue(store: JobStore, models: Models, **limits: Any) -> Jobs:
    return Jobs(
        store,
        models.execute,
        ManualClock(),
        parallel_of=models.parallel_of,
        max_queued=limits.pop("max_queued", 1000),
        ttl=3600.0,
        **limits,
    )


def insert(path: Path, *rows: tuple[Any, ...]) -> None:
    """Rows (id, model, role, input, status) written as an older proxy, or a damaged disk, left them."""
    db = sqlite3.connect(path)
    db.executemany(
        "INSERT INTO jobs (id, model, owner, role, input, status, created) VALUES (?, ?, 'o', ?, ?, ?, 1.0)", rows
    )
    db.commit()
    db.close()


def column(path: Path, jid: str, name: str) -> Any:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT {name} FROM jobs WHERE id = ?", (jid,)).fetchone()[0]
    finally:
        db.close()


async def settled(jobs: Jobs, jid: str) -> Job:
    """The job once it is final (the queue's tasks run on this loop: wait on it, never sleep)."""
    await jobs.wait(jid, timeout=10)
    job = await jobs.get(jid, None)
    assert job.status in FINAL, job
    return job


async def test_a_start_ends_the_jobs_of_a_removed_model_and_of_damaged_rows_and_runs_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    JobStore(path).close()
    ok = json.dumps({"messages": []})
    insert(
        path,
        *[(f"gone-{i}", "removed", 1, ok, "IN_QUEUE") for i in range(5)],
        ("running-gone", "removed", 1, ok, "IN_PROGRESS"),
        ("bad-role", "here", "not a role", ok, "IN_QUEUE"),
        ("bad-input", "here", 1, "{not json", "IN_QUEUE"),
        ("odd-status", "here", 1, ok, "SOMETHING"),
        ("fine", "here", 1, ok, "IN_QUEUE"),
    )
    models = Models("here")
    models.gate.set()
    jobs = queue(JobStore(path), models)
    await jobs.start()  # never raises, whatever the table holds
    try:
        for jid in [f"gone-{i}" for i in range(5)] + ["running-gone"]:
            job = await settled(jobs, jid)
            assert job.status is Status.FAILED and job.error == "model 'removed' is no longer configured", job
        assert (await settled(jobs, "bad-role")).error == "the job's stored row could not be read"
        assert (await settled(jobs, "bad-input")).error == "the job's stored input could not be read"
        done = await settled(jobs, "fine")
        assert done.status is Status.COMPLETED and done.output == {"echo": {"messages": []}}
        odd = await jobs.get("odd-status", None)  # shown as failed, never run
        assert odd.status is Status.FAILED and "SOMETHING" in (odd.error or "")
        assert [jid for jid, _ in models.ran] == ["fine"]
        assert jobs.pending == 0  # nothing is counted against max_queued any more
    finally:
        await jobs.close()


async def test_a_reload_that_removes_a_model_ends_its_waiting_jobs_and_frees_their_places(tmp_path: Path) -> None:
    models = Models("a", "b")
    jobs = queue(JobStore(tmp_path / "jobs.sqlite3"), models, max_queued=3)
    await jobs.start()
    try:
        running = await jobs.submit("a", "o", 1, json.dumps({"n": 0}))
        waiting = [await jobs.submit("a", "o", 1, json.dumps({"n": i})) for i in (1, 2)]
        with pytest.raises(QueueFull):
            await jobs.submit("b", "o", 1, json.dumps({"n": 3}))
        models.names.discard("a")  # the catalog changed (Discovery.rescan calls this after replace_models)
        await jobs.forget_missing()
        for job in waiting:
            failed = await settled(jobs, job.id)
            assert failed.status is Status.FAILED and failed.error == "model 'a' is no longer configured"
        # the running one finishes as its request does; the places of the others are free at once
        assert jobs.counts("a") == (0, 1)
        other = await jobs.submit("b", "o", 1, json.dumps({"n": 4}))
        models.gate.set()
        assert (await settled(jobs, running.id)).status is Status.COMPLETED
        assert (await settled(jobs, other.id)).status is Status.COMPLETED
    finally:
        await jobs.close()


async def test_per_key_limits_count_waiting_and_running_jobs_and_their_bytes(tmp_path: Path) -> None:
    models = Models("m")
    jobs = queue(JobStore(tmp_path / "jobs.sqlite3"), models, max_queued_per_key=3, max_bytes_per_key=1000)
    await jobs.start()
    try:
        mine = [await jobs.submit("m", "me", 1, json.dumps({"n": i})) for i in range(3)]  # one runs, two wait
        assert jobs.counts("m") == (2, 1)
        with pytest.raises(TooManyRequests) as refused:
            await jobs.submit("m", "me", 1, json.dumps({"n": 3}))
        assert refused.value.status == 429 and refused.value.headers()["Retry-After"] == "5"
        await jobs.submit("m", "you", 1, json.dumps({"n": 4}))  # another key is not held back
        await jobs.cancel(mine[2].id, "me")
        await jobs.submit("m", "me", 1, json.dumps({"n": 5}))  # its place is free again
        # bytes: one input alone over the limit is a 413; the sum over the limit a 429
        with pytest.raises(PayloadTooLarge):
            await jobs.submit("m", "them", 1, json.dumps({"pad": "x" * 1000}))
        await jobs.submit("m", "them", 1, json.dumps({"pad": "x" * 600}))
        with pytest.raises(TooManyRequests, match="max_bytes_per_key"):
            await jobs.submit("m", "them", 1, json.dumps({"pad": "x" * 400}))
        await jobs.submit("m", "them", 1, json.dumps({"pad": "x" * 300}))
        models.gate.set()
    finally:
        await jobs.close()


async def test_a_jobs_input_is_on_disk_only_and_dropped_when_it_ends(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    models = Models("m")
    jobs = queue(JobStore(path), models)
    await jobs.start()
    try:
        first = await jobs.submit("m", "o", 1, json.dumps({"pad": "a" * 10_000}))
        second = await jobs.submit("m", "o", 1, json.dumps({"pad": "b" * 10_000}))
        third = await jobs.submit("m", "o", 1, json.dumps({"pad": "c" * 10_000}))
        assert column(path, second.id, "length(input)") > 10_000
        # what the queue holds of a waiting job: its id, owner and size, never its input
        held = [vars(entry) for q in jobs._queues.values() for entry in q]
        assert held and all("input" not in entry and "b" * 100 not in str(entry) for entry in held)
        await jobs.cancel(third.id, "o")
        models.gate.set()
        for job in (first, second):
            assert (await settled(jobs, job.id)).status is Status.COMPLETED
        assert models.ran[1] == (second.id, {"pad": "b" * 10_000})  # read back from disk when it ran
        for job in (first, second, third):
            assert column(path, job.id, "input") is None, job.id
            assert (await jobs.get(job.id, "o")).size is None
        # a failed job's too; and it cannot be retried without it (409, saying why)

        async def fail(job: Job, job_input: dict[str, Any], cancelled: asyncio.Event) -> Outcome:
            return Outcome(Status.FAILED, error="503: no")

        jobs._execute = fail
        failed = await settled(jobs, (await jobs.submit("m", "o", 1, json.dumps({"pad": "d" * 10_000}))).id)
        assert failed.status is Status.FAILED and column(path, failed.id, "input") is None
        from proxy.errors import Conflict

        with pytest.raises(Conflict, match="input is not kept"):
            await jobs.retry(failed.id, "o", "m")
    finally:
        await jobs.close()


async def test_an_admin_sees_lists_cancels_and_purges_every_keys_jobs_a_key_only_its_own(tmp_path: Path) -> None:
    models = Models("m")
    jobs = queue(JobStore(tmp_path / "jobs.sqlite3"), models)
    await jobs.start()
    try:
        a = [await jobs.submit("m", "a", 1, json.dumps({"n": i})) for i in range(3)]
        b = [await jobs.submit("m", "b", 1, json.dumps({"n": i})) for i in range(2)]
        from proxy.errors import NotFound

        with pytest.raises(NotFound):
            await jobs.get(a[1].id, "b")
        assert {j.id for j in await jobs.listing("b")} == {j.id for j in b}
        assert len(await jobs.listing(None)) == 5
        assert [j.id for j in await jobs.listing(None, status=Status.IN_PROGRESS)] == [a[0].id]
        assert (await jobs.cancel(b[1].id, None)).status is Status.CANCELLED
        assert await jobs.purge_queue("b", "m") == 1  # b's other waiting one; a's stay
        assert await jobs.purge_queue(None, "m") == 2  # an admin's: a's two waiting ones
        assert jobs.counts("m") == (0, 1)
    finally:
        await jobs.close()


def test_a_database_whose_input_column_is_not_null_is_rebuilt_keeping_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, model TEXT NOT NULL,"
        " owner TEXT NOT NULL, role INTEGER NOT NULL, input TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,"
        " started REAL, finished REAL, output TEXT, error TEXT, retries INTEGER NOT NULL DEFAULT 0);"
        "CREATE INDEX jobs_status ON jobs (status, finished);"
        "INSERT INTO jobs (id, model, owner, role, input, status, created)"
        " VALUES ('w', 'm', 'o', 1, '{}', 'IN_QUEUE', 1);"
    )
    old.commit()
    old.close()
    store = JobStore(path)
    try:
        entries, broken = store.unfinished()
        assert [e.id for e in entries] == ["w"] and not broken
        store.finish("w", Outcome(Status.COMPLETED, output={}), 2.0)
        assert column(path, "w", "input") is None
    finally:
        store.close()
