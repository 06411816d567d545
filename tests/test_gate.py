"""The one gate every chat request passes (proxy/dialects/gate.py), on a live proxy with a fake worker: every
chat route, with every field that carries a JSON schema, refuses an over-limit schema with a 400 in its own
dialect, naming the field as the client spelled it and the limit, before any worker starts. The route list
is checked against the app's own POST routes, so a new route must say whether it is a chat route (and then
pass here) or not. The gate's rules in-process are below the live tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from proxy.app import create_app
from proxy.auth import KeyRing
from proxy.config import Settings
from proxy.dialects import gate
from proxy.dialects.schemas import SchemaLimits
from proxy.errors import BadRequest, UnsupportedInput
from tests.bare import bare_settings
from tests.harness import LiveProxy, fake_config, wait_until
from tests.test_shaping import model

MSG = [{"role": "user", "content": "hi"}]
Body = Callable[[Any], dict[str, Any]]


def _fn(schema: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", "description": "d", "parameters": schema}}


def _named(schema: Any) -> dict[str, Any]:
    """A tool_choice that forces the tool f: only then do its parameters become a grammar."""
    return {"type": "function", "function": {"name": "f"}}


def _tool_named(schema: Any) -> dict[str, Any]:
    return {"type": "tool", "name": "f"}  # Anthropic's spelling


def _json_schema(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def _text_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "name": "x", "schema": schema}


def _chat(**extra: Any) -> Body:
    return lambda s: {"model": "fake", "messages": MSG, **{k: v(s) for k, v in extra.items()}}


def _job(**extra: Any) -> Body:
    return lambda s: {"input": {"messages": MSG, **{k: v(s) for k, v in extra.items()}}}


# (route, how the route spells the field, the body carrying a schema there); the dialect follows from the route
FIELDS: list[tuple[str, str, Body]] = [
    ("/v1/chat/completions", "response_format", _chat(response_format=_json_schema)),
    ("/v1/chat/completions", "response_format", _chat(response_format=lambda s: {"type": "json_object", "schema": s})),
    ("/v1/chat/completions", "tools[0].function.parameters", _chat(tools=lambda s: [_fn(s)], tool_choice=_named)),
    (
        "/v1/chat/completions",
        "functions[0].parameters",
        _chat(functions=lambda s: [{"name": "f", "parameters": s}], function_call=lambda s: {"name": "f"}),
    ),
    (
        "/v1/completions",
        "response_format",
        lambda s: {"model": "fake", "prompt": "hi", "response_format": _json_schema(s)},
    ),
    ("/api/chat", "format", _chat(format=lambda s: s)),
    # (Ollama's tools are never forced, it has no tool_choice: their schemas are only text in the prompt)
    ("/api/generate", "format", lambda s: {"model": "fake", "prompt": "hi", "format": s}),
    ("/api/generate", "format", lambda s: {"model": "fake", "prompt": "hi", "raw": True, "format": s}),
    (
        "/v1/messages",
        "output_config.format",
        _chat(max_tokens=lambda s: 5, output_config=lambda s: {"format": {"type": "json_schema", "schema": s}}),
    ),
    (
        "/v1/messages",
        "tools[0].input_schema",
        _chat(max_tokens=lambda s: 5, tools=lambda s: [{"name": "f", "input_schema": s}], tool_choice=_tool_named),
    ),
    (
        "/v1/messages/count_tokens",
        "tools[0].input_schema",
        _chat(tools=lambda s: [{"name": "f", "input_schema": s}], tool_choice=_tool_named),
    ),
    (
        "/v1/responses",
        "text.format",
        lambda s: {"model": "fake", "input": "hi", "text": {"format": _text_format(s)}},
    ),
    (
        "/v1/responses",
        "tools (function 'f').parameters",
        lambda s: {
            "model": "fake",
            "input": "hi",
            "tools": [{"type": "function", "name": "f", "parameters": s}],
            "tool_choice": "required",
        },
    ),
    ("/v2/fake/run", "response_format", _job(response_format=_json_schema)),
    ("/v2/fake/run", "tools[0].function.parameters", _job(tools=lambda s: [_fn(s)], tool_choice=_named)),
    ("/v2/fake/runsync", "response_format", _job(response_format=_json_schema)),
    ("/v2/fake/runsync", "tools[0].function.parameters", _job(tools=lambda s: [_fn(s)], tool_choice=_named)),
    ("/v2/fake/run", "response_format", lambda s: {"input": {"prompt": "hi", "response_format": _json_schema(s)}}),
]

# an over-limit schema of each kind, and the limit its refusal names
OVER: dict[str, tuple[Any, str]] = {
    "repeat": ({"type": "string", "maxLength": 5000}, "limits.max_schema_repeat"),
    "enum": ({"type": "string", "enum": [f"v{i}" for i in range(300)]}, "limits.max_schema_enum"),
    "anyOf": ({"anyOf": [{"const": i} for i in range(300)]}, "limits.max_schema_enum"),
    "bytes": ({"type": "object", "description": "x" * 70_000}, "limits.max_schema_bytes"),
}

# every other POST route of the app, and why the gate is not its business
NOT_CHAT = {
    "/v1/embeddings": "embeddings: check_embeddings (test_too_many_embedding_inputs...)",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/api/show": "a model's facts",
    "/api/pull": "Ollama's model management",
    "/api/push": "Ollama's model management",
    "/api/create": "Ollama's model management",
    "/api/copy": "Ollama's model management",
    "/api/blobs/{digest}": "Ollama's model management",
    "/api/tts": "speech",
    "/v1/audio/speech": "speech",
    "/v1/audio/transcriptions": "transcription",
    "/v1/audio/translations": "transcription",
    "/v1/images/generations": "images",
    "/sdapi/v1/txt2img": "images",
    "/sdapi/v1/img2img": "images",
    "/sdapi/v1/options": "a client setting",
    "/txt2img": "images",
    "/img2img": "images",
    "/infer": "images",
    "/v1/infer": "images",
    "/load/{model:path}": "lifecycle",
    "/unload": "lifecycle",
    "/unload/{model:path}": "lifecycle",
    "/models/unload": "lifecycle",
    "/v1/models/unload": "lifecycle",
    "/models/rescan": "discovery",
    "/v2/{model:path}/status/{job_id}": "a job's status",
    "/v2/{model:path}/cancel/{job_id}": "a job's cancel",
    "/v2/{model:path}/retry/{job_id}": "a job already submitted (through the gate)",
    "/v2/{model:path}/purge-queue": "jobs' purge",
    # the service API carries no schema of the client's: its chat is built by the proxy, and passes the gate
    # in its job's dry run (tests/test_service.py)
    "/api/v1/run": "the seed's service API",
    "/api/v1/runsync": "the seed's service API",
}


def _settings(**limits: Any) -> Settings:
    """The fewest settings an app is made with, and the limits given."""
    return bare_settings(**limits)


def _post_routes() -> set[str]:
    app = create_app(_settings(), keys=KeyRing())
    return {r.path for r in app.routes if isinstance(r, Route) and "POST" in (r.methods or ())}


def test_every_post_route_is_a_chat_route_walked_here_or_said_not_to_be_one() -> None:
    walked = {route.replace("/v2/fake/", "/v2/{model:path}/") for route, _, _ in FIELDS}
    routes = _post_routes()
    assert not routes - walked - set(NOT_CHAT), "POST routes neither walked here nor said not to be chat routes"
    assert not (walked | set(NOT_CHAT)) - routes, "routes named here that the app does not have"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    live = LiveProxy(tmp_path_factory.mktemp("gate"), [fake_config("fake")]).start()
    yield live
    live.stop()


def dialect_error(route: str, r: httpx.Response) -> str:
    """The refusal's message, after checking the shape of the route's dialect."""
    assert r.status_code == 400, r.text
    body = r.json()
    if route.startswith("/api/"):
        assert list(body) == ["error"] and isinstance(body["error"], str), body
        return str(body["error"])
    if route.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
        return str(body["error"]["message"])
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    return str(body["error"]["message"])


CASES = [(route, field, body, kind) for route, field, body in FIELDS for kind in OVER]


@pytest.mark.parametrize(("route", "field", "body", "kind"), CASES, ids=[f"{r} {f} {k}" for r, f, _, k in CASES])
def test_an_over_limit_schema_is_a_400_in_the_routes_dialect_before_any_worker(
    proxy: LiveProxy, route: str, field: str, body: Body, kind: str
) -> None:
    schema, limit = OVER[kind]
    r = httpx.post(proxy.url + route, json=body(schema), timeout=30)
    message = dialect_error(route, r)
    assert f"'{field}'" in message and limit in message, message
    assert proxy.status()["fake"]["state"] == "stopped"  # nothing was started for it


IMAGE = "data:image/png;base64,AAAA"
IMAGE_PART = {"type": "image_url", "image_url": {"url": IMAGE}}
IMAGES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": [IMAGE_PART]}]}),
    ("/v2/fake/runsync", {"input": {"messages": [{"role": "user", "content": [IMAGE_PART]}]}}),
    ("/api/chat", {"model": "fake", "messages": [{"role": "user", "content": "x", "images": ["AAAA"]}]}),
    ("/api/generate", {"model": "fake", "prompt": "x", "images": ["AAAA"]}),
    (
        "/v1/messages",
        {
            "model": "fake",
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/a.png"}}]}
            ],
        },
    ),
    (
        "/v1/responses",
        {
            "model": "fake",
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE}]}],
        },
    ),
]


@pytest.mark.parametrize(("route", "body"), IMAGES, ids=[r for r, _ in IMAGES])
def test_an_image_for_a_model_without_vision_is_a_400_in_every_dialect(
    proxy: LiveProxy, route: str, body: dict[str, Any]
) -> None:
    message = dialect_error(route, httpx.post(proxy.url + route, json=body, timeout=30))
    assert "cannot read images" in message, message
    assert proxy.status()["fake"]["state"] == "stopped"


EMBEDDINGS = [
    ("/v1/embeddings", lambda n, text: {"model": "fake", "input": [text] * n}),
    ("/api/embed", lambda n, text: {"model": "fake", "input": [text] * n}),
    ("/v2/fake/run", lambda n, text: {"input": {"input": [text] * n}}),
]


@pytest.mark.parametrize(("route", "body"), EMBEDDINGS, ids=[r for r, _ in EMBEDDINGS])
def test_too_many_embedding_inputs_or_tokens_are_a_400_before_any_worker(
    proxy: LiveProxy, route: str, body: Callable[[int, str], dict[str, Any]]
) -> None:
    message = dialect_error(route, httpx.post(proxy.url + route, json=body(2049, "a"), timeout=30))
    assert "2049 inputs" in message and "limits.max_embedding_inputs" in message, message
    message = dialect_error(route, httpx.post(proxy.url + route, json=body(2, "abcd" * 150_001), timeout=30))
    assert "limits.max_embedding_tokens" in message, message
    assert proxy.status()["fake"]["state"] == "stopped"
    legacy = {"model": "fake", "prompt": "abcd" * 300_001}
    message = dialect_error("/api/embeddings", httpx.post(proxy.url + "/api/embeddings", json=legacy, timeout=30))
    assert "'prompt'" in message and "limits.max_embedding_tokens" in message, message


def test_within_the_limits_every_route_still_answers(proxy: LiveProxy) -> None:
    """The gate lets through what is within its limits: one schema of each kind at its limit, per dialect."""
    at_limit = {
        "type": "object",
        "properties": {"a": {"type": "string", "maxLength": 500}, "b": {"enum": list(range(256))}},
    }
    for route, _, body in FIELDS:
        if "/v2/" in route or "count_tokens" in route:
            continue
        r = httpx.post(proxy.url + route, json={**body(at_limit), "stream": False}, timeout=60)
        assert r.status_code == 200, (route, r.text)
    assert httpx.post(proxy.url + "/unload/fake", timeout=60).status_code == 200  # the others expect it stopped
    wait_until(lambda: proxy.status()["fake"]["state"] == "stopped")


# -- the gate's rules, in-process -------------------------------------------------------------------------

LIMITS = gate.Limits(SchemaLimits(repeat=10, enum=3, bytes=400), embedding_inputs=4, embedding_tokens=10)


def refused(request: dict[str, Any], dialect: gate.Dialect = "openai", **kw: Any) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        gate.check_chat(request, model(), LIMITS, dialect, **kw)
    return info.value


def test_each_dialect_names_the_field_as_its_clients_spell_it() -> None:
    request = {"messages": MSG, "response_format": _json_schema({"maxLength": 11}), "tools": [_fn({})]}
    for dialect, name in [
        ("openai", "'response_format'"),
        ("ollama", "'format'"),
        ("anthropic", "'output_config.format'"),
        ("responses", "'text.format'"),
    ]:
        error = refused(request, dialect)  # type: ignore[arg-type]
        assert error.message.startswith(name) and "maxLength 11" in error.message, error.message
    tool = {"messages": MSG, "tools": [_fn({}), _fn({"enum": [1, 2, 3, 4]})], "tool_choice": "required"}
    assert refused(tool, "anthropic").message.startswith("'tools[1].input_schema': an 'enum' of 4 values")
    assert refused(tool, "responses").message.startswith("'tools (function 'f').parameters'")
    assert refused(tool).param == "tools"


def test_enums_anyof_and_oneof_count_their_alternatives_and_the_size_counts_every_schema() -> None:
    for key in ("enum", "anyOf", "oneOf"):
        deep: Any = {"properties": {"x": {"items": {key: [{}, {}, {}, {}]}}}}
        assert f"'{key}' of 4 values" in refused({"messages": MSG, "response_format": _json_schema(deep)}).message
        gate.check_chat({"messages": MSG, "response_format": _json_schema({key: [1, 2, 3]})}, model(), LIMITS)
    half = {"description": "x" * 150}  # each within the limit, together over it
    error = refused({"messages": MSG, "tools": [_fn(half), _fn(half), _fn(half)], "tool_choice": "required"})
    assert "over the limit of 400 (limits.max_schema_bytes)" in error.message, error.message
    assert "'tools[0].function.parameters', 'tools[1].function.parameters'" in error.message
    gate.check_chat({"messages": MSG, "tools": [_fn(half), _fn(half)]}, model(), LIMITS)
    # a property named like a keyword is not one
    gate.check_chat({"messages": MSG, "tools": [_fn({"properties": {"enum": {"type": "string"}}})]}, model(), LIMITS)


def test_the_gate_checks_messages_or_a_prompt_and_the_sampling_fields() -> None:
    assert "'messages'" in refused({"prompt": "hi"}).message  # a chat needs messages, whatever else it has
    assert "'prompt'" in refused({"messages": MSG, "prompt": ""}, completion=True).message
    request: dict[str, Any] = {"prompt": ["hi"]}
    gate.check_chat(request, model(), LIMITS, completion=True)
    assert request["prompt"] == "hi"
    assert refused({"messages": MSG, "temperature": "hot"}).param == "temperature"
    png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTk"
    png += "SuQmCC"  # a 1x1 PNG
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}]}]
    assert isinstance(refused({"messages": image}, "anthropic"), UnsupportedInput)
    gate.check_chat({"messages": image}, model(vision=True), LIMITS, "anthropic")
    image[0]["content"][0]["image_url"]["url"] = "x"  # type: ignore[index]
    with pytest.raises(BadRequest, match="a data: URL or an http"):  # its images are checked (test_dialect_vision)
        gate.check_chat({"messages": image}, model(vision=True), LIMITS, "anthropic")


def test_embeddings_are_bounded_in_count_and_estimated_tokens() -> None:
    assert gate.check_embeddings("a", LIMITS) == ["a"]
    assert gate.check_embeddings(["a"] * 4, LIMITS) == ["a"] * 4
    with pytest.raises(BadRequest) as info:
        gate.check_embeddings(["a"] * 5, LIMITS)
    assert info.value.message.startswith("'input' holds 5 inputs, over the limit of 4") and info.value.param == "input"
    assert gate.estimated_tokens(["abcd" * 10]) == 10 and gate.estimated_tokens(["é"]) == 1
    gate.check_embeddings(["abcd" * 5, "abcd" * 5], LIMITS)
    with pytest.raises(BadRequest) as info:
        gate.check_embeddings(["abcd" * 5, "abcd" * 5, "a"], LIMITS, "prompt")
    assert "about 11 tokens" in info.value.message and info.value.param == "prompt"
    with pytest.raises(BadRequest):
        gate.check_embeddings(["a", ""], LIMITS)  # the shape is still checked


def test_the_limits_come_from_the_settings() -> None:
    settings = _settings(
        max_schema_repeat=7, max_schema_enum=8, max_schema_bytes=9, max_embedding_inputs=10, max_embedding_tokens=11
    )
    assert gate.Limits.of(settings) == gate.Limits(SchemaLimits(7, 8, 9), 10, 11)


def test_only_the_tools_a_request_forces_are_grammars_so_only_their_schemas_are_bounded() -> None:
    """Claude Code sends tools whose schemas no grammar could hold (``maxLength: 524288``) and never forces
    them: unforced, a tool's schema is only text in the prompt, so it passes; forced by name, that tool's
    schema is checked (the others' are not); ``required`` checks every tool's."""
    agent = {"type": "string", "maxLength": 524288}
    tools = [_fn({}), {"type": "function", "function": {"name": "Write", "parameters": agent}}]
    for choice in (None, "auto", "none", {"type": "function", "function": {"name": "f"}}):
        gate.check_chat({"messages": MSG, "tools": tools, "tool_choice": choice}, model(), LIMITS)
    write = {"type": "function", "function": {"name": "Write"}}
    assert "tools[1]" in refused({"messages": MSG, "tools": tools, "tool_choice": write}).message
    assert "tools[1]" in refused({"messages": MSG, "tools": tools, "tool_choice": "required"}).message
    functions = [{"name": "Write", "parameters": agent}]
    gate.check_chat({"messages": MSG, "functions": functions}, model(), LIMITS)
    assert (
        "functions[0]" in refused({"messages": MSG, "functions": functions, "function_call": {"name": "Write"}}).message
    )
