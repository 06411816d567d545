"""Warm spares in admission (proxy/admission.py): their memory counts, they take no model slot, they are
never a victim nor something to wait for (the manager stops them first and asks again); and they go at
shutdown."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from proxy.admission import Occupant, Snapshot, decide
from proxy.clock import ManualClock
from proxy.config import MemoryLimits
from proxy.manager import ModelManager
from proxy.memory import GiB, MemoryStore, Need
from proxy.spares import Spare, SpareKey, Spares
from tests.fake_memory import FakeProbe
from tests.test_manager import settings

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


async def test_the_warm_spares_are_closed_at_shutdown() -> None:
    # issue 25, item 6: a live proxy cannot see it (a spare dies with its parent anyway); in process it shows
    spares = Spares()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE, start_new_session=True
    )  # like a spare: it waits for its spec on stdin, and goes when that closes
    key = SpareKey(sys.executable, "proxy.worker.backends.piper:PiperBackend", ())
    spares._spares[key] = Spare(key, process, ready=True)
    manager = ModelManager(settings(), clock=ManualClock(), probe=FakeProbe(), store=MemoryStore(None), spares=spares)
    try:
        await manager.shutdown()
        assert process.returncode is not None and spares.waiting() == []
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_at_start_up_spares_come_one_at_a_time_in_order_while_there_is_room(tmp_path: Path) -> None:
    # issue 23, item 3 (Spares.prestart): the real path is tests/test_spares_real.py; here the order, the
    # one-at-a-time and the end of the round at the first "no room", with a stand-in interpreter
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho \'{"event": "spare"}\'\nread line\n')  # says it is ready, waits for stdin
    fake.chmod(0o755)
    keys = [SpareKey(str(fake), f"proxy.worker.backends.b{i}:B", ()) for i in range(4)]
    asked: list[tuple[str, list[bool]]] = []
    spares = Spares()

    def room(key: SpareKey) -> bool:
        asked.append((key.entry, [s.ready for s in spares.waiting()]))
        return key is not keys[2]  # the third does not fit: it and those after it get none

    try:
        spares.prestart([(k, {}) for k in keys], room)
        assert spares._prestart is not None
        await asyncio.wait_for(spares._prestart, timeout=30)
        assert [s.key for s in spares.waiting()] == keys[:2] and all(s.ready for s in spares.waiting())
        # each asked for once the ones before it were ready; none after the first no
        assert asked == [(keys[0].entry, []), (keys[1].entry, [True]), (keys[2].entry, [True, True])]
    finally:
        await spares.close()
