"""The manager's rules from issue 11 (items 8 and 11), under a ManualClock with in-process fake workers.

Each is also covered through a live proxy: test_hung.py (unload_grace and ?force=true on fake worker
processes, a SIGSTOPped SmolLM2) and test_lifecycle_real.py's keep_alive sent while a model stops.
"""

from __future__ import annotations

import asyncio

from tests.test_manager import FakeWorker, GraceWorker, SlowStop, _reset, make, model, settle, state  # noqa: F401 (_reset: autouse)


async def test_unload_waits_for_in_flight_at_most_unload_grace_then_kills() -> None:
    GraceWorker.graces = []
    manager, clock = make(model("a", unload_grace=7.0), factory=GraceWorker)
    lease = await manager.acquire("a")
    unloading = asyncio.create_task(manager.unload("a"))
    await settle()
    clock.advance(6.9)
    await settle()
    assert not unloading.done() and state(manager, "a") == "ready"
    clock.advance(0.2)  # past unload_grace with the request still in flight: killed, no second grace
    assert await asyncio.wait_for(unloading, 5) is True
    assert GraceWorker.graces == [0.0] and state(manager, "a") == "stopped"
    lease.release()  # the late release of a killed model's lease changes nothing
    assert state(manager, "a") == "stopped"
    await manager.shutdown()


async def test_unload_within_the_grace_stops_with_sigterm_and_its_grace() -> None:
    GraceWorker.graces = []
    manager, clock = make(model("a", unload_grace=7.0), factory=GraceWorker)
    lease = await manager.acquire("a")
    unloading = asyncio.create_task(manager.unload("a"))
    clock.advance(3)
    await settle()
    lease.release()
    assert await asyncio.wait_for(unloading, 5) is True
    assert GraceWorker.graces == [7.0]
    await manager.shutdown()


async def test_a_forced_unload_kills_at_once() -> None:
    GraceWorker.graces = []
    manager, _ = make(model("a", unload_grace=7.0), factory=GraceWorker)
    lease = await manager.acquire("a")
    assert await asyncio.wait_for(manager.unload("a", force=True), 5) is True  # no clock moved
    assert GraceWorker.graces == [0.0] and state(manager, "a") == "stopped"
    lease.release()
    await manager.shutdown()


async def test_a_keep_alive_sent_while_the_model_stops_wins_over_the_config() -> None:
    SlowStop.release_stop = asyncio.Event()
    manager, _ = make(model("a", keep_alive=60), factory=SlowStop)
    (await manager.acquire("a", keep_alive=120)).release()
    unloading = asyncio.create_task(manager.unload("a"))
    await settle()
    assert state(manager, "a") == "stopping"
    reload = asyncio.create_task(manager.acquire("a", keep_alive=900))  # sent while it stops
    await settle()
    SlowStop.release_stop.set()
    assert await unloading is True
    lease = await asyncio.wait_for(reload, 5)
    assert len(FakeWorker.instances) == 2
    assert next(s.keep_alive for s in manager.status()) == 900
    lease.release()
    # and a request that sends none while it stops gets the config's value, not the last load's
    SlowStop.release_stop = asyncio.Event()
    unloading = asyncio.create_task(manager.unload("a"))
    await settle()
    reload = asyncio.create_task(manager.acquire("a"))
    await settle()
    SlowStop.release_stop.set()
    await unloading
    lease = await asyncio.wait_for(reload, 5)
    assert next(s.keep_alive for s in manager.status()) == 60
    lease.release()
    await manager.shutdown()
