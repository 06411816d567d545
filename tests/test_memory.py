"""Scheduling by memory: the policy as a table, the manager with an injected probe and the ManualClock
(no processes, no sleeps), NVML behind a fake, sizes and estimates. The real path is in
test_memory_real.py."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import signal
from pathlib import Path
from typing import Any

import pytest

from proxy import needs
from proxy.clock import ManualClock
from proxy.config import MemoryLimits, ModelConfig
from proxy.errors import InsufficientMemory, ModelLoadFailed
from proxy.manager import ModelManager
from proxy.memory import (
    PROJECTOR_COMPUTE,
    GiB,
    MemoryStore,
    MiB,
    Need,
    estimate_llama_cpp,
    model_files,
    parse_bytes,
)
from proxy.nvml import GpuMemory, Nvml
from proxy.policy import Candidate, Deficit, choose_victims
from proxy.runtime import WorkerFactory
from tests.fake_memory import FakeProbe, FakePynvml
from tests.test_manager import FakeWorker, model, settings, settle, state

# -- the policy, as a table -----------------------------------------------------------------------------------


def c(
    name: str,
    ram: int = 0,
    *,
    vram: int = 0,
    left: float = 300,
    used: float = 0,
    busy: bool = False,
    pinned: bool = False,
) -> Candidate:
    return Candidate(name, keep_alive=300, last_used=used, busy=busy, ram=ram, vram=vram, remaining=left, pinned=pinned)


POLICY = [
    # (case, candidates, deficit, expected)
    ("nothing missing", [c("a", 4)], Deficit(), []),
    ("the one that frees enough", [c("a", 4)], Deficit(ram=3), ["a"]),
    ("busy is never chosen", [c("a", 4, busy=True), c("b", 1)], Deficit(ram=3), None),
    ("pinned is never chosen", [c("a", 4, pinned=True), c("b", 8)], Deficit(ram=3), ["b"]),
    ("only pinned and busy: none", [c("a", 8, pinned=True), c("b", 8, busy=True)], Deficit(ram=1), None),
    ("all idle together are not enough", [c("a", 2), c("b", 2)], Deficit(ram=5), None),
    ("expired first", [c("fresh", 4, left=200), c("expired", 4, left=0)], Deficit(ram=4), ["expired"]),
    ("shortest keep_alive left first", [c("long", 4, left=250), c("short", 4, left=10)], Deficit(ram=4), ["short"]),
    ("then least recently used", [c("new", 4, used=50), c("old", 4, used=10)], Deficit(ram=4), ["old"]),
    (
        "never a big one when a smaller frees enough",
        [c("big", 16, left=0), c("small", 4, left=100)],
        Deficit(ram=3),
        ["small"],
    ),
    (
        "several when one is not enough, in order",
        [c("a", 2, left=1), c("b", 2, left=2), c("c", 2, left=3)],
        Deficit(ram=4),
        ["a", "b"],
    ),
    ("a taken one that is not needed is dropped", [c("tiny", 1, left=0), c("big", 8, left=5)], Deficit(ram=6), ["big"]),
    (
        "VRAM on the short GPU counts, RAM does not make up for it",
        [c("cpu", 16), c("gpu", 1, vram=6)],
        Deficit(vram=4),
        ["gpu"],
    ),
    ("a slot when the count is the cap", [c("a", 0, left=9), c("b", 0, left=1)], Deficit(slots=1), ["b"]),
    ("RAM and a slot", [c("a", 1, left=0), c("b", 5, left=9)], Deficit(ram=4, slots=1), ["b"]),
]


@pytest.mark.parametrize(("candidates", "deficit", "expected"), [p[1:] for p in POLICY], ids=[p[0] for p in POLICY])
def test_policy(candidates: list[Candidate], deficit: Deficit, expected: list[str] | None) -> None:
    got = choose_victims(candidates, deficit)
    assert (sorted(got) if got is not None else None) == (sorted(expected) if expected is not None else None)


# -- sizes, estimates, NVML -------------------------------------------------------------------------------------


def test_sizes() -> None:
    assert parse_bytes("16GiB") == 16 * GiB
    assert parse_bytes("512MB") == 512_000_000
    assert parse_bytes("1.5 GiB") == int(1.5 * GiB)
    assert parse_bytes(1024) == 1024
    for bad in ("lots", "-1GiB", "16 GiBs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


FACTS = {  # SmolLM2-135M's, as proxy.worker.gguf_meta reads them
    "n_layer": 30,
    "n_embd": 576,
    "n_head": 9,
    "n_head_kv": [3] * 30,
    "key_length": 64,
    "value_length": 64,
    "n_vocab": 49152,
    "context_length": 8192,
    "layer_bytes": [2216448] * 30,
    "other_bytes": 30081024 + 1152,
    "output_bytes": 1152,
}


def test_llama_cpp_estimate_matches_what_llama_cpp_allocates() -> None:
    # llama.cpp's own log for this model at n_ctx 4096 on the CPU: model 92.10 MiB, KV 90.00 MiB,
    # compute 99.38 MiB
    cpu = estimate_llama_cpp(FACTS, {"n_ctx": 4096, "n_gpu_layers": -1}, gpu=False)
    assert cpu.vram == 0
    allocated = (92.10 + 90.00 + 99.38) * MiB
    assert abs(cpu.ram - 50 * MiB - allocated) < 0.05 * allocated
    gpu = estimate_llama_cpp(FACTS, {"n_ctx": 4096, "n_gpu_layers": -1}, gpu=True)
    assert gpu.vram > 180 * MiB and gpu.ram < cpu.ram - 150 * MiB  # weights, KV and compute moved
    half = estimate_llama_cpp(FACTS, {"n_ctx": 4096, "n_gpu_layers": 15}, gpu=True)
    assert gpu.vram > half.vram > 0 and half.ram > gpu.ram
    small_ctx = estimate_llama_cpp(FACTS, {"n_ctx": 1024}, gpu=False)
    assert cpu.ram - small_ctx.ram > 60 * MiB  # the KV cache shrinks with n_ctx


def test_a_vision_models_estimate_counts_its_projector(tmp_path: Path) -> None:
    mmproj = tmp_path / "mmproj.gguf"
    mmproj.write_bytes(b"\0" * 3 * MiB)
    plain = {"n_ctx": 4096, "n_gpu_layers": -1}
    vision = {**plain, "mmproj": str(mmproj)}
    assert estimate_llama_cpp(FACTS, vision, gpu=False).ram - estimate_llama_cpp(FACTS, plain, gpu=False).ram == (
        3 * MiB + PROJECTOR_COMPUTE
    )
    on_gpu, text_on_gpu = estimate_llama_cpp(FACTS, vision, gpu=True), estimate_llama_cpp(FACTS, plain, gpu=True)
    assert (on_gpu.vram - text_on_gpu.vram, on_gpu.ram - text_on_gpu.ram) == (3 * MiB + PROJECTOR_COMPUTE, 0)
    # its file is one of the model's files: a measurement taken with another projector is not reused
    assert model_files("llama_cpp", tmp_path / "m.gguf", vision) == [tmp_path / "m.gguf", mmproj]


def test_nvml_reads_free_memory_and_per_process_use() -> None:
    fake = FakePynvml([(24 * GiB, 20 * GiB, {11: 2 * GiB, 12: None}), (16 * GiB, 1 * GiB, {11: GiB, 13: 5 * GiB})])
    nvml = Nvml(fake, 2)
    assert nvml.memory() == [GpuMemory(0, "Fake GPU", 24 * GiB, 20 * GiB), GpuMemory(1, "Fake GPU", 16 * GiB, GiB)]
    assert nvml.used_by([11, 12]) == {0: 2 * GiB, 1: GiB}
    assert nvml.used_by([99]) == {}


def test_memory_store_remembers_measurements_per_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / ".cache" / "memory.json"
    MemoryStore(path).put_measured("m", "fp1", Need(3 * GiB, GiB, "measured"))
    again = MemoryStore(path)
    assert again.measured("m", "fp1") == Need(3 * GiB, GiB, "measured")
    assert again.measured("m", "fp2") is None  # other files or options: measure again


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


# -- the manager ----------------------------------------------------------------------------------------------

LIMITS = MemoryLimits(ram=10 * GiB, reserve_ram=0, reserve_vram=0, recovery_timeout=10.0)


def make(
    *models: ModelConfig,
    probe: FakeProbe | None = None,
    limits: MemoryLimits = LIMITS,
    factory: WorkerFactory = FakeWorker,
    max_loaded: int | None = None,
) -> tuple[ModelManager, ManualClock, FakeProbe]:
    clock = ManualClock()
    probe = probe or FakeProbe()
    s = dataclasses.replace(settings(*models), max_loaded_models=max_loaded, memory=limits)
    manager = ModelManager(s, clock=clock, worker_factory=factory, probe=probe, store=MemoryStore(None))
    return manager, clock, probe


def m(name: str, ram_gib: float, vram_gib: float = 0, **kw: Any) -> ModelConfig:
    return model(name, memory=Need(int(ram_gib * GiB), int(vram_gib * GiB), "config"), **kw)


async def test_fits_no_eviction_then_evicts_the_right_idle_one() -> None:
    manager, clock, _ = make(m("a", 4, keep_alive=300), m("b", 4, keep_alive=60), m("c", 4))
    (await manager.acquire("a")).release()
    (await manager.acquire("b")).release()
    assert state(manager, "a") == state(manager, "b") == "ready"  # 8 of 10 GiB
    (await manager.acquire("c")).release()  # needs 4: one goes, b (shorter keep_alive left)
    assert (state(manager, "a"), state(manager, "b"), state(manager, "c")) == ("ready", "stopped", "ready")


async def test_never_fits_fails_at_once_naming_need_and_budget() -> None:
    manager, _, _ = make(m("a", 2), m("huge", 12))
    (await manager.acquire("a")).release()
    with pytest.raises(InsufficientMemory) as info:
        await manager.acquire("huge")
    assert "needs 12.0 GiB of RAM; the whole budget is 10.0 GiB" in info.value.message
    assert info.value.status == 507
    assert state(manager, "a") == "ready"  # nothing was unloaded for it
    assert len(FakeWorker.instances) == 1


async def test_a_busy_model_is_never_evicted_the_request_waits() -> None:
    manager, _, _ = make(m("a", 6), m("b", 6))
    lease = await manager.acquire("a")
    waiting = asyncio.create_task(manager.acquire("b"))
    await settle()
    assert not waiting.done() and state(manager, "a") == "ready"
    assert "waiting for memory" in (next(s.waiting for s in manager.status() if s.name == "b") or "")
    assert manager.queued == 1
    lease.release()  # a is idle now: it goes, b starts
    (await asyncio.wait_for(waiting, 5)).release()
    assert (state(manager, "a"), state(manager, "b")) == ("stopped", "ready")


async def test_waits_for_memory_to_come_back_after_an_unload() -> None:
    probe = FakeProbe(total=16 * GiB, available=5 * GiB)  # a and c loaded, 5 GiB free on the box
    manager, clock, _ = make(m("a", 6), m("c", 2), m("b", 6), probe=probe, limits=MemoryLimits(reserve_ram=0))
    (await manager.acquire("a")).release()
    (await manager.acquire("c")).release()
    waiting = asyncio.create_task(manager.acquire("b"))
    await settle()
    assert state(manager, "c") == "stopped"  # the smaller one that frees enough: the books say b fits now ...
    assert not waiting.done() and len(FakeWorker.instances) == 2  # ... but the box does not show it yet
    clock.advance(1.0)
    await settle()
    assert not waiting.done() and len(FakeWorker.instances) == 2
    assert state(manager, "a") == "ready"  # nothing more is unloaded while c's memory comes back
    probe.available = 7 * GiB  # the kernel hands c's memory back
    clock.advance(0.25)
    (await asyncio.wait_for(waiting, 5)).release()
    assert (state(manager, "a"), state(manager, "b")) == ("ready", "ready")


async def test_memory_that_never_comes_back_stops_the_wait_at_the_cap() -> None:
    probe = FakeProbe(total=16 * GiB, available=5 * GiB)
    manager, clock, _ = make(m("a", 6), m("b", 6), probe=probe, limits=MemoryLimits(reserve_ram=0))
    (await manager.acquire("a")).release()
    waiting = asyncio.create_task(manager.acquire("b"))
    await settle()
    for _ in range(39):
        clock.advance(0.25)
        await settle()
    assert not waiting.done()
    clock.advance(0.5)  # past recovery_timeout (10 s): tried anyway (another program holds the memory)
    (await asyncio.wait_for(waiting, 5)).release()
    assert state(manager, "b") == "ready"


def oom_on_first(config: Any, runtime_dir: Path, on_exit: Any) -> FakeWorker:
    worker = FakeWorker(config, runtime_dir, on_exit)
    if config.name == "big" and sum(1 for w in FakeWorker.instances if w.config.name == "big") == 1:
        worker.fail = "its worker exited with code -9 while loading"
        worker.returncode = -signal.SIGKILL
    return worker


def oom_always(config: Any, runtime_dir: Path, on_exit: Any) -> FakeWorker:
    worker = FakeWorker(config, runtime_dir, on_exit)
    if config.name == "big":
        worker.fail = "its worker exited with code -9 while loading"
        worker.returncode = -signal.SIGKILL
    return worker


async def test_an_out_of_memory_load_unloads_every_idle_model_and_retries_once() -> None:
    manager, _, _ = make(m("a", 1), m("b", 1), m("big", 4), factory=oom_on_first)
    (await manager.acquire("a")).release()
    busy = await manager.acquire("b")
    (await manager.acquire("big")).release()
    assert (state(manager, "a"), state(manager, "b"), state(manager, "big")) == ("stopped", "ready", "ready")
    assert [w.config.name for w in FakeWorker.instances] == ["a", "b", "big", "big"]
    busy.release()


async def test_an_out_of_memory_load_fails_clearly_after_one_retry() -> None:
    manager, _, _ = make(m("a", 1), m("big", 4), factory=oom_always)
    (await manager.acquire("a")).release()
    with pytest.raises(ModelLoadFailed, match="out of memory again"):
        await manager.acquire("big")
    assert [w.config.name for w in FakeWorker.instances] == ["a", "big", "big"]  # once more, not again
    assert state(manager, "a") == "stopped" and state(manager, "big") == "failed"


async def test_pinned_models_are_kept_and_a_model_that_cannot_fit_beside_them_is_refused() -> None:
    manager, _, _ = make(m("forever", 6), m("b", 6))
    (await manager.acquire("forever", keep_alive=math.inf)).release()
    with pytest.raises(InsufficientMemory, match="kept loaded for ever"):
        await manager.acquire("b")
    assert state(manager, "forever") == "ready"


async def test_gpu_placement_most_free_vram_that_fits_and_gpus_restricts() -> None:
    gpus = [GpuMemory(0, "g", 24 * GiB, 6 * GiB), GpuMemory(1, "g", 24 * GiB, 20 * GiB)]
    probe = FakeProbe(gpu_list=gpus)
    limits = MemoryLimits(reserve_ram=0, reserve_vram=0)
    manager, _, _ = make(m("x", 1, 4), m("y", 1, 4, gpus=(0,)), m("z", 1, 30), probe=probe, limits=limits)
    (await manager.acquire("x")).release()
    (await manager.acquire("y")).release()
    env = {w.config.name: w.config.env.get("CUDA_VISIBLE_DEVICES") for w in FakeWorker.instances}
    assert env == {"x": "1", "y": "0"}
    assert {s.name: s.device for s in manager.status()} == {"x": "cuda:1", "y": "cuda:0", "z": None}
    with pytest.raises(InsufficientMemory, match="VRAM"):  # 30 GiB on no 24 GiB GPU
        await manager.acquire("z")


async def test_without_a_gpu_vram_needs_are_zero() -> None:
    manager, _, _ = make(m("x", 1, 40))  # no GPU: its VRAM need cannot be met, and does not count
    (await manager.acquire("x")).release()
    assert FakeWorker.instances[0].config.env.get("CUDA_VISIBLE_DEVICES") is None
    assert next(s.device for s in manager.status()) == "cpu"


async def test_measured_need_replaces_the_estimate_and_is_remembered(tmp_path: Path) -> None:
    probe = FakeProbe()
    manager, _, _ = make(model("e"), probe=probe)  # an external cmd without memory: unknown until measured
    manager.store = MemoryStore(tmp_path / "memory.json")
    probe.rss_of[1000] = 3 * GiB
    (await manager.acquire("e")).release()
    need = next(s.need for s in manager.status())
    assert need == Need(3 * GiB, 0, "measured")
    assert MemoryStore(tmp_path / "memory.json").measured("e", manager.needs.fingerprint(manager.resolve("e"))) == need


async def test_a_later_load_that_uses_less_does_not_shrink_the_remembered_need(tmp_path: Path) -> None:
    # a load that filled its context (llama.cpp's KV cache and compute buffer resident) measured 3 GiB;
    # the next load serves only short requests: what the model can take is still 3 GiB
    probe = FakeProbe()
    manager, _, _ = make(model("e"), probe=probe)
    manager.store = MemoryStore(tmp_path / "memory.json")
    probe.rss_of[1000] = 3 * GiB
    (await manager.acquire("e")).release()
    await manager.unload("e")
    probe.rss_of[1001] = 1 * GiB
    (await manager.acquire("e")).release()
    assert next(s.need for s in manager.status()) == Need(3 * GiB, 0, "measured")
    await manager.unload("e")
    assert next(s.need for s in manager.status()) == Need(3 * GiB, 0, "measured")
    stored = MemoryStore(tmp_path / "memory.json").measured("e", manager.needs.fingerprint(manager.resolve("e")))
    assert stored == Need(3 * GiB, 0, "measured")
    probe.rss_of[1002] = 4 * GiB  # and one that uses more raises it
    (await manager.acquire("e")).release()
    assert next(s.need for s in manager.status()) == Need(4 * GiB, 0, "measured")


@dataclasses.dataclass
class CountingProbe(FakeProbe):
    """A FakeProbe that counts its reads of a worker's RSS (each a walk of its process tree in /proc)."""

    rss_reads: int = 0

    def rss(self, pid: int) -> int | None:
        self.rss_reads += 1
        return super().rss(pid)


async def test_memory_is_read_at_most_once_a_second_after_requests_the_last_one_included(tmp_path: Path) -> None:
    probe = CountingProbe()
    manager, clock, _ = make(model("e"), probe=probe)
    manager.store = MemoryStore(tmp_path / "memory.json")
    probe.rss_of[1000] = 1 * GiB
    (await manager.acquire("e")).release()
    assert probe.rss_reads == 1  # after its load; the release right after it waits its turn
    for _ in range(10):  # a burst of requests: no read each
        (await manager.acquire("e")).release()
    probe.rss_of[1000] = 3 * GiB  # the last one of the burst made it grow
    (await manager.acquire("e")).release()
    assert probe.rss_reads == 1
    clock.advance(0.99)
    assert probe.rss_reads == 1
    clock.advance(0.01)  # a second after the last read: the read put off, once
    assert probe.rss_reads == 2
    clock.advance(5)
    assert probe.rss_reads == 2  # nothing to read while no request comes
    (await manager.acquire("e")).release()  # the last read is old: this release reads at once
    assert probe.rss_reads == 3
    assert next(s.need for s in manager.status()) == Need(3 * GiB, 0, "measured")  # the burst's peak


async def test_an_unload_takes_the_read_that_a_release_put_off(tmp_path: Path) -> None:
    probe = CountingProbe()
    manager, _, _ = make(model("e"), probe=probe)
    manager.store = MemoryStore(tmp_path / "memory.json")
    probe.rss_of[1000] = 1 * GiB
    (await manager.acquire("e")).release()
    probe.rss_of[1000] = 2 * GiB
    (await manager.acquire("e")).release()  # its read put off
    await manager.unload("e")  # within the second: read as the stop begins, not lost
    assert probe.rss_reads == 2  # (before /status reads it too)
    stored = MemoryStore(tmp_path / "memory.json").measured("e", manager.needs.fingerprint(manager.resolve("e")))
    assert stored == Need(2 * GiB, 0, "measured")
    assert next(s.need for s in manager.status()) == Need(2 * GiB, 0, "measured")


# -- a model spread over GPUs (span_gpus: llama.cpp's tensor split) ------------------------------------------


def two_gpus() -> FakeProbe:
    return FakeProbe(gpu_list=[GpuMemory(0, "g", 24 * GiB, 24 * GiB), GpuMemory(1, "g", 24 * GiB, 24 * GiB)])


async def test_a_model_too_big_for_one_gpu_spans_two_when_its_yaml_allows_and_is_refused_when_not() -> None:
    limits = MemoryLimits(reserve_ram=0, reserve_vram=0)
    manager, _, _ = make(
        m("big", 1, 40, span_gpus=True),
        m("stiff", 1, 40),
        m("huge", 1, 60, span_gpus=True),
        probe=two_gpus(),
        limits=limits,
    )
    (await manager.acquire("big")).release()
    placed = FakeWorker.instances[0].config
    assert placed.env["CUDA_VISIBLE_DEVICES"] == "0,1" and placed.options["tensor_split"] == [0.5, 0.5]
    assert next(s.device for s in manager.status() if s.name == "big") == "cuda:0,1"
    with pytest.raises(InsufficientMemory, match="the largest GPU budget is 24.0 GiB"):
        await manager.acquire("stiff")  # the same need without span_gpus: no one GPU holds it
    with pytest.raises(InsufficientMemory, match="the 2 GPUs it may span have 48.0 GiB in all"):
        await manager.acquire("huge")


async def test_a_spanning_model_makes_room_on_each_gpu_and_holds_its_share_of_each() -> None:
    limits = MemoryLimits(reserve_ram=0, reserve_vram=0)
    models = (m("x", 1, 10, gpus=(0,)), m("y", 1, 10, gpus=(1,)), m("big", 1, 40, span_gpus=True))
    manager, _, _ = make(*models, probe=two_gpus(), limits=limits)
    for name in ("x", "y"):
        (await manager.acquire(name)).release()
    (await manager.acquire("big")).release()  # 20 GiB on each GPU: x and y must both go
    assert (state(manager, "x"), state(manager, "y"), state(manager, "big")) == ("stopped", "stopped", "ready")
    (await manager.acquire("x")).release()  # 10 GiB on GPU 0, where big holds 20 of 24: big goes
    assert (state(manager, "big"), state(manager, "x")) == ("stopped", "ready")


async def test_a_spanning_model_counts_once_among_loaded_models() -> None:
    limits = MemoryLimits(reserve_ram=0, reserve_vram=0)
    manager, _, _ = make(m("big", 1, 40, span_gpus=True), m("z", 1, 2), probe=two_gpus(), limits=limits, max_loaded=2)
    (await manager.acquire("big")).release()
    (await manager.acquire("z")).release()  # max_loaded 2: big is one model on two GPUs, so nothing goes
    assert (state(manager, "big"), state(manager, "z")) == ("ready", "ready")


async def test_shutdown_cancels_a_gguf_read_whoever_started_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # /api/show's metadata and the memory estimate share one read per file; shutdown must cancel it (the real
    # read_gguf kills its subprocess when cancelled), whoever is waiting for it
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    cancelled = asyncio.Event()

    async def read_forever(path: Path, python: str | None, timeout: float = 120.0) -> dict[str, Any] | None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return None

    monkeypatch.setattr(needs, "read_gguf", read_forever)
    manager, _, _ = make(model("g", backend="llama_cpp", model_path=gguf, cmd=None))
    shown = asyncio.create_task(manager.gguf_metadata(manager.resolve("g")))
    await settle()
    await manager.shutdown()
    assert cancelled.is_set()
    shown.cancel()
