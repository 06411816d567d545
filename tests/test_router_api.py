"""llama.cpp's router API as Open WebUI's llama.cpp provider uses it: each `GET /v1/models` entry's
`status.value` (loaded, loading, unloaded) for the Loaded badge, and `POST /models/unload` to eject."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.harness import LiveProxy, fake_config, wait_until

MakeProxy = Callable[..., LiveProxy]
TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}


def statuses(client: openai.OpenAI) -> dict[str, Any]:
    return {m.id: (m.model_extra or {})["status"]["value"] for m in client.models.list().data}


@pytest.mark.real
def test_openai_sdk_reads_status_and_unload_ejects(
    smollm2_proxy: LiveProxy, openai_for: Callable[[LiveProxy], openai.OpenAI]
) -> None:
    client = openai_for(smollm2_proxy)
    httpx.post(smollm2_proxy.url + "/unload", timeout=60).raise_for_status()
    assert statuses(client) == {"smollm2:135m": "unloaded"}
    client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert statuses(client) == {"smollm2:135m": "loaded"}
    model = client.models.list().data[0]
    assert (model.model_extra or {})["loaded"] is True  # the older field stays
    r = httpx.post(smollm2_proxy.url + "/models/unload", json={"model": "smollm2"}, timeout=60)
    assert r.status_code == 200 and r.json() == {"success": True}
    assert statuses(client) == {"smollm2:135m": "unloaded"}
    assert not smollm2_proxy.workers()


def test_loading_shows_while_a_worker_starts_and_unload_needs_an_admin_key(
    make_proxy: MakeProxy, openai_for: Callable[..., openai.OpenAI]
) -> None:
    proxy = make_proxy(
        [fake_config("slow", "--hang-on-load"), fake_config("quick")], tokens=TOKENS, defaults={"load_timeout": "5s"}
    )
    client = openai_for(proxy, "user-key")
    assert statuses(client) == {"slow": "unloaded", "quick": "unloaded"}
    user = {"Authorization": "Bearer user-key"}
    admin = {"x-api-key": "admin-key"}
    load = {"headers": admin, "timeout": 60}
    loader = threading.Thread(target=httpx.post, args=(proxy.url + "/load/slow",), kwargs=load)
    loader.start()
    try:
        wait_until(lambda: statuses(client)["slow"] == "loading")
    finally:
        loader.join()
    assert statuses(client)["slow"] == "unloaded"  # its load failed
    client.chat.completions.create(model="quick", messages=[{"role": "user", "content": "hi"}])
    assert statuses(client)["quick"] == "loaded"
    r = httpx.post(proxy.url + "/models/unload", json={"model": "quick"}, headers=user)
    assert r.status_code == 403
    r = httpx.post(proxy.url + "/models/unload", json={"model": "nope"}, headers={"x-api-key": "admin-key"})
    assert r.status_code == 404
    r = httpx.post(proxy.url + "/models/unload", json={}, headers={"x-api-key": "admin-key"})
    assert r.status_code == 400 and "'model' is required" in r.json()["error"]["message"]
    r = httpx.post(proxy.url + "/v1/models/unload", json={"model": "quick"}, headers={"x-api-key": "admin-key"})
    assert r.status_code == 200 and r.json() == {"success": True}
    assert statuses(client)["quick"] == "unloaded"
