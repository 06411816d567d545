"""admission.decide at its edges (issue 25, item 6: gaps a planted-bug audit found): a stopping model's
memory is still taken, and a need exactly equal to what is free starts."""

from __future__ import annotations

from proxy.admission import Occupant, Snapshot, decide
from proxy.config import MemoryLimits
from proxy.memory import GiB, Need
from proxy.nvml import GpuMemory

LIMITS = MemoryLimits(ram=10 * GiB, reserve_ram=0, reserve_vram=0)
ROOMY = Snapshot(ram_total=64 * GiB, ram_available=64 * GiB)  # the box has plenty: the budget decides


def test_a_stopping_models_ram_counts_until_it_is_stopped() -> None:
    stopping = Occupant("old", "stopping", Need(6 * GiB, 0, "measured"), None)
    decision = decide("new", Need(6 * GiB, 0, "config"), None, [stopping], ROOMY, LIMITS)
    assert decision.kind == "wait" and decision.reason.endswith("unloading old")
    assert "needs 6.0 GiB RAM, 4.0 GiB free" in decision.reason
    assert decide("new", Need(4 * GiB, 0, "config"), None, [stopping], ROOMY, LIMITS).kind == "start"


def test_a_need_exactly_equal_to_what_is_free_starts() -> None:
    loaded = Occupant("a", "ready", Need(4 * GiB, 0, "measured"), None)
    exact = decide("b", Need(6 * GiB, 0, "config"), None, [loaded], ROOMY, LIMITS)
    assert exact.kind == "start" and not exact.reason and not exact.victims
    assert decide("b", Need(6 * GiB + 1, 0, "config"), None, [loaded], ROOMY, LIMITS).victims == ["a"]
    whole = decide("b", Need(10 * GiB, 0, "config"), None, [], ROOMY, LIMITS)  # the whole budget
    assert whole.kind == "start" and not whole.reason
    box = Snapshot(ram_total=64 * GiB, ram_available=6 * GiB)  # what the box has free, to the byte
    assert decide("b", Need(6 * GiB, 0, "config"), None, [], box, LIMITS) == decide(
        "b", Need(6 * GiB, 0, "config"), None, [], ROOMY, LIMITS
    )


def test_a_vram_need_exactly_equal_to_a_gpus_free_vram_starts_there() -> None:
    gpus = [GpuMemory(0, "g", 24 * GiB, 8 * GiB), GpuMemory(1, "g", 24 * GiB, 24 * GiB)]
    snap = Snapshot(ram_total=64 * GiB, ram_available=64 * GiB, gpus=gpus)
    assert decide("m", Need(GiB, 8 * GiB, "config"), (0,), [], snap, LIMITS).kind == "start"
    whole = decide("m", Need(GiB, 24 * GiB, "config"), (1,), [], snap, LIMITS)  # the whole GPU
    assert whole.kind == "start" and whole.gpu == 1 and not whole.reason


def test_a_gpu_whose_free_vram_is_exactly_the_need_is_chosen_over_one_that_needs_an_unload() -> None:
    gpus = [GpuMemory(0, "g", 24 * GiB, 8 * GiB), GpuMemory(1, "g", 24 * GiB, 7 * GiB)]
    snap = Snapshot(ram_total=64 * GiB, ram_available=64 * GiB, gpus=gpus)
    idle = Occupant("idle", "ready", Need(GiB, 6 * GiB, "measured"), 1)  # unloading it would free 13 GiB on 1
    decision = decide("m", Need(GiB, 8 * GiB, "config"), None, [idle], snap, LIMITS)
    assert decision.kind == "start" and decision.gpu == 0 and not decision.victims
