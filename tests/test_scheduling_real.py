"""The scheduler's promises on the real path (issue 25): a live proxy, real SmolLM2 workers, room for one (and a
config reload on fake worker processes, where the request the worker gets must be seen).

The same rules with fake workers and a manual clock: tests/test_manager_scheduling.py; the decision alone:
tests/test_scheduler.py.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.harness import LiveProxy, fake_config, running, smollm2_config, wait_until

TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
ADMIN = {"Authorization": "Bearer admin-key"}
USER = {"Authorization": "Bearer user-key"}
NAMES = ["m1", "m2", "m3"]
UP = ("starting", "ready", "stopping")


def copies() -> list[dict[str, Any]]:
    """Three copies of the SmolLM2 config under other names."""
    return [smollm2_config(name=name, aliases=[]) for name in NAMES]


def chat(proxy: LiveProxy, model: str, headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **extra}
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


@pytest.mark.real
def test_two_cold_models_with_room_for_one_are_never_up_together(tmp_path: Path) -> None:
    with running(tmp_path, copies(), limits={"max_loaded_models": 1}) as proxy:
        answers: dict[str, int] = {}

        def ask(model: str) -> None:
            answers[model] = chat(proxy, model).status_code

        threads = [threading.Thread(target=ask, args=(m,)) for m in NAMES[:2]]
        for thread in threads:
            thread.start()
        most = 0
        while any(t.is_alive() for t in threads):
            up = [name for name, m in proxy.status().items() if m["state"] in UP]
            most = max(most, len(up))
            assert len(up) <= 1, f"two models up at once with room for one: {up}"
        for thread in threads:
            thread.join()
        assert answers == {"m1": 200, "m2": 200}
        assert most == 1


@pytest.mark.real
def test_a_user_key_cannot_unload_a_model_an_admin_pinned(tmp_path: Path) -> None:
    with running(tmp_path, copies()[:1], tokens=TOKENS) as proxy:
        assert chat(proxy, "m1", ADMIN, keep_alive=-1).status_code == 200
        assert chat(proxy, "m1", USER, keep_alive="1ms").status_code == 200
        status = proxy.status(ADMIN)["m1"]
        assert (status["state"], status["keep_alive"], status["expires_at"]) == ("ready", "-1", "never")
        # a 1 ms keep_alive would have unloaded it by now; it stays for as long as we look
        deadline = time.monotonic() + 2.0
        wait_until(lambda: proxy.status(ADMIN)["m1"]["state"] != "ready" or time.monotonic() > deadline, timeout=10)
        assert proxy.status(ADMIN)["m1"]["state"] == "ready"
        # an admin's own value replaces it
        assert chat(proxy, "m1", ADMIN, keep_alive="1ms").status_code == 200
        wait_until(lambda: proxy.status(ADMIN)["m1"]["state"] == "stopped", timeout=30)


@pytest.mark.real
def test_a_requests_keep_alive_survives_the_reload_its_own_num_ctx_causes(tmp_path: Path) -> None:
    with running(tmp_path, copies()[:1]) as proxy:
        ask = {"model": "m1", "messages": [{"role": "user", "content": "Say hi."}], "stream": False}
        first = httpx.post(
            proxy.url + "/api/chat", json={**ask, "options": {"num_ctx": 1024, "num_predict": 4}}, timeout=120
        )
        assert first.status_code == 200
        old = proxy.status()["m1"]["pid"]
        # as Open WebUI sends them: another num_ctx (a reload) and keep_alive -1 in one request
        body = {**ask, "keep_alive": -1, "options": {"num_ctx": 2048, "num_predict": 4}}
        assert httpx.post(proxy.url + "/api/chat", json=body, timeout=120).status_code == 200
        status = proxy.status()["m1"]
        assert status["pid"] != old and status["worker"]["n_ctx"] == 2048  # it reloaded for this request
        assert (status["state"], status["keep_alive"], status["expires_at"]) == ("ready", "-1", "never")


def test_a_request_after_a_config_reload_is_built_from_the_new_config(tmp_path: Path) -> None:
    record, gate = tmp_path / "bodies.jsonl", tmp_path / "gate"
    flags = ("--record", str(record), "--gate", str(gate))
    with running(tmp_path / "proxy", [fake_config("rec", *flags, template={"system": "the old prompt"})]) as proxy:
        body = {"model": "rec", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json={**body, "stream": True}) as held:
            chunks = held.iter_lines()
            next(line for line in chunks if line.startswith("data: {"))  # busy on the old config, held
            new = fake_config("rec", *flags, template={"system": "a new, longer system prompt"})
            (proxy.root / "configs" / "rec.yaml").write_text(yaml.safe_dump(new))
            assert proxy.proc is not None
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "its config changed; it restarts" in proxy.log())
            answers: list[int] = []
            later = threading.Thread(target=lambda: answers.append(chat(proxy, "rec").status_code))
            later.start()
            wait_until(lambda: proxy.status()["rec"]["queued"] == 1)  # it waits for the restart
            gate.touch()
            list(chunks)
        later.join(60)
        assert answers == [200]
    sent = [json.loads(line)["body"]["messages"][0] for line in record.read_text().splitlines()]
    assert sent == [
        {"role": "system", "content": "the old prompt"},
        {"role": "system", "content": "a new, longer system prompt"},
    ]
