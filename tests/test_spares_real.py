"""Warm spare workers (``limits.warm_spare``, proxy/spares.py) on the real path: a live proxy, two SmolLM2
configs with room for one, the real llama.cpp worker, the official OpenAI SDK."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
import yaml

from tests.harness import REPO, LiveProxy, gone, running, smollm2_config, wait_until

pytestmark = pytest.mark.real

A, B = "smol-a", "smol-b"


def _models() -> list[dict[str, Any]]:
    return [smollm2_config(name=A, aliases=[]), smollm2_config(name=B, aliases=[])]


def _spares(proxy: LiveProxy) -> list[dict[str, Any]]:
    spares: list[dict[str, Any]] = httpx.get(proxy.url + "/status", timeout=10).json()["spares"]
    return spares


def _waiting_spare(proxy: LiveProxy) -> dict[str, Any]:
    """The one llama.cpp spare, once it has done its imports."""

    def ready() -> dict[str, Any] | None:
        found = [s for s in _spares(proxy) if s["state"] == "waiting"]
        return found[0] if found else None

    spare: dict[str, Any] = wait_until(ready, timeout=120)
    assert spare["backend"] == "llama_cpp" and spare["rss_bytes"] > 0
    return spare


def _ask(proxy: LiveProxy, model: str) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="none", timeout=120)
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert answer.model == model and answer.choices[0].message.content is not None


def _cmdline(pid: int) -> list[str]:
    return psutil.Process(pid).cmdline()


def test_the_next_load_is_the_spare_and_a_new_spare_follows(tmp_path: Path) -> None:
    with running(tmp_path, _models(), limits={"max_loaded_models": 1, "warm_spare": True}) as proxy:
        _ask(proxy, A)
        spare = _waiting_spare(proxy)
        assert "--spare" in _cmdline(spare["pid"])
        _ask(proxy, B)  # a switch: A unloads, B loads in the spare
        status = proxy.status()
        assert status[A]["state"] == "stopped"
        assert status[B]["pid"] == spare["pid"]
        # B is loaded and idle: a new spare is on its way for the next load
        after = _waiting_spare(proxy)
        assert after["pid"] != spare["pid"]
        _ask(proxy, A)
        assert proxy.status()[A]["pid"] == after["pid"]


def test_a_spare_dies_with_the_proxy(tmp_path: Path) -> None:
    proxy = LiveProxy(tmp_path, _models(), limits={"max_loaded_models": 1, "warm_spare": True}).start()
    try:
        _ask(proxy, A)
        spare = _waiting_spare(proxy)
        below = [p.pid for p in proxy.workers()]
        assert spare["pid"] in below and proxy.status()[A]["pid"] in below
    finally:
        proxy.stop(signal.SIGKILL)  # no shutdown of its own: the kernel's parent-death signal must do it
    wait_until(lambda: gone(below), timeout=30)


def test_off_starts_workers_as_before(tmp_path: Path) -> None:
    with running(tmp_path, _models(), limits={"max_loaded_models": 1, "warm_spare": False}) as proxy:
        _ask(proxy, A)
        _ask(proxy, B)
        assert _spares(proxy) == []
        pid = proxy.status()[B]["pid"]
        assert "--spec" in _cmdline(pid) and "--spare" not in _cmdline(pid)
        assert [p.pid for p in proxy.workers()] == [pid]  # the worker alone: nothing waits beside it


def _piper() -> dict[str, Any]:
    """The shipped Piper voice: another backend, whose spare imports onnxruntime and piper (no model)."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    return cfg


def test_at_start_up_a_spare_per_backend_serves_its_first_load(tmp_path: Path) -> None:
    # issue 23, item 3: two llama.cpp configs (one spare for both) and a Piper voice, nothing asked yet
    proxy = LiveProxy(tmp_path, [*_models(), _piper()], limits={"warm_spare": True}).start()
    try:

        def both() -> dict[str, dict[str, Any]] | None:
            waiting = {s["backend"]: s for s in _spares(proxy) if s["state"] == "waiting"}
            return waiting if len(waiting) == 2 else None

        spares = wait_until(both, timeout=120)
        assert sorted(spares) == ["llama_cpp", "piper"] and len(_spares(proxy)) == 2
        assert all(s["rss_bytes"] > 0 and "--spare" in _cmdline(s["pid"]) for s in spares.values())
        _ask(proxy, A)  # the first load of llama.cpp: its spare, imports done, becomes A's worker
        assert proxy.status()[A]["pid"] == spares["llama_cpp"]["pid"]
        below = [p.pid for p in proxy.workers()]
        assert spares["piper"]["pid"] in below and spares["llama_cpp"]["pid"] in below
    finally:
        proxy.stop(signal.SIGKILL)  # no shutdown of its own: the kernel's parent-death signal must do it
    wait_until(lambda: gone(below), timeout=30)  # every spare and worker goes with it


def test_no_spare_at_start_up_when_the_memory_is_short(tmp_path: Path) -> None:
    # a budget of 256 MiB: a llama.cpp spare (~50 MiB) would leave less than HEADROOM (512 MiB) for models
    memory = {"ram": "256MiB", "reserve_ram": 0}
    with running(tmp_path, _models(), limits={"warm_spare": True, "memory": memory}) as proxy:
        wait_until(lambda: "no warm spare at start-up for llama_cpp: the memory is short" in proxy.log(), timeout=60)
        assert _spares(proxy) == [] and proxy.workers() == []
