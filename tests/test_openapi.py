"""GET /openapi.json: the document describes every route the app serves and nothing else, is a valid
OpenAPI 3.1 document whose bodies the proxy accepts, and is public."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from schemathesis.core.result import Ok
from starlette.routing import Mount, Route

from proxy.api import openapi
from proxy.app import create_app
from proxy.auth import KeyRing
from proxy.config import load_settings
from tests.harness import LiveProxy, fake_config

MakeProxy = Callable[..., LiveProxy]
TOKENS = {"api_key": ["user-key"], "admin_key": ["admin-key"]}


def _served(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route of the app create_app builds; the HEAD Starlette adds to every
    GET is left out (the document says so once); a mount of static files is GET of a path below it."""
    (tmp_path / "config.yml").write_text("limits: {}\n")
    app = create_app(load_settings(tmp_path / "config.yml"), keys=KeyRing.load(None))
    out = set()
    for route in app.routes:
        if isinstance(route, Mount):
            out.add(("GET", route.path + "/{path}"))
            continue
        assert isinstance(route, Route), route
        methods = route.methods or set()
        for method in methods:
            if method != "HEAD" or "GET" not in methods:
                out.add((method, openapi.openapi_path(route.path)))
    return out


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_every_route_is_documented_and_nothing_else(tmp_path: Path) -> None:
    served = _served(tmp_path)
    documented = _documented(openapi.document())
    assert served - documented == set(), "routes without a line in proxy/api/openapi.py OPERATIONS"
    assert documented - served == set(), "documented routes the app does not serve"
    assert len(served) > 40


def test_the_document_is_valid_openapi_with_resolvable_schemas() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)  # validates the document against the OpenAPI 3.1 schema
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) == sum(len(ops) for ops in doc["paths"].values())
    names = set(doc["components"]["schemas"])
    refs = {ref.rsplit("/", 1)[1] for ref in _strings(doc) if ref.startswith("#/components/schemas/")}
    assert refs <= names, refs - names
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert set(chat["responses"]) >= {"200", "400", "401", "403", "404", "413", "415", "503", "507"}
    assert "Retry-After" in chat["responses"]["503"]["headers"]
    assert doc["paths"]["/api/chat"]["post"]["responses"]["400"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("OllamaError")
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/unload"]["post"]["security"] != []


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_openapi_json_is_served_without_a_key(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], tokens=TOKENS)
    r = httpx.get(proxy.url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == openapi.document()
    assert httpx.get(proxy.url + "/status").status_code == 401  # the document is public, the rest is not
    # a body built as the document says is accepted by the route it documents
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": False, "keep_alive": "1m"}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer user-key"})
    assert r.status_code == 200, r.text
