"""ModelManager.replace_models for a config reload, with injected time and in-process fake workers.

The same rules run through a live proxy on SmolLM2 in tests/test_reload_real.py (SIGHUP, --watch); the
ones here alone: a change undone before the model went idle, and a change that waits for a busy model.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from proxy.events import Unloaded, UnloadReason
from tests.test_manager import FakeWorker, make, model, settings, settle, state


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


async def test_a_changed_busy_model_restarts_with_its_new_config_when_idle() -> None:
    old = model("a", keep_alive=600)
    manager, _ = make(old)
    unloads: list[Unloaded] = []
    manager.events.listen(lambda e: unloads.append(e) if isinstance(e, Unloaded) else None)
    lease = await manager.acquire("a")
    new = dataclasses.replace(old, sampling={"temperature": 0.1})
    manager.replace_models([new])
    await settle()
    assert state(manager, "a") == "ready"  # busy: it keeps its worker and its config
    assert lease.config == old
    lease.release()
    await settle()
    assert state(manager, "a") == "stopped"
    assert FakeWorker.instances[0].stopped
    assert [u.reason for u in unloads] == [UnloadReason.CONFIG]
    lease = await manager.acquire("a")  # the next request loads the new config
    assert FakeWorker.instances[1].config == new
    lease.release()
    await manager.shutdown()


async def test_requests_after_a_change_wait_for_the_restart_so_a_steady_load_cannot_keep_the_old_config() -> None:
    old = model("a", keep_alive=600, parallel=4)
    manager, _ = make(old)
    first = await manager.acquire("a")
    new = dataclasses.replace(old, sampling={"temperature": 0.1})
    manager.replace_models([new])
    later = asyncio.create_task(manager.acquire("a"))  # a free slot, but the old config: it waits
    await settle()
    assert not later.done() and state(manager, "a") == "ready"
    assert "restart" in (next(s.waiting for s in manager.status()) or "")
    first.release()  # the last request on the old config: the restart begins, the waiting one gets the new
    lease = await asyncio.wait_for(later, 5)
    assert lease.config == new and lease.worker is FakeWorker.instances[1]
    assert FakeWorker.instances[0].stopped
    lease.release()
    await manager.shutdown()


async def test_unchanged_models_keep_their_worker_new_ones_appear_removed_ones_go() -> None:
    a, b = model("a", keep_alive=600), model("b", keep_alive=600)
    manager, clock = make(a, b)
    for name in ("a", "b"):
        (await manager.acquire(name)).release()
    manager.replace_models([a, model("c")], settings(a, model("c"), max_queue=1, keep_alive=60))
    await settle()
    assert state(manager, "a") == "ready" and not FakeWorker.instances[0].stopped
    assert FakeWorker.instances[1].stopped  # b: removed and idle
    assert [c.name for c in manager.configs] == ["a", "c"]
    assert manager.settings.max_queue == 1  # limits apply at once
    lease = await manager.acquire("c")  # c's keep_alive is the new default's
    lease.release()
    clock.advance(61)
    await settle()
    assert state(manager, "c") == "stopped"
    assert state(manager, "a") == "ready"  # still its own 600 s
    await manager.shutdown()


async def test_a_change_undone_before_idle_restarts_nothing_and_a_stopped_model_takes_its_config() -> None:
    a, b = model("a", keep_alive=600), model("b")
    manager, _ = make(a, b)
    lease = await manager.acquire("a")
    manager.replace_models([dataclasses.replace(a, parallel=2), b])
    manager.replace_models([a, b])  # back as it was
    lease.release()
    await settle()
    assert state(manager, "a") == "ready" and not FakeWorker.instances[0].stopped
    new_b = dataclasses.replace(b, parallel=3)
    manager.replace_models([a, new_b])
    assert manager.resolve("b") == new_b  # stopped: at once
    await manager.shutdown()
