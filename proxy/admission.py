"""Admission by memory: may a model start now, on which GPU, and if not, what to unload or wait for.

``decide`` is a function of plain data (what is loaded, what each needs, what the probe reads, the
limits); the manager gathers the data, acts on the ``Decision`` and owns every state change.

What is free, for RAM and for each GPU's VRAM, is the smaller of
- the budget: ``limits.memory.ram`` / ``.vram`` (or the total less the reserve) less the needs of every
  model loaded, starting or stopping;
- what the box has now: psutil's available RAM / NVML's free VRAM, less the reserve, less the full need of
  every load in progress (its memory is not all taken yet).
A stopping model's need counts as coming back: nothing more is unloaded for it, the start waits. A
starting model counts at its full need and takes a slot: it is never a victim, and a start that does not fit
beside it waits for it (it is a blocker, like a busy model).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from proxy.config import MemoryLimits
from proxy.memory import Need, format_bytes
from proxy.nvml import GpuMemory
from proxy.policy import Candidate, Deficit, choose_victims


@dataclass(frozen=True)
class Occupant:
    """A model that holds memory: starting, ready or stopping; or a warm spare worker (``proxy.spares``):
    its memory counts, but it takes no model slot, is never a victim here (the manager stops spares
    first, before it asks again) and never something to wait for."""

    name: str
    state: Literal["starting", "ready", "stopping", "spare"]
    need: Need
    gpu: int | None
    busy: bool = False
    keep_alive: float = 300.0
    remaining: float | None = None
    last_used: float = 0.0
    pinned: bool = False


@dataclass(frozen=True)
class Snapshot:
    ram_total: int
    ram_available: int
    gpus: Sequence[GpuMemory] = ()


@dataclass(frozen=True)
class Decision:
    kind: Literal["start", "evict", "wait", "recover", "refuse"]
    gpu: int | None = None
    # a model spread over several GPUs (``span_gpus``): (GPU index, its share of the VRAM need); gpu is None
    split: tuple[tuple[int, int], ...] = ()
    victims: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)  # busy models it would unload were they idle ("wait")
    reason: str = ""  # why it waits, what it evicts, or why it is refused


def _ram_whole(limits: MemoryLimits, snap: Snapshot) -> int:
    whole = snap.ram_total - limits.reserve_ram
    return min(whole, limits.ram) if limits.ram is not None else whole


def _vram_whole(limits: MemoryLimits, gpu: GpuMemory) -> int:
    whole = gpu.total - limits.reserve_vram
    return min(whole, limits.vram) if limits.vram is not None else whole


def budgets(limits: MemoryLimits, snap: Snapshot) -> dict[str, object]:
    """The budgets and what is free now, for /status."""
    return {
        "ram": {
            "budget": _ram_whole(limits, snap),
            "available": snap.ram_available,
            "reserve": limits.reserve_ram,
        },
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "budget": _vram_whole(limits, g),
                "free": g.free,
                "total": g.total,
                "reserve": limits.reserve_vram,
            }
            for g in snap.gpus
        ],
    }


def free_ram(limits: MemoryLimits, snap: Snapshot, occupants: Sequence[Occupant]) -> int:
    """The RAM free beside ``occupants`` (the smaller of the budget's and the box's, less the reserve and what
    the models starting will still take)."""
    booked = _ram_whole(limits, snap) - sum(o.need.ram for o in occupants)
    loading = sum(o.need.ram for o in occupants if o.state == "starting")
    physical = snap.ram_available - limits.reserve_ram - loading
    return min(booked, physical)


def _free_vram(limits: MemoryLimits, gpu: GpuMemory, occupants: Sequence[Occupant]) -> int:
    here = [o for o in occupants if o.gpu == gpu.index]
    booked = _vram_whole(limits, gpu) - sum(o.need.vram for o in here)
    loading = sum(o.need.vram for o in here if o.state == "starting")
    physical = gpu.free - limits.reserve_vram - loading
    return min(booked, physical)


def _names(occupants: Iterable[Occupant]) -> list[str]:
    """Their names, each once (a model spread over GPUs is an occupant per GPU)."""
    return list(dict.fromkeys(o.name for o in occupants))


def _candidates(occupants: Sequence[Occupant], gpu: int | None, *, busy_too: bool = False) -> list[Candidate]:
    """The ready models as candidates to unload: one each, with the RAM and the VRAM on ``gpu`` it frees. A
    starting model is never a victim, only something to wait for (``busy_too``: the blockers)."""
    merged: dict[str, Candidate] = {}
    for o in occupants:
        if o.state not in ("ready", "starting") or (o.state == "starting" and not busy_too):
            continue
        vram = o.need.vram if gpu is not None and o.gpu == gpu else 0
        seen = merged.get(o.name)
        if seen is not None:  # another GPU's part of a model spread over several
            merged[o.name] = dataclasses.replace(seen, ram=seen.ram + o.need.ram, vram=seen.vram + vram)
            continue
        merged[o.name] = Candidate(
            name=o.name,
            keep_alive=o.keep_alive,
            last_used=o.last_used,
            busy=o.busy and not busy_too,
            ram=o.need.ram,
            vram=vram,
            pinned=o.pinned,
            remaining=o.remaining,
        )
    return list(merged.values())


def split_shares(vram: int, budgets: Mapping[int, int]) -> dict[int, int]:
    """A VRAM need spread over GPUs in proportion to their budgets (what llama.cpp's tensor split is then
    set to), each share at most its GPU's budget."""
    total = sum(max(0, b) for b in budgets.values())
    return {i: min(max(0, b), math.ceil(vram * max(0, b) / total)) for i, b in budgets.items()} if total else {}


def decide(
    name: str,
    need: Need,
    allowed_gpus: Sequence[int] | None,
    occupants: Sequence[Occupant],
    snap: Snapshot,
    limits: MemoryLimits,
    max_loaded: int | None = None,
    recovering: bool = False,
    span: bool = False,
) -> Decision:
    """What to do for ``name`` (stopped, wanted) now. ``recovering``: a model stopped less than
    ``limits.memory.recovery_timeout`` ago, so the box may not show its memory back yet. ``span``: it may
    be spread over several of its GPUs (a llama.cpp tensor split), which it is only when no one GPU's
    budget can ever hold it."""
    gpus = [g for g in snap.gpus if allowed_gpus is None or g.index in allowed_gpus]
    vram_need = need.vram if gpus else 0  # no GPU (or no NVML): VRAM needs are zero
    # -- never fits -----------------------------------------------------------------------------------------
    ram_whole = _ram_whole(limits, snap)
    if need.ram > ram_whole:
        return Decision(
            "refuse",
            reason=f"model '{name}' needs {format_bytes(need.ram)} of RAM; "
            f"the whole budget is {format_bytes(ram_whole)}",
        )
    fits_one = any(vram_need <= _vram_whole(limits, g) for g in gpus)
    if vram_need and not fits_one and span and len(gpus) > 1:
        return _decide_split(name, need, gpus, occupants, snap, limits, max_loaded, recovering)
    if vram_need and not fits_one:
        best = max(_vram_whole(limits, g) for g in gpus)
        return Decision(
            "refuse",
            reason=f"model '{name}' needs {format_bytes(vram_need)} of VRAM; the largest GPU budget is "
            f"{format_bytes(best)}",
        )
    # -- on which GPU: the most free that fits; else the one where unloading frees the most ---------------
    gpu: int | None = None
    if vram_need:
        free = {g.index: _free_vram(limits, g, occupants) for g in gpus}
        fitting = [g for g in gpus if free[g.index] >= vram_need]
        if fitting:
            gpu = max(fitting, key=lambda g: (free[g.index], -g.index)).index
        else:

            def reclaimable(g: GpuMemory) -> int:
                return free[g.index] + sum(o.need.vram for o in occupants if o.gpu == g.index and not o.pinned)

            gpu = max(gpus, key=lambda g: (reclaimable(g), -g.index)).index
    return _make_room(name, need, vram_need, gpu, gpus, occupants, snap, limits, max_loaded, recovering)


def _decide_split(
    name: str,
    need: Need,
    gpus: Sequence[GpuMemory],
    occupants: Sequence[Occupant],
    snap: Snapshot,
    limits: MemoryLimits,
    max_loaded: int | None,
    recovering: bool,
) -> Decision:
    """A model too big for any one of its GPUs, spread over all of them in proportion to their budgets.
    The GPU most short of its share decides what to unload or wait for; the manager asks again after each
    step, so the others come in turn."""
    budget = {g.index: _vram_whole(limits, g) for g in gpus}
    total = sum(max(0, b) for b in budget.values())
    if need.vram > total:
        return Decision(
            "refuse",
            reason=f"model '{name}' needs {format_bytes(need.vram)} of VRAM; the {len(gpus)} GPUs it may span "
            f"have {format_bytes(total)} in all",
        )
    shares = split_shares(need.vram, budget)
    free = {g.index: _free_vram(limits, g, occupants) for g in gpus}
    worst = max(gpus, key=lambda g: (shares[g.index] - free[g.index], -g.index)).index
    decision = _make_room(name, need, shares[worst], worst, gpus, occupants, snap, limits, max_loaded, recovering)
    if decision.kind == "refuse":
        return decision
    return dataclasses.replace(decision, gpu=None, split=tuple(sorted(shares.items())))


def _make_room(
    name: str,
    need: Need,
    vram_need: int,
    gpu: int | None,
    gpus: Sequence[GpuMemory],
    occupants: Sequence[Occupant],
    snap: Snapshot,
    limits: MemoryLimits,
    max_loaded: int | None,
    recovering: bool,
) -> Decision:
    """Start on ``gpu`` (``vram_need`` there), or what to unload or wait for first, or refuse."""
    # -- what is missing --------------------------------------------------------------------------------------
    ram_free = free_ram(limits, snap, occupants)
    free_vram = _free_vram(limits, next(g for g in gpus if g.index == gpu), occupants) if gpu is not None else 0
    count = len(_names(o for o in occupants if o.state != "spare"))  # a model spread over GPUs: one
    missing = Deficit(
        ram=need.ram - ram_free,
        vram=vram_need - free_vram if gpu is not None else 0,
        slots=count + 1 - max_loaded if max_loaded else 0,
    )
    if missing.nothing:
        return Decision("start", gpu=gpu)
    stopping = [o for o in occupants if o.state == "stopping"]
    after = Deficit(
        ram=missing.ram - sum(o.need.ram for o in stopping),
        vram=missing.vram - sum(o.need.vram for o in stopping if o.gpu == gpu),
        slots=missing.slots - len(_names(stopping)),
    )
    short = _shortfall(need, vram_need, ram_free, free_vram, gpu)
    if after.nothing:
        names = ", ".join(_names(stopping))
        return Decision("wait", gpu=gpu, reason=f"waiting for memory: {short}; unloading {names}")
    if recovering and _booked_fits(need, vram_need, gpu, gpus, occupants, limits, snap) and missing.slots <= 0:
        # what we unloaded is not back yet as the box sees it: wait for it rather than unload more
        return Decision("recover", gpu=gpu, reason=f"waiting for memory: {short}; waiting for it to come back")
    victims = choose_victims(_candidates(occupants, gpu), after)
    if victims:
        return Decision(
            "evict", gpu=gpu, victims=victims, reason=f"waiting for memory: {short}; unloading " + ", ".join(victims)
        )
    if stopping:
        names = ", ".join(_names(stopping))
        return Decision("wait", gpu=gpu, reason=f"waiting for memory: {short}; unloading {names}")
    busy = _names(o for o in occupants if (o.busy and o.state == "ready") or o.state == "starting")
    blockers = choose_victims(_candidates(occupants, gpu, busy_too=True), after)
    if blockers is not None:
        return Decision(
            "wait", gpu=gpu, blockers=blockers, reason=f"waiting for memory: {short}; busy: {', '.join(busy)}"
        )
    return _beyond_room(name, need, vram_need, gpu, gpus, occupants, snap, limits, missing, short, recovering)


def _beyond_room(
    name: str,
    need: Need,
    vram_need: int,
    gpu: int | None,
    gpus: Sequence[GpuMemory],
    occupants: Sequence[Occupant],
    snap: Snapshot,
    limits: MemoryLimits,
    missing: Deficit,
    short: str,
    recovering: bool,
) -> Decision:
    """Even every model of ours that may be unloaded (or waited for) would not free enough: refuse when the
    pinned models leave too little, else wait for the box to give back what we freed, then start anyway."""
    if missing.slots > 0:
        held = ", ".join(_names(o for o in occupants if o.state != "spare"))
        return Decision(
            "refuse",
            reason=f"model '{name}' needs a model slot; limits.max_loaded_models is reached by models kept "
            f"loaded for ever ({held})",
        )
    ram_whole = _ram_whole(limits, snap)
    where = f" on cuda:{gpu}" if gpu is not None else ""
    booked_ram = ram_whole - sum(o.need.ram for o in occupants if o.pinned)
    booked_vram = (
        min(
            _vram_whole(limits, g) - sum(o.need.vram for o in occupants if o.pinned and o.gpu == g.index)
            for g in gpus
            if g.index == gpu
        )
        if gpu is not None
        else math.inf
    )
    if need.ram > booked_ram or vram_need > booked_vram:
        pinned = ", ".join(_names(o for o in occupants if o.pinned))
        return Decision(
            "refuse",
            reason=f"model '{name}' needs {need.describe()}{where}; models kept loaded for ever ({pinned}) leave "
            f"{format_bytes(booked_ram)} of RAM"
            + (f" and {format_bytes(booked_vram)} of VRAM" if gpu is not None else ""),
        )
    # Other programs hold the memory: give the box time to hand back what we freed, then try anyway.
    if recovering:
        return Decision("recover", gpu=gpu, reason=f"waiting for memory: {short}; waiting for it to come back")
    return Decision("start", gpu=gpu, reason=f"starting with too little memory free: {short}")


def _booked_fits(
    need: Need,
    vram_need: int,
    gpu: int | None,
    gpus: Sequence[GpuMemory],
    occupants: Sequence[Occupant],
    limits: MemoryLimits,
    snap: Snapshot,
) -> bool:
    if need.ram > _ram_whole(limits, snap) - sum(o.need.ram for o in occupants):
        return False
    for g in gpus:
        if g.index == gpu:
            return vram_need <= _vram_whole(limits, g) - sum(o.need.vram for o in occupants if o.gpu == gpu)
    return True


def _shortfall(need: Need, vram_need: int, free_ram: int, free_vram: int, gpu: int | None) -> str:
    parts = []
    if need.ram > free_ram:
        parts.append(f"needs {format_bytes(need.ram)} RAM, {format_bytes(max(0, free_ram))} free")
    if gpu is not None and vram_need > free_vram:
        parts.append(f"needs {format_bytes(vram_need)} VRAM on cuda:{gpu}, {format_bytes(max(0, free_vram))} free")
    return "; ".join(parts) or "no model slot free"
