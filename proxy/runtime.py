"""The model state data the manager owns: ``Runtime`` (what it knows of one model), its ``State`` and the
``TRANSITIONS`` between them, the ``WorkerHandle`` it drives, the ``ModelStatus`` it reports, and small pure
helpers over a runtime (its device, its view for the scheduler, its occupants per GPU, an out-of-memory
load). Only ``proxy.manager`` writes a ``Runtime``."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from proxy import runtime_options as ropts
from proxy.admission import Occupant
from proxy.clock import Timer
from proxy.config import ModelConfig
from proxy.errors import LoadTimeout, ModelLoadFailed
from proxy.events import UnloadReason
from proxy.memory import Need
from proxy.scheduler import ModelView, Ticket
from proxy.upstream import Upstream
from proxy.watchdog import StallWatch

# what a worker that ran out of memory leaves in its log (CUDA, llama.cpp's ggml, torch, onnxruntime)
_OOM_MARKERS = ("out of memory", "cudaMalloc failed", "CUDA_ERROR_OUT_OF_MEMORY", "std::bad_alloc", "MemoryError")


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

    # called with its load's progress (fraction 0..1, phase) while it starts; set by the manager
    on_progress: Callable[[float, str], None] | None

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
        self.keep_alive_set = False  # a request set keep_alive during this load (scheduler.kept_alive)
        self.last_used = 0.0
        self.idle_deadline: float | None = None
        self.idle_timer: Timer | None = None
        self.start_task: asyncio.Task[None] | None = None
        self.stop_task: asyncio.Task[None] | None = None
        self.draining = False
        self.last_error: str | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.loaded_at: float | None = None  # wall clock
        self.load_duration = 0.0
        self.watchdog: StallWatch | None = None
        self.writing = 0  # its leases whose answer waits on its client's reading (Lease.writing)
        self.need: Need | None = None  # what it needs (memory.py); None until found
        self.need_task: asyncio.Task[tuple[ModelConfig, Need]] | None = None  # a GGUF read, for that config
        self.gpu: int | None = None  # the GPU it runs (or starts) on
        self.split: tuple[tuple[int, int], ...] = ()  # or the GPUs it is spread over, with its VRAM share on each
        self.waiting: str | None = None  # why a request for it waits, while one does
        self.peak = Need(0, 0, "measured")  # the most its worker used, this load
        self.measured_at = -math.inf  # when its worker's memory was last read (ModelManager._measure)
        self.measure_timer: Timer | None = None  # a read put off at a release (ModelManager._measure_after_request)
        self.tickets: list[Ticket] = []  # its requests inside ``acquire``, in arrival order
        self.blockers: tuple[str, ...] = ()  # busy models it must wait for (its last decision)
        self.progress: float | None = None  # while it starts: its load's fraction done (0..1), and the phase
        self.phase: str | None = None
        self.retired = False  # gone from the catalog (a rescan): unloads when idle, then is forgotten
        self.pending: ModelConfig | None = None  # its changed config (a reload), taken when it has stopped
        self.stop_cause = UnloadReason.IDLE  # why its stop in progress began (the unload event's reason)
        self.overrides: dict[str, Any] = {}  # runtime options its load runs with (proxy.runtime_options)
        self.ignored: set[str] = set()  # runner options requests asked for in vain, logged once each

    @property
    def effective(self) -> ModelConfig:
        """Its config as its worker runs it: with the runtime options of its load."""
        return ropts.with_options(self.config, self.overrides)

    @property
    def occupies_slot(self) -> bool:
        local = self.config.url is None
        return local and self.state in (State.STARTING, State.READY, State.STOPPING)

    @property
    def counted(self) -> Need:
        """What a loaded model counts for: its need, or more when it was seen using more."""
        need = self.need or Need(0, 0, "unknown")
        if self.peak.ram and need.source == "measured":  # an earlier load's peak: the larger of the two
            return Need(max(need.ram, self.peak.ram), max(need.vram, self.peak.vram), "measured")
        if self.peak.ram and need.source != "config":
            return self.peak  # measured on this load: replaces the estimate
        return need

    @property
    def placed(self) -> ModelConfig:
        """Its config, with CUDA_VISIBLE_DEVICES naming its GPU when it was placed on one; spread over
        several, naming them all, and llama.cpp's ``tensor_split`` set to its shares (in that order)."""
        return self.placed_on(self.gpu, self.split)

    def placed_on(self, gpu: int | None, split: tuple[tuple[int, int], ...] = ()) -> ModelConfig:
        """``placed`` for a placement that is not (yet) its own: a warm spare's at start-up."""
        cfg = self.effective
        if split:
            total = sum(share for _, share in split) or 1
            visible = ",".join(str(index) for index, _ in split)
            shares = [round(share / total, 4) for _, share in split]
            env = {**self.config.env, "CUDA_VISIBLE_DEVICES": visible}
            return dataclasses.replace(cfg, env=env, options={**cfg.options, "tensor_split": shares})
        if gpu is None:
            return cfg
        return dataclasses.replace(cfg, env={**self.config.env, "CUDA_VISIBLE_DEVICES": str(gpu)})


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
    need: Need | None = None
    device: str | None = None  # cpu, cuda:N while it runs
    vram_bytes: int | None = None
    waiting: str | None = None
    queued: int = 0  # its requests waiting inside ``acquire``
    progress: float | None = None  # while it starts (0..1), with its phase
    phase: str | None = None


def view(rt: Runtime) -> ModelView:
    """A model as the scheduler sees it (plain data)."""
    return ModelView(
        name=rt.config.name,
        state=rt.state.value,
        tickets=tuple(rt.tickets),
        in_flight=rt.in_flight,
        parallel=rt.config.parallel,
        draining=rt.draining,
        pending=rt.pending is not None,
        has_worker=rt.worker is not None,
        start_running=rt.start_task is not None,
        external=rt.config.url is not None,
        need_known=rt.need is not None,
        retry_at=rt.retry_at,
        last_error=rt.last_error,
        options=rt.effective.options,
        config_options=rt.config.options,
        overrides=rt.overrides,
        blockers=rt.blockers,
    )


def device(rt: Runtime) -> str:
    """Where it runs: cpu, cuda:N, or cuda:N,M when spread over several GPUs."""
    if rt.split:
        return "cuda:" + ",".join(str(index) for index, _ in rt.split)
    return f"cuda:{rt.gpu}" if rt.gpu is not None else "cpu"


def per_gpu(occupant: Occupant, split: tuple[tuple[int, int], ...]) -> list[Occupant]:
    """A model spread over GPUs as one occupant per GPU: its VRAM (as measured, when it was) in the
    proportions of its split, its RAM counted once, with the first."""
    total = sum(share for _, share in split) or 1
    need = occupant.need
    return [
        dataclasses.replace(
            occupant,
            gpu=index,
            need=Need(need.ram if i == 0 else 0, need.vram * share // total, need.source),
        )
        for i, (index, share) in enumerate(split)
    ]


def out_of_memory(worker: WorkerHandle, exc: ModelLoadFailed) -> bool:
    """Did this load fail for want of memory? Killed by SIGKILL that we did not send (the kernel's OOM
    killer), or an out-of-memory message in its log (CUDA, ggml, torch). Not a load timeout (we killed it)."""
    if isinstance(exc, LoadTimeout):
        return False
    if worker.returncode == -signal.SIGKILL and worker.kill_reason is None:
        return True
    tail = worker.log_tail().lower()
    return any(marker.lower() in tail for marker in _OOM_MARKERS)
