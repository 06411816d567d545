"""proxy/cluster/local.py: what a node publishes of itself, read from a real ModelManager (fake workers, a
probe with set figures, the ManualClock)."""

from __future__ import annotations

import dataclasses

from proxy.cluster.local import local_state, quick_state
from proxy.cluster.view import ModelPresence
from proxy.memory import Need
from proxy.nvml import GpuMemory
from tests.fake_memory import GiB
from tests.test_manager import make, model


async def test_models_states_and_free_memory() -> None:
    manager, _ = make(
        model("a", parallel=2, memory=Need(4 * GiB, 0, "config"), aliases=("a1", "a2")),
        model("b", memory=Need(2 * GiB, 0, "config")),
        max_loaded=None,
    )
    manager.probe.total = manager.probe.available = 16 * GiB  # type: ignore[attr-defined]
    reserve = manager.settings.memory.reserve_ram
    before = local_state(manager)
    assert before.catalog == ("a", "b") and before.weights == ("a", "b")
    assert before.aliases == (("a1", "a"), ("a2", "a"))
    llm = ("completion", "embedding")  # what the lists show it can do (published with its kind)
    assert before.models == (
        ModelPresence("a", "stopped", ram=4 * GiB, parallel=2, kind="llm", capabilities=llm),
        ModelPresence("b", "stopped", ram=2 * GiB, kind="llm", capabilities=llm),
    )
    assert before.free_ram == before.ram_budget == 16 * GiB - reserve
    lease = await manager.acquire("a")
    try:
        after = local_state(manager)
        assert after.models[0] == ModelPresence(
            "a", "ready", in_flight=1, ram=4 * GiB, parallel=2, kind="llm", capabilities=llm
        )
        # what the loaded model is counted at is no longer free, by the budget, though the probe shows no change
        assert after.free_ram == 16 * GiB - reserve - 4 * GiB
        assert after.config_hash == before.config_hash != ""
    finally:
        lease.release()
        await manager.shutdown()


async def test_free_vram_per_gpu() -> None:
    manager, _ = make(model("g", memory=Need(GiB, 3 * GiB, "config")), max_loaded=None)
    manager.probe.gpu_list = [GpuMemory(0, "g0", 8 * GiB, 8 * GiB), GpuMemory(1, "g1", 8 * GiB, 6 * GiB)]  # type: ignore[attr-defined]
    reserve = manager.settings.memory.reserve_vram
    assert local_state(manager).free_vram == (8 * GiB - reserve, 6 * GiB - reserve)
    lease = await manager.acquire("g")  # on the GPU with the most free VRAM: 0
    try:
        assert local_state(manager).free_vram == (8 * GiB - reserve - 3 * GiB, 6 * GiB - reserve)
        assert local_state(manager).vram_budget == (8 * GiB - reserve, 8 * GiB - reserve)
    finally:
        lease.release()
        await manager.shutdown()


async def test_quick_state_reads_states_and_counts_without_the_probe() -> None:
    manager, _ = make(model("a", parallel=2, memory=Need(4 * GiB, 0, "config")), max_loaded=None)
    before = local_state(manager)
    lease = await manager.acquire("a")
    try:
        reads = manager.probe.reads  # type: ignore[attr-defined]
        quick = quick_state(manager, before)
        assert manager.probe.reads == reads  # type: ignore[attr-defined]
        assert quick.models == (dataclasses.replace(before.models[0], state="ready", in_flight=1),)
        assert quick.free_ram == before.free_ram  # memory stays the last heartbeat's
    finally:
        lease.release()
        await manager.shutdown()
