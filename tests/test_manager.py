"""ModelManager's rules with injected time and in-process fake workers (no processes, no sleeps).

Every rule here is also covered through a live proxy: test_lifecycle.py with fake worker processes,
test_lifecycle_real.py on SmolLM2 (one start shared, keep_alive 0 with overlapping requests, pin_keep_alive,
a new load from the config, the LRU tie-break, a failed load retried after the backoff, /unload waiting for
a stream). Only the walk over the transition table, a watchdog turned off and the refusal of a lease while
shutting down are checked here alone.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.clock import ManualClock
from proxy.config import ModelConfig, Settings
from proxy.errors import ModelLoadFailed, ModelNotFound, QueueFull, Unavailable
from proxy.events import LoadProgress
from proxy.manager import ModelManager
from proxy.memory import MemoryStore
from proxy.runtime import TRANSITIONS, InvalidTransition, Runtime, State, WorkerFactory
from proxy.upstream import Upstream
from tests.bare import bare_model, bare_settings
from tests.fake_memory import FakeProbe


def model(name: str, keep_alive: float | None = None, **kw: Any) -> ModelConfig:
    return bare_model(name, keep_alive=keep_alive, **kw)


def settings(
    *models: ModelConfig, max_loaded: int = 3, max_queue: int = 8, keep_alive: float = 300.0, stall_timeout: float = 0.0
) -> Settings:
    return bare_settings(
        api_tokens=Path("none"),
        keep_alive=keep_alive,
        max_loaded_models=max_loaded,
        max_queue=max_queue,
        max_body_bytes=1 << 20,
        models=tuple(models),
        stall_timeout=stall_timeout,
    )


class FakeWorker:
    """Stands in for supervisor.Worker (a manager.WorkerHandle): starts when its gate opens, stops at once."""

    instances: list[FakeWorker] = []

    def __init__(self, config: ModelConfig, runtime_dir: Path, on_exit: Callable[[Any], None]) -> None:
        self.config = config
        self.on_exit = on_exit
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: str | None = None
        self.stopped = False
        self.pid = 1000 + len(FakeWorker.instances)
        self.upstream = Upstream("http://fake", name=config.name)  # never used: no session is made
        self.returncode: int | None = None
        self.cpu: float | None = 0.0  # what cpu_seconds() reports; a test moves it
        self.kill_reason: str | None = None
        self.on_progress: Callable[[float, str], None] | None = None
        FakeWorker.instances.append(self)

    def cpu_seconds(self) -> float | None:
        return self.cpu

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        self.returncode = -9
        self.on_exit(self)

    def log_tail(self, lines: int = 20) -> str:
        return "fake log"

    async def start(self) -> None:
        await self.gate.wait()
        if self.fail:
            raise ModelLoadFailed(self.fail)

    async def stop(self, grace: float) -> None:
        self.stopped = True

    def kill_sync(self) -> None:
        self.stopped = True


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


def make(*models: ModelConfig, factory: WorkerFactory = FakeWorker, **kw: Any) -> tuple[ModelManager, ManualClock]:
    clock = ManualClock()
    manager = ModelManager(
        settings(*models, **kw), clock=clock, worker_factory=factory, probe=FakeProbe(), store=MemoryStore(None)
    )
    return manager, clock


def held(config: ModelConfig, runtime_dir: Path, on_exit: Callable[[Any], None]) -> FakeWorker:
    """A FakeWorker whose start waits until the test opens its gate."""
    worker = FakeWorker(config, runtime_dir, on_exit)
    worker.gate.clear()
    return worker


def failing(config: ModelConfig, runtime_dir: Path, on_exit: Callable[[Any], None]) -> FakeWorker:
    """A FakeWorker whose start fails when its gate opens."""
    worker = held(config, runtime_dir, on_exit)
    worker.fail = "weights are corrupt"
    return worker


def state(manager: ModelManager, name: str) -> str:
    return next(s.state for s in manager.status() if s.name == name)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_concurrent_acquires_share_one_start() -> None:
    manager, _ = make(model("a", parallel=10))
    leases = await asyncio.gather(*(manager.acquire("a") for _ in range(10)))
    assert len(FakeWorker.instances) == 1
    assert all(lease.worker is FakeWorker.instances[0] for lease in leases)
    for lease in leases:
        lease.release()
    await manager.shutdown()


async def test_idle_timer_starts_when_in_flight_reaches_zero() -> None:
    manager, clock = make(model("a", keep_alive=10, parallel=2))
    first = await manager.acquire("a")
    second = await manager.acquire("a")
    clock.advance(100)  # busy: no timer runs while requests are in flight
    assert state(manager, "a") == "ready"
    first.release()
    clock.advance(100)
    assert state(manager, "a") == "ready"
    second.release()  # in-flight reaches zero: now the 10 s start
    clock.advance(9.9)
    assert state(manager, "a") == "ready"
    clock.advance(0.2)
    await settle()
    assert state(manager, "a") == "stopped"
    assert FakeWorker.instances[0].stopped
    await manager.shutdown()


async def test_keep_alive_zero_negative_and_absent() -> None:
    manager, clock = make(model("a"), model("b"))
    lease = await manager.acquire("a", keep_alive=0)
    lease.release()
    await settle()
    assert state(manager, "a") == "stopped"

    lease = await manager.acquire("b", keep_alive=float("inf"))
    lease.release()
    clock.advance(10**9)
    await settle()
    assert state(manager, "b") == "ready"
    lease = await manager.acquire("b")  # absent: keeps "forever"
    lease.release()
    clock.advance(10**9)
    assert state(manager, "b") == "ready"
    assert next(s.keep_alive for s in manager.status() if s.name == "b") == float("inf")
    await manager.shutdown()


async def test_pinned_keep_alive_ignores_the_client() -> None:
    manager, clock = make(model("a", keep_alive=5, pin_keep_alive=True))
    lease = await manager.acquire("a", keep_alive=float("inf"))
    lease.release()
    clock.advance(6)
    await settle()
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_eviction_prefers_shortest_keep_alive_then_lru() -> None:
    manager, clock = make(model("a"), model("b"), model("c"), model("d"), max_loaded=2)
    (await manager.acquire("a", keep_alive=600)).release()
    (await manager.acquire("b", keep_alive=60)).release()
    lease = await manager.acquire("c", keep_alive=600)  # full: b (shorter keep_alive) makes room
    assert state(manager, "b") == "stopped" and state(manager, "a") == "ready"
    lease.release()
    assert next(s.keep_alive for s in manager.status() if s.name == "c") == 600  # a tie with a: LRU decides
    clock.advance(1)
    (await manager.acquire("a")).release()  # a is now the most recently used
    lease = await manager.acquire("d")
    assert state(manager, "c") == "stopped" and state(manager, "a") == "ready"
    lease.release()
    await manager.shutdown()


async def test_busy_model_is_never_evicted_and_queue_is_bounded() -> None:
    manager, _ = make(model("a"), model("b"), model("c"), max_loaded=1, max_queue=1)
    busy = await manager.acquire("a")
    waiting = asyncio.create_task(manager.acquire("b"))
    await settle()
    assert not waiting.done() and manager.queued == 1
    assert state(manager, "a") == "ready"
    with pytest.raises(QueueFull) as info:
        await manager.acquire("c")
    assert info.value.headers()["Retry-After"]
    busy.release()
    lease = await asyncio.wait_for(waiting, 5)
    assert state(manager, "a") == "stopped" and state(manager, "b") == "ready"
    lease.release()
    await manager.shutdown()


async def test_failed_start_reaches_every_waiter_and_backs_off() -> None:
    manager, clock = make(model("a"), factory=failing)
    waiters = [asyncio.create_task(manager.acquire("a")) for _ in range(3)]
    await settle()
    FakeWorker.instances[0].gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ModelLoadFailed) and "corrupt" in r.message for r in results)
    assert len(FakeWorker.instances) == 1
    with pytest.raises(ModelLoadFailed):  # within the backoff: no new start
        await manager.acquire("a")
    assert len(FakeWorker.instances) == 1
    clock.advance(2)
    with pytest.raises(ModelLoadFailed):
        task = asyncio.create_task(manager.acquire("a"))
        await settle()
        FakeWorker.instances[-1].gate.set()
        await task
    assert len(FakeWorker.instances) == 2
    await manager.shutdown()


async def test_worker_exit_marks_stopped_and_next_request_restarts() -> None:
    manager, _ = make(model("a"))
    lease = await manager.acquire("a")
    lease.release()
    worker = FakeWorker.instances[0]
    worker.returncode = -9
    worker.on_exit(worker)
    assert state(manager, "a") == "stopped"
    assert "exited unexpectedly" in (next(s.last_error for s in manager.status()) or "")
    lease = await manager.acquire("a")
    assert len(FakeWorker.instances) == 2
    lease.release()
    await manager.shutdown()


async def test_unload_waits_for_in_flight() -> None:
    manager, _ = make(model("a"))
    lease = await manager.acquire("a")
    unloading = asyncio.create_task(manager.unload("a"))
    await settle()
    assert not unloading.done() and state(manager, "a") == "ready"
    lease.release()
    assert await asyncio.wait_for(unloading, 5) is True
    assert state(manager, "a") == "stopped"
    assert await manager.unload("a") is False
    await manager.shutdown()


async def test_aliases_and_latest_tag_resolve() -> None:
    manager, _ = make(model("smol:135m", aliases=("smol",)), model("plain"))
    assert manager.resolve("smol").name == "smol:135m"
    assert manager.resolve("plain:latest").name == "plain"
    with pytest.raises(ModelNotFound):
        manager.resolve("nope")
    await manager.shutdown()


async def test_a_new_load_starts_from_the_configured_keep_alive() -> None:
    manager, _ = make(model("a", keep_alive=600))
    lease = await manager.acquire("a", keep_alive=0)
    lease.release()
    await settle()
    assert state(manager, "a") == "stopped"
    lease = await manager.acquire("a")
    assert next(s.keep_alive for s in manager.status()) == 600
    lease.release()
    await manager.shutdown()


async def test_a_busy_worker_without_progress_is_killed_an_idle_or_working_one_is_not() -> None:
    manager, clock = make(model("a"), stall_timeout=20.0)  # checks every 5 s
    lease = await manager.acquire("a")
    worker = FakeWorker.instances[0]
    for _ in range(10):  # busy and working: 1 s of CPU per 5 s check
        worker.cpu = (worker.cpu or 0.0) + 1.0
        clock.advance(5.0)
    assert worker.kill_reason is None and state(manager, "a") == "ready"
    lease.release()
    clock.advance(100.0)  # idle and using nothing: fine (keep_alive is 300 s)
    assert worker.kill_reason is None and state(manager, "a") == "ready"
    lease = await manager.acquire("a")
    clock.advance(15.0)  # busy, no progress, for less than the timeout
    assert worker.kill_reason is None
    worker.cpu = (worker.cpu or 0.0) + 0.01  # below 1% of a core over 5 s: still no progress
    clock.advance(5.0)
    assert worker.kill_reason is not None and "no progress for 20s" in worker.kill_reason
    assert state(manager, "a") == "stopped"
    assert "no progress" in (next(s.last_error for s in manager.status()) or "")
    lease.release()
    await manager.shutdown()


async def test_the_stall_watchdog_is_off_at_zero() -> None:
    manager, clock = make(model("a"), stall_timeout=0.0)
    lease = await manager.acquire("a")
    clock.advance(1000.0)
    assert FakeWorker.instances[0].kill_reason is None and state(manager, "a") == "ready"
    lease.release()
    await manager.shutdown()


FORBIDDEN = [(a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a]]


@pytest.mark.parametrize(("old", "new"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
async def test_a_forbidden_transition_is_refused(old: State, new: State) -> None:
    manager, _ = make(model("a"))
    rt = manager._runtimes["a"]
    rt.state = old  # set by hand: no allowed path need lead here
    with pytest.raises(InvalidTransition, match=f"{old} -> {new} is not allowed"):
        manager._transition(rt, new, "test")
    assert rt.state is old
    await manager.shutdown()


async def test_every_allowed_transition_is_made(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Walks the table: each move in TRANSITIONS happens on a path the manager really takes."""
    moves: list[tuple[str, State, State]] = []
    real = ModelManager._transition

    def record(self: ModelManager, rt: Runtime, new: State, reason: str) -> None:
        moves.append((rt.config.name, rt.state, new))
        real(self, rt, new, reason)

    monkeypatch.setattr(ModelManager, "_transition", record)
    caplog.set_level(logging.DEBUG, logger="proxy.manager")

    async def start(manager: ModelManager, name: str, fail: str | None = None) -> None:
        task = asyncio.create_task(manager.acquire(name))
        await settle()
        FakeWorker.instances[-1].fail = fail
        FakeWorker.instances[-1].gate.set()
        (await task).release()

    manager, clock = make(model("a"), factory=held)
    with pytest.raises(ModelLoadFailed):
        await start(manager, "a", fail="weights are corrupt")
    clock.advance(2)  # past the backoff: the next request starts it again
    await start(manager, "a")
    worker = FakeWorker.instances[-1]
    worker.returncode = -9
    worker.on_exit(worker)  # a crash
    await start(manager, "a")
    assert await manager.unload("a")
    await manager.shutdown()
    S = State
    assert moves == [
        ("a", S.STOPPED, S.STARTING),
        ("a", S.STARTING, S.FAILED),
        ("a", S.FAILED, S.STARTING),
        ("a", S.STARTING, S.READY),
        ("a", S.READY, S.STOPPED),
        ("a", S.STOPPED, S.STARTING),
        ("a", S.STARTING, S.READY),
        ("a", S.READY, S.STOPPING),
        ("a", S.STOPPING, S.STOPPED),
    ]
    assert "model a: ready -> stopped (the worker exited unexpectedly with code -9)" in caplog.messages

    manager, _ = make(model("b"), model("c"), factory=held)
    loading = asyncio.create_task(manager.acquire("b"))
    await settle()  # b's start is under way, waiting at its gate
    waiting = asyncio.create_task(manager.acquire("c"))
    await asyncio.sleep(0)  # one step: c's start task exists but has not run yet
    await manager.shutdown()
    for task in (loading, waiting):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert moves[-5:] == [
        ("b", S.STOPPED, S.STARTING),
        ("c", S.STOPPED, S.STARTING),
        ("b", S.STARTING, S.STOPPED),  # its start, cancelled
        ("c", S.STARTING, S.STOPPING),
        ("c", S.STOPPING, S.STOPPED),  # cancelled before it ran: stopped all the same
    ]
    made = {(old, new) for _, old, new in moves}
    assert made == {(old, new) for old, targets in TRANSITIONS.items() for new in targets}


async def test_no_lease_once_shutdown_has_begun() -> None:
    manager, _ = make(model("a"))
    await manager.shutdown()
    with pytest.raises(Unavailable, match="shutting down"):
        await manager.acquire("a")
    assert FakeWorker.instances == []


# -- rules a mutation check found unpinned (scripts/mutation.sh manager) ---------------------------


class GraceWorker(FakeWorker):
    """A FakeWorker that records the grace each stop gets."""

    graces: list[float] = []

    async def stop(self, grace: float) -> None:
        GraceWorker.graces.append(grace)
        self.stopped = True


async def test_one_request_in_flight_holds_off_the_idle_timer() -> None:
    manager, clock = make(model("a", keep_alive=0, parallel=2))
    first = await manager.acquire("a")
    lease = await manager.acquire("a")  # two overlapping requests (streams)
    first.release()
    clock.advance(100)
    await settle()
    assert state(manager, "a") == "ready"  # keep_alive 0 unloads only once the last request is done
    lease.release()
    lease.release()  # idempotent: a second release counts nothing
    await settle()
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_a_keep_alive_under_a_second_is_a_timer_not_an_unload() -> None:
    manager, clock = make(model("a", keep_alive=0.5))
    (await manager.acquire("a")).release()
    await settle()
    assert state(manager, "a") == "ready"
    clock.advance(0.6)
    await settle()
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_status_reports_each_model() -> None:
    manager, clock = make(model("a", keep_alive=60), model("b", keep_alive=30))
    lease = await manager.acquire("a")
    worker = FakeWorker.instances[0]
    [a, b] = list(manager.status())
    assert (a.name, a.backend, a.state, a.pid, a.in_flight, a.keep_alive) == (
        "a",
        "external",
        "ready",
        worker.pid,
        1,
        60,
    )
    assert a.loaded_at == clock.time() and a.config.name == "a" and a.last_error is None
    assert a.expires_at == clock.time() + 60  # busy: the full keep_alive once it is done
    assert (b.state, b.pid, b.in_flight, b.expires_at, b.loaded_at, b.rss_bytes) == (
        "stopped",
        None,
        0,
        None,
        None,
        None,
    )
    lease.release()
    clock.advance(20)
    [a, _] = list(manager.status())
    assert a.in_flight == 0 and a.expires_at == clock.time() + 40  # idle 20 s of its 60
    probe = manager.probe
    assert isinstance(probe, FakeProbe)
    probe.rss_of[worker.pid] = 123 << 20  # what the memory probe reads for the worker's process tree
    [a, _] = list(manager.status())
    assert a.rss_bytes == 123 << 20
    await manager.shutdown()


async def test_a_forever_model_never_expires() -> None:
    manager, _ = make(model("a", keep_alive=-1))
    (await manager.acquire("a", keep_alive=math.inf)).release()
    assert next(iter(manager.status())).expires_at == math.inf
    await manager.shutdown()


async def test_stops_get_the_configured_grace_and_a_crashed_worker_none() -> None:
    GraceWorker.graces = []
    manager, _ = make(model("a", unload_grace=7.0), factory=GraceWorker)
    (await manager.acquire("a")).release()
    assert await manager.unload("a")
    (await manager.acquire("a")).release()
    worker = FakeWorker.instances[-1]
    worker.returncode = 1
    worker.on_exit(worker)  # it crashed: reaped without a grace
    await settle()
    assert GraceWorker.graces == [7.0, 0]
    assert state(manager, "a") == "stopped" and manager.status().__next__().loaded_at is None
    await manager.shutdown()


async def test_unload_while_starting_waits_for_the_start_then_stops() -> None:
    manager, _ = make(model("a"), factory=held)
    task = asyncio.create_task(manager.acquire("a"))
    await settle()
    unload = asyncio.create_task(manager.unload("a"))
    await settle()
    assert not unload.done() and state(manager, "a") == "starting"
    FakeWorker.instances[0].gate.set()
    (await task).release()
    assert await unload is True
    assert state(manager, "a") == "stopped" and FakeWorker.instances[0].stopped
    assert await manager.unload("a") is False  # nothing loaded
    await manager.shutdown()


async def test_unload_of_a_failing_start_reports_nothing_unloaded() -> None:
    manager, _ = make(model("a"), factory=failing)
    task = asyncio.create_task(manager.acquire("a"))
    await settle()
    unload = asyncio.create_task(manager.unload("a"))
    await settle()
    FakeWorker.instances[0].gate.set()
    assert await unload is False
    with pytest.raises(ModelLoadFailed):
        await task
    await manager.shutdown()


class SlowStop(FakeWorker):
    """Its stop ends when the test sets ``release_stop`` (a fresh Event per test)."""

    release_stop = asyncio.Event()

    async def stop(self, grace: float) -> None:
        await SlowStop.release_stop.wait()
        self.stopped = True


async def test_two_unloads_of_one_model_both_wait_for_the_stop() -> None:
    SlowStop.release_stop = asyncio.Event()
    manager, _ = make(model("a"), factory=SlowStop)
    (await manager.acquire("a")).release()
    first = asyncio.create_task(manager.unload("a"))
    await settle()
    second = asyncio.create_task(manager.unload("a"))
    await settle()
    assert state(manager, "a") == "stopping" and not first.done() and not second.done()
    SlowStop.release_stop.set()
    assert await first is True and await second is True
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_a_lease_refuses_new_requests_while_its_model_drains_for_unload() -> None:
    manager, _ = make(model("a"))
    lease = await manager.acquire("a")
    unload = asyncio.create_task(manager.unload("a"))
    await settle()
    late = asyncio.create_task(manager.acquire("a"))  # waits: the model is draining, not taken over
    await settle()
    assert not unload.done() and not late.done()
    lease.release()
    assert await unload is True
    (await asyncio.wait_for(late, 5)).release()  # then started again for the late request
    assert state(manager, "a") == "ready" and len(FakeWorker.instances) == 2
    await manager.shutdown()


async def test_unload_all_preload_and_is_loaded() -> None:
    manager, clock = make(model("a", keep_alive=10), model("b"), model("c"))
    lease = await manager.preload("a")
    assert lease.released and manager.is_loaded("a") and not manager.is_loaded("b")
    (await manager.preload("b", keep_alive=0)).release()
    await settle()
    assert not manager.is_loaded("b")
    clock.advance(10.1)  # preload left a's idle timer running with its keep_alive
    await settle()
    assert not manager.is_loaded("a")
    (await manager.preload("a")).release()
    (await manager.preload("c")).release()
    assert sorted(await manager.unload_all()) == ["a", "c"]
    assert await manager.unload_all() == []
    await manager.shutdown()


async def test_worker_reports_come_from_ready_workers_that_answer() -> None:
    class Reporting:
        def __init__(self, report: dict[str, Any] | None) -> None:
            self.report = report
            self.paths: list[str] = []

        async def health_report(self, path: str = "/health") -> dict[str, Any] | None:
            self.paths.append(path)
            return self.report

    manager, _ = make(model("a", health_path="/status"), model("b"), model("c"))
    (await manager.acquire("a")).release()
    (await manager.acquire("b")).release()
    a_up, b_up = Reporting({"state": "busy"}), Reporting(None)
    FakeWorker.instances[0].upstream = a_up  # type: ignore[assignment]
    FakeWorker.instances[1].upstream = b_up  # type: ignore[assignment]
    assert await manager.worker_reports() == {"a": {"state": "busy"}}  # b cannot say; c is not loaded
    assert a_up.paths == ["/status"]
    await manager.shutdown()


async def test_lease_load_duration_is_the_time_the_start_took() -> None:
    manager, clock = make(model("a"), factory=held)
    task = asyncio.create_task(manager.acquire("a"))
    await settle()
    clock.advance(3)
    FakeWorker.instances[0].gate.set()
    lease = await task
    assert lease.load_duration == 3
    lease.release()
    await manager.shutdown()


async def test_the_log_tells_each_step(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.manager")
    manager, clock = make(model("a", keep_alive=10), model("b"))
    (await manager.acquire("a")).release()
    clock.advance(11)
    await settle()
    (await manager.acquire("b", keep_alive=0)).release()
    await settle()
    (await manager.acquire("a")).release()
    await manager.unload("a")
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.manager"]
    for expected in (
        "model a: starting",
        "model a: stopped -> starting (requested)",
        "model a: keep_alive of 10s ran out; unloading",
        "model a: ready -> stopping (keep_alive ran out)",
        "model a: stopping -> stopped (the worker is stopped)",
        "model a: stopped",
        "model b: ready -> stopping (keep_alive is 0)",
        "model a: ready -> stopping (unload)",
    ):
        assert expected in lines, (expected, lines)
    await manager.shutdown()


async def test_model_names_with_and_without_the_latest_tag() -> None:
    manager, _ = make(model("plain"), model("tagged:latest"), model("other:7b"))
    assert manager.is_loaded("plain:latest") is False  # "plain:latest" is "plain"
    (await manager.acquire("plain:latest")).release()
    (await manager.acquire("tagged")).release()  # "tagged" is "tagged:latest"
    assert manager.is_loaded("plain") and manager.is_loaded("tagged:latest")
    for wrong in ("other", "other:latest", "plain:7b", "tagged:7b", "", 5, None):
        with pytest.raises(ModelNotFound) as info:
            manager.is_loaded(wrong)  # type: ignore[arg-type]
        assert info.value.message == f"model '{wrong}' not found"
    await manager.shutdown()


# -- the queue: parallel slots, batches by model, the bound on a switch's wait ------------------------------


async def test_the_request_past_the_parallel_slots_waits_for_one_to_finish() -> None:
    manager, _ = make(model("a", parallel=2), max_queue=1)
    first, second = await manager.acquire("a"), await manager.acquire("a")
    third = asyncio.create_task(manager.acquire("a"))
    await settle()
    assert not third.done() and manager.queued == 1
    with pytest.raises(QueueFull) as info:  # max_queue bounds the requests waiting for a slot too
        await manager.acquire("a")
    assert info.value.headers()["Retry-After"]
    first.release()
    lease = await asyncio.wait_for(third, 5)
    assert manager.queued == 0
    lease.release()
    second.release()
    await manager.shutdown()


async def test_waiting_requests_for_the_loaded_model_go_before_a_switch() -> None:
    manager, clock = make(model("a"), model("b"), max_loaded=1)
    busy = await manager.acquire("a")
    clock.advance(1)
    for_b = asyncio.create_task(manager.acquire("b"))
    await settle()
    clock.advance(1)
    more_a = [asyncio.create_task(manager.acquire("a")) for _ in range(3)]  # later, but within the bound
    await settle()
    busy.release()
    for task in more_a:  # a's batch, one slot at a time, before b's switch
        lease = await asyncio.wait_for(task, 5)
        assert state(manager, "a") == "ready" and not for_b.done()
        lease.release()
    lease = await asyncio.wait_for(for_b, 5)
    assert state(manager, "a") == "stopped" and len(FakeWorker.instances) == 2  # one switch, not three
    lease.release()
    await manager.shutdown()


async def test_a_steady_stream_for_a_loaded_model_cannot_keep_another_waiting_past_the_bound() -> None:
    manager, clock = make(model("a"), model("b"), max_loaded=1)
    bound = manager.settings.max_wait_for_switch
    lease = await manager.acquire("a")
    for_b = asyncio.create_task(manager.acquire("b"))
    await settle()
    waited = 0.0
    stream = []
    while not for_b.done() and waited <= bound + 1:  # a fresh request for a before each one ends
        stream.append(asyncio.create_task(manager.acquire("a")))
        clock.advance(1)
        waited += 1
        await settle()
        lease.release()
        await settle()
        nxt = [t for t in stream if t.done()]
        if not nxt:
            break
        lease = nxt[-1].result()
        stream.remove(nxt[-1])
    assert waited <= bound + 1
    b_lease = await asyncio.wait_for(for_b, 5)
    assert state(manager, "b") == "ready" and state(manager, "a") == "stopped"
    b_lease.release()
    for task in stream:  # a's later requests are served after b's batch
        (await asyncio.wait_for(task, 5)).release()
    await manager.shutdown()


async def test_when_every_waiting_request_is_past_the_bound_each_switch_serves_a_batch() -> None:
    """Requests for two models with room for one, all waiting past max_wait_for_switch: each switch serves
    every request that waited for its model, not one per load (the soak's thrash: one switch per request)."""
    manager, clock = make(model("a"), model("b"), max_loaded=1)
    busy = await manager.acquire("a")
    waiting: dict[asyncio.Task[Any], str] = {}
    for _ in range(4):  # a, b, a, b, ...: arrival order alone would switch at every request
        for name in ("a", "b"):
            waiting[asyncio.create_task(manager.acquire(name))] = name
            await settle()
            clock.advance(0.1)
    clock.advance(manager.settings.max_wait_for_switch + 1)  # every one of them is past the bound
    await settle()
    busy.release()
    served = []
    while waiting:
        done, _ = await asyncio.wait(set(waiting), return_when=asyncio.FIRST_COMPLETED, timeout=5)
        assert len(done) == 1  # one slot: one at a time
        task = done.pop()
        served.append(waiting.pop(task))
        task.result().release()
        await settle()
    assert served == ["a", "b", "b", "b", "b", "a", "a", "a"]  # a's first (it came before b's), then batches
    assert len(FakeWorker.instances) == 3  # two switches
    await manager.shutdown()


@pytest.mark.parametrize(("b_priority", "first"), [(1, "b"), (0, "a")])
async def test_priority_orders_requests_that_came_together(b_priority: int, first: str) -> None:
    manager, clock = make(model("a"), model("b", priority=b_priority), max_loaded=1)
    busy = await manager.acquire("a")
    for_a = asyncio.create_task(manager.acquire("a"))  # same moment; a's came first
    for_b = asyncio.create_task(manager.acquire("b"))
    await settle()
    clock.advance(manager.settings.max_wait_for_switch + 1)  # b's request is past the bound
    await settle()
    busy.release()
    done, _ = await asyncio.wait({for_a, for_b}, return_when=asyncio.FIRST_COMPLETED, timeout=5)
    assert [t is for_b for t in done] == [first == "b"]
    (await asyncio.wait_for(next(iter(done)), 5)).release()
    for task in {for_a, for_b} - done:  # the other one is served after
        (await asyncio.wait_for(task, 5)).release()
    await manager.shutdown()


async def test_on_loading_is_said_once_while_the_model_starts_and_progress_shows_in_status() -> None:
    manager, _ = make(model("a"), factory=held)
    said: list[str] = []
    task = asyncio.create_task(manager.acquire("a", on_loading=lambda: said.append("loading")))
    await settle()
    assert said == ["loading"]
    assert manager.queued == 1  # it holds its place: no 503 for a full queue can follow its early answer
    worker = FakeWorker.instances[0]
    assert worker.on_progress is not None
    seen = manager.events.subscribe()
    worker.on_progress(0.4, "loading weights")
    (status,) = manager.status()
    assert (status.state, status.progress, status.phase) == ("starting", 0.4, "loading weights")
    (event,) = seen.get_nowait()  # the page and /status/events show it
    assert isinstance(event, LoadProgress)
    assert (event.model, event.progress, event.detail) == ("a", 0.4, "loading weights")
    assert manager.loading("a") == (0.4, "loading weights")
    worker.gate.set()
    (await task).release()
    (status,) = manager.status()
    assert (status.progress, status.phase, manager.loading("a")) == (None, None, None)
    lease = await manager.acquire("a", on_loading=lambda: said.append("again"))  # loaded: no load to wait for
    lease.release()
    assert said == ["loading"]
    await manager.shutdown()


async def test_on_loading_is_not_said_when_the_queue_is_full() -> None:
    manager, _ = make(model("a"), factory=held, max_queue=0)
    said: list[str] = []
    task = asyncio.create_task(manager.acquire("a", on_loading=lambda: said.append("loading")))
    await settle()
    assert said == []  # it waits without an early answer, so a refusal later can still be a status
    FakeWorker.instances[0].gate.set()
    (await task).release()
    await manager.shutdown()


async def test_a_removed_model_whose_worker_crashed_under_its_requests_is_forgotten_when_they_end() -> None:
    # issue 25, defect 9b: it stayed in /status for ever
    manager, _ = make(model("a", parallel=2), model("b"))
    first, second = await manager.acquire("a"), await manager.acquire("a")
    manager.replace_models([model("b")])  # a is retired: it finishes what it has
    FakeWorker.instances[0].kill("crashed")  # ... but its worker dies under both requests
    assert state(manager, "a") == "stopped"
    first.release()
    assert "a" in {s.name for s in manager.status()}  # one request still holds it
    second.release()
    assert {s.name for s in manager.status()} == {"b"}
    with pytest.raises(ModelNotFound):
        manager.resolve("a")
    await manager.shutdown()
