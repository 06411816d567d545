"""The scheduling decision as a pure function: plain data in, one move out (no manager, no event loop).

Each row is a request's situation (its model's state, the other requests, the clock, admission's answer)
and the move the scheduler must answer. The manager carries the moves out: tests/test_manager.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import pytest

from proxy.admission import Decision, Occupant, Snapshot, decide
from proxy.config import MemoryLimits
from proxy.memory import Need
from proxy.scheduler import (
    RECOVERY_POLL,
    Decide,
    Evict,
    FailBackoff,
    ModelView,
    Move,
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
    first_misfit,
    kept_alive,
    load_options,
    may_serve,
    next_move,
    overdue,
    overtaken,
)
from tests.fake_memory import GiB

BOUND = 30.0  # limits.max_wait_for_switch


def world(*models: ModelView, now: float = 100.0) -> World:
    return World({m.name: m for m in models}, now, BOUND)


def view(name: str, state: str, *tickets: Ticket, **kw: Any) -> ModelView:
    worker = state in ("starting", "ready", "stopping")
    base: dict[str, Any] = {"has_worker": worker, "start_running": state == "starting"}
    return ModelView(name, state, tuple(tickets), **{**base, **kw})


def ticket(model: str = "a", since: float = 90.0, seq: int = 0, **kw: Any) -> Ticket:
    return Ticket(model, since, seq, **kw)


# -- one model, one request ----------------------------------------------------------------------------------
T = ticket()
N = Need(1, 0, "config")
ROWS: list[tuple[str, World, Ticket, Decision | None, Move]] = [
    ("ready with a free slot: serve", world(view("a", "ready", T)), T, None, Serve()),
    (
        "ready, its one slot in use: wait for it",
        world(view("a", "ready", T, in_flight=1)),
        T,
        None,
        Wait("waiting for a slot: 1 of 1 in use", 90.0 + BOUND),
    ),
    ("ready but draining (an unload): wait", world(view("a", "ready", T, draining=True)), T, None, Wait(None, 120.0)),
    ("starting: wait for that start", world(view("a", "starting", T)), T, None, WaitForStart()),
    ("stopping: wait", world(view("a", "stopping", T)), T, None, Wait(None, 120.0)),
    ("stopped, need unknown: find it first", world(view("a", "stopped", T, need_known=False)), T, None, NeedFirst({})),
    ("stopped, need known: ask admission", world(view("a", "stopped", T)), T, None, Decide()),
    ("stopped, external server: start, no admission", world(view("a", "stopped", T, external=True)), T, None, Start()),
    (
        "admission says start on cuda:1",
        world(view("a", "stopped", T)),
        T,
        Decision("start", gpu=1),
        Start(1, (), "", ()),
    ),
    (
        "admission refuses: 507",
        world(view("a", "stopped", T)),
        T,
        Decision("refuse", reason="too big"),
        Refuse("too big"),
    ),
    (
        "admission evicts b: stop it and wait, b is in the way",
        world(view("a", "stopped", T)),
        T,
        Decision("evict", victims=["b"], reason="unloading b"),
        Evict(("b",), "unloading b", ("b",), 120.0),
    ),
    (
        "admission waits for busy b (or a starting one): b is a blocker",
        world(view("a", "stopped", T)),
        T,
        Decision("wait", blockers=["b"], reason="busy: b"),
        Wait("busy: b", 120.0, ("b",)),
    ),
    (
        "memory not back yet: look again soon",
        world(view("a", "stopped", T)),
        T,
        Decision("recover", reason="coming back"),
        Recover("coming back", (), 100.0 + RECOVERY_POLL),
    ),
    (
        "failed, backoff not over: 503 with what is left of it",
        world(view("a", "failed", T, retry_at=104.0, last_error="boom")),
        T,
        None,
        FailBackoff("boom", 4.0),
    ),
    ("failed, backoff over: ask admission again", world(view("a", "failed", T, retry_at=99.0)), T, None, Decide()),
    (
        "config changed, nothing in flight: restart it",
        world(view("a", "ready", T, pending=True)),
        T,
        None,
        RestartForConfig(),
    ),
    (
        "config changed, one in flight: wait for the restart",
        world(view("a", "ready", T, pending=True, in_flight=1, parallel=4)),
        T,
        None,
        Wait("waiting for its restart with its changed config", 120.0),
    ),
]


@pytest.mark.parametrize(("what", "w", "t", "decision", "move"), ROWS, ids=[r[0] for r in ROWS])
def test_next_move(what: str, w: World, t: Ticket, decision: Decision | None, move: Move) -> None:
    assert next_move(w, t, decision) == move


# -- runtime options: reload, in order ----------------------------------------------------------------------
def test_a_request_that_wants_other_options_reloads_the_idle_model_after_a_refusal_check() -> None:
    wants = ticket(wants={"n_ctx": 2048}, need=N)
    w = world(view("a", "ready", wants, options={"n_ctx": 4096}))
    assert next_move(w, wants) == Decide(N, reload=True)
    assert next_move(w, wants, Decision("start")) == Reload({"n_ctx": 2048})
    assert next_move(w, wants, Decision("refuse", reason="never")) == Refuse("never")


def test_a_reload_waits_for_requests_in_flight_and_holds_back_later_ones() -> None:
    wants = ticket(seq=1, wants={"n_ctx": 2048})
    later = ticket(since=95.0, seq=2)
    w = world(view("a", "ready", wants, later, options={"n_ctx": 4096}, in_flight=1, parallel=4))
    assert next_move(w, wants) == Wait("waiting to reload with n_ctx=2048 once its earlier requests finish", 120.0)
    # a later request that fits the loaded options is held back too: it came after the misfit
    assert isinstance(next_move(w, later), Wait)
    # an earlier request that fits is served first
    earlier = ticket(since=80.0, seq=0)
    w = world(view("a", "ready", earlier, wants, options={"n_ctx": 4096}, parallel=4))
    assert next_move(w, earlier) == Serve()
    assert isinstance(next_move(w, wants), Wait)
    assert first_misfit(w.models["a"]) is wants


def test_load_options_are_the_earliest_askers_less_what_the_config_has() -> None:
    first = ticket(seq=0, wants={"n_ctx": 2048})
    second = ticket(seq=1, wants={"n_ctx": 1024})
    m = view("a", "stopped", second, first, config_options={"n_ctx": 4096})
    assert load_options(m) == {"n_ctx": 2048}
    assert load_options(view("a", "stopped", ticket(wants={"n_ctx": 4096}), config_options={"n_ctx": 4096})) == {}
    # a stopped model whose next load needs other options than the last one's: its need anew
    w = world(dataclasses.replace(m, overrides={"n_ctx": 1024}))
    assert next_move(w, first) == NeedFirst({"n_ctx": 2048})


# -- the queue: parallel slots in order, and the bound -------------------------------------------------------
def test_slots_go_in_arrival_order_then_priority() -> None:
    first, second = ticket(seq=0), ticket(seq=1)
    w = world(view("a", "ready", second, first, parallel=1))
    assert may_serve(w, first) and not may_serve(w, second)
    urgent = ticket(seq=2, priority=5)
    w = world(view("a", "ready", second, urgent, parallel=1))
    assert may_serve(w, urgent) and not may_serve(w, second)


def test_past_the_bound_the_models_in_the_way_serve_no_later_request() -> None:
    waiting = ticket("b", since=50.0)  # waited 50 s > 30 s for a, which is busy
    later = ticket("a", since=90.0, seq=1)
    w = world(view("b", "stopped", waiting, blockers=("a",)), view("a", "ready", later, in_flight=0, parallel=2))
    assert overdue(w) == [waiting]
    assert overtaken(w, later)
    assert next_move(w, later) == Wait(
        "waiting: requests for other models have waited longer than limits.max_wait_for_switch", 120.0
    )
    # its turn's batch is never overtaken
    batch = ticket("a", since=90.0, seq=1, batch=True)
    w = world(view("b", "stopped", waiting, blockers=("a",)), view("a", "ready", batch, parallel=2))
    assert next_move(w, batch) == Serve()
    # within the bound nothing is overdue
    w = world(view("b", "stopped", waiting, blockers=("a",)), view("a", "ready", later, parallel=2), now=70.0)
    assert overdue(w) == [] and next_move(w, later) == Serve()


def test_an_overtaken_request_for_a_stopped_model_starts_nothing() -> None:
    waiting = ticket("b", since=50.0)
    later = ticket("a", since=90.0, seq=1)
    w = world(view("b", "stopped", waiting, blockers=("a",)), view("a", "stopped", later))
    assert next_move(w, later) == Wait(None, 120.0)


def test_blockers_accumulate_while_it_waits() -> None:
    w = world(view("a", "stopped", T, blockers=("b",)))
    move = next_move(w, T, Decision("wait", blockers=["c"], reason="busy: c"))
    assert move == Wait("busy: c", 120.0, ("b", "c"))


# -- keep_alive: an admin's replaces, a user's lengthens, never shortens a caller's -------------------------
INF = math.inf
KEEP: list[tuple[str, float, bool, float | None, bool, bool, tuple[float, bool]]] = [
    ("no keep_alive asked: unchanged", 300.0, False, None, False, False, (300.0, False)),
    ("an admin pins", 300.0, False, INF, True, False, (INF, True)),
    ("an admin shortens a pin", INF, True, 1.0, True, False, (1.0, True)),
    ("a user cannot shorten an admin's pin", INF, True, 0.001, False, False, (INF, True)),
    ("a user cannot shorten another caller's value", 3600.0, True, 60.0, False, False, (3600.0, True)),
    ("a user lengthens", 300.0, True, 3600.0, False, False, (3600.0, True)),
    ("a user may shorten the config's default (Ollama)", 300.0, False, 60.0, False, False, (60.0, True)),
    ("a config's pin_keep_alive ignores an admin's too", 300.0, False, INF, True, True, (300.0, False)),
]


@pytest.mark.parametrize(
    ("what", "current", "set_", "asked", "admin", "pinned", "result"), KEEP, ids=[k[0] for k in KEEP]
)
def test_kept_alive(
    what: str, current: float, set_: bool, asked: float | None, admin: bool, pinned: bool, result: tuple[float, bool]
) -> None:
    assert kept_alive(current, set_, asked, admin=admin, pinned=pinned) == result


# -- admission: a starting or stopping model holds its full need and a slot --------------------------------
LIMITS = MemoryLimits(ram=10 * GiB, reserve_ram=0, reserve_vram=0, recovery_timeout=10.0)
BOX = Snapshot(64 * GiB, 64 * GiB)


def need(gib: float) -> Need:
    return Need(int(gib * GiB), 0, "config")


def occupant(name: str, state: Literal["starting", "ready", "stopping"], gib: float, **kw: Any) -> Occupant:
    return Occupant(name, state, need(gib), None, **kw)


ADMISSION: list[tuple[str, list[Occupant], Need, int | None, Decision]] = [
    (
        "one slot, another model starting (idle or not): wait for it, never evict it",
        [occupant("a", "starting", 1)],
        need(1),
        1,
        Decision("wait", blockers=["a"], reason="waiting for memory: no model slot free; busy: a"),
    ),
    (
        "memory for one, another model starting: wait for it",
        [occupant("a", "starting", 6)],
        need(6),
        None,
        Decision("wait", blockers=["a"], reason="waiting for memory: needs 6.0 GiB RAM, 4.0 GiB free; busy: a"),
    ),
    (
        "one slot, a model stopping: wait for it to go, unload nothing more",
        [occupant("a", "stopping", 1), occupant("c", "ready", 1)],
        need(1),
        2,
        Decision("wait", reason="waiting for memory: no model slot free; unloading a"),
    ),
    (
        "an idle ready model beside a starting one is the victim",
        [occupant("a", "starting", 1), occupant("c", "ready", 1)],
        need(1),
        2,
        Decision("evict", victims=["c"], reason="waiting for memory: no model slot free; unloading c"),
    ),
    (
        "the one slot held by a model kept for ever: 507, not a start past the cap",
        [occupant("a", "ready", 1, pinned=True, keep_alive=math.inf)],
        need(1),
        1,
        Decision(
            "refuse",
            reason="model 'b' needs a model slot; limits.max_loaded_models is reached by models kept loaded for "
            "ever (a)",
        ),
    ),
]


@pytest.mark.parametrize(("what", "occupants", "wanted", "slots", "decision"), ADMISSION, ids=[a[0] for a in ADMISSION])
def test_admission(what: str, occupants: list[Occupant], wanted: Need, slots: int | None, decision: Decision) -> None:
    assert decide("b", wanted, None, occupants, BOX, LIMITS, slots) == decision


# -- the queue's edges ---------------------------------------------------------------------------------------
def test_only_a_stopped_failed_or_stopping_model_with_blockers_has_overdue_requests() -> None:
    old = ticket("b", since=10.0)
    assert overdue(world(view("b", "stopped", old))) == []  # no busy model in its way
    assert overdue(world(view("b", "starting", old, blockers=("a",)))) == []  # its switch is under way
    for state in ("stopped", "failed", "stopping"):
        assert overdue(world(view("b", state, old, blockers=("a",)))) == [old]


def test_parallel_slots_serve_the_requests_ahead_and_this_one() -> None:
    first, second, third = ticket(seq=0), ticket(seq=1), ticket(seq=2)
    w = world(view("a", "ready", first, second, third, parallel=2))
    assert may_serve(w, first) and may_serve(w, second) and not may_serve(w, third)


def test_the_backoff_ends_at_retry_at() -> None:
    assert next_move(world(view("a", "failed", T, retry_at=100.0)), T) == Decide()


def test_the_earliest_misfit_holds_back_the_later_ones() -> None:
    later = ticket(seq=2, wants={"n_ctx": 1024})
    earlier = ticket(seq=1, wants={"n_ctx": 2048})
    assert first_misfit(view("a", "ready", later, earlier, options={"n_ctx": 4096})) is earlier
