"""Scoped callers (keys with ``models:`` in api_tokens.yml, JWTs with a ``models`` claim) against a live proxy:
a scoped caller sees only its models in every list and gets 404 for the others, as if they did not exist.

The routes come from the app itself, so a route added without going through ``caller(request)`` fails
here. Models of every kind (fake LLMs, Piper, Whisper, a diffusers config) are configured; only the fake
LLMs are loaded (for /api/ps and /status).
"""

from __future__ import annotations

import concurrent.futures
import io
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from proxy.app import create_app
from proxy.auth import KeyRing
from tests.bare import bare_settings
from tests.harness import REPO, LiveProxy, fake_config, running, wait_until

SECRET = "s" * 40
FULL_ADMIN = "full-admin-key"
OPEN = ["open-llm", "open-voice", "open-ear", "open-painter"]
HIDDEN = ["secret-llm", "secret-voice", "secret-ear", "secret-painter"]


def _shipped(file: str, name: str) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load((REPO / "configs" / file).read_text())
    cfg["name"] = name
    cfg.pop("aliases", None)
    return cfg


def _models(root: Path) -> list[dict[str, Any]]:
    (root / "sd").mkdir(parents=True, exist_ok=True)
    out: list[dict[str, Any]] = []
    for llm, voice, ear, painter in (OPEN, HIDDEN):
        out += [
            fake_config(llm),
            _shipped("piper.yaml", voice),
            _shipped("whisper.yaml", ear),
            {"name": painter, "backend": "diffusers", "model": {"path": str(root / "sd")}},
        ]
    return out


def token(role: str, models: list[str] | None, **claims: Any) -> str:
    body: dict[str, Any] = {"role": role, "exp": int(time.time()) + 3600, **claims}
    if models is not None:
        body["models"] = models
    return jwt.encode(body, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    root = tmp_path_factory.mktemp("scopes")
    tokens: dict[str, Any] = {
        "api_key": ["full-user-key", {"key": "scoped-user-key", "models": OPEN}],
        "admin_key": [FULL_ADMIN, {"key": "scoped-admin-key", "models": OPEN}],
    }
    with running(root, _models(root), tokens=tokens, auth={"jwt_secret": SECRET}) as live:
        yield live


def _load_llms(proxy: LiveProxy) -> None:
    """Both fake LLMs loaded, so /api/ps and /status have something to show (or to hide)."""
    for name in ("open-llm", "secret-llm"):
        r = httpx.post(proxy.url + f"/load/{name}", headers={"Authorization": f"Bearer {FULL_ADMIN}"}, timeout=60)
        assert r.status_code == 200, r.text


def app_routes() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from the app itself."""
    app = create_app(
        bare_settings(),
        keys=KeyRing(),
    )
    out = []
    for route in app.routes:
        if isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            continue  # the page's own files (/ui/static): no model data behind them
        assert isinstance(route, Route)
        for method in sorted(route.methods or ()):
            if method != "HEAD":
                out.append((method, route.path))
    return out


ROUTES = app_routes()
CALLERS = {
    "scoped user key": "scoped-user-key",
    "scoped admin key": "scoped-admin-key",
    "scoped user JWT": token("user", OPEN),
    "scoped admin JWT": token("admin", OPEN),
}


def _wav() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    return buf.getvalue()


def _call(proxy: LiveProxy, method: str, path: str, model: str, key: str, anthropic: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if anthropic:
        headers["anthropic-version"] = "2023-06-01"
    url = proxy.url + path.replace("{model:path}", model)
    if method == "GET":
        return httpx.get(url, headers=headers, timeout=60)
    if "/audio/transcriptions" in path or "/audio/translations" in path:
        files = {"file": ("a.wav", _wav(), "audio/wav")}
        return httpx.post(url, headers=headers, files=files, data={"model": model}, timeout=60)
    body = {
        "model": model,
        "name": model,
        "prompt": "x",
        "input": "x",
        "text": "x",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1,
        "sd_model_checkpoint": model,
        "override_settings": {"sd_model_checkpoint": model},
        "model_id": model,
        "source": model,
        "destination": "copy-of-it",
    }
    return httpx.post(url, headers=headers, json=body, timeout=60)


ADMIN_ONLY = ("/load", "/unload", "/models/unload", "/v1/models/unload", "/logs/")
# views over every model at once: only for callers not scoped to some (403 for a scoped key, admin or not)
SPANS_EVERY_MODEL = {"/models/rescan", "/status/events", "/status/requests"}
# refused whatever the model (Ollama's management calls that change what is installed)
ALWAYS_REFUSED = {"/api/create", "/api/push", "/api/blobs/{digest}"}
# not per caller by design: /metrics is public (server.metrics_public), and with it off it needs an unscoped
# key (test_metrics_need_an_unscoped_key_when_not_public)
NOT_PER_CALLER = {"/metrics"}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_a_scoped_caller_never_sees_nor_reaches_another_model(
    proxy: LiveProxy, method: str, path: str, caller: str
) -> None:
    key = CALLERS[caller]
    if path in NOT_PER_CALLER:
        return
    _load_llms(proxy)
    if path in SPANS_EVERY_MODEL:
        r = _call(proxy, method, path, HIDDEN[0], key)
        assert r.status_code == 403 and "secret-" not in r.text, r.text[:300]
        return
    if path == "/unload":  # unloads what the caller sees, and says so: nothing else
        r = _call(proxy, method, path, "", key)
        assert r.status_code == (200 if "admin" in caller else 403) and "secret-" not in r.text
        assert proxy.status({"Authorization": f"Bearer {FULL_ADMIN}"})["secret-llm"]["state"] == "ready"
        return
    names_a_model = method == "POST" or "{model:path}" in path
    for hidden in HIDDEN:
        for anthropic in (False, True) if method == "GET" else (False,):
            r = _call(proxy, method, path, hidden, key, anthropic)
            assert r.status_code < 500, r.text[:300]
            if not names_a_model:  # a list: none of the hidden models in it
                assert "secret-" not in r.text, r.text[:300]
                continue
            # naming a hidden model gets exactly what naming one that does not exist gets
            ghost = _call(proxy, method, path, "ghost-model", key, anthropic)
            assert (r.status_code, r.text.replace(hidden, "@")) == (
                ghost.status_code,
                ghost.text.replace("ghost-model", "@"),
            )
            assert "secret-" not in r.text.replace(hidden, "@")
            if path.startswith(ADMIN_ONLY) and "admin" not in caller or path in ALWAYS_REFUSED:
                assert r.status_code == 403
            else:
                assert r.status_code == 404, r.text[:300]
    assert "secret-llm" in proxy.status({"Authorization": f"Bearer {FULL_ADMIN}"})  # it is there, just not seen


LISTS = {
    "/v1/models": "open-llm",
    "/api/tags": "open-llm",
    "/api/ps": "open-llm",
    "/status": "open-llm",
    "/sdapi/v1/sd-models": "open-painter",
    "/v1/audio/models": "open-voice",
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("path", list(LISTS))
def test_a_scoped_caller_sees_its_own_models_in_each_list(proxy: LiveProxy, path: str, caller: str) -> None:
    _load_llms(proxy)
    r = _call(proxy, "GET", path, "", CALLERS[caller])
    assert r.status_code == 200 and LISTS[path] in r.text and "secret-" not in r.text
    full = _call(proxy, "GET", path, "", FULL_ADMIN)
    assert "secret-" in full.text  # the unscoped admin sees both


def test_an_unscoped_jwt_sees_every_model_and_a_scoped_one_reaches_its_own(proxy: LiveProxy) -> None:
    r = _call(proxy, "GET", "/v1/models", "", token("user", None))
    assert r.status_code == 200 and "secret-llm" in r.text and "open-llm" in r.text
    r = _call(proxy, "POST", "/v1/chat/completions", "open-llm", CALLERS["scoped user JWT"])
    assert r.status_code == 200, r.text
    r = _call(proxy, "POST", "/v1/chat/completions", "secret-llm", CALLERS["scoped user JWT"])
    assert r.status_code == 404 and r.json()["error"]["message"] == "model 'secret-llm' not found"


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (jwt.encode({"role": "user", "exp": int(time.time()) + 60}, "x" * 40, algorithm="HS256"), "signature"),
        (token("user", None, exp=int(time.time()) - 60), "expired"),
        (jwt.encode({"role": "user"}, SECRET, algorithm="HS256"), "'exp' claim"),
        (token("root", None), "role must be 'user' or 'admin'"),
        (
            jwt.encode({"role": "admin", "exp": int(time.time()) + 60}, None, algorithm="none"),
            "alg value is not allowed",
        ),
    ],
    ids=["bad signature", "expired", "no exp", "bad role", "alg none"],
)
def test_a_bad_token_is_a_401_with_its_reason_in_each_dialect(proxy: LiveProxy, bad: str, reason: str) -> None:
    headers = {"Authorization": f"Bearer {bad}"}
    r = httpx.get(proxy.url + "/v1/models", headers=headers, timeout=30)
    assert r.status_code == 401 and reason in r.json()["error"]["message"]
    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    r = httpx.get(proxy.url + "/api/tags", headers=headers, timeout=30)
    assert r.status_code == 401 and reason in r.json()["error"]
    r = httpx.post(proxy.url + "/v1/messages", headers={"x-api-key": bad}, json={}, timeout=30)
    assert r.status_code == 401 and reason in r.json()["error"]["message"] and r.json()["type"] == "error"
    r = httpx.get(proxy.url + "/v1/models", timeout=30)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")


def test_a_user_jwt_is_refused_admin_routes_an_admin_jwt_is_not(proxy: LiveProxy) -> None:
    r = httpx.post(proxy.url + "/unload/open-llm", headers={"Authorization": f"Bearer {token('user', None)}"})
    assert r.status_code == 403
    r = httpx.post(
        proxy.url + "/load/open-llm", headers={"Authorization": f"Bearer {token('admin', None)}"}, timeout=60
    )
    assert r.status_code == 200


def test_public_views_name_only_the_models_every_scoped_key_sees(proxy: LiveProxy) -> None:
    # keys scoped to the OPEN models are configured: leaving the key out must not show a scoped caller more
    _load_llms(proxy)
    r = _call(proxy, "POST", "/v1/chat/completions", "secret-llm", FULL_ADMIN)
    assert r.status_code == 200, r.text  # secret-llm has request counts now
    metrics = httpx.get(proxy.url + "/metrics", timeout=30)
    assert metrics.status_code == 200 and 'model="open-llm"' in metrics.text
    assert "secret-" not in metrics.text, [line for line in metrics.text.splitlines() if "secret-" in line][:3]
    for path, shown in (("/v1/audio/models", "open-voice"), ("/v1/audio/voices", "")):
        listed = httpx.get(proxy.url + path, timeout=30)
        assert listed.status_code == 200 and shown in listed.text and "secret-" not in listed.text, listed.text
    hidden = httpx.get(proxy.url + "/v1/audio/voices", params={"model": "secret-voice"}, timeout=30)
    assert hidden.status_code == 404, hidden.text
    assert "secret-voice" in _call(proxy, "GET", "/v1/audio/models", "", FULL_ADMIN).text  # a key still sees its own


def test_with_no_scoped_keys_public_views_name_every_model(tmp_path: Path) -> None:
    tokens = {"api_key": ["full-user-key"], "admin_key": []}
    with running(tmp_path, [fake_config("open-llm"), fake_config("secret-llm")], tokens=tokens) as live:
        metrics = httpx.get(live.url + "/metrics", timeout=30)
        assert 'model="open-llm"' in metrics.text and 'model="secret-llm"' in metrics.text


def test_metrics_need_an_unscoped_key_when_not_public(tmp_path: Path) -> None:
    tokens = {"api_key": ["full-user-key", {"key": "scoped-user-key", "models": ["open-llm"]}], "admin_key": []}
    models = [fake_config("open-llm"), fake_config("secret-llm")]
    with running(tmp_path, models, tokens=tokens, server={"metrics_public": False}) as live:
        assert httpx.get(live.url + "/metrics", timeout=30).status_code == 401
        scoped = httpx.get(live.url + "/metrics", headers={"Authorization": "Bearer scoped-user-key"}, timeout=30)
        assert scoped.status_code == 403 and "secret-" not in scoped.text
        full = httpx.get(live.url + "/metrics", headers={"Authorization": "Bearer full-user-key"}, timeout=30)
        assert full.status_code == 200 and 'model="secret-llm"' in full.text


def test_reasons_shown_to_a_scoped_caller_never_name_another_model(tmp_path: Path) -> None:
    # two fakes of 600 MiB each under a 1 GiB budget: one in the way of the other. The reason a request
    # waits (/status) and a 507's reason name the model in the way: to a caller scoped away from it, it is
    # "another model"; an unscoped caller sees its name
    gate = tmp_path / "gate"
    models = [
        fake_config("open-llm", memory={"ram": "600MiB"}),
        fake_config("secret-llm", "--gate-answers", str(gate), memory={"ram": "600MiB"}),
    ]
    tokens = {
        "api_key": ["full-user-key", {"key": "scoped-user-key", "models": ["open-llm"]}],
        "admin_key": [FULL_ADMIN],
    }
    limits = {"memory": {"ram": "1GiB", "reserve_ram": 0}}
    scoped, full = {"Authorization": "Bearer scoped-user-key"}, {"Authorization": "Bearer full-user-key"}
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    with running(tmp_path, models, tokens=tokens, limits=limits) as live, httpx.Client(timeout=60) as http:

        def model(name: str, headers: dict[str, str]) -> dict[str, Any]:
            found = http.get(live.url + "/status", headers=headers).json()["models"]
            return dict(next(m for m in found if m["name"] == name))

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            busy = pool.submit(
                http.post, live.url + "/v1/chat/completions", headers=full, json={**chat, "model": "secret-llm"}
            )
            wait_until(lambda: model("secret-llm", full)["in_flight"] == 1, timeout=30)
            waiting = pool.submit(
                http.post, live.url + "/v1/chat/completions", headers=scoped, json={**chat, "model": "open-llm"}
            )
            assert "secret-llm" in wait_until(lambda: model("open-llm", full)["waiting"], timeout=30)
            shown = model("open-llm", scoped)["waiting"]
            assert shown and "secret-llm" not in shown and "another model" in shown, shown
            gate.touch()
            assert busy.result().status_code == 200 and waiting.result().status_code == 200
        # secret-llm kept loaded for ever: open-llm can never fit beside it (507)
        pin = http.post(live.url + "/load/secret-llm?keep_alive=-1", headers={"Authorization": f"Bearer {FULL_ADMIN}"})
        assert pin.status_code == 200, pin.text
        for headers, named in ((full, True), (scoped, False)):
            r = http.post(live.url + "/api/chat", headers=headers, json={**chat, "model": "open-llm", "stream": False})
            assert r.status_code == 507, r.text
            assert ("secret-llm" in r.json()["error"]) is named, r.text
