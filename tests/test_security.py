"""What a web page or a user key must not be able to do: cross-site requests (content type, Host, Origin),
GET side effects, and user keys pinning or unloading models. On live proxies, through the SDKs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.harness import LiveProxy, fake_config, smollm2_config

MakeProxy = Callable[..., LiveProxy]
MSG = [{"role": "user", "content": "hi"}]
TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}
USER = {"Authorization": "Bearer user-key"}
ADMIN = {"Authorization": "Bearer admin-key"}
MODEL = "smollm2:135m"


def _state(proxy: LiveProxy, name: str = "fake") -> str:
    return str(proxy.status(ADMIN)[name]["state"])


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_json_routes_refuse_what_a_page_can_send_without_preflight(make_proxy: MakeProxy, content_type: str) -> None:
    proxy = make_proxy([fake_config("fake")])
    pin = b'{"model": "fake", "prompt": "hi", "keep_alive": -1}'
    r = httpx.post(proxy.url + "/api/generate", content=pin, headers={"content-type": content_type})
    assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    body = b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}]}'
    r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": content_type})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    assert _state(proxy) == "stopped"  # nothing was loaded, let alone pinned
    for ok in ("application/json; charset=utf-8", "application/vnd.example+json"):
        r = httpx.post(proxy.url + "/v1/chat/completions", content=body, headers={"content-type": ok})
        assert r.status_code == 200, r.text


def test_a_foreign_host_is_refused(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], allowed_hosts=["proxy.lan"])
    port = proxy.port
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
        r = httpx.get(proxy.url + "/api/tags", headers={"host": host})
        assert r.status_code == 403 and "server.allowed_hosts" in r.json()["error"], (host, r.text)
        r = httpx.post(
            proxy.url + "/v1/chat/completions", json={"model": "fake", "messages": MSG}, headers={"host": host}
        )
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert _state(proxy) == "stopped"
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", f"proxy.lan:{port}"):
        assert httpx.get(proxy.url + "/api/tags", headers={"host": host}).status_code == 200, host


def test_a_foreign_origin_cannot_change_state(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], cors=["http://ui.example"])
    body = {"model": "fake", "messages": MSG}
    for origin in ("http://evil.example", "null", "http://ui.example.evil"):
        r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"origin": origin})
        assert r.status_code == 403 and "server.cors_origins" in r.json()["error"]["message"], origin
        r = httpx.post(proxy.url + "/unload", headers={"origin": origin})
        assert r.status_code == 403
    assert _state(proxy) == "stopped"
    # reading is harmless (the browser keeps the answer from the page);
    # the listed origin and the proxy's own pages may post
    assert httpx.get(proxy.url + "/v1/models", headers={"origin": "http://evil.example"}).status_code == 200
    for origin in ("http://ui.example", f"http://127.0.0.1:{proxy.port}"):
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"origin": origin}).status_code == 200


def test_unload_is_post_only(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")])
    assert httpx.post(proxy.url + "/load/fake", timeout=30).status_code == 200
    for path in ("/unload", "/unload/fake"):
        r = httpx.get(proxy.url + path)
        assert r.status_code == 405 and "GET" in r.json()["error"]["message"]
    assert _state(proxy) == "ready"


def test_user_keys_cannot_pin_or_unload_and_their_keep_alive_is_capped(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([smollm2_config()], tokens=TOKENS, limits={"max_user_keep_alive": "20m"})
    with ollama.Client(host=proxy.url, headers=USER, timeout=120) as user:
        for keep_alive in (-1, "-1m", 0, "0s"):
            with pytest.raises(ollama.ResponseError) as info:
                user.chat(model=MODEL, messages=MSG, keep_alive=keep_alive, options={"num_predict": 2})
            assert info.value.status_code == 403 and "admin key" in info.value.error
            with pytest.raises(ollama.ResponseError) as info:
                user.generate(model=MODEL, keep_alive=keep_alive)  # Ollama's load / unload request
            assert info.value.status_code == 403
        assert _state(proxy, MODEL) == "stopped"
        user.chat(model=MODEL, messages=MSG, keep_alive="2h", options={"num_predict": 2})
        assert proxy.status(USER)[MODEL]["keep_alive"] == "20m"
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="user-key", max_retries=0) as client:
        extra: dict[str, Any] = {"keep_alive": 0}
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, extra_body=extra)  # type: ignore[arg-type]
    assert _state(proxy, MODEL) == "ready"
    with ollama.Client(host=proxy.url, headers=ADMIN, timeout=120) as admin:
        admin.generate(model=MODEL, keep_alive=-1)
        assert proxy.status(ADMIN)[MODEL]["keep_alive"] == "-1"
        admin.generate(model=MODEL, keep_alive=0)
    assert _state(proxy, MODEL) == "stopped"


def test_user_keys_get_one_line_without_paths_admins_the_detail(make_proxy: MakeProxy) -> None:
    broken = smollm2_config(name="broken")
    broken.pop("aliases")
    broken["model"] = {"path": "nowhere/missing.gguf"}
    proxy = make_proxy([broken, smollm2_config()], tokens=TOKENS)
    body = {"model": "broken", "messages": MSG}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=USER, timeout=60)
    assert r.status_code == 503 and "Retry-After" in r.headers
    message = r.json()["error"]["message"]
    assert "\n" not in message and "/" not in message and "missing.gguf" not in message, message
    last = proxy.status(USER)["broken"]["last_error"]
    assert "\n" not in last and "/" not in last, last
    r = httpx.post(proxy.url + "/api/chat", json=body, headers=USER, timeout=60)
    assert r.status_code == 503 and "/" not in r.json()["error"]
    # the first /api/show reads the GGUF's metadata (seconds on a loaded box)
    show = httpx.post(proxy.url + "/api/show", json={"model": MODEL}, headers=USER, timeout=60).json()
    assert "/" not in show["modelfile"], show["modelfile"]
    # an admin key gets the worker's own words, paths included
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=ADMIN, timeout=60)
    assert r.status_code == 503 and "missing.gguf" in r.json()["error"]["message"]
    assert "missing.gguf" in proxy.status(ADMIN)["broken"]["last_error"]
    show = httpx.post(proxy.url + "/api/show", json={"model": MODEL}, headers=ADMIN, timeout=60).json()
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in show["modelfile"] and "/" in show["modelfile"]
