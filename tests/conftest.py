from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.harness import REPO, LiveProxy, gone, smollm2_config, vision_config, vision_mmproj, wait_until


@pytest.fixture(scope="session")
def smollm2_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    """One live proxy for the whole session serving the real SmolLM2 worker (loaded on demand)."""
    proxy = LiveProxy(tmp_path_factory.mktemp("smollm2"), [smollm2_config()]).start()
    yield proxy
    pids = [p.pid for p in proxy.workers()]
    proxy.stop()
    wait_until(lambda: gone(pids), timeout=15)


@pytest.fixture(scope="session")
def vision_model() -> dict[str, Any]:
    """The config of the tests' vision model: SmolLM2 with a random-weight projector (scripts/make_vision_model.py,
    built once, cached under models/.cache/vision/); add it to a LiveProxy's models."""
    return vision_config(vision_mmproj())


@pytest.fixture(scope="session")
def vision_proxy(tmp_path_factory: pytest.TempPathFactory, vision_model: dict[str, Any]) -> Iterator[LiveProxy]:
    """One live proxy for the session serving the vision model (``smolvlm-test``) and plain SmolLM2."""
    proxy = LiveProxy(tmp_path_factory.mktemp("vision"), [vision_model, smollm2_config()]).start()
    yield proxy
    pids = [p.pid for p in proxy.workers()]
    proxy.stop()
    wait_until(lambda: gone(pids), timeout=15)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' tiny Stable Diffusion pipeline (random weights, tests/sd_build.py), built once per module."""
    out = tmp_path_factory.mktemp("sd")
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "sd_build.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return out / "pipeline"


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[..., LiveProxy]]:
    """Start a proxy with the given model configs; stopped (and checked for leftovers) after the test."""
    started: list[LiveProxy] = []

    def make(models: list[dict[str, Any]], **kw: Any) -> LiveProxy:
        proxy = LiveProxy(tmp_path / f"proxy{len(started)}", models, **kw).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        leftovers = [p.pid for p in proxy.workers()]
        proxy.stop()
        wait_until(functools.partial(gone, leftovers), timeout=15)


@pytest.fixture
def openai_for() -> Iterator[Callable[[LiveProxy], openai.OpenAI]]:
    """An `openai` SDK client for a live proxy (no retries), closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(proxy: LiveProxy, api_key: str = "unused") -> openai.OpenAI:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=api_key, max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
