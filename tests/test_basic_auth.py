"""Open WebUI with keys configured: Basic credentials (its AUTOMATIC1111 engine sends only those), the
WWW-Authenticate challenge on every 401, a named unsupported scheme, and the audio listings it asks for
without any key (``server.public_audio_listings``). Against a live proxy with keys, over plain HTTP."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import REPO, LiveProxy, fake_config, running

MakeProxy = Callable[..., LiveProxy]
TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}


def basic(credential: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}


def piper() -> dict[str, object]:
    cfg: dict[str, object] = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    return cfg


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    with running(tmp_path_factory.mktemp("keys"), [piper(), fake_config("fake")], tokens=TOKENS) as live:
        yield live


@pytest.mark.parametrize("credential", ["user-key", "webui:user-key", ":user-key", "admin-key", "x:admin-key"])
def test_basic_credentials_carry_a_key(proxy: LiveProxy, credential: str) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers=basic(credential), timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(proxy.url + "/sdapi/v1/sd-models", headers=basic(credential)).status_code == 200
    # the key decides the role, as with Bearer
    admin = httpx.post(proxy.url + "/unload", headers=basic(credential), timeout=30)
    assert admin.status_code == (200 if "admin" in credential else 403)


@pytest.mark.parametrize("credential", ["wrong", "user-key:", "user:wrong", "user-key:x"])
def test_basic_with_no_key_is_refused_with_a_challenge(proxy: LiveProxy, credential: str) -> None:
    r = httpx.get(proxy.url + "/sdapi/v1/options", headers=basic(credential))
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="llm-proxy"') and 'Basic realm="llm-proxy"' in challenge


def test_every_401_carries_www_authenticate(proxy: LiveProxy) -> None:
    for method, path, headers in [
        ("GET", "/v1/models", {}),
        ("GET", "/api/tags", {"Authorization": "Bearer wrong"}),
        ("POST", "/v1/chat/completions", {"x-api-key": "wrong"}),
        ("GET", "/status", {}),
        ("GET", "/sdapi/v1/sd-models", {}),
    ]:
        r = httpx.request(method, proxy.url + path, headers=headers, json={})
        assert r.status_code == 401, (path, r.text)
        challenge = r.headers.get("www-authenticate", "")
        assert challenge.startswith("Bearer"), (path, r.headers)
        # Basic is offered where it applies: AUTOMATIC1111's routes
        assert ("Basic" in challenge) == path.startswith("/sdapi/"), (path, challenge)


def test_an_unsupported_scheme_is_named(proxy: LiveProxy) -> None:
    r = httpx.get(proxy.url + "/v1/models", headers={"Authorization": 'Digest username="u", realm="r"'})
    assert r.status_code == 401
    assert "unsupported authorization scheme Digest" in r.json()["error"]["message"]
    assert "www-authenticate" in r.headers
    r = httpx.get(proxy.url + "/v1/models", headers={"Authorization": "Basic %%%not-base64"})
    assert r.status_code == 401 and "malformed Basic credentials" in r.json()["error"]["message"]
    assert "Basic" in r.headers["www-authenticate"]


def test_audio_listings_are_public_but_a_sent_key_is_checked(proxy: LiveProxy) -> None:
    voices = httpx.get(proxy.url + "/v1/audio/voices", timeout=30)
    assert voices.status_code == 200 and {"id": "default", "name": "default"} in voices.json()["voices"]
    models = httpx.get(proxy.url + "/v1/audio/models")
    assert models.status_code == 200 and [m["id"] for m in models.json()["models"]] == ["piper-joe"]
    by_model = httpx.get(proxy.url + "/v1/audio/voices", params={"model": "tts-1"}, timeout=30)
    assert by_model.status_code == 200 and by_model.json() == voices.json()
    # a key sent is checked as anywhere else
    assert httpx.get(proxy.url + "/v1/audio/voices", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(proxy.url + "/v1/audio/models", headers=basic("nope")).status_code == 401
    assert httpx.get(proxy.url + "/v1/audio/models", headers={"x-api-key": "user-key"}).status_code == 200
    # only the listings: speech itself still needs a key
    r = httpx.post(proxy.url + "/v1/audio/speech", json={"model": "tts-1", "input": "hi", "voice": "alloy"})
    assert r.status_code == 401


def test_public_audio_listings_can_be_turned_off(tmp_path: Path) -> None:
    live = LiveProxy(tmp_path, [piper()], tokens=TOKENS)
    config = yaml.safe_load((tmp_path / "config.yml").read_text())
    config["server"]["public_audio_listings"] = False
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    live.start()
    try:
        for path in ("/v1/audio/voices", "/v1/audio/models"):
            assert httpx.get(live.url + path).status_code == 401
            assert httpx.get(live.url + path, headers=basic("user-key"), timeout=30).status_code == 200
    finally:
        live.stop()
