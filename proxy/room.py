"""Admission over the manager's runtimes: the models and warm spares that hold memory as
``admission.Occupant``s, and the admission decision for one model (``admission.decide``) from them, the
memory probe's snapshot and the limits. Plain reads: the manager acts on the decision."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

from proxy.admission import Decision, Occupant, Snapshot, decide, free_ram
from proxy.config import Settings
from proxy.memory import MemoryProbe, Need
from proxy.runtime import Runtime, per_gpu
from proxy.scheduler import World, overdue, overtaken
from proxy.spares import Spares


def occupants(
    rt: Runtime | None, runtimes: Iterable[Runtime], world: World, now: float, evict_pinned: bool
) -> list[Occupant]:
    """The models other than ``rt`` (None: every one) that hold a slot, as admission sees them (one per GPU
    when split)."""
    late = overdue(world)
    out = []
    for o in runtimes:
        if o is rt or not o.occupies_slot:
            continue
        remaining = o.idle_deadline - now if o.idle_deadline is not None else o.keep_alive
        occupant = Occupant(
            name=o.config.name,
            state=o.state.value,  # type: ignore[arg-type]  # starting, ready or stopping here
            need=o.counted,
            gpu=o.gpu,
            # its waiting requests keep it only while none for a model in its way waited too long
            busy=o.in_flight > 0 or o.draining or any(not overtaken(world, t, late) for t in o.tickets),
            keep_alive=o.keep_alive,
            remaining=remaining,
            last_used=o.last_used,
            pinned=math.isinf(o.keep_alive) and not evict_pinned,
        )
        out += per_gpu(occupant, o.split) if o.split else [occupant]
    return out


def snapshot(probe: MemoryProbe) -> Snapshot:
    return Snapshot(probe.ram_total(), probe.ram_available(), probe.gpus())


def admit(
    rt: Runtime,
    need: Need | None,
    others: list[Occupant],
    probe: MemoryProbe,
    spares: Spares | None,
    settings: Settings,
    recovering: bool,
) -> Decision:
    """``admission.decide`` for ``rt`` beside ``others``; the warm spares count like a model's need, and what
    its own kind's spare holds is free for it."""
    held, mine = spares.occupants(rt.config, probe) if spares is not None else ([], 0)
    snap = snapshot(probe)
    if mine:
        snap = dataclasses.replace(snap, ram_available=snap.ram_available + mine)
    return decide(
        rt.config.name,
        need or rt.need or Need(0, 0, "unknown"),
        rt.config.gpus,
        [*others, *held],
        snap,
        settings.memory,
        settings.max_loaded_models,
        recovering,
        span=rt.config.span_gpus,
    )


def ram_free(others: list[Occupant], probe: MemoryProbe, spares: Spares | None, settings: Settings) -> int:
    """The RAM admission counts as free beside ``others`` and every warm spare (the budget and what the box
    has now, less the reserve): what a new warm spare is weighed against."""
    held = spares.occupants(None, probe)[0] if spares is not None else []
    return free_ram(settings.memory, snapshot(probe), [*others, *held])
