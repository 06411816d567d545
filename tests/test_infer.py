"""Seed 001's /infer and /v1/infer on the real path: the tests' tiny Stable Diffusion pipeline
(tests/sd_build.py), dropped into models/ with no YAML (discovered as a diffusers folder), behind a live
proxy; ``model_id`` by name, and by content id."""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import LiveProxy, running, wait_until
from tests.test_images import png_size

BODY: dict[str, Any] = {"prompt": "a red square", "num_inference_steps": 2, "width": 256, "height": 256, "seed": 7}


def folder_id(folder: Path) -> str:
    """What proxy.discovery computes for a folder: sha256 over each file's relative path and bytes."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode() + b"\0")
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pipeline: Path) -> Iterator[LiveProxy]:
    root = tmp_path_factory.mktemp("infer-proxy")
    (root / "models").mkdir()
    shutil.copytree(pipeline, root / "models" / "Tiny-SD")
    with running(root, []) as live:
        yield live


def infer(proxy: LiveProxy, body: dict[str, Any], path: str = "/v1/infer") -> httpx.Response:
    return httpx.post(proxy.url + path, json=body, timeout=120)


def test_infer_answers_seed_001s_shape(proxy: LiveProxy) -> None:
    r = infer(proxy, {"id": "req-1", "model_id": "tiny-sd", "negative_prompt": "blue", "num_images": 2, **BODY})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "req-1" and out["model_id"] == "tiny-sd"
    assert len(out["images"]) == 2
    for image in out["images"]:
        assert png_size(base64.b64decode(image["base64"])) == (256, 256)
        assert (image["width"], image["height"]) == (256, 256)
    assert out["images"][0]["seed"] == 7
    assert out["processing_time"] > 0
    assert out["parameters"] == {
        "prompt": "a red square",
        "negative_prompt": "blue",
        "num_inference_steps": 2,
        "guidance_scale": 7.5,
        "width": 256,
        "height": 256,
        "seed": 7,
        "num_images": 2,
    }
    # /infer is the same API; no id: null
    again = infer(proxy, {"model_id": "tiny-sd", **BODY}, "/infer").json()
    assert again["id"] is None and [i["seed"] for i in again["images"]] == [7]


def test_model_id_takes_a_content_id(proxy: LiveProxy, pipeline: Path) -> None:
    cid = folder_id(pipeline)
    r = wait_until(lambda: (x := infer(proxy, {"model_id": cid, **BODY})).status_code == 200 and x, timeout=60)
    assert r.json()["model_id"] == "tiny-sd"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"guidance_scale": 0.5}, "guidance_scale"),
        ({"guidance_scale": 20.5}, "guidance_scale"),
        ({"width": 1032}, "width"),
        ({"height": 128}, "height"),
        ({"num_inference_steps": 151}, "num_inference_steps"),
        ({"num_images": 5}, "num_images"),
        ({"prompt": "x" * 1001}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"model_id": None}, "model_id"),
        ({"id": 5}, "id"),
    ],
)
def test_bad_requests_get_400_naming_the_field(proxy: LiveProxy, change: dict[str, Any], param: str) -> None:
    body = {"model_id": "tiny-sd", **BODY, **change}
    r = infer(proxy, {k: v for k, v in body.items() if v is not None})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_model_is_404_and_the_info_routes(proxy: LiveProxy) -> None:
    assert infer(proxy, {"model_id": "nope", **BODY}).status_code == 404
    info = httpx.get(proxy.url + "/v1").json()
    assert info["name"] and info["version"] and info["links"]["infer"] == "/v1/infer"
    health = httpx.get(proxy.url + "/v1/health").json()
    assert health["status"] == "ok" and health["models"] == 1
