"""Config reload on the real path: a proxy started as its own process, SmolLM2 loaded in a real llama.cpp
worker, reloaded by SIGHUP and by ``--watch``; the new configuration is seen through /status, the events and
the keys, never by sleeping."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.harness import LiveProxy, fake_config, smollm2_config, wait_until
from tests.test_ops import Collected

pytestmark = pytest.mark.real

MODEL = "smollm2:135m"
KEYS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
ADMIN = {"Authorization": "Bearer admin-key"}


def write(path: Path, data: Any) -> None:
    """Replace a file whole (as an editor saving it does), so no reader sees half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    os.replace(tmp, path)


def loaded(proxy: LiveProxy, name: str) -> dict[str, Any]:
    httpx.post(f"{proxy.url}/load/{name}", headers=ADMIN, timeout=120).raise_for_status()
    model: dict[str, Any] = proxy.status(ADMIN)[name]
    assert model["state"] == "ready" and model["pid"]
    return model


def chats(proxy: LiveProxy, key: str, model: str = MODEL) -> bool:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0)
    with client:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
        )
    return bool(answer.choices)


def reloads(events: list[tuple[str, dict[str, Any]]], kind: str = "config_reload") -> list[dict[str, Any]]:
    return [d for n, d in events if n == kind]


def test_sighup_adds_changes_and_keeps_smollm2_loaded_with_its_pid(make_proxy: Any) -> None:
    proxy: LiveProxy = make_proxy([smollm2_config(), fake_config("fake", keep_alive="5m")], tokens=KEYS)
    smol = loaded(proxy, MODEL)
    fake = loaded(proxy, "fake")
    seen = Collected(proxy, lambda events: len(reloads(events)) + len(reloads(events, "config_rejected")) >= 2)

    configs = proxy.root / "configs"
    write(configs / "fake.yaml", fake_config("fake", keep_alive="7m"))  # changed
    write(configs / "added.yaml", fake_config("added"))  # new
    write(proxy.root / "api_tokens.yml", {**KEYS, "api_key": ["user-key", "new-key"]})
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGHUP)

    wait_until(lambda: "added" in proxy.status(ADMIN))
    status = proxy.status(ADMIN)
    assert status[MODEL]["state"] == "ready" and status[MODEL]["pid"] == smol["pid"]  # kept, same worker
    wait_until(lambda: proxy.status(ADMIN)["fake"]["state"] == "stopped")  # changed and idle: restarts
    assert chats(proxy, "new-key")  # the new key at once, on the same SmolLM2 worker
    assert proxy.status(ADMIN)[MODEL]["pid"] == smol["pid"]
    again = loaded(proxy, "fake")
    assert again["pid"] != fake["pid"] and again["keep_alive"] == "7m"  # its next load has the new config

    # a broken file refuses the whole reload: the old configuration keeps serving
    write(configs / "added.yaml", "name: [unclosed\n")
    write(proxy.root / "api_tokens.yml", {"api_key": ["other-key"]})
    proxy.proc.send_signal(signal.SIGHUP)
    events = seen.wait()
    [applied] = reloads(events)
    assert applied["trigger"] == "SIGHUP" and applied["added"] == ["added"] and applied["changed"] == ["fake"]
    [refused] = reloads(events, "config_rejected")
    assert "added.yaml" in refused["error"] and "not valid YAML" in refused["error"]
    assert "config reload (SIGHUP) refused" in proxy.log()
    assert "added" in proxy.status(ADMIN)
    assert chats(proxy, "new-key")  # the old keys still hold
    assert proxy.status(ADMIN)[MODEL]["pid"] == smol["pid"]


def test_watch_reloads_on_a_saved_file(make_proxy: Any) -> None:
    proxy: LiveProxy = make_proxy([smollm2_config()], tokens=KEYS, args=["--watch"])
    smol = loaded(proxy, MODEL)
    seen = Collected(proxy, lambda events: len(reloads(events)) >= 1)
    write(proxy.root / "configs" / "added.yaml", fake_config("added"))
    write(proxy.root / "api_tokens.yml", {**KEYS, "api_key": ["user-key", "new-key"]})
    wait_until(lambda: "added" in proxy.status(ADMIN))
    wait_until(lambda: httpx.get(proxy.url + "/v1/models", headers={"Authorization": "Bearer new-key"}).is_success)
    seen.wait()
    assert proxy.status(ADMIN)[MODEL]["pid"] == smol["pid"]
    assert chats(proxy, "new-key", "added")
