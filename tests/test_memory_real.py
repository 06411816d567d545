"""Scheduling by memory on the real path: a live proxy, real workers (SmolLM2, Piper, Whisper) under a RAM
budget that holds two of them, and a model that can never fit answered 507 through both SDKs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import yaml

from tests.harness import REPO, LiveProxy, fake_config, running, smollm2_config, wait_until

MiB = 1 << 20
# Estimates here: SmolLM2 at n_ctx 2048 ~284 MiB, Piper ~203 MiB, Whisper base ~252 MiB (proxy/memory.py);
# measured after load they are smaller. Any two fit in 580 MiB, the three never do.
BUDGET = 580 * MiB

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    piper = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    whisper = yaml.safe_load((REPO / "configs" / "whisper.yaml").read_text())
    models = [
        smollm2_config(keep_alive="5m"),
        piper,
        whisper,
        fake_config("huge", memory={"ram": "100GiB"}),
    ]
    limits = {"memory": {"ram": BUDGET, "reserve_ram": 0}}
    with running(tmp_path_factory.mktemp("memory"), models, limits=limits, defaults={"load_timeout": "120s"}) as live:
        yield live


def load(proxy: LiveProxy, name: str) -> None:
    httpx.post(f"{proxy.url}/load/{name}", timeout=300).raise_for_status()


def test_loading_the_third_unloads_the_smaller_idle_one_and_needs_are_measured(proxy: LiveProxy) -> None:
    load(proxy, "smollm2:135m")
    load(proxy, "piper-joe")
    status = proxy.status()
    assert status["smollm2:135m"]["state"] == status["piper-joe"]["state"] == "ready"
    # Both frees enough for Whisper: SmolLM2 has less keep_alive left, but Piper is the smaller one.
    load(proxy, "whisper-base")
    status = proxy.status()
    states = {n: status[n]["state"] for n in ("smollm2:135m", "piper-joe", "whisper-base")}
    assert states == {"smollm2:135m": "ready", "piper-joe": "stopped", "whisper-base": "ready"}
    for name in ("smollm2:135m", "whisper-base"):
        need = status[name]["need"]
        assert need["source"] == "measured" and need["vram"] == 0 and status[name]["device"] == "cpu"
        assert 50 * MiB < need["ram"] <= status[name]["memory_bytes"] * 1.5
    assert status["piper-joe"]["need"]["source"] == "measured"  # remembered from its load
    top = httpx.get(proxy.url + "/status", timeout=10).json()["memory"]
    assert top["ram"]["budget"] == BUDGET and top["gpus"] == []
    ps = {m["name"]: m for m in httpx.get(proxy.url + "/api/ps", timeout=10).json()["models"]}
    assert ps["smollm2:135m"]["size"] > 50 * MiB and ps["smollm2:135m"]["size_vram"] == 0
    remembered = (Path(proxy.root) / "models" / ".cache" / "memory.json").read_text()
    assert "whisper-base" in remembered and "smollm2:135m" in remembered


def test_a_model_over_the_whole_budget_gets_507_in_both_dialects(proxy: LiveProxy) -> None:
    with (
        openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as oa,
    ):
        client.chat.completions.create(model="huge", messages=[{"role": "user", "content": "hi"}])
    assert oa.value.status_code == 507
    assert "100.0 GiB" in oa.value.message and "580.0 MiB" in oa.value.message
    with ollama.Client(host=proxy.url) as ollama_client, pytest.raises(ollama.ResponseError) as ol:
        ollama_client.chat(model="huge", messages=[{"role": "user", "content": "hi"}])
    assert ol.value.status_code == 507 and "100.0 GiB" in ol.value.error
    assert wait_until(lambda: proxy.status()["huge"]["state"] == "stopped")  # never started
