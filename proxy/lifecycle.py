"""Start and stop of a model's worker, on its ``Runtime``: the load (with one retry after running out of
memory), the stop (SIGTERM, grace, SIGKILL), a worker that exits on its own, and the stall watchdog put on a
ready worker; the idle timer that unloads it when its keep_alive runs out. The manager decides; this carries
out its starts and stops, and changes state only through the manager (``Host._transition``)."""

from __future__ import annotations

import asyncio
import logging
import math
from pathlib import Path
from typing import Protocol

from proxy.admission import Decision
from proxy.clock import Clock
from proxy.config import Settings
from proxy.errors import ModelLoadFailed, ProxyError
from proxy.events import EventBus, LoadEnded, LoadProgress, LoadStarted, Unloaded, UnloadReason
from proxy.memory import Need
from proxy.policy import backoff
from proxy.runtime import Runtime, State, WorkerFactory, WorkerHandle, out_of_memory
from proxy.scheduler import RECOVERY_POLL
from proxy.watchdog import Activity, StallWatch

log = logging.getLogger("proxy.manager")  # its lines are the manager's, as before the split


class Host(Protocol):
    """What the lifecycle uses of its manager (``ModelManager``), which owns the runtimes and their states."""

    settings: Settings
    clock: Clock
    events: EventBus
    _runtimes: dict[str, Runtime]

    def _transition(self, rt: Runtime, new: State, reason: str) -> None: ...

    def _notify(self) -> None: ...

    def _decide(self, rt: Runtime, need: Need | None = None) -> Decision: ...

    async def _wait(self, seconds: float) -> None: ...

    def _measure(self, rt: Runtime, worker: WorkerHandle) -> None: ...

    def _forget_or_stop(self, rt: Runtime) -> None: ...

    def _replenish_spare(self, rt: Runtime) -> None: ...


class Lifecycle:
    """Starts and stops workers for ``host``'s runtimes."""

    def __init__(self, host: Host, factory: WorkerFactory, runtime_dir: Path) -> None:
        self.host = host
        self._factory = factory
        self._runtime_dir = runtime_dir
        self.stopped_at = -math.inf  # when a worker last stopped (its memory may not be back yet)

    # -- idle timers (keep_alive) ------------------------------------------------------------------------
    def cancel_idle(self, rt: Runtime) -> None:
        if rt.idle_timer is not None:
            rt.idle_timer.cancel()
        rt.idle_timer = None
        rt.idle_deadline = None

    def maybe_idle(self, rt: Runtime) -> None:
        """Start the idle timer when nothing is in flight or waiting (DESIGN.md's rule)."""
        if rt.state in (State.STOPPED, State.FAILED):
            # the last request on a worker that crashed under it: a model gone from the catalog goes now
            self.host._forget_or_stop(rt)
            return
        if rt.state is not State.READY or rt.in_flight > 0 or rt.waiters > 0 or rt.draining:
            return
        self.cancel_idle(rt)
        self.host._replenish_spare(rt)
        if rt.retired or rt.pending is not None:
            self.host._forget_or_stop(rt)
        elif rt.keep_alive <= 0:
            self.begin_stop(rt, "keep_alive is 0", UnloadReason.IDLE)
        elif not math.isinf(rt.keep_alive):
            rt.idle_deadline = self.host.clock.monotonic() + rt.keep_alive
            rt.idle_timer = self.host.clock.call_later(rt.keep_alive, lambda: self._expire(rt))

    def _expire(self, rt: Runtime) -> None:
        rt.idle_timer = None
        if rt.state is State.READY and rt.in_flight == 0 and rt.waiters == 0:
            log.info("model %s: keep_alive of %gs ran out; unloading", rt.config.name, rt.keep_alive)
            self.begin_stop(rt, "keep_alive ran out", UnloadReason.IDLE)

    def begin_start(self, rt: Runtime, gpu: int | None, split: tuple[tuple[int, int], ...] = ()) -> None:
        self.host._transition(rt, State.STARTING, "requested")
        rt.gpu, rt.split = gpu, split
        rt.peak = Need(0, 0, "measured")
        rt.progress, rt.phase = 0.0, "starting"
        rt.worker = self._new_worker(rt)
        rt.start_task = asyncio.create_task(self._start(rt, rt.worker))
        rt.start_task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.host._notify()

    def _new_worker(self, rt: Runtime) -> WorkerHandle:
        worker = self._factory(rt.placed, self._runtime_dir, self.on_worker_exit)
        worker.on_progress = lambda fraction, phase: self._on_progress(rt, worker, fraction, phase)
        return worker

    def _on_progress(self, rt: Runtime, worker: WorkerHandle, fraction: float, phase: str) -> None:
        """A starting worker's load progress (its progress lines): kept on the runtime for /status."""
        if rt.worker is worker and rt.state is State.STARTING:
            rt.progress, rt.phase = fraction, phase
            self.host.events.publish(LoadProgress(model=rt.config.name, progress=fraction, detail=phase))

    async def _start(self, rt: Runtime, worker: WorkerHandle) -> None:
        began = self.host.clock.monotonic()
        log.info("model %s: starting%s", rt.config.name, f" on cuda:{rt.gpu}" if rt.gpu is not None else "")
        self.host.events.publish(LoadStarted(model=rt.config.name))
        try:
            try:
                await worker.start()
            except ModelLoadFailed as exc:
                if not out_of_memory(worker, exc):
                    raise
                worker = await self._retry_after_oom(rt, exc)
        except ProxyError as exc:
            self.host._transition(rt, State.FAILED, "its start failed")
            rt.progress = rt.phase = None
            rt.worker = None
            rt.last_error = exc.message
            rt.failures += 1
            rt.retry_at = self.host.clock.monotonic() + backoff(rt.failures)
            log.error("model %s: failed to start: %s", rt.config.name, exc.message)
            self._load_ended(rt, began, exc.message)
            self.host._notify()
            raise
        except BaseException as exc:
            self.host._transition(rt, State.STOPPED, f"its start ended with {type(exc).__name__}")
            rt.progress = rt.phase = None
            rt.worker = None
            self._load_ended(rt, began, f"its start ended with {type(exc).__name__}")
            self.host._notify()
            raise
        self.host._transition(rt, State.READY, "the worker is up")
        for ticket in rt.tickets:
            ticket.batch = True
        rt.progress = rt.phase = None
        rt.failures = 0
        rt.last_error = None
        rt.load_duration = self.host.clock.monotonic() - began
        rt.loaded_at = self.host.clock.time()
        rt.last_used = self.host.clock.monotonic()
        log.info("model %s: ready in %.2fs (pid %s)", rt.config.name, rt.load_duration, worker.pid)
        self._load_ended(rt, began, None)
        self.host._measure(rt, worker)
        self._watch_progress(rt, worker)
        self.maybe_idle(rt)
        self.host._notify()

    def _load_ended(self, rt: Runtime, began: float, error: str | None) -> None:
        seconds = self.host.clock.monotonic() - began
        self.host.events.publish(LoadEnded(model=rt.config.name, seconds=seconds, ok=error is None, error=error))

    async def _retry_after_oom(self, rt: Runtime, exc: ModelLoadFailed) -> WorkerHandle:
        """A load that ran out of memory: unload every idle model, wait for the memory, try once more."""
        idle = [
            o
            for o in self.host._runtimes.values()
            if o is not rt and o.state is State.READY and o.config.url is None and o.in_flight == 0 and o.waiters == 0
        ]
        log.warning(
            "model %s: its worker ran out of memory while loading; unloading %s and trying once more",
            rt.config.name,
            ", ".join(o.config.name for o in idle) or "nothing (no idle model)",
        )
        await asyncio.gather(
            *(self.begin_stop(o, f"out of memory loading {rt.config.name}", UnloadReason.EVICTED) for o in idle)
        )
        deadline = self.host.clock.monotonic() + self.host.settings.memory.recovery_timeout
        while self.host._decide(rt).kind not in ("start", "refuse") and self.host.clock.monotonic() < deadline:
            await self.host._wait(RECOVERY_POLL)
        worker = self._new_worker(rt)
        rt.progress, rt.phase = 0.0, "starting again"
        rt.worker = worker
        try:
            await worker.start()
        except ModelLoadFailed as again:
            if rt.worker is worker:
                rt.worker = None
            oom = " (out of memory again, after unloading every idle model)" if out_of_memory(worker, again) else ""
            raise ModelLoadFailed(f"{again.message}{oom}", retry_after=again.retry_after) from exc
        return worker

    # -- stall watchdog (proxy.watchdog) -------------------------------------------------------
    def _watch_progress(self, rt: Runtime, worker: WorkerHandle) -> None:
        """Kill this worker when it has requests in flight and makes no progress for ``stall_timeout``
        (``StallWatch``), unless they wait on their clients' reading."""

        def activity() -> Activity | None:
            if rt.worker is not worker or rt.state is not State.READY:
                return None
            return Activity(rt.in_flight, rt.writing)

        rt.watchdog = StallWatch.start(
            self.host.clock, self.host.settings.stall_timeout, worker, rt.config.name, activity
        )

    def begin_stop(
        self, rt: Runtime, reason: str, cause: UnloadReason, grace: float | None = None
    ) -> asyncio.Task[None]:
        """Stop its worker: SIGTERM, ``grace`` (its ``unload_grace`` by default), then SIGKILL; ``cause`` is
        the unload event's reason."""
        if rt.stop_task is not None:
            return rt.stop_task
        self.cancel_idle(rt)
        if rt.measure_timer is not None and rt.worker is not None and rt.state is State.READY:
            self.host._measure(rt, rt.worker)  # a read put off at a release: now, while the worker is still there
        rt.stop_cause = cause
        self.host._transition(rt, State.STOPPING, reason)
        # the next load is a first load again: its keep_alive is the config's until a request is served
        rt.keep_alive, rt.keep_alive_set = rt.default_keep_alive, False
        rt.stop_task = asyncio.create_task(
            self._stop(rt, rt.worker, rt.config.unload_grace if grace is None else grace)
        )
        self.host._notify()
        return rt.stop_task

    async def _stop(self, rt: Runtime, worker: WorkerHandle | None, grace: float) -> None:
        try:
            if worker is not None:
                await worker.stop(grace)
        finally:
            if rt.worker is worker:
                rt.worker = None
            self.host._transition(rt, State.STOPPED, "the worker is stopped")
            if worker is not None:  # a start that never ran unloads nothing
                self.host.events.publish(Unloaded(model=rt.config.name, reason=rt.stop_cause))
            self.stopped_at = self.host.clock.monotonic()
            rt.need = rt.counted  # the next load starts from what this one measured
            rt.gpu, rt.split = None, ()
            rt.stop_task = None
            rt.loaded_at = None
            log.info("model %s: stopped", rt.config.name)
            self.host._forget_or_stop(rt)
            self.host._notify()

    def on_worker_exit(self, worker: WorkerHandle) -> None:
        for rt in self.host._runtimes.values():
            if rt.worker is worker and rt.state is State.READY:
                why = worker.kill_reason or f"the worker exited unexpectedly with code {worker.returncode}"
                rt.last_error = f"{why}; its log ends:\n{worker.log_tail()}"
                self.cancel_idle(rt)
                rt.worker = None
                self.host._transition(rt, State.STOPPED, why)
                self.host.events.publish(Unloaded(model=rt.config.name, reason=UnloadReason.CRASH, detail=why))
                self.stopped_at = self.host.clock.monotonic()
                rt.gpu, rt.split = None, ()
                rt.loaded_at = None
                rt.keep_alive, rt.keep_alive_set = rt.default_keep_alive, False
                asyncio.get_running_loop().create_task(worker.stop(0))  # reap, close its client
                self.host._forget_or_stop(rt)
                self.host._notify()
