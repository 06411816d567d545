"""A deterministic simulation of the scheduler: hypothesis's stateful testing over the real ModelManager.

``SchedulerMachine`` drives a real ``proxy.manager.ModelManager`` through its public API only (the
constructor with clock, worker factory, probe, store and events; ``acquire``, ``Lease.release``, ``unload``,
``replace_models``, ``shutdown``, ``status``, ``resolve``), and the leased call of the HTTP routes
(``proxy.relay.LeasedCall``, whose client is a Starlette ``Request`` over a fake ASGI ``receive``), with
fake workers whose start, failure, out-of-memory failure, crash or hang the machine decides, and the
``ManualClock``. Each machine owns its event loop; every rule schedules its work there and runs the loop
until it is quiet (``settle``), so a run is a pure function of hypothesis's choices.

The invariants are the README's promises, one small method each. ``checks`` (a class attribute) says which
run: ``machine(checks)`` makes a subclass with others. ``tests/test_simulation.py`` runs it in CI,
``python -m bench.simulate`` runs it long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import math
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from starlette.requests import Request
from starlette.types import Message

from proxy.auth import Role
from proxy.clock import ManualClock
from proxy.config import MemoryLimits, ModelConfig, Settings
from proxy.errors import ModelLoadFailed, ProxyError
from proxy.events import Event, EventBus, StateChanged, Unloaded, UnloadReason
from proxy.manager import Lease, ModelManager
from proxy.memory import MemoryStore, Need
from proxy.relay import LeasedCall
from proxy.runtime import TRANSITIONS, InvalidTransition, State
from proxy.upstream import Upstream
from tests.bare import bare_model, bare_settings
from tests.fake_memory import FakeProbe, GiB

# -- what the simulated box holds ---------------------------------------------------------------------------
RAM_BUDGET = 9 * GiB  # limits.memory.ram: two of a, b, d fit, and c with d, not c with a or b
MAX_LOADED = 2  # limits.max_loaded_models
MAX_QUEUE = 6
MAX_WAIT = 30.0  # limits.max_wait_for_switch
NEEDS = {"a": 4, "b": 4, "c": 6, "d": 3}  # GiB each (memory: in their YAML, so no estimate is read)
NUM_CTX = (2048, 8192)  # d lists runtime_options: [num_ctx]; its YAML loads n_ctx 4096
WANTED = ("a", "b", "c", "d", "d")  # the models requests ask for: d, with its reloads, twice as often
KEEP_ALIVES = (None, 0.0, math.inf, 1.0, 5.0, 300.0)  # absent, 0, -1 (for ever), small, the default
SETTLE = 60  # event-loop turns per settle: more than any chain of wake-ups here takes

# -- the checks (each an invariant below; the names are what ``checks`` holds) --------------------------
CAPACITY = "capacity"  # models up <= max_loaded_models, their needs <= the RAM budget (defect 1)
BUSY_STOP = "busy_stop"  # a busy model is stopped only by an unload by hand (or its own crash)
ADMIN_PIN = "admin_pin"  # an admin's keep_alive -1 holds against user requests (defect 3; needs the role)
GONE_LEAVES = "gone_leaves"  # a request whose client is gone leaves the queue and loads nothing (defect 4)
ENDS = "ends"  # every accepted request ends, served or with an explicit error (checked at the end)
TRANSITIONS_ONLY = "transitions"  # state changes only along manager.TRANSITIONS
CURRENT_CONFIG = "current_config"  # served with the config current when it was admitted (defect 7)
OWN_KEEP_ALIVE = "own_keep_alive"  # a request's keep_alive survives its own num_ctx reload (defect 5)
ALL_CHECKS = frozenset(
    {CAPACITY, BUSY_STOP, ADMIN_PIN, GONE_LEAVES, ENDS, TRANSITIONS_ONLY, CURRENT_CONFIG, OWN_KEEP_ALIVE}
)

# -- the caller's role, where acquire takes one (issue 25: an admin's pin holds against a user's keep_alive) --
_ACQUIRE = inspect.signature(ModelManager.acquire).parameters
_LEASED = inspect.signature(LeasedCall.__init__).parameters
ROLE_PARAM = next((name for name in ("role", "admin") if name in _ACQUIRE), None)
LEASED_ROLE_PARAM = next((name for name in ("role", "admin") if name in _LEASED), None)


def _role(param: str | None, admin: bool) -> dict[str, Any]:
    if param == "role":
        return {"role": Role.ADMIN if admin else Role.USER}
    if param == "admin":
        return {"admin": admin}
    return {}


def model(name: str, **kw: Any) -> ModelConfig:
    """A model the fake workers run: its memory need in its config, so admission needs no estimate."""
    base: dict[str, Any] = dict(
        source=f"configs/{name}.yaml",
        cmd=("fake",),
        load_timeout=60.0,
        unload_grace=5.0,
        memory=Need(NEEDS[name] * GiB, 0, "config"),
    )
    base.update(kw)
    return bare_model(name, **base)


def catalog() -> dict[str, ModelConfig]:
    return {
        "a": model("a"),
        "b": model("b", parallel=2),
        "c": model("c"),
        # a llama.cpp model a request may reload with another num_ctx (its worker is a fake all the same)
        "d": model("d", backend="llama_cpp", options={"n_ctx": 4096}, runtime_options=("num_ctx",)),
    }


def sim_settings(models: tuple[ModelConfig, ...]) -> Settings:
    return bare_settings(
        load_timeout=60.0,
        unload_grace=5.0,
        max_loaded_models=MAX_LOADED,
        max_queue=MAX_QUEUE,
        max_body_bytes=1 << 20,
        log_level="warning",
        models=models,
        stall_timeout=0.0,  # no stall watchdog: the fakes use no CPU
        memory=MemoryLimits(ram=RAM_BUDGET, reserve_ram=0, recovery_timeout=1.0),
        max_wait_for_switch=MAX_WAIT,
        warm_spare=False,
    )


class SimWorker:
    """A ``manager.WorkerHandle`` whose start waits until the machine decides how it ends: up, a failed
    load, an out-of-memory failure (its log says so), or never (a hang). Ready, it may crash (``on_exit``)."""

    def __init__(self, config: ModelConfig, pid: int, on_exit: Callable[[Any], None]) -> None:
        self.config = config
        self.pid = pid
        self.on_exit = on_exit
        self.on_progress: Callable[[float, str], None] | None = None
        self.upstream = Upstream("http://fake", name=config.name)  # never used: no session is made
        self.returncode: int | None = None
        self.kill_reason: str | None = None
        self.gate = asyncio.Event()
        self.outcome = "up"  # up, fail, oom
        self.starting = False  # start() was called and has not returned
        self.up = False
        self.stopped = False
        self._log = "fake log"

    def log_tail(self, lines: int = 20) -> str:
        return self._log

    def cpu_seconds(self) -> float | None:
        return None

    async def start(self) -> None:
        self.starting = True
        try:
            await self.gate.wait()
        finally:
            self.starting = False
        if self.outcome == "oom":
            self._log = "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate: std::bad_alloc"
            raise ModelLoadFailed("the worker exited while loading")
        if self.outcome == "fail":
            raise ModelLoadFailed("weights are corrupt")
        self.up = True

    async def stop(self, grace: float) -> None:
        self.stopped = True
        await asyncio.sleep(0)

    def kill(self, reason: str) -> None:
        self.kill_reason = reason
        self.returncode = -9
        self.stopped = True
        self.on_exit(self)

    def kill_sync(self) -> None:
        self.stopped = True

    def crash(self) -> None:
        self.returncode = 1
        self.stopped = True
        self.on_exit(self)


@dataclass(eq=False)
class Req:
    """One simulated request, from its call to its end."""

    id: int
    model: str
    keep_alive: float | None
    admin: bool
    role_sent: bool  # the caller's role reached acquire (it takes one, and this route passes it)
    num_ctx: int | None
    leased_call: bool  # through relay.LeasedCall with a watched client; else manager.acquire itself
    version: int  # the catalog's version when it was admitted
    called_at: int  # the machine's event count when it was made
    finish: asyncio.Event = field(default_factory=asyncio.Event)
    disconnect: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    lease: Lease | None = None
    gone: bool = False  # its client went away
    error: BaseException | None = None

    @property
    def waiting(self) -> bool:
        """Inside acquire: not ended, no lease yet."""
        return self.task is not None and not self.task.done() and self.lease is None


def _plain(cfg: ModelConfig) -> ModelConfig:
    """A config without its load's runtime options (what the catalog said)."""
    return dataclasses.replace(cfg, options={k: v for k, v in cfg.options.items() if k != "n_ctx"})


class SchedulerMachine(RuleBasedStateMachine):
    checks: ClassVar[frozenset[str]] = ALL_CHECKS
    machines: ClassVar[int] = 0  # machines made (examples run, shrinking included): for bench.simulate
    first_failure: ClassVar[int | None] = None  # the machine count at the first failed check

    def __init__(self) -> None:
        super().__init__()
        type(self).machines += 1
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.clock = ManualClock()
        self.events = EventBus()
        self.events.listen(self._on_event)
        self.versions: dict[str, list[ModelConfig | None]] = {n: [c] for n, c in catalog().items()}
        self.current = catalog()
        self.workers: list[SimWorker] = []
        self.requests: list[Req] = []
        self.unloading: dict[str, int] = {}
        self.pins: set[str] = set()  # models an admin pinned (keep_alive -1), until something unpins them
        self.last_state: dict[str, str] = {}
        self.violations: dict[str, list[str]] = {name: [] for name in ALL_CHECKS}
        self.count = 0  # events seen: orders calls, unloads and reloads
        self.unloads: list[tuple[int, str, UnloadReason]] = []
        self.reloads: list[int] = []
        self.kas: list[tuple[int, str]] = []  # (when, model) of each request that sent a keep_alive
        self.shutting_down = False
        self.manager = ModelManager(
            sim_settings(tuple(self.current.values())),
            clock=self.clock,
            worker_factory=self._factory,
            probe=FakeProbe(total=64 * GiB, available=64 * GiB),
            store=MemoryStore(None),
            events=self.events,
        )

    # -- the loop ---------------------------------------------------------------------------------------
    def settle(self) -> None:
        async def turns() -> None:
            for _ in range(SETTLE):
                await asyncio.sleep(0)

        self.loop.run_until_complete(turns())

    def call(self, fn: Callable[[], Any]) -> None:
        """Run a synchronous manager call (it may make tasks) on the loop, then let it settle."""

        async def inside() -> None:
            fn()

        self.loop.run_until_complete(inside())
        self.settle()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self.loop.create_task(coro)

    def _violate(self, check: str, message: str) -> None:
        if check in self.checks:
            self.violations[check].append(message)
            self._failed()

    def _failed(self) -> None:
        if type(self).first_failure is None:
            type(self).first_failure = type(self).machines

    def _check(self, check: str, ok: bool, message: str) -> None:
        """An invariant's assertion, when its check is on."""
        if check in self.checks and not ok:
            self._failed()
            raise AssertionError(f"{check}: {message}")

    def _no_violations(self, check: str) -> None:
        self._check(check, not self.violations[check], "; ".join(self.violations[check][:3]))

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """A task of the manager's that failed with nobody to tell (an invalid transition, a bug). Best effort:
        the loop says so when the task is collected, which may be after the machine's end (then ignored)."""
        error = context.get("exception")
        if error is None or self.shutting_down:
            return
        check = TRANSITIONS_ONLY if isinstance(error, InvalidTransition) else ENDS
        self._violate(check, f"{context.get('message')}: {error!r}")

    # -- fakes ------------------------------------------------------------------------------------------
    def _factory(self, config: ModelConfig, runtime_dir: Path, on_exit: Callable[[Any], None]) -> SimWorker:
        worker = SimWorker(config, 1000 + len(self.workers), on_exit)
        self.workers.append(worker)
        return worker

    def _client(self, req: Req) -> Request:
        async def receive() -> Message:
            await req.disconnect.wait()
            return {"type": "http.disconnect"}

        return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}, receive)

    def _on_event(self, event: Event) -> None:
        self.count += 1
        if isinstance(event, Unloaded):
            self.unloads.append((self.count, event.model, event.reason))
            if event.reason is UnloadReason.IDLE and event.model in self.pins and ROLE_PARAM is not None:
                self._violate(ADMIN_PIN, f"{event.model}: an admin's pin, unloaded as idle")
            self.pins.discard(event.model)
        if not isinstance(event, StateChanged):
            return
        self._check_transition(event)
        if event.new == State.STARTING.value:
            self._check_load_has_a_client(event.model)
        if event.old == State.READY.value and event.new == State.STOPPING.value:
            self._check_busy_stop(event)

    # -- requests ---------------------------------------------------------------------------------------
    def _served(self, req: Req, lease: Lease) -> None:
        req.lease = lease
        self._check_current_config(req, lease.config)
        self._check_own_keep_alive(req)
        if req.admin and req.role_sent and req.keep_alive is not None:
            if math.isinf(req.keep_alive):
                self.pins.add(req.model)
            else:
                self.pins.discard(req.model)  # an admin changed its own pin: applied when served, in turn

    async def _via_acquire(self, req: Req, options: Mapping[str, Any] | None) -> None:
        try:
            lease = await self.manager.acquire(req.model, req.keep_alive, None, options, **_role(ROLE_PARAM, req.admin))
        except ProxyError as exc:
            req.error = exc
            return
        try:
            self._served(req, lease)
            await req.finish.wait()
        finally:
            lease.release()

    async def _via_leased_call(self, req: Req, options: Mapping[str, Any] | None) -> None:
        call = LeasedCall(
            self.manager,
            req.model,
            req.keep_alive,
            client=self._client(req),
            options=options,
            **_role(LEASED_ROLE_PARAM, req.admin),
        )
        try:
            async with call:
                self._served(req, call.lease)
                await req.finish.wait()
        except ProxyError as exc:  # ClientGone included
            req.error = exc

    @rule(
        name=st.sampled_from(WANTED),
        keep_alive=st.sampled_from(KEEP_ALIVES),
        admin=st.booleans(),
        num_ctx=st.sampled_from((None, *NUM_CTX)),
        leased_call=st.booleans(),
    )
    def request(self, name: str, keep_alive: float | None, admin: bool, num_ctx: int | None, leased_call: bool) -> None:
        """A request for any model: keep_alive absent, 0, -1, small; an admin's or a user's; num_ctx."""
        live = [r for r in self.requests if r.task is not None and not r.task.done()]
        if len(live) >= 10:
            return
        role_sent = ROLE_PARAM is not None and (not leased_call or LEASED_ROLE_PARAM is not None)
        if ROLE_PARAM is not None and not role_sent:
            keep_alive = None  # a role the route cannot say: its keep_alive would mean nothing checkable
        try:
            resolved: ModelConfig | None = self.manager.resolve(name)
        except ProxyError:
            resolved = None
        self._check_resolved(name, resolved)
        self.count += 1
        req = Req(
            id=len(self.requests),
            model=name,
            keep_alive=keep_alive,
            admin=admin,
            role_sent=role_sent,
            num_ctx=num_ctx if name == "d" else None,
            leased_call=leased_call,
            version=len(self.versions[name]) - 1,
            called_at=self.count,
        )
        if keep_alive is not None:
            self.kas.append((self.count, name))
        options = {"num_ctx": req.num_ctx} if req.num_ctx is not None else None
        self.requests.append(req)
        run = self._via_leased_call if leased_call else self._via_acquire
        req.task = self.spawn(run(req, options))
        self.settle()

    def _pick(self, items: list[Any], index: int) -> Any:
        return items[index % len(items)]

    def _open(self) -> list[Req]:
        return [r for r in self.requests if r.task is not None and not r.task.done() and not r.gone]

    @precondition(lambda self: self._open())
    @rule(index=st.integers(0, 100))
    def client_goes_away(self, index: int) -> None:
        """A client gives up: while it waits (its ticket), or while it holds its lease."""
        req: Req = self._pick(self._open(), index)
        req.gone = True
        if req.leased_call:
            req.disconnect.set()  # the connection closes: what the route watches
        else:
            assert req.task is not None
            req.task.cancel()  # the handler itself is cancelled
        self.settle()

    def _leased(self) -> list[Req]:
        return [r for r in self._open() if r.lease is not None and not r.finish.is_set()]

    @precondition(lambda self: self._leased())
    @rule(index=st.integers(0, 100))
    def answer_ends(self, index: int) -> None:
        """A served request's answer ends: its lease is released."""
        req: Req = self._pick(self._leased(), index)
        req.finish.set()
        self.settle()

    # -- workers ----------------------------------------------------------------------------------------
    def _starting(self) -> list[SimWorker]:
        return [w for w in self.workers if w.starting and not w.gate.is_set()]

    @precondition(lambda self: self._starting())
    @rule(index=st.integers(0, 100), outcome=st.sampled_from(("up", "up", "fail", "oom")))
    def worker_load_ends(self, index: int, outcome: str) -> None:
        """A starting worker's load ends: up, a failed load, or out of memory (the manager tries once more).
        A worker no rule picks hangs while the clock moves: a slow load, or one that never ends."""
        worker: SimWorker = self._pick(self._starting(), index)
        worker.outcome = outcome
        worker.gate.set()
        self.settle()

    def _running(self) -> list[SimWorker]:
        return [w for w in self.workers if w.up and not w.stopped]

    @precondition(lambda self: self._running())
    @rule(index=st.integers(0, 100))
    def worker_crashes(self, index: int) -> None:
        """A ready worker exits on its own (with requests in flight or not)."""
        worker: SimWorker = self._pick(self._running(), index)
        self.call(worker.crash)

    # -- the operator -----------------------------------------------------------------------------------
    @rule(name=st.sampled_from(sorted(NEEDS)), change=st.sampled_from(("system", "parallel", "keep_alive", "remove")))
    def config_reload(self, name: str, change: str) -> None:
        """A config reload (``replace_models``) that changes one model's YAML, removes it, or brings it back."""
        original = catalog()[name]
        cfg = self.current.get(name)
        new: ModelConfig | None
        if cfg is None:
            new = original  # removed: it comes back as it was
        elif change == "remove":
            new = None
        elif change == "system":
            new = dataclasses.replace(cfg, system=None if cfg.system else f"be brief ({len(self.reloads)})")
        elif change == "parallel":
            new = dataclasses.replace(cfg, parallel=1 if cfg.parallel > 1 else 2)
        else:
            new = dataclasses.replace(cfg, keep_alive=None if cfg.keep_alive is not None else 60.0)
        if new is None:
            del self.current[name]
        else:
            self.current[name] = new
        self.versions[name].append(new)
        self.count += 1
        self.reloads.append(self.count)
        present = {s.name for s in self.manager.status()}
        for gone in [n for n in self.last_state if n not in present]:
            del self.last_state[gone]  # forgotten (retired, then stopped): it comes back as a new, stopped model
        models = tuple(self.current.values())
        self.call(lambda: self.manager.replace_models(list(models), sim_settings(models)))

    @rule(name=st.sampled_from(sorted(NEEDS)), force=st.booleans())
    def unload(self, name: str, force: bool) -> None:
        """An unload by hand: graceful (waits unload_grace for requests in flight) or forced."""

        async def unloading() -> None:
            self.unloading[name] = self.unloading.get(name, 0) + 1
            try:
                await self.manager.unload(name, force=force)
            except ProxyError:
                pass  # not in the catalog (404), or a shutdown
            except Exception as exc:  # a bug: an unload by hand answers or refuses, it never breaks
                self._violate(ENDS, f"unload {name}: {exc!r}")
            finally:
                self.unloading[name] -= 1

        self.spawn(unloading())
        self.settle()

    @rule(seconds=st.sampled_from((0.1, 1.0, 5.0, MAX_WAIT + 1, 301.0)))
    def time_passes(self, seconds: float) -> None:
        """The clock moves: keep_alive timers, the max_wait_for_switch bound, recovery polls, unload_grace."""
        self.call(lambda: self.clock.advance(seconds))

    # -- the invariants: the README's promises ------------------------------------------------------
    def _up(self) -> list[Any]:
        up = (State.STARTING.value, State.READY.value, State.STOPPING.value)
        return [s for s in self.manager.status() if s.state in up]

    @invariant()
    def models_up_fit(self) -> None:
        """README, admission by memory: the models up (starting, ready, stopping) never exceed
        ``limits.max_loaded_models``, and their needs never exceed the RAM budget."""
        up = self._up()
        shown = [(s.name, s.state) for s in up]
        self._check(CAPACITY, len(up) <= MAX_LOADED, f"{len(up)} models up: {shown}")
        ram = sum(s.config.memory.ram for s in up if s.config.memory is not None)
        self._check(CAPACITY, ram <= RAM_BUDGET, f"{ram / GiB:g} GiB up, the budget {RAM_BUDGET / GiB:g}: {shown}")

    def _check_busy_stop(self, event: StateChanged) -> None:
        status = next((s for s in self.manager.status() if s.name == event.model), None)
        if status is None or status.in_flight == 0:
            return
        if self.unloading.get(event.model) or self.shutting_down:
            return  # an unload by hand (forced, or past unload_grace), or the shutdown: allowed
        self._violate(BUSY_STOP, f"{event.model} stopped with {status.in_flight} in flight: {event.reason}")

    @invariant()
    def busy_models_stop_only_by_hand(self) -> None:
        """README, unload: a busy model (requests in flight) is stopped only by an unload by hand (forced, or
        past ``unload_grace``), a shutdown or its own crash; never by keep_alive, eviction or a reload."""
        self._no_violations(BUSY_STOP)

    @invariant()
    def admin_pin_holds(self) -> None:
        """README, keep_alive: a model an admin pinned (keep_alive -1) stays loaded whatever keep_alive a
        user's request sends; only an unload by hand (or a crash, a reload) ends it. Needs acquire's role."""
        if ROLE_PARAM is None:
            return
        self._no_violations(ADMIN_PIN)
        for s in self.manager.status():
            if s.name in self.pins and s.state == State.READY.value:
                keep_alive = s.keep_alive
                self._check(ADMIN_PIN, math.isinf(keep_alive), f"{s.name}: pinned, now keep_alive {keep_alive}")

    def _check_load_has_a_client(self, name: str) -> None:
        if not any(r.model == name and r.waiting and not r.gone for r in self.requests):
            gone = sum(1 for r in self.requests if r.model == name and r.waiting)
            self._violate(GONE_LEAVES, f"{name} starts for nobody ({gone} requests waiting, every client gone)")

    @invariant()
    def gone_clients_leave_the_queue(self) -> None:
        """README, the queue: a request whose client went away leaves the queue at once (``queued`` drops)
        and starts no load for itself."""
        self._no_violations(GONE_LEAVES)
        ghosts = [(r.id, r.model) for r in self.requests if r.gone and r.task is not None and not r.task.done()]
        self._check(GONE_LEAVES, not ghosts, f"requests whose clients are gone still wait: {ghosts}")
        for s in self.manager.status():
            waiting = sum(1 for r in self.requests if r.model == s.name and r.waiting)
            queued = s.queued
            self._check(GONE_LEAVES, queued <= waiting, f"{s.name}: queued {queued}, {waiting} requests wait")

    def _check_transition(self, event: StateChanged) -> None:
        before = self.last_state.get(event.model, State.STOPPED.value)
        self.last_state[event.model] = event.new
        if State(event.new) not in TRANSITIONS[State(event.old)] or event.old != before:
            self._violate(TRANSITIONS_ONLY, f"{event.model}: {event.old} -> {event.new} (was {before})")

    @invariant()
    def states_follow_the_table(self) -> None:
        """ARCHITECTURE, model lifecycle: a model's state changes only along ``manager.TRANSITIONS``, each
        change from the state it was in."""
        self._no_violations(TRANSITIONS_ONLY)

    def _check_resolved(self, name: str, resolved: ModelConfig | None) -> None:
        current = self.current.get(name)
        if resolved is not None and current is not None and _plain(resolved) != _plain(current):
            self._violate(CURRENT_CONFIG, f"{name}: resolve() gave the old config while a new one was current")

    def _check_current_config(self, req: Req, leased: ModelConfig) -> None:
        versions = self.versions[req.model]
        if versions[req.version] is None:
            return  # not in the catalog when it came: it was refused (404) or is the retired model's
        if any(v is None for v in versions[req.version + 1 :]):
            return  # removed after it came: the retired model finishes its requests with the worker it has
        newer = [i for i, c in enumerate(versions) if c is not None and _plain(c) == _plain(leased)]
        if not newer or max(newer) < req.version:
            self._violate(CURRENT_CONFIG, f"{req.model}: served with a config older than the one it was admitted with")

    @invariant()
    def served_with_the_current_config(self) -> None:
        """README, config reload: a request is served with the config current when it was admitted (or a
        newer one), and what routes build it from (``resolve``) is that config too."""
        self._no_violations(CURRENT_CONFIG)

    def _check_own_keep_alive(self, req: Req) -> None:
        if req.keep_alive is None or (ROLE_PARAM is not None and not (req.admin and req.role_sent)):
            return
        cfg = self.current.get(req.model)
        if cfg is None or cfg.pin_keep_alive:
            return
        window = range(req.called_at + 1, self.count + 1)
        if any(when in window and name == req.model for when, name in self.kas):
            return  # a later request sent its own keep_alive
        if any(when in window for when in self.reloads):
            return  # a config reload came between (a stopped model takes its new config's keep_alive)
        if any(
            when in window and name == req.model and why is not UnloadReason.OPTIONS for when, name, why in self.unloads
        ):
            return  # stopped for another reason while it waited: the next load is a first load again
        if ROLE_PARAM is not None and any(
            o is not req and o.model == req.model and o.keep_alive is not None and o.waiting for o in self.requests
        ):
            return  # with roles, another caller's keep_alive still waiting may count too (never shortened)
        status = next(s for s in self.manager.status() if s.name == req.model)
        if status.keep_alive != req.keep_alive:
            self._violate(
                OWN_KEEP_ALIVE,
                f"{req.model}: served with keep_alive {status.keep_alive}, the request sent {req.keep_alive}",
            )

    @invariant()
    def keep_alive_survives_its_own_reload(self) -> None:
        """README, runtime options and keep_alive: the keep_alive a request sends is the model's when it is
        served, also when its num_ctx reloads the model (Open WebUI sends both)."""
        self._no_violations(OWN_KEEP_ALIVE)

    @invariant()
    def requests_end_explicitly(self) -> None:
        """README, errors: a request that ends without its answer ends with an explicit error (the exception
        tree of ``proxy.errors``, a status in the client's dialect), never an unforeseen exception (a 500)."""
        self._no_violations(ENDS)
        for r in self.requests:
            if r.task is not None and r.task.done() and not r.task.cancelled() and r.task.exception() is not None:
                self._check(ENDS, False, f"request {r.id} for {r.model} ended with {r.task.exception()!r}")

    # -- the end ---------------------------------------------------------------------------------------
    def every_request_ends(self) -> None:
        """README, the queue: every accepted request ends, served or with an explicit error, and none waits
        past ``max_wait_for_switch`` plus a load when its model can fit. Every load ends, each answer
        ends, time passes the bound: nothing may still wait."""
        for _ in range(12):
            for worker in self._starting():
                worker.outcome = "up"
                worker.gate.set()
            for req in self.requests:
                if req.lease is not None:
                    req.finish.set()
            self.call(lambda: self.clock.advance(MAX_WAIT + 1))
            if not any(r.task is not None and not r.task.done() for r in self.requests):
                break
        stuck = [
            (r.id, r.model, r.gone)
            for r in self.requests
            if r.task is not None and not r.task.done() and r.model in self.current
        ]
        self._check(ENDS, not stuck, f"requests still waiting with every load and answer ended: {stuck}")

    def teardown(self) -> None:
        try:
            if ENDS in self.checks:
                self.every_request_ends()
        finally:
            self._close()

    def _close(self) -> None:
        self.shutting_down = True
        for worker in self.workers:
            worker.gate.set()  # a hung start ends so the shutdown's cancel reaches it
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.wait_for(self.manager.shutdown(), 10))
        for _ in range(5):  # what a cancelled task starts on its way out goes too
            tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            if not tasks:
                break
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


def machine(checks: frozenset[str] = ALL_CHECKS, name: str = "Simulation") -> type[SchedulerMachine]:
    """The machine with only these checks on."""
    return type(name, (SchedulerMachine,), {"checks": frozenset(checks)})
