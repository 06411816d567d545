"""The queue and the scheduling decision, as pure functions over plain data.

``ModelManager.acquire`` holds one ``Ticket`` per request. At each step it builds a ``World`` (every model's
state as a ``ModelView``, the tickets, the clock's ``now``), asks ``next_move(world, ticket)`` what this
request does next, carries the move out and waits for the next change. A move that needs an admission
``Decision`` (``admission.decide``: memory, slots, victims) is first answered ``Decide``; the manager then
asks again with the decision. No asyncio, no I/O, no clock reads here: the same data gives the same move.

The queue's rules (ARCHITECTURE.md, "The queue"): a ready model leases at most ``parallel`` requests at
once, in arrival order; a request for a stopped model that waits for busy models (its ``blockers``) past
``max_wait_for_switch`` is overdue, and from then on those models serve nobody who came after it; the
requests waiting when a model becomes ready are its turn's ``batch`` and are never overtaken.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy import runtime_options as ropts
from proxy.admission import Decision
from proxy.memory import Need

RECOVERY_POLL = 0.25  # seconds between looks at the probe while memory comes back after an unload


@dataclass(eq=False)
class Ticket:
    """One request inside ``acquire``: when it came (the queue's order), what it needs loaded, and the
    keep_alive it asks for, applied when it is served (so no stop or reload in between can lose it)."""

    model: str  # the model's name (``ModelConfig.name``)
    since: float
    seq: int
    priority: int = 0
    wants: Mapping[str, Any] = field(default_factory=dict)  # backend options it needs loaded
    need: Need | None = None  # the model's need with those options
    keep_alive: float | None = None
    admin: bool = True  # the caller's role: an admin's keep_alive replaces the model's (``kept_alive``)
    # waiting when its model got its turn (became ready): served in that batch, never overtaken, so a switch
    # serves every request that waited for it even when all are past max_wait_for_switch (no thrash)
    batch: bool = False

    @property
    def order(self) -> tuple[float, int, int]:
        """Who was first: the earlier, then the higher priority, then the earlier arrival."""
        return (self.since, -self.priority, self.seq)


@dataclass(frozen=True)
class ModelView:
    """What the decision reads of one model (the manager's ``Runtime``, as plain data)."""

    name: str
    state: str  # stopped, starting, ready, stopping, failed
    tickets: tuple[Ticket, ...] = ()  # its requests inside ``acquire``, in arrival order
    in_flight: int = 0
    parallel: int = 1
    draining: bool = False  # an unload waits for its requests in flight
    pending: bool = False  # its config changed (a reload): it restarts with it once idle
    has_worker: bool = False
    start_running: bool = False  # a start is under way (its task runs)
    external: bool = False  # a server at a url: no memory to admit
    need_known: bool = True
    retry_at: float = 0.0  # a failed model: when it may be tried again
    last_error: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the options its worker runs (or would run) with
    config_options: Mapping[str, Any] = field(default_factory=dict)  # its config's own
    overrides: Mapping[str, Any] = field(default_factory=dict)  # runtime options of its (next) load
    blockers: tuple[str, ...] = ()  # busy models its waiting requests wait for (their last decision)


@dataclass(frozen=True)
class World:
    models: Mapping[str, ModelView]
    now: float
    max_wait_for_switch: float


# -- moves: what one request does next -----------------------------------------------------------------------
@dataclass(frozen=True)
class Serve:
    """Lease the ready model to it (and apply its keep_alive)."""


@dataclass(frozen=True)
class Decide:
    """Ask admission (``admission.decide``) for ``need`` (None: the model's), then ask again with it."""

    need: Need | None = None
    reload: bool = False  # for a reload with the ticket's runtime options (no spares dismissed for it)


@dataclass(frozen=True)
class Reload:
    """Stop the idle model so that its next load takes this request's runtime options."""

    wants: Mapping[str, Any]


@dataclass(frozen=True)
class RestartForConfig:
    """Stop the idle model whose config changed; it then takes the new one."""


@dataclass(frozen=True)
class NeedFirst:
    """Set the next load's runtime options (``overrides``; other ones forget the need), find the need."""

    overrides: Mapping[str, Any]


@dataclass(frozen=True)
class Start:
    """Start the model on ``gpu`` (or spread over ``split``); ``warning``: started short of memory."""

    gpu: int | None = None
    split: tuple[tuple[int, int], ...] = ()
    warning: str = ""
    blockers: tuple[str, ...] = ()


@dataclass(frozen=True)
class WaitForStart:
    """The model is starting: wait for that start (the request holds its place in the queue)."""


@dataclass(frozen=True)
class Evict:
    """Stop these idle models, then wait."""

    victims: tuple[str, ...]
    reason: str
    blockers: tuple[str, ...]
    wake_at: float


@dataclass(frozen=True)
class Recover:
    """Memory that was freed is not back yet as the box sees it: look again at ``wake_at``."""

    reason: str
    blockers: tuple[str, ...]
    wake_at: float


@dataclass(frozen=True)
class Refuse:
    """507: it can never fit (the whole budget, or what the pinned models leave)."""

    reason: str


@dataclass(frozen=True)
class FailBackoff:
    """503: its last start failed and the backoff has not run out."""

    message: str
    retry_after: float


@dataclass(frozen=True)
class Wait:
    """Wait in the queue for a change (or ``wake_at``, the bound past which it is overdue). ``reason`` (None:
    unchanged) is what /status shows; ``blockers`` (None: unchanged) the busy models in its way."""

    reason: str | None
    wake_at: float
    blockers: tuple[str, ...] | None = None


Move = (
    Serve
    | Decide
    | Reload
    | RestartForConfig
    | NeedFirst
    | Start
    | WaitForStart
    | Evict
    | Recover
    | Refuse
    | FailBackoff
    | Wait
)


# -- the queue ------------------------------------------------------------------------------------------------
def overdue(world: World) -> list[Ticket]:
    """Requests that have waited past the bound for a model that must wait for busy models."""
    limit = world.now - world.max_wait_for_switch
    return [
        t
        for m in world.models.values()
        if m.blockers and m.state in ("stopped", "failed", "stopping")
        for t in m.tickets
        if t.since <= limit
    ]


def overtaken(world: World, ticket: Ticket, late: Sequence[Ticket] | None = None) -> bool:
    """Would serving this request overtake an earlier one, past the bound, that its model is in the way of?"""
    if ticket.batch:
        return False
    late = overdue(world) if late is None else late
    return any(
        o.model != ticket.model and ticket.model in world.models[o.model].blockers and o.order < ticket.order
        for o in late
    )


def may_serve(world: World, ticket: Ticket) -> bool:
    """A slot is free for this request: its model's earlier requests that may go take theirs first."""
    model = world.models[ticket.model]
    late = overdue(world)
    if model.in_flight >= model.parallel or overtaken(world, ticket, late):
        return False
    ahead = sum(1 for t in model.tickets if t.order < ticket.order and not overtaken(world, t, late))
    return model.in_flight + ahead < model.parallel


def first_misfit(model: ModelView) -> Ticket | None:
    """Its earliest request that wants other runtime options than its worker was loaded with."""
    misfits = [t for t in model.tickets if not ropts.fits(model.options, t.wants)]
    return min(misfits, key=lambda t: t.order) if misfits else None


def load_options(model: ModelView) -> dict[str, Any]:
    """The runtime options a load starts with: those of its earliest request that asks for some; else the
    config's (a value stays until the model unloads, and the next load starts from the config)."""
    asking = [t for t in model.tickets if t.wants]
    if not asking:
        return {}
    wants = min(asking, key=lambda t: t.order).wants
    return {k: v for k, v in wants.items() if model.config_options.get(k) != v}


def kept_alive(
    current: float, set_by_caller: bool, requested: float | None, *, admin: bool, pinned: bool
) -> tuple[float, bool]:
    """The model's keep_alive once a request asking for ``requested`` is served, and whether a caller set
    it this load. An admin's replaces it; a user's (capped by the routes at ``max_user_keep_alive``) may
    lengthen it, and shorten only the config's default: never what a caller set during this load (an
    admin's pin included). A config's ``pin_keep_alive`` ignores every request's."""
    if requested is None or pinned:
        return current, set_by_caller
    if admin or not set_by_caller or requested >= current:
        return requested, True
    return current, True


def shown(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


# -- the decision ---------------------------------------------------------------------------------------------
def next_move(world: World, ticket: Ticket, decision: Decision | None = None) -> Move:
    """What this request does next. ``decision``: admission's answer, when a ``Decide`` asked for one."""
    model = world.models[ticket.model]
    if model.state == "ready" and model.has_worker and not model.draining:
        return _on_ready(world, model, ticket, decision)
    if model.state == "starting" and model.start_running:
        return WaitForStart()
    if model.state in ("stopped", "failed") and not model.draining and not overtaken(world, ticket):
        return _on_stopped(world, model, ticket, decision)
    return Wait(None, _bound(world, ticket))


def _bound(world: World, ticket: Ticket) -> float:
    """When it becomes overdue: the models in its way take no more requests from then on."""
    return ticket.since + world.max_wait_for_switch


def _on_ready(world: World, model: ModelView, ticket: Ticket, decision: Decision | None) -> Move:
    first = first_misfit(model)
    if first is not None and first.order <= ticket.order:
        # the model must reload with other runtime options: those that came before go first
        earliest = all(t.order >= ticket.order for t in model.tickets)
        if first is ticket and model.in_flight == 0 and earliest and not overtaken(world, ticket):
            if decision is None:
                return Decide(ticket.need, reload=True)
            if decision.kind == "refuse":
                return Refuse(decision.reason)
            return Reload(ticket.wants)
        return Wait(
            f"waiting to reload with {shown(first.wants)} once its earlier requests finish", _bound(world, ticket)
        )
    if model.pending:
        # its config changed (a reload): requests from now on wait for its restart, which begins when those in
        # flight are done, so a steady load does not keep the old config for ever
        if model.in_flight == 0:
            return RestartForConfig()
        return Wait("waiting for its restart with its changed config", _bound(world, ticket))
    if may_serve(world, ticket):
        return Serve()
    if overtaken(world, ticket):
        reason = "waiting: requests for other models have waited longer than limits.max_wait_for_switch"
    else:
        reason = f"waiting for a slot: {model.in_flight} of {model.parallel} in use"
    return Wait(reason, _bound(world, ticket))


def _on_stopped(world: World, model: ModelView, ticket: Ticket, decision: Decision | None) -> Move:
    if model.state == "failed" and world.now < model.retry_at:
        return FailBackoff(model.last_error or "the model failed to load", model.retry_at - world.now)
    if model.external:
        return Start()
    overrides = load_options(model)
    if overrides != dict(model.overrides) or not model.need_known:
        return NeedFirst(overrides)  # a load with other runtime options: its need anew (or not found yet)
    if decision is None:
        return Decide()
    # the models in its way, while requests for it wait (those it unloads too: the switch it waits for)
    blockers = tuple(dict.fromkeys((*model.blockers, *decision.blockers, *decision.victims)))
    if decision.kind == "refuse":
        return Refuse(decision.reason)
    if decision.kind == "start":
        return Start(decision.gpu, decision.split, decision.reason, blockers)
    if decision.kind == "evict":
        return Evict(tuple(decision.victims), decision.reason, blockers, _bound(world, ticket))
    if decision.kind == "recover":
        return Recover(decision.reason, blockers, world.now + RECOVERY_POLL)
    return Wait(decision.reason, _bound(world, ticket), blockers)
