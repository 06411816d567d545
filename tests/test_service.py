"""The seed's service API (``/api/v1/run``, ``/runsync``, ``/status/{id}``): its three request shapes through
a live proxy with keys. Describing an image runs on a recording fake worker configured as a vision model
(it shows the image reaching the worker as a data URL; the projector itself: test_vision.py); the product
description runs on SmolLM2 and text to speech on Piper's joe voice (``real``)."""

from __future__ import annotations

import base64
import io
import json
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from proxy.dialects import service
from proxy.errors import BadRequest
from tests.harness import REPO, LiveProxy, fake_config, smollm2_config, wait_until
from tests.test_media_dialects import PNG_URL, _Images, images  # noqa: F401 - the image server fixture

MakeProxy = Callable[..., LiveProxy]
USER, OTHER, SCOPED, ADMIN, BLIND_ADMIN = "user-key-1", "user-key-2", "scoped-key", "admin-key", "blind-admin"
TOKENS: dict[str, Any] = {
    "api_key": [USER, OTHER, {"key": SCOPED, "models": ["blind"]}],
    "admin_key": [ADMIN, {"key": BLIND_ADMIN, "models": ["blind"]}],
}
FETCH = {"fetch": {"allowed_hosts": ["127.0.0.1"], "max_bytes": 1_000_000, "timeout": "10s"}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(proxy: LiveProxy, path: str, body: Any, key: str = USER) -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, headers=auth(key), timeout=330)


def status(proxy: LiveProxy, job: str, key: str = USER) -> httpx.Response:
    return httpx.get(f"{proxy.url}/api/v1/status/{job}", headers=auth(key), timeout=30)


def finished(proxy: LiveProxy, job: str, key: str = USER) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        body: dict[str, Any] = status(proxy, job, key).json()
        return body if body["status"] in ("COMPLETED", "FAILED", "CANCELLED") else None

    result: dict[str, Any] = wait_until(done, timeout=120, interval=0.2)
    return result


# -- the shapes, as pure functions ------------------------------------------------------------------
def test_the_three_shapes_are_told_apart_by_their_key() -> None:
    assert service.kind_of({"image_url": "x"}) == "describe"
    assert service.kind_of({"image_description": "a red mug", "prompt": "short"}) == "product"
    assert service.kind_of({"text": "hello", "voice": "joe"}) == "speech"
    for bad in ({}, {"prompt": "x"}, {"image_url": "x", "text": "y"}):
        with pytest.raises(BadRequest) as info:
            service.kind_of(bad)
        assert info.value.param == "input" and "image_description" in info.value.message


def test_a_product_request_asks_for_the_schema_and_its_answer_is_checked() -> None:
    request = service.product_request({"image_description": "a red mug", "prompt": "for a café"})
    assert request["response_format"]["json_schema"]["schema"] == service.PRODUCT_SCHEMA
    assert "a red mug" in request["messages"][-1]["content"] and "for a café" in request["messages"][-1]["content"]
    product = {"title": "Mug", "description": "Red.", "keywords": ["mug"], "categories": ["Kitchen"]}
    answer = {"choices": [{"message": {"content": json.dumps(product)}}]}
    assert service.shape_output("product", answer) == product
    for content in ('{"title": "Mug"', '{"title": "Mug"}', "[]"):
        with pytest.raises(ValueError):
            service.shape_output("product", {"choices": [{"message": {"content": content}}]})
    with pytest.raises(BadRequest):
        service.product_request({"image_description": "  "})


# -- describe an image, on a recording fake vision worker --------------------------------------------
def test_describe_an_image_by_url_and_by_data_url_with_keys(
    make_proxy: MakeProxy,
    tmp_path: Path,
    images: str,  # noqa: F811 - the fixture imported above
) -> None:
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy(
        [fake_config("eyes", "--record", str(record), vision=True), fake_config("blind")], tokens=TOKENS, limits=FETCH
    )
    _Images.hits.clear()
    r = post(proxy, "/api/v1/run", {"model": "eyes", "input": {"image_url": f"http://{images}/a.png"}})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") and set(job) == {"id", "status"}
    done = finished(proxy, job["id"])
    assert done["status"] == "COMPLETED" and done["model"] == "eyes", done
    assert done["output"]["description"].startswith("tok tok")  # the fake worker's answer
    assert _Images.hits == ["/a.png"]  # fetched once, at submit
    sync = post(proxy, "/api/v1/runsync", {"model": "eyes", "input": {"image_url": PNG_URL, "prompt": "Colours?"}})
    assert sync.json()["status"] == "COMPLETED", sync.text
    bodies = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    assert [body["messages"][0]["content"] for body in bodies] == [
        [{"type": "text", "text": service.DESCRIBE_PROMPT}, {"type": "image_url", "image_url": {"url": PNG_URL}}],
        [{"type": "text", "text": "Colours?"}, {"type": "image_url", "image_url": {"url": PNG_URL}}],
    ]
    # one engine, one database: the same job through RunPod's /v2 route
    v2 = httpx.get(f"{proxy.url}/v2/eyes/status/{job['id']}", headers=auth(USER), timeout=30).json()
    assert v2["output"] == done["output"]
    # the job is its key's: another user key gets 404, an admin key sees it, a key scoped elsewhere gets 404
    assert status(proxy, job["id"], OTHER).status_code == 404
    assert status(proxy, job["id"], ADMIN).json()["output"] == done["output"]
    assert status(proxy, job["id"], SCOPED).status_code == 404
    assert status(proxy, job["id"], BLIND_ADMIN).status_code == 404  # an admin key sees only its models' jobs
    assert httpx.get(f"{proxy.url}/api/v1/status/{job['id']}", timeout=30).status_code == 401
    r = post(proxy, "/api/v1/run", {"model": "eyes", "input": {"image_url": PNG_URL}}, SCOPED)
    assert r.status_code == 404 and r.json() == {"error": "model 'eyes' not found"}


def test_service_refusals_are_400s_in_ollamas_shape_before_any_fetch(
    make_proxy: MakeProxy,
    images: str,  # noqa: F811
) -> None:
    proxy = make_proxy([fake_config("eyes", vision=True), fake_config("blind")], tokens=TOKENS, limits=FETCH)
    url = f"http://{images}/a.png"
    _Images.hits.clear()
    cases: list[tuple[Any, str]] = [
        ({"model": "blind", "input": {"image_url": url}}, "cannot read images"),
        ({"model": "eyes", "input": {"text": "hello", "audio_prompt_url": url}}, "not a speech model"),
        ({"input": {"image_url": url}}, "'model'"),
        ({"model": "eyes", "input": "describe"}, "image_description"),
        ({"model": "eyes", "input": {"image_url": url, "image_description": "x"}}, "one of"),
        ({"model": "eyes", "input": {"image_url": "file:///etc/passwd"}}, "http(s) URL or a data URL"),
        ({"model": "eyes", "input": {"image_url": "data:image/png;base64,aGVsbG8="}}, "not a PNG"),
    ]
    for body, words in cases:
        r = post(proxy, "/api/v1/run", body)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"], (body, r.json())
    assert _Images.hits == []
    port = images.split(":")[1]
    for where, why in ((f"http://127.0.0.2:{port}/a.png", "loopback"), (f"http://{images}/page", "text/html")):
        r = post(proxy, "/api/v1/runsync", {"model": "eyes", "input": {"image_url": where}})
        assert r.status_code == 400 and why in r.json()["error"], r.text
        assert "cannot fetch the URL on host '127.0.0." in r.json()["error"]
    assert post(proxy, "/api/v1/run", {"model": "nope", "input": {"image_url": url}}).status_code == 404
    assert status(proxy, "no-such-job").status_code == 404
    # a /v2 job cannot pass as a service job
    r = post(proxy, "/v2/eyes/run", {"input": {service.SERVICE_KEY: "describe", "request": {}}})
    assert r.status_code == 400 and "reserved" in r.json()["error"]["message"]


# -- a product description on SmolLM2 and speech on Piper (real workers) ----------------------------
@pytest.mark.real
def test_product_description_and_speech_on_real_models(make_proxy: MakeProxy) -> None:
    piper = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    proxy = make_proxy([smollm2_config(), piper], tokens=TOKENS, limits=FETCH)
    product_input = {"image_description": "A red ceramic coffee mug with a white handle on a wooden table."}
    started = time.monotonic()
    r = post(proxy, "/api/v1/runsync?wait=300000", {"model": "smollm2", "input": product_input})
    print(f"product description: {time.monotonic() - started:.1f} s, {r.json()}")
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "COMPLETED", done
    product = done["output"]
    assert set(product) == {"title", "description", "keywords", "categories"}, product
    assert isinstance(product["title"], str) and isinstance(product["description"], str)
    assert all(isinstance(k, str) for k in product["keywords"]) and len(product["keywords"]) <= 6
    assert all(isinstance(c, str) for c in product["categories"]) and len(product["categories"]) <= 3
    # text to speech, queued: the job id, then its status
    r = post(proxy, "/api/v1/run", {"model": "piper-joe", "input": {"text": "Hello there.", "voice": "default"}})
    assert r.status_code == 200, r.text
    spoken = finished(proxy, r.json()["id"])
    assert spoken["status"] == "COMPLETED", spoken
    assert spoken["output"]["content_type"] == "audio/wav"
    with wave.open(io.BytesIO(base64.b64decode(spoken["output"]["audio"]))) as w:
        assert w.getnframes() / w.getframerate() > 0.3
    # a chat model cannot speak, and Piper clones no voice (refused before the sample is fetched)
    r = post(proxy, "/api/v1/run", {"model": "smollm2", "input": {"text": "Hello"}})
    assert r.status_code == 400 and "not a speech model" in r.json()["error"]
    sample = {"text": "Hello", "audio_prompt_url": "http://127.0.0.2/voice.wav"}
    r = post(proxy, "/api/v1/run", {"model": "piper-joe", "input": sample})
    assert r.status_code == 400 and "cannot clone voices" in r.json()["error"], r.text
    r = post(proxy, "/api/v1/run", {"model": "piper-joe", "input": {"image_description": "a mug"}})
    assert r.status_code == 400 and "not a chat model" in r.json()["error"]
