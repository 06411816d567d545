"""API keys: user and admin keys, Bearer and x-api-key, errors in the caller's dialect."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import yaml

from tests.harness import REPO, LiveProxy, answers, fake_config, wait_until

MakeProxy = Callable[..., LiveProxy]
TOKENS = {"api_key": ["user-key-1", "user-key-2"], "admin_key": ["admin-key"]}


def test_keys_are_required_and_checked(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], tokens=TOKENS)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(proxy.url + "/api/chat", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "invalid API key" in r.json()["error"]
    for headers in (
        {"Authorization": "Bearer user-key-2"},
        {"x-api-key": "user-key-1"},
        {"Authorization": "Bearer admin-key"},
    ):
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
    # open endpoints
    assert httpx.get(proxy.url + "/health").status_code == 200
    assert httpx.get(proxy.url + "/").text == "Ollama is running"
    assert httpx.get(proxy.url + "/api/version").status_code == 200
    assert httpx.get(proxy.url + "/status").status_code == 401
    assert "user-key" not in proxy.log() and "admin-key" not in proxy.log()


def test_admin_endpoints_need_an_admin_key(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], tokens=TOKENS)
    user = {"Authorization": "Bearer user-key-1"}
    admin = {"Authorization": "Bearer admin-key"}
    r = httpx.post(proxy.url + "/load/fake", headers=user)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert httpx.post(proxy.url + "/load/fake", headers=admin, timeout=30).status_code == 200
    assert httpx.post(proxy.url + "/unload", headers=user).status_code == 403
    assert httpx.post(proxy.url + "/unload", headers=admin, timeout=30).json() == {"unloaded": ["fake"]}


def test_sdks_send_their_keys(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], tokens=TOKENS)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="user-key-1", max_retries=0) as good:
        assert good.models.list().data[0].id == "fake"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    with ollama.Client(host=proxy.url, headers={"Authorization": "Bearer user-key-2"}) as client:
        assert [m.model for m in client.list().models] == ["fake:latest"]
    with ollama.Client(host=proxy.url) as anonymous, pytest.raises(ollama.ResponseError) as info:
        anonymous.list()
    assert info.value.status_code == 401


def test_open_proxy_says_so(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")])
    assert "OPEN" in proxy.log()


def test_cors_origins_from_config(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], cors=["http://ui.example"])
    r = httpx.options(
        proxy.url + "/v1/models", headers={"Origin": "http://ui.example", "Access-Control-Request-Method": "GET"}
    )
    assert r.headers["access-control-allow-origin"] == "http://ui.example"
    r = httpx.get(proxy.url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def _near_misses(key: str) -> list[str]:
    """Keys one mistake away from a real one: a prefix, an extension, another case. (Spaces around a key
    are not a mistake: HTTP strips them from header values, and RFC 6750 allows several after "Bearer".)"""
    return [key[:-1], key[:1], key + "x", key + key, key.upper(), key.capitalize()]


def test_keys_one_mistake_away_are_refused(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], tokens=TOKENS)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    for real in ("user-key-1", "user-key-2", "admin-key"):
        for wrong in _near_misses(real):
            for headers in ({"Authorization": f"Bearer {wrong}"}, {"x-api-key": wrong}):
                r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=headers)
                assert r.status_code == 401, (real, wrong, headers)
    # an admin key's near miss gets no admin rights either (nor does a user key's): the model stays loaded
    ok = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"x-api-key": "user-key-1"})
    assert ok.status_code == 200
    for wrong in [*_near_misses("admin-key"), *_near_misses("user-key-1")]:
        r = httpx.post(proxy.url + "/unload", headers={"Authorization": f"Bearer {wrong}"})
        assert r.status_code == 401, wrong
    assert proxy.status({"Authorization": "Bearer admin-key"})["fake"]["state"] == "ready"


def _start_up(root: Path, api_tokens: str | None) -> tuple[int | None, str]:
    """Start a proxy whose config names ``api_tokens``; its exit code (None: it served) and its output."""
    proxy = LiveProxy(root, [fake_config("fake")])
    config = yaml.safe_load((root / "config.yml").read_text())
    config["api_tokens"] = api_tokens
    (root / "config.yml").write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "proxy", "--config", str(root / "config.yml"), "--port", str(proxy.port)]
    with subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        wait_until(lambda: proc.poll() is not None or answers(proxy.url + "/health"), timeout=30)
        served = proc.poll() is None
        if served:
            proc.terminate()
        out, _ = proc.communicate(timeout=30)
    return (None if served else proc.returncode), out


def test_a_missing_tokens_file_stops_start_up(tmp_path: Path) -> None:
    code, out = _start_up(tmp_path / "typo", "api_tokens.yaml")  # the shipped file is .yml
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "api_tokens.yaml" in lines[0] and "does not exist" in lines[0]


def test_open_mode_only_on_purpose(tmp_path: Path) -> None:
    code, out = _start_up(tmp_path / "null", None)  # api_tokens: null
    assert code is None and "OPEN" in out
    code, out = _start_up(tmp_path / "empty", "api_tokens.yml")  # the harness writes it with no keys
    assert code is None and "OPEN" in out
