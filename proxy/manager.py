"""ModelManager: the one owner of model state.

Every decision (start, reuse, evict, unload) is taken here, in synchronous code between awaits, so
it is serial on the event loop without a lock. Request handlers ask for a ``Lease`` and release
it in one ``finally``; they never read-then-act on state themselves.

States per model: stopped -> starting -> ready -> stopping -> stopped, and failed (with the
reason; retried on a later request after a backoff). ``TRANSITIONS`` lists every move allowed;
each one goes through ``ModelManager._transition``, which refuses the others.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy.clock import Clock, SystemClock, Timer
from proxy.config import ModelConfig, Settings
from proxy.errors import ModelLoadFailed, ModelNotFound, ProxyError, QueueFull, Unavailable
from proxy.policy import Candidate, backoff, choose_victim
from proxy.supervisor import Worker
from proxy.upstream import Upstream

log = logging.getLogger("proxy.manager")

_STALL_CHECKS = 4  # progress checks per stall_timeout (at most every _STALL_CHECK_MAX seconds)
_STALL_CHECK_MAX = 5.0
_MIN_CPU_SHARE = 0.01  # less CPU than this share of one core between two checks is "no progress"


class WorkerHandle(Protocol):
    """What the manager uses of a worker: ``supervisor.Worker``, or a test's fake."""

    @property
    def pid(self) -> int | None: ...

    @property
    def upstream(self) -> Upstream | None: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def kill_reason(self) -> str | None: ...

    def log_tail(self) -> str: ...

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...

    def kill(self, reason: str) -> None: ...

    def kill_sync(self) -> None: ...

    def cpu_seconds(self) -> float | None: ...


# (config, runtime dir, on_exit) -> a worker not yet started; on_exit is called when it exits on its own
WorkerFactory = Callable[[ModelConfig, Path, Callable[[WorkerHandle], None]], WorkerHandle]


class State(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# llama-swap's isValidTransition: the moves each state may make, and why it makes them.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),  # a request
    State.STARTING: frozenset(
        {
            State.READY,  # the worker is up
            State.FAILED,  # its start failed
            State.STOPPED,  # its start was cancelled (shutdown) or raised something unforeseen
            State.STOPPING,  # shutdown cancelled its start before it ran: the worker is stopped anyway
        }
    ),
    State.READY: frozenset(
        {
            State.STOPPING,  # keep_alive ran out, eviction, unload, shutdown
            State.STOPPED,  # the worker exited on its own (a crash, the stall watchdog)
        }
    ),
    State.STOPPING: frozenset({State.STOPPED}),
    State.FAILED: frozenset({State.STARTING}),  # a request after the backoff
}


class InvalidTransition(AssertionError):
    """A state change ``TRANSITIONS`` does not allow: a bug in the manager, never a client's error."""


class Runtime:
    """What the manager knows of one model. Only the manager writes it."""

    def __init__(self, config: ModelConfig, keep_alive: float) -> None:
        self.config = config
        self.default_keep_alive = keep_alive
        self.state = State.STOPPED
        self.worker: WorkerHandle | None = None
        self.in_flight = 0
        self.waiters = 0
        self.keep_alive = keep_alive
        self.last_used = 0.0
        self.idle_deadline: float | None = None
        self.idle_timer: Timer | None = None
        self.start_task: asyncio.Task[None] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.draining = False
        self.evicting_for: Runtime | None = None
        self.last_error: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.loaded_at: float | None = None  # wall clock
        self.load_duration = 0.0
        self.watchdog: Timer | None = None

    @property
    def occupies_slot(self) -> bool:
        local = self.config.url is None
        return local and self.state in (State.STARTING, State.READY, State.STOPPING)


@dataclass(frozen=True)
class ModelStatus:
    name: str
    backend: str
    state: str
    pid: int | None
    in_flight: int
    keep_alive: float
    expires_at: float | None  # wall clock; math.inf for never
    loaded_at: float | None
    last_error: str | None
    rss_bytes: int | None
    config: ModelConfig


class Lease:
    """The right to send requests to a ready model, until ``release`` (idempotent)."""

    def __init__(self, manager: ModelManager, runtime: Runtime, worker: WorkerHandle, load_duration: float) -> None:
        self._manager = manager
        self._runtime = runtime
        self.worker = worker
        self.load_duration = load_duration
        self.released = False

    @property
    def config(self) -> ModelConfig:
        return self._runtime.config

    @property
    def upstream(self) -> Upstream:
        assert self.worker.upstream is not None  # a ready worker always has one
        return self.worker.upstream

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._manager._release(self._runtime)


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        worker_factory: WorkerFactory | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self._factory: WorkerFactory = worker_factory or Worker
        self._runtimes: dict[str, Runtime] = {}
        self._names: dict[str, Runtime] = {}
        for cfg in settings.models:
            keep_alive = cfg.keep_alive if cfg.keep_alive is not None else settings.keep_alive
            rt = Runtime(cfg, keep_alive)
            self._runtimes[cfg.name] = rt
            for name in (cfg.name, *cfg.aliases):
                self._names[name] = rt
        self._changed = asyncio.Event()
        self._queued = 0
        self._shutting_down = False
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="llm-proxy-"))
        atexit.register(self._kill_all_sync)

    # -- lookup -----------------------------------------------------------------------------
    def resolve(self, name: object) -> ModelConfig:
        return self._runtime(name).config

    def _runtime(self, name: object) -> Runtime:
        if not isinstance(name, str) or not name:
            raise ModelNotFound(str(name))
        rt = self._names.get(name)
        if rt is None and name.endswith(":latest"):
            rt = self._names.get(name[: -len(":latest")])
        if rt is None and ":" not in name:
            rt = self._names.get(f"{name}:latest")
        if rt is None:
            raise ModelNotFound(name)
        return rt

    @property
    def configs(self) -> list[ModelConfig]:
        return [rt.config for rt in self._runtimes.values()]

    # -- change notification ----------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- acquire / release ------------------------------------------------------------------
    def _apply_keep_alive(self, rt: Runtime, keep_alive: float | None) -> None:
        if keep_alive is not None and not rt.config.pin_keep_alive:
            rt.keep_alive = keep_alive

    async def acquire(self, name: str, keep_alive: float | None = None) -> Lease:
        """Wait until the model is ready (starting it, making room) and lease it."""
        rt = self._runtime(name)
        if self._shutting_down:
            raise Unavailable("the proxy is shutting down", retry_after=5)
        self._apply_keep_alive(rt, keep_alive)
        started = self.clock.monotonic()
        waited_for_start = False
        queued = False
        lease: Lease | None = None
        rt.waiters += 1
        try:
            while True:
                if rt.state is State.READY and not rt.draining and rt.worker is not None:
                    self._cancel_idle(rt)
                    rt.in_flight += 1
                    rt.last_used = self.clock.monotonic()
                    load = self.clock.monotonic() - started if waited_for_start else 0.0
                    lease = Lease(self, rt, rt.worker, load)
                    return lease
                if rt.state is State.STARTING and rt.start_task is not None:
                    waited_for_start = True
                    await asyncio.shield(rt.start_task)
                    continue
                if rt.state in (State.STOPPED, State.FAILED) and not rt.draining:
                    if rt.state is State.FAILED and self.clock.monotonic() < rt.retry_at:
                        raise ModelLoadFailed(
                            rt.last_error or "the model failed to load",
                            retry_after=rt.retry_at - self.clock.monotonic(),
                        )
                    if self._has_room() or rt.config.url is not None:
                        self._begin_start(rt)
                        continue
                    if not any(v.evicting_for is rt for v in self._runtimes.values()):
                        victim = self._victim()
                        if victim is not None:
                            victim.evicting_for = rt
                            log.info("unloading %s to make room for %s", victim.config.name, rt.config.name)
                            self._begin_stop(victim, f"evicted for {rt.config.name}")
                    if not queued:
                        if self._queued >= self.settings.max_queue:
                            raise QueueFull(
                                f"{self._queued} requests are already waiting for a model slot; try again later",
                                retry_after=5,
                            )
                        queued = True
                        self._queued += 1
                await self._changed.wait()
        finally:
            rt.waiters -= 1
            if queued:
                self._queued -= 1
            if lease is None:
                self._maybe_idle(rt)

    def _release(self, rt: Runtime) -> None:
        rt.in_flight -= 1
        rt.last_used = self.clock.monotonic()
        self._maybe_idle(rt)
        self._notify()

    def _has_room(self) -> bool:
        used = sum(1 for rt in self._runtimes.values() if rt.occupies_slot)
        return used < self.settings.max_loaded_models

    def _victim(self) -> Runtime | None:
        candidates = [
            Candidate(rt.config.name, rt.keep_alive, rt.last_used, busy=rt.in_flight > 0 or rt.waiters > 0)
            for rt in self._runtimes.values()
            if rt.state is State.READY and rt.config.url is None and not rt.draining
        ]
        name = choose_victim(candidates)
        return self._runtimes[name] if name is not None else None

    # -- idle timers ------------------------------------------------------------------------
    def _cancel_idle(self, rt: Runtime) -> None:
        if rt.idle_timer is not None:
            rt.idle_timer.cancel()
        rt.idle_timer = None
        rt.idle_deadline = None

    def _maybe_idle(self, rt: Runtime) -> None:
        """Start the idle timer when nothing is in flight or waiting (DESIGN.md's rule)."""
        if rt.state is not State.READY or rt.in_flight > 0 or rt.waiters > 0 or rt.draining:
            return
        self._cancel_idle(rt)
        if rt.keep_alive <= 0:
            self._begin_stop(rt, "keep_alive is 0")
        elif not math.isinf(rt.keep_alive):
            rt.idle_deadline = self.clock.monotonic() + rt.keep_alive
            rt.idle_timer = self.clock.call_later(rt.keep_alive, lambda: self._expire(rt))

    def _expire(self, rt: Runtime) -> None:
        rt.idle_timer = None
        if rt.state is State.READY and rt.in_flight == 0 and rt.waiters == 0:
            log.info("model %s: keep_alive of %gs ran out; unloading", rt.config.name, rt.keep_alive)
            self._begin_stop(rt, "keep_alive ran out")

    # -- state ------------------------------------------------------------------------------
    def _transition(self, rt: Runtime, new: State, reason: str) -> None:
        """The one place a model's state changes."""
        if new not in TRANSITIONS[rt.state]:
            raise InvalidTransition(f"model {rt.config.name}: {rt.state} -> {new} is not allowed ({reason})")
        log.debug("model %s: %s -> %s (%s)", rt.config.name, rt.state, new, reason)
        rt.state = new

    # -- start / stop -----------------------------------------------------------------------
    def _begin_start(self, rt: Runtime) -> None:
        self._transition(rt, State.STARTING, "requested")
        rt.worker = self._factory(rt.config, self._runtime_dir, self._on_worker_exit)
        rt.start_task = asyncio.create_task(self._start(rt, rt.worker))
        rt.start_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._notify()

    async def _start(self, rt: Runtime, worker: WorkerHandle) -> None:
        began = self.clock.monotonic()
        log.info("model %s: starting", rt.config.name)
        try:
            await worker.start()
        except ProxyError as exc:
            self._transition(rt, State.FAILED, "its start failed")
            rt.worker = None
            rt.last_error = exc.message
            rt.failures += 1
            rt.retry_at = self.clock.monotonic() + backoff(rt.failures)
            log.error("model %s: failed to start: %s", rt.config.name, exc.message)
            self._notify()
            raise
        except BaseException as exc:
            self._transition(rt, State.STOPPED, f"its start ended with {type(exc).__name__}")
            rt.worker = None
            self._notify()
            raise
        self._transition(rt, State.READY, "the worker is up")
        rt.failures = 0
        rt.last_error = None
        rt.load_duration = self.clock.monotonic() - began
        rt.loaded_at = self.clock.time()
        rt.last_used = self.clock.monotonic()
        log.info("model %s: ready in %.2fs (pid %s)", rt.config.name, rt.load_duration, worker.pid)
        self._watch_progress(rt, worker)
        self._maybe_idle(rt)
        self._notify()

    # -- stall watchdog ---------------------------------------------------------------------
    def _watch_progress(self, rt: Runtime, worker: WorkerHandle) -> None:
        """Kill a worker that has requests in flight and makes no progress (uses no CPU) for
        ``stall_timeout``: a deadlock or a hung abort would otherwise hold its requests for ever.
        Its exit then takes the crash path: in-flight requests get an explicit error."""
        limit = self.settings.stall_timeout
        last = worker.cpu_seconds()
        if limit <= 0 or math.isinf(limit) or last is None:
            return  # off, or nothing here to measure (a server at a url)
        interval = min(_STALL_CHECK_MAX, limit / _STALL_CHECKS)
        quiet = 0.0

        def check() -> None:
            nonlocal last, quiet
            rt.watchdog = None
            if rt.worker is not worker or rt.state is not State.READY:
                return
            cpu = worker.cpu_seconds()
            if cpu is None:
                return
            stalled = rt.in_flight > 0 and last is not None and cpu - last < interval * _MIN_CPU_SHARE
            quiet = quiet + interval if stalled else 0.0
            last = cpu
            if quiet >= limit:
                why = f"the worker made no progress for {quiet:g}s with {rt.in_flight} requests in flight; killed"
                log.warning("model %s: worker %s: %s", rt.config.name, worker.pid, why)
                worker.kill(why)
                return
            rt.watchdog = self.clock.call_later(interval, check)

        rt.watchdog = self.clock.call_later(interval, check)

    def _begin_stop(self, rt: Runtime, reason: str) -> asyncio.Task[None]:
        if rt.stop_task is not None:
            return rt.stop_task
        self._cancel_idle(rt)
        self._transition(rt, State.STOPPING, reason)
        rt.stop_task = asyncio.create_task(self._stop(rt, rt.worker))
        self._notify()
        return rt.stop_task

    async def _stop(self, rt: Runtime, worker: WorkerHandle | None) -> None:
        try:
            if worker is not None:
                await worker.stop(rt.config.unload_grace)
        finally:
            if rt.worker is worker:
                rt.worker = None
            self._transition(rt, State.STOPPED, "the worker is stopped")
            rt.stop_task = None
            rt.evicting_for = None
            rt.loaded_at = None
            rt.keep_alive = rt.default_keep_alive  # the next load is a first load again
            log.info("model %s: stopped", rt.config.name)
            self._notify()

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        for rt in self._runtimes.values():
            if rt.worker is worker and rt.state is State.READY:
                why = worker.kill_reason or f"the worker exited unexpectedly with code {worker.returncode}"
                rt.last_error = f"{why}; its log ends:\n{worker.log_tail()}"
                self._cancel_idle(rt)
                rt.worker = None
                self._transition(rt, State.STOPPED, why)
                rt.loaded_at = None
                rt.keep_alive = rt.default_keep_alive
                asyncio.get_running_loop().create_task(worker.stop(0))  # reap, close its client
                self._notify()

    # -- by hand ----------------------------------------------------------------------------
    async def unload(self, name: str) -> bool:
        """Wait for in-flight requests, then stop the worker. False when nothing was loaded."""
        rt = self._runtime(name)
        if rt.state is State.STARTING and rt.start_task is not None:
            with contextlib.suppress(ProxyError):
                await asyncio.shield(rt.start_task)
        if rt.state not in (State.READY, State.STOPPING):
            return False
        rt.draining = True
        self._notify()
        try:
            while rt.in_flight > 0 and rt.state is State.READY:
                await self._changed.wait()
            task = rt.stop_task if rt.state is State.STOPPING else None
            if rt.state is State.READY:
                task = self._begin_stop(rt, "unload")
            if task is not None:
                await asyncio.shield(task)
        finally:
            rt.draining = False
            self._notify()
        return True

    async def unload_all(self) -> list[str]:
        names = [rt.config.name for rt in self._runtimes.values() if rt.state in (State.READY, State.STARTING)]
        results = await asyncio.gather(*(self.unload(n) for n in names))
        return [n for n, done in zip(names, results, strict=True) if done]

    async def preload(self, name: str, keep_alive: float | None = None) -> Lease:
        lease = await self.acquire(name, keep_alive)
        lease.release()
        return lease

    async def shutdown(self) -> None:
        self._shutting_down = True  # no new leases: a start now would race the stops below
        for rt in self._runtimes.values():
            self._cancel_idle(rt)
        starting = [rt.start_task for rt in self._runtimes.values() if rt.start_task and not rt.start_task.done()]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        stops = [self._begin_stop(rt, "shutdown") for rt in self._runtimes.values() if rt.worker is not None]
        await asyncio.gather(*stops, return_exceptions=True)
        with contextlib.suppress(OSError):
            for path in self._runtime_dir.iterdir():
                path.unlink()
            self._runtime_dir.rmdir()
        atexit.unregister(self._kill_all_sync)

    def _kill_all_sync(self) -> None:
        for rt in self._runtimes.values():
            if rt.worker is not None:
                rt.worker.kill_sync()

    # -- status ------------------------------------------------------------------------------
    def _expires_at(self, rt: Runtime) -> float | None:
        if rt.state is not State.READY:
            return None
        if math.isinf(rt.keep_alive):
            return math.inf
        now_mono, now_wall = self.clock.monotonic(), self.clock.time()
        deadline = rt.idle_deadline if rt.idle_deadline is not None else now_mono + rt.keep_alive
        return now_wall + (deadline - now_mono)

    def status(self) -> Iterator[ModelStatus]:
        for rt in self._runtimes.values():
            worker = rt.worker
            yield ModelStatus(
                name=rt.config.name,
                backend=rt.config.backend,
                state=rt.state.value,
                pid=worker.pid if worker is not None else None,
                in_flight=rt.in_flight,
                keep_alive=rt.keep_alive,
                expires_at=self._expires_at(rt),
                loaded_at=rt.loaded_at,
                last_error=rt.last_error,
                rss_bytes=_rss(worker.pid) if worker is not None and worker.pid else None,
                config=rt.config,
            )

    async def worker_reports(self) -> dict[str, dict[str, Any]]:
        """Each ready worker's own /health (progress of a running job, device, ...), asked at once."""
        ready = [
            rt
            for rt in self._runtimes.values()
            if rt.state is State.READY and rt.worker is not None and rt.worker.upstream is not None
        ]

        async def ask(rt: Runtime) -> dict[str, Any] | None:
            assert rt.worker is not None and rt.worker.upstream is not None
            return await rt.worker.upstream.health_report(rt.config.health_path)

        reports = await asyncio.gather(*(ask(rt) for rt in ready))
        return {rt.config.name: r for rt, r in zip(ready, reports, strict=True) if r is not None}

    def is_loaded(self, name: str) -> bool:
        return self._runtime(name).state is State.READY

    @property
    def queued(self) -> int:
        return self._queued


def _rss(pid: int) -> int | None:
    """Resident memory of a worker and its children (psutil; None when it is gone)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs)
    except psutil.Error:
        return None
