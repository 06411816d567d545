"""ModelManager: the one owner of model state.

Every decision (start, reuse, evict, unload) is taken here, in synchronous code between awaits, so
it is serial on the event loop without a lock. Request handlers ask for a ``Lease`` and release
it in one ``finally``; they never read-then-act on state themselves.

States per model: stopped -> starting -> ready -> stopping -> stopped, and failed (with the
reason; retried on a later request after a backoff). ``TRANSITIONS`` (``proxy.runtime``) lists every
move allowed; each one goes through ``ModelManager._transition``, which refuses the others.

The manager owns the runtimes and decides; its helpers each have one concern: ``proxy.runtime`` (the state
data), ``proxy.registry`` (the catalog by name), ``proxy.lifecycle`` (starts, stops, idle timers),
``proxy.room`` (admission over the runtimes), ``proxy.status`` (what /status shows), ``proxy.needs``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy import room, status
from proxy import runtime_options as ropts
from proxy.admission import Decision, budgets
from proxy.clock import Clock, SystemClock, Timer
from proxy.config import ModelConfig, Settings
from proxy.errors import (
    InsufficientMemory,
    ModelLoadFailed,
    ProxyError,
    QueueFull,
    Unavailable,
)
from proxy.events import EventBus, StateChanged, UnloadReason
from proxy.lifecycle import Lifecycle
from proxy.memory import PROCESS_BASE, MemoryProbe, MemoryStore, Need, SystemProbe
from proxy.needs import Needs
from proxy.nvml import Nvml
from proxy.registry import Registry
from proxy.runtime import (
    TRANSITIONS,
    InvalidTransition,
    Runtime,
    State,
    WorkerFactory,
    WorkerHandle,
    view,
)
from proxy.runtime import (
    ModelStatus as ModelStatus,  # re-exported: the api routes import it from here
)
from proxy.scheduler import (
    Decide,
    Evict,
    FailBackoff,
    NeedFirst,
    Recover,
    Refuse,
    Reload,
    RestartForConfig,
    Serve,
    Start,
    Ticket,
    Wait,
    WaitForStart,
    World,
    kept_alive,
    next_move,
    shown,
)
from proxy.spares import HEADROOM, SpareKey, Spares
from proxy.supervisor import Worker, worker_env
from proxy.upstream import Upstream

log = logging.getLogger("proxy.manager")

# a loaded model's memory (RSS and VRAM of its worker's process tree) is read after its load, then at most once
# this many seconds after its requests (ModelManager._measure_after_request), not at every release
MEASURE_EVERY = 1.0


@dataclass
class _Place:
    """A request's place in the queue while it waits in ``acquire``."""

    on_loading: Callable[[], None] | None  # not yet called (``acquire``'s docstring)
    queued: bool = False  # counted against limits.max_queue
    bound: Timer | None = None  # wakes the queue when it becomes overdue (limits.max_wait_for_switch)
    waited_for_start: bool = False  # its lease's load_duration is then the time it waited


class Lease:
    """The right to send requests to a ready model, until ``release`` (idempotent)."""

    def __init__(self, manager: ModelManager, runtime: Runtime, worker: WorkerHandle, load_duration: float) -> None:
        self._manager = manager
        self._runtime = runtime
        self.worker = worker
        self.load_duration = load_duration
        self.released = False
        self._writing = False

    @property
    def config(self) -> ModelConfig:
        return self._runtime.effective

    @property
    def upstream(self) -> Upstream:
        assert self.worker.upstream is not None  # a ready worker always has one
        return self.worker.upstream

    def writing(self, pending: bool) -> None:
        """A send of its answer to its client is pending (True) or done (False): while one is, the client
        is not reading, and its worker waits on it rather than being stalled (``proxy.watchdog``)."""
        if self.released or pending == self._writing:
            return
        self._writing = pending
        self._runtime.writing += 1 if pending else -1

    def release(self) -> None:
        if not self.released:
            self.writing(False)
            self.released = True
            self._manager._release(self._runtime)


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        worker_factory: WorkerFactory | None = None,
        probe: MemoryProbe | None = None,
        store: MemoryStore | None = None,
        events: EventBus | None = None,
        spares: Spares | None = None,
    ) -> None:
        self.settings = settings
        self.spares = spares  # warm spare workers (proxy.spares), counted in admission; None: off
        self.events = events or EventBus()  # what happens to models is published here (proxy.events)
        self.clock = clock or SystemClock()
        self.probe: MemoryProbe = probe or SystemProbe(Nvml.open())
        # need-finding (proxy.needs): estimates, GGUF facts, measured peaks, the cache file
        self.needs = Needs(store or MemoryStore(settings.models_dir / ".cache" / "memory.json"), self.probe)
        # the catalog (proxy.registry); _runtimes is its dict of runtimes by name
        self.registry = Registry(settings.models, settings.keep_alive)
        self._runtimes = self.registry.runtimes
        self._changed = asyncio.Event()
        self._queued = 0
        self._seq = itertools.count()
        self._shutting_down = False
        self._runtime_dir = Path(tempfile.mkdtemp(prefix="llm-proxy-"))
        # starts and stops workers (proxy.lifecycle); state changes still go through _transition here
        self.lifecycle = Lifecycle(self, worker_factory or Worker, self._runtime_dir)
        atexit.register(self._kill_all_sync)

    @property
    def store(self) -> MemoryStore:
        """The cache file of GGUF facts and measured needs (``Needs.store``)."""
        return self.needs.store

    @store.setter
    def store(self, store: MemoryStore) -> None:
        self.needs.store = store

    # -- lookup -----------------------------------------------------------------------------
    def resolve(self, name: object) -> ModelConfig:
        """Its config; after a reload changed it, the new one (requests from then on wait for its restart)."""
        rt = self.registry.lookup(name)
        return rt.pending or rt.config

    @property
    def configs(self) -> list[ModelConfig]:
        return self.registry.configs

    @property
    def pending_configs(self) -> list[ModelConfig]:
        """The new configs of loaded models that restart with them when idle (a reload)."""
        return self.registry.pending_configs

    # -- the catalog (proxy.registry: start-up, rescans) -------------------------------------------
    def replace_models(self, configs: list[ModelConfig], settings: Settings | None = None) -> None:
        """A new catalog (a rescan, a config reload with its ``settings``: limits and defaults apply at
        once). A model still in it keeps its state: a stopped one takes its new config, a loaded one whose
        config changed keeps its worker until its requests in flight are done (later ones wait), then stops
        and takes it (the next request loads the new config); an unchanged one keeps its worker. A new one is
        added stopped; one no longer in it answers no new request, finishes what it has, unloads when idle and
        is then forgotten."""
        if settings is not None:
            self.settings = settings
            self.registry.keep_alive = settings.keep_alive
        self.registry.replace(configs, self._forget_or_stop, defaults=settings is not None)
        self._notify()

    def _forget_or_stop(self, rt: Runtime) -> None:
        """A retired model: forgotten when stopped and unused, stopped when loaded and idle. A changed one
        (``pending``): takes its new config once stopped, is stopped when loaded and idle."""
        if rt.pending is not None and rt.state in (State.STOPPED, State.FAILED):
            self.registry.renew(rt)
            return
        if not (rt.retired or rt.pending is not None) or rt.in_flight > 0 or rt.waiters > 0:
            return
        if rt.state in (State.STOPPED, State.FAILED):
            self.registry.forget(rt)
        elif rt.state is State.READY and not rt.draining:
            why = "no longer in the catalog" if rt.retired else "its config changed"
            self.lifecycle.begin_stop(rt, why, UnloadReason.CONFIG)

    def add_content_id(self, name: str, content_id: str) -> None:
        """Let ``content_id`` name the model ``name`` too (unless that name is taken)."""
        self.registry.add_content_id(name, content_id)

    # -- change notification ----------------------------------------------------------------
    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- acquire / release: the scheduler (proxy.scheduler) decides, the manager acts -----------
    async def acquire(
        self,
        name: str,
        keep_alive: float | None = None,
        on_loading: Callable[[], None] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        admin: bool = True,
    ) -> Lease:
        """Wait until the model is ready (starting it, making room) and one of its ``parallel`` slots is
        free in turn, and lease it.

        ``on_loading`` is called once, when the request is admitted and waits for its model's load (the
        model is starting and the request holds a place in the queue, so no 503 for a full queue can come
        after it): from then on the only failures are the load's own, or a shutdown (``proxy.loading``).

        ``options``: the request's runner options (``runtime_options.requested``). Those its config lists
        in ``runtime_options`` are honoured: a loaded model with other values finishes the requests that
        came before, then reloads with these (later requests wait behind it, in order); the rest are ignored.

        ``keep_alive`` is applied when the request is served (``scheduler.kept_alive``: ``admin`` is the
        caller's role; a user's never shortens what a caller set during this load).

        Each step: ``scheduler.next_move`` over the models as plain data, the move carried out here, then
        a wait for the next change."""
        rt = self.registry.lookup(name)
        wants, need = await self._wants(rt, options) if options else ({}, None)
        self._refuse_if_shutting_down()
        ticket = Ticket(
            rt.config.name, self.clock.monotonic(), next(self._seq), rt.config.priority, wants, need, keep_alive, admin
        )
        rt.tickets.append(ticket)
        rt.waiters += 1
        place = _Place(on_loading)
        lease: Lease | None = None
        try:
            if rt.config.url is None:
                await self.needs.ensure(rt)
                self._refuse_if_shutting_down()
            while lease is None:
                lease = await self._step(rt, ticket, place)
            return lease
        finally:
            self._leave(rt, ticket, place, leased=lease is not None)

    def _refuse_if_shutting_down(self) -> None:
        if self._shutting_down:
            raise Unavailable("the proxy is shutting down", retry_after=5)

    def _leave(self, rt: Runtime, ticket: Ticket, place: _Place, *, leased: bool) -> None:
        """A request leaves the queue, leased or not."""
        rt.tickets.remove(ticket)
        if not rt.tickets:
            rt.waiting = None
            rt.blockers = ()
        rt.waiters -= 1
        if place.bound is not None:
            place.bound.cancel()
        if place.queued:
            self._queued -= 1
        if not leased:
            self.lifecycle.maybe_idle(rt)
            self._forget_or_stop(rt)
            self._notify()  # a place in line is free

    def world(self) -> World:
        """Every model as the scheduler sees it, now."""
        views = {name: view(rt) for name, rt in self._runtimes.items()}
        return World(views, self.clock.monotonic(), self.settings.max_wait_for_switch)

    async def _step(self, rt: Runtime, ticket: Ticket, place: _Place) -> Lease | None:
        """One step of a request: ask the scheduler, carry out its move; a lease when it is served."""
        move = next_move(self.world(), ticket)
        if isinstance(move, Decide):
            decision = self._decide(rt, move.need)
            if not move.reload and (decision.kind != "start" or decision.reason) and self._dismiss_spares(rt):
                return None  # the warm spares of other backends were in the way: decide again without them
            move = next_move(self.world(), ticket, decision)
        match move:
            case Serve():
                return self._serve(rt, ticket, place)
            case Refuse(reason=reason):
                raise InsufficientMemory(reason)
            case FailBackoff(message=message, retry_after=retry_after):
                raise ModelLoadFailed(message, retry_after=retry_after)
            case Reload(wants=wants):
                was = {k: rt.effective.options.get(k) for k in wants}
                log.info("model %s: reloading with %s (was %s)", rt.config.name, shown(wants), shown(was))
                self.lifecycle.begin_stop(rt, f"a request asks for {shown(wants)}", UnloadReason.OPTIONS)
            case RestartForConfig():
                self.lifecycle.begin_stop(rt, "its config changed", UnloadReason.CONFIG)
            case NeedFirst(overrides=overrides):
                await self._need_first(rt, overrides)
            case Start():
                self._start_move(rt, move)
            case WaitForStart():
                await self._wait_for_start(rt, place)
            case Evict() | Recover() | Wait():
                await self._queue_wait(rt, place, move)
        return None

    def _serve(self, rt: Runtime, ticket: Ticket, place: _Place) -> Lease:
        assert rt.worker is not None  # a ready model that is served has one (scheduler.next_move)
        self.lifecycle.cancel_idle(rt)
        rt.in_flight += 1
        now = self.clock.monotonic()
        rt.last_used = now
        rt.keep_alive, rt.keep_alive_set = kept_alive(
            rt.keep_alive, rt.keep_alive_set, ticket.keep_alive, admin=ticket.admin, pinned=rt.config.pin_keep_alive
        )
        return Lease(self, rt, rt.worker, now - ticket.since if place.waited_for_start else 0.0)

    async def _need_first(self, rt: Runtime, overrides: Mapping[str, Any]) -> None:
        if dict(overrides) != rt.overrides:  # a load with other runtime options: its need anew
            rt.overrides, rt.need = dict(overrides), None
        await self.needs.ensure(rt)  # (also after its config changed while this request waited)
        self._refuse_if_shutting_down()

    def _start_move(self, rt: Runtime, move: Start) -> None:
        rt.blockers = move.blockers
        if move.warning:
            log.warning("model %s: %s", rt.config.name, move.warning)
        self.lifecycle.begin_start(rt, move.gpu, move.split)

    async def _wait_for_start(self, rt: Runtime, place: _Place) -> None:
        assert rt.start_task is not None  # scheduler.next_move: a start under way
        place.waited_for_start = True
        if place.on_loading is not None and (place.queued or self._queued < self.settings.max_queue):
            self._enqueue(place)  # its place now: a full queue answers 503 before, never after
            place.on_loading()
            place.on_loading = None
        await asyncio.shield(rt.start_task)

    async def _queue_wait(self, rt: Runtime, place: _Place, move: Evict | Recover | Wait) -> None:
        """Wait in the queue (bounded by limits.max_queue) for a change; stop the victims of an eviction first."""
        if move.blockers is not None:
            rt.blockers = move.blockers
        if move.reason is not None:
            if move.blockers is not None and rt.waiting != move.reason:
                log.info("model %s: %s", rt.config.name, move.reason)
            rt.waiting = move.reason
        if isinstance(move, Evict):
            for victim in move.victims:
                self.lifecycle.begin_stop(self._runtimes[victim], f"evicted for {rt.config.name}", UnloadReason.EVICTED)
        self._enqueue(place)
        if isinstance(move, Recover):
            await self._wait(move.wake_at - self.clock.monotonic())
            return
        if place.bound is None:  # past the bound, the models in its way take no more requests: wake everyone then
            place.bound = self.clock.call_later(max(0.0, move.wake_at - self.clock.monotonic()), self._notify)
        await self._changed.wait()

    def _enqueue(self, place: _Place) -> None:
        if place.queued:
            return
        if self._queued >= self.settings.max_queue:
            raise QueueFull(
                f"{self._queued} requests are already waiting for a model or a slot; try again later",
                retry_after=5,
            )
        self._queued += 1
        place.queued = True

    # -- runtime options (proxy.runtime_options) ------------------------------------------------
    async def _wants(self, rt: Runtime, options: Mapping[str, Any]) -> tuple[dict[str, Any], Need | None]:
        """The backend options a request's runner options need loaded (bounded: 400), and the model's need
        with them; those its config does not list are ignored, and logged once per model."""
        cfg = rt.config
        allowed = {k: v for k, v in options.items() if k in cfg.runtime_options}
        ignored = sorted(set(options) - set(allowed) - rt.ignored)
        if ignored:
            rt.ignored.update(ignored)
            log.info(
                "model %s: requests ask for %s; ignored: not in its runtime_options (said once)",
                cfg.name,
                ", ".join(ignored),
            )
        if not allowed:
            return {}, None
        facts = await self.needs.gguf_facts(cfg)
        for key, value in allowed.items():
            ropts.check_bound(key, value, int(facts.get("context_length") or 0) if facts else 0)
        wants = ropts.backend_options(cfg.backend, allowed)
        loaded = ropts.with_options(cfg, wants)
        need = self.needs.now(loaded)
        return wants, need if need is not None else await self.needs.from_gguf(loaded)

    def _release(self, rt: Runtime) -> None:
        rt.in_flight -= 1
        rt.last_used = self.clock.monotonic()
        if rt.worker is not None and rt.state is State.READY:
            self._measure_after_request(rt, rt.worker)
        self.lifecycle.maybe_idle(rt)
        self._notify()

    def _measure_after_request(self, rt: Runtime, worker: WorkerHandle) -> None:
        """The worker's memory after a request: read now when the last read is ``MEASURE_EVERY`` old, else
        once when it is (a read walks its process tree in /proc, about 1 ms: a burst of short requests is read
        once a ``MEASURE_EVERY``, the last of them included). A stop takes a read still put off at once
        (``Lifecycle.begin_stop``), so no request's peak is lost to an unload."""
        if rt.measure_timer is not None:
            return  # a read is already due, after this request
        wait = rt.measured_at + MEASURE_EVERY - self.clock.monotonic()
        if wait <= 0:
            self._measure(rt, worker)
            return

        def due() -> None:
            rt.measure_timer = None
            if rt.worker is worker and rt.state is State.READY:
                self._measure(rt, worker)

        rt.measure_timer = self.clock.call_later(wait, due)

    async def _wait(self, seconds: float) -> None:
        """Until something changes or ``seconds`` pass on the manager's clock."""
        changed = self._changed
        timer = self.clock.call_later(seconds, self._notify)  # a fresh event after it: no busy loop
        try:
            await changed.wait()
        finally:
            timer.cancel()

    # -- warm spares (proxy.spares): what they hold counts like a model's need; the first to go for room ----
    def _replenish_spare(self, rt: Runtime) -> None:
        """A model of this kind is loaded and idle: have a spare of its kind ready for the next load. Not
        earlier: on a small box the spare's imports would slow this load and its first answers."""
        placed = rt.placed
        key = SpareKey.of(placed) if self.spares is not None and not rt.retired else None
        if self.spares is not None and key is not None:
            self.spares.replenish(key, worker_env(placed.env))

    def start_spares(self) -> None:
        """At start-up: a warm spare for each backend (interpreter, environment) of the catalog, so that the
        first load of each pays for its weights only; in the catalog's order, one at a time, in the background
        (``Spares.prestart``), each while the RAM admission counts as free leaves ``HEADROOM`` beside it."""
        if self.spares is None:
            return
        wanted: dict[SpareKey, Mapping[str, str]] = {}
        backends: dict[SpareKey, str] = {}
        for rt in self._runtimes.values():
            if rt.retired:
                continue
            decision = self._decide(rt)  # where its load would go now (a spare's CUDA_VISIBLE_DEVICES is its worker's)
            placed = rt.placed_on(decision.gpu, decision.split) if decision.kind == "start" else rt.placed
            key = SpareKey.of(placed)
            if key is not None and key not in wanted:
                wanted[key], backends[key] = worker_env(placed.env), placed.backend

        def room_for(key: SpareKey) -> bool:
            now = self.clock.monotonic()
            models = room.occupants(None, self._runtimes.values(), self.world(), now, self.settings.memory.evict_pinned)
            free = room.ram_free(models, self.probe, self.spares, self.settings)
            return free >= PROCESS_BASE.get(backends[key], 0) + HEADROOM

        self.spares.prestart(list(wanted.items()), room_for)

    def _dismiss_spares(self, rt: Runtime) -> bool:
        """Stop the spares that are not ``rt``'s (their memory is wanted); True when there were any."""
        if self.spares is None or not self.spares.dismiss_others(rt.config):
            return False
        self.lifecycle.stopped_at = self.clock.monotonic()  # the box gives their memory back in a moment
        return True

    def _decide(self, rt: Runtime, need: Need | None = None) -> Decision:
        """Admission for ``rt`` now (``proxy.room``, ``admission.decide``)."""
        recovering = self.clock.monotonic() < self.lifecycle.stopped_at + self.settings.memory.recovery_timeout
        now = self.clock.monotonic()
        others = room.occupants(rt, self._runtimes.values(), self.world(), now, self.settings.memory.evict_pinned)
        return room.admit(rt, need, others, self.probe, self.spares, self.settings, recovering)

    # -- need-finding: proxy.needs (this delegates, for the api routes) ---------------------------------
    async def gguf_metadata(self, cfg: ModelConfig) -> dict[str, Any] | None:
        """A llama.cpp model's GGUF metadata as Ollama's /api/show has it (``Needs.gguf_metadata``)."""
        return await self.needs.gguf_metadata(cfg)

    def _measure(self, rt: Runtime, worker: WorkerHandle) -> None:
        """The worker's RSS (process tree) and VRAM now; the peak of this load is remembered."""
        if rt.measure_timer is not None:  # this read is the one that was put off
            rt.measure_timer.cancel()
            rt.measure_timer = None
        rt.measured_at = self.clock.monotonic()
        rt.peak = self.needs.measure(rt.config, rt.effective, rt.peak, worker.pid)

    def estimate_soon(self) -> None:
        """Find every model's need in the background (for /status), once."""
        self.needs.estimate_soon(lambda: self._runtimes.values())

    def memory_status(self) -> dict[str, Any]:
        """Budgets and what is free, for /status."""
        limits = self.settings.memory
        return {**budgets(limits, room.snapshot(self.probe)), "limits": dataclasses.asdict(limits)}

    # -- state ------------------------------------------------------------------------------
    def _transition(self, rt: Runtime, new: State, reason: str) -> None:
        """The one place a model's state changes."""
        if new not in TRANSITIONS[rt.state]:
            raise InvalidTransition(f"model {rt.config.name}: {rt.state} -> {new} is not allowed ({reason})")
        log.debug("model %s: %s -> %s (%s)", rt.config.name, rt.state, new, reason)
        old, rt.state = rt.state, new
        self.events.publish(StateChanged(model=rt.config.name, old=old.value, new=new.value, reason=reason))

    # -- start progress ---------------------------------------------------------------------
    def loading(self, name: str) -> tuple[float, str] | None:
        """A starting model's load progress (fraction, phase); None when it is not starting."""
        rt = self.registry.lookup(name)
        if rt.state is not State.STARTING or rt.progress is None:
            return None
        return rt.progress, rt.phase or ""

    # -- by hand ----------------------------------------------------------------------------
    async def unload(self, name: str, *, force: bool = False) -> bool:
        """Wait for in-flight requests at most ``unload_grace``, then stop the worker (killed at once when
        requests are still in flight then, or with ``force``). False when nothing was loaded."""
        rt = self.registry.lookup(name)
        if rt.state is State.STARTING and rt.start_task is not None:
            with contextlib.suppress(ProxyError):
                await asyncio.shield(rt.start_task)
        if rt.state not in (State.READY, State.STOPPING):
            return False
        rt.draining = True
        self._notify()
        try:
            deadline = self.clock.monotonic() + (0.0 if force else rt.config.unload_grace)
            while rt.in_flight > 0 and rt.state is State.READY and self.clock.monotonic() < deadline:
                await self._wait(deadline - self.clock.monotonic())
            grace = rt.config.unload_grace
            if force or (rt.in_flight > 0 and rt.state is State.READY):
                grace = 0.0
                if rt.in_flight > 0:
                    why = "forced" if force else f"still in flight after unload_grace ({rt.config.unload_grace:g}s)"
                    log.warning("model %s: unload: %d requests %s; killing", rt.config.name, rt.in_flight, why)
            task = rt.stop_task if rt.state is State.STOPPING else None
            if rt.state is State.READY:
                task = self.lifecycle.begin_stop(
                    rt, "unload" if grace else "unload: killed", UnloadReason.ADMIN, grace=grace
                )
            elif force and rt.worker is not None:
                rt.worker.kill("unload forced")  # a stop under way: its SIGTERM grace is cut short
            if task is not None:
                await asyncio.shield(task)
        finally:
            rt.draining = False
            self._notify()
        return True

    async def unload_all(self, *, force: bool = False) -> list[str]:
        names = [rt.config.name for rt in self._runtimes.values() if rt.state in (State.READY, State.STARTING)]
        results = await asyncio.gather(*(self.unload(n, force=force) for n in names))
        return [n for n, done in zip(names, results, strict=True) if done]

    async def preload(
        self,
        name: str,
        keep_alive: float | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        admin: bool = True,
    ) -> Lease:
        lease = await self.acquire(name, keep_alive, options=options, admin=admin)
        lease.release()
        return lease

    async def shutdown(self) -> None:
        self._shutting_down = True  # no new leases: a start now would race the stops below
        for rt in self._runtimes.values():
            self.lifecycle.cancel_idle(rt)
        starting = [rt.start_task for rt in self._runtimes.values() if rt.start_task and not rt.start_task.done()]
        for task in starting:
            task.cancel()
        await asyncio.gather(*starting, return_exceptions=True)
        # a GGUF still being read (an estimate, /api/show): its subprocess goes too (read_gguf kills it)
        tasks = [*self.needs.reads(), *(rt.need_task for rt in self._runtimes.values())]
        reading = [t for t in tasks if t is not None and not t.done()]
        for reader in reading:
            reader.cancel()
        await asyncio.gather(*reading, return_exceptions=True)
        stops = [
            self.lifecycle.begin_stop(rt, "shutdown", UnloadReason.SHUTDOWN)
            for rt in self._runtimes.values()
            if rt.worker is not None
        ]
        await asyncio.gather(*stops, return_exceptions=True)
        if self.spares is not None:
            await self.spares.close()
        with contextlib.suppress(OSError):
            for path in self._runtime_dir.iterdir():
                path.unlink()
            self._runtime_dir.rmdir()
        atexit.unregister(self._kill_all_sync)

    def _kill_all_sync(self) -> None:
        if self.spares is not None:
            self.spares.kill_sync()
        for rt in self._runtimes.values():
            if rt.worker is not None:
                rt.worker.kill_sync()

    # -- status (proxy.status) -------------------------------------------------------------------
    def status(self) -> Iterator[ModelStatus]:
        return status.models(self._runtimes.values(), self.clock, self.probe)

    async def worker_reports(self) -> dict[str, dict[str, Any]]:
        """Each ready worker's own /health (progress of a running job, device, ...), asked at once."""
        return await status.worker_reports(self._runtimes.values())

    def spare_status(self) -> list[dict[str, Any]]:
        """The warm spares, for /status: backend, pid, state (importing, waiting) and RSS."""
        return status.spares(self.spares, self.probe)

    def is_loaded(self, name: str) -> bool:
        return self.registry.lookup(name).state is State.READY

    def state_of(self, name: str) -> str:
        """Its state now (``State``'s value)."""
        return self.registry.lookup(name).state.value

    @property
    def queued(self) -> int:
        return self._queued
