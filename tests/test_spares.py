"""Warm spares in admission (proxy/admission.py): their memory counts, they take no model slot, they are
never a victim nor something to wait for (the manager stops them first and asks again)."""

from __future__ import annotations

from proxy.admission import Occupant, Snapshot, decide
from proxy.config import MemoryLimits
from proxy.memory import GiB, Need

LIMITS = MemoryLimits(ram=4 * GiB, reserve_ram=0)
SNAP = Snapshot(ram_total=16 * GiB, ram_available=16 * GiB)


def spare(ram: int) -> Occupant:
    return Occupant("(spare piper)", "spare", Need(ram, 0, "measured"), None)


def test_a_spares_memory_counts_in_the_budget() -> None:
    need = Need(3 * GiB + GiB // 2, 0, "estimate")
    clean = decide("m", need, None, [], SNAP, LIMITS)
    assert clean.kind == "start" and not clean.reason
    held = decide("m", need, None, [spare(GiB)], SNAP, LIMITS)
    # not a clean start (the manager stops the spares on this, then asks again), and a spare is no victim
    assert held.reason.startswith("starting with too little memory free: needs 3.5 GiB RAM, 3.0 GiB free")
    assert held.victims == [] and held.blockers == []


def test_a_spare_takes_no_model_slot() -> None:
    need = Need(GiB, 0, "estimate")
    beside = decide("m", need, None, [spare(GiB // 4)], SNAP, LIMITS, max_loaded=1)
    assert beside.kind == "start" and not beside.reason
    loaded = Occupant("other", "ready", Need(GiB, 0, "measured"), None)
    assert decide("m", need, None, [loaded], SNAP, LIMITS, max_loaded=1).victims == ["other"]
