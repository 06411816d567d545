"""Images on the real path: a tiny random-weight Stable Diffusion pipeline (tests/sd_build.py, diffusers'
and transformers' own classes, saved with save_pretrained) loaded by the real diffusers worker, through
a live proxy; every endpoint through its own client shape (the `openai` SDK for OpenAI's)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import LiveProxy, fake_config, running, wait_until

MODEL = "tiny-sd"


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, pipeline: Path) -> Iterator[LiveProxy]:
    model = {
        "name": MODEL,
        "backend": "diffusers",
        "load_timeout": "120s",
        "model": {"path": str(pipeline), "threads": 2, "width": 256, "height": 256, "steps": 3},
    }
    single = {
        "name": "tiny-sd-file",
        "backend": "diffusers",
        "load_timeout": "120s",
        "model": {
            "path": str(pipeline.parent / "tiny-sd.safetensors"),
            "config": str(pipeline),
            "threads": 2,
            "width": 256,
            "height": 256,
            "steps": 3,
        },
    }
    with running(
        tmp_path_factory.mktemp("sd-proxy"), [model, single, fake_config("chatty")], limits={"max_loaded_models": 2}
    ) as live:
        yield live


def post(proxy: LiveProxy, path: str, body: dict[str, Any], **kw: object) -> httpx.Response:
    kw.setdefault("timeout", 120)
    return httpx.post(proxy.url + path, json=body, **kw)  # type: ignore[arg-type]


def test_openai_sdk_generates_pngs(proxy: LiveProxy) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        result = client.images.generate(
            model=MODEL, prompt="a red cat", n=2, size="256x256", response_format="b64_json"
        )
    assert result.data is not None and len(result.data) == 2
    for image in result.data:
        assert png_size(base64.b64decode(image.b64_json or "")) == (256, 256)
    worker = proxy.status()[MODEL]["worker"]
    assert worker["device"] == "cpu" and worker["dtype"] == "float32"
    assert proxy.status()[MODEL]["memory_bytes"] > 10_000_000


def test_txt2img_seed_determinism_and_sizes(proxy: LiveProxy) -> None:
    body = {"model": MODEL, "prompt": "a lighthouse", "seed": 42, "num_inference_steps": 2, "width": 256, "height": 320}
    first, second = post(proxy, "/txt2img", body).json(), post(proxy, "/txt2img", body).json()
    assert first["images"][0]["base64"] == second["images"][0]["base64"]
    assert first["images"][0]["seed"] == 42 and first["parameters"]["steps"] == 2
    assert png_size(base64.b64decode(first["images"][0]["base64"])) == (256, 320)
    assert first["processing_time"] > 0
    other = post(proxy, "/txt2img", {**body, "seed": 43}).json()
    assert other["images"][0]["base64"] != first["images"][0]["base64"]
    random_seed = post(proxy, "/txt2img", {"model": MODEL, "prompt": "x", "num_inference_steps": 1}).json()
    assert isinstance(random_seed["images"][0]["seed"], int)


def test_img2img_and_raw_png(proxy: LiveProxy) -> None:
    init = post(proxy, "/txt2img", {"model": MODEL, "prompt": "a tree", "seed": 1}).json()["images"][0]["base64"]
    result = post(
        proxy,
        "/img2img",
        {
            "model": MODEL,
            "prompt": "a tree in snow",
            "init_image": init,
            "strength": 0.6,
            "num_inference_steps": 4,
            "seed": 2,
        },
    )
    assert result.status_code == 200, result.text
    image = result.json()["images"][0]
    assert png_size(base64.b64decode(image["base64"])) == (256, 256) and image["base64"] != init
    raw = post(proxy, "/txt2img", {"model": MODEL, "prompt": "a tree", "seed": 1}, headers={"Accept": "image/png"})
    assert raw.headers["content-type"] == "image/png" and base64.b64encode(raw.content).decode() == init


def test_automatic1111_api(proxy: LiveProxy) -> None:
    models = httpx.get(proxy.url + "/sdapi/v1/sd-models").json()
    assert sorted(m["model_name"] for m in models) == [MODEL, "tiny-sd-file"]
    r = post(
        proxy,
        "/sdapi/v1/txt2img",
        {
            "prompt": "a boat",
            "steps": 2,
            "cfg_scale": 5,
            "seed": -1,
            "override_settings": {"sd_model_checkpoint": MODEL},
            "batch_size": 2,
            "width": 256,
            "height": 256,
            "sampler_name": "Euler a",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert len(body["images"]) == 2 and len(info["all_seeds"]) == 2 and info["all_seeds"][1] == info["seed"] + 1
    assert body["parameters"]["cfg_scale"] == 5 and info["sampler_name"] == "euler a"
    r = post(
        proxy,
        "/sdapi/v1/img2img",
        {
            "prompt": "a boat at night",
            "init_images": [body["images"][0]],
            "denoising_strength": 0.5,
            "steps": 3,
            "seed": 7,
        },
    )
    assert r.status_code == 200 and png_size(base64.b64decode(r.json()["images"][0])) == (256, 256)


def test_automatic1111_checkpoint_switch(proxy: LiveProxy) -> None:
    """What A1111 clients (Open WebUI among them) do to switch models: GET options, change
    sd_model_checkpoint, POST them back; later requests that name no model use that checkpoint."""
    options_url = proxy.url + "/sdapi/v1/options"
    options = httpx.get(options_url).json()
    first = options["sd_model_checkpoint"]
    other = {MODEL: "tiny-sd-file", "tiny-sd-file": MODEL}[first]
    try:
        r = httpx.post(options_url, json={**options, "sd_model_checkpoint": other, "CLIP_stop_at_last_layers": 1})
        assert r.status_code == 200 and r.json() is None
        assert httpx.get(options_url).json()["sd_model_checkpoint"] == other
        httpx.post(proxy.url + "/unload", timeout=30).raise_for_status()
        r = post(proxy, "/sdapi/v1/txt2img", {"prompt": "a boat", "steps": 1, "width": 256, "height": 256})
        assert r.status_code == 200, r.text
        states = {name: proxy.status()[name]["state"] for name in (MODEL, "tiny-sd-file")}
        assert states == {other: "ready", first: "stopped"}
        missing = httpx.post(options_url, json={"sd_model_checkpoint": "no-such-model"})
        assert missing.status_code == 404 and "no-such-model" in missing.json()["error"]["message"]
        not_image = httpx.post(options_url, json={"sd_model_checkpoint": "chatty"})
        assert not_image.status_code == 400 and "does not make images" in not_image.json()["error"]["message"]
        assert httpx.get(options_url).json()["sd_model_checkpoint"] == other  # refusals change nothing
    finally:
        httpx.post(options_url, json={"sd_model_checkpoint": first}).raise_for_status()


async def test_progress_in_status_and_disconnect_stops_the_job(proxy: LiveProxy) -> None:
    """A long job shows its progress; the client going away (its request cancelled once the job runs,
    whether or not the model was loaded before) stops the job within a few steps of 150."""

    def job() -> dict[str, Any] | None:
        worker = proxy.status()[MODEL].get("worker") or {}
        running: dict[str, Any] | None = worker.get("job")
        return running if running and running["step"] > 0 else None

    body = {"model": MODEL, "prompt": "a storm", "num_inference_steps": 150}
    async with httpx.AsyncClient(base_url=proxy.url, timeout=300) as client:
        request = asyncio.create_task(client.post("/txt2img", json=body))
        progress = await asyncio.to_thread(wait_until, job, 120)
        assert progress["total_steps"] == 150 and 0 < progress["step"] < 150
        request.cancel()  # the client goes away: its connection closes
        with contextlib.suppress(asyncio.CancelledError):
            await request
    steps = [progress["step"]]

    def stopped() -> bool:
        running = job()
        steps.append(running["step"] if running else 0)
        worker = proxy.status()[MODEL].get("worker")  # None when the busy worker's report came too late
        return worker is not None and worker["in_flight"] == 0

    await asyncio.to_thread(wait_until, stopped, 300)
    assert max(steps) < progress["step"] + 20, steps  # stopped at a next step, far from its 150
    assert proxy.status()[MODEL]["in_flight"] == 0
    # and the worker serves the next request
    assert post(proxy, "/txt2img", {"model": MODEL, "prompt": "x", "num_inference_steps": 1}).status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/txt2img", {"prompt": "x", "num_inference_steps": 0}, ("num_inference_steps", "1", "150")),
        ("/txt2img", {"prompt": "x", "num_inference_steps": 151}, ("num_inference_steps",)),
        ("/txt2img", {"prompt": "x", "width": 300}, ("width", "multiple of 8")),
        ("/txt2img", {"prompt": "x", "height": 2048}, ("height", "1024")),
        ("/txt2img", {"prompt": "x" * 1001}, ("prompt", "1000")),
        ("/txt2img", {"prompt": "x", "num_images": 5}, ("num_images",)),
        ("/txt2img", {"prompt": ""}, ("prompt",)),
        ("/txt2img", {"prompt": "x", "scheduler": "magic"}, ("scheduler", "euler")),
        ("/img2img", {"prompt": "x", "init_image": "!!not base64!!"}, ("init_image", "base64")),
        (
            "/img2img",
            {"prompt": "x", "init_image": base64.b64encode(b"just text, no image").decode()},
            ("init_image", "PNG"),
        ),
        ("/img2img", {"prompt": "x"}, ("init_image",)),
        (
            "/img2img",
            {"prompt": "x", "init_image": base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(), "num_inference_steps": 1},
            ("steps x strength", "1 x 0.75"),
        ),
        ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "high"}, ("cfg_scale",)),
        ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, ("batch_size",)),
        ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Heun++"}, ("sampler_name",)),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, ("init_images",)),
        ("/v1/images/generations", {"prompt": "x", "size": "big"}, ("size",)),
        ("/v1/images/generations", {"prompt": "x", "response_format": "url"}, ("b64_json",)),
        ("/v1/images/generations", {"prompt": "x", "n": 9}, ("n",)),
    ],
)
def test_bad_input_never_reaches_the_worker(
    proxy: LiveProxy, path: str, body: dict[str, Any], words: tuple[str, ...]
) -> None:
    httpx.post(proxy.url + "/unload/" + MODEL, timeout=60)
    r = post(proxy, path, {"model": MODEL, **body})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert all(w in message for w in words), message
    assert proxy.status()[MODEL]["state"] == "stopped"


def test_not_an_image_model_and_lists(proxy: LiveProxy) -> None:
    r = post(proxy, "/v1/images/generations", {"model": "chatty", "prompt": "x"})
    assert r.status_code == 400 and "does not make images" in r.json()["error"]["message"]
    kinds = {m["id"]: m["kind"] for m in httpx.get(proxy.url + "/v1/models").json()["data"]}
    assert kinds[MODEL] == "image"
    assert f"{MODEL}:latest" not in [m["name"] for m in httpx.get(proxy.url + "/api/tags").json()["models"]]


def test_keep_alive_zero_unloads(proxy: LiveProxy) -> None:
    r = post(proxy, "/txt2img", {"model": MODEL, "prompt": "x", "num_inference_steps": 1, "keep_alive": 0})
    assert r.status_code == 200
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped", timeout=15)


def test_single_file_checkpoint_gives_the_same_image(proxy: LiveProxy) -> None:
    body = {"prompt": "a lighthouse", "seed": 5, "num_inference_steps": 2}
    from_folder = post(proxy, "/txt2img", {"model": MODEL, **body}).json()["images"][0]["base64"]
    from_file = post(proxy, "/txt2img", {"model": "tiny-sd-file", **body})
    assert from_file.status_code == 200, from_file.text
    assert from_file.json()["images"][0]["base64"] == from_folder  # the same weights, the same bytes


def test_huge_init_image_is_refused_from_its_header(proxy: LiveProxy) -> None:
    """Issue 11 item 7: a PNG of 13,000 x 13,000 pixels is a small file but ~0.5 GB decoded: the worker
    reads its size from the header and answers 413 (limits.max_image_pixels, 4096 x 4096 by default)
    without decoding it, and keeps serving."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (13_000, 13_000)).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 1024 * 1024
    init = base64.b64encode(buf.getvalue()).decode()
    r = post(proxy, "/img2img", {"model": MODEL, "prompt": "x", "init_image": init, "num_inference_steps": 4})
    assert r.status_code == 413, r.text
    assert "13000x13000" in r.json()["error"]["message"] and "limit" in r.json()["error"]["message"]
    pid = proxy.status()[MODEL]["pid"]
    ok = post(proxy, "/txt2img", {"model": MODEL, "prompt": "x", "num_inference_steps": 1})
    assert ok.status_code == 200 and proxy.status()[MODEL]["pid"] == pid


def odd_png(width: int, height: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_img2img_without_a_size_keeps_the_init_images(proxy: LiveProxy) -> None:
    init = odd_png(300, 270)  # the model's default is 256x256; diffusers rounds down to a multiple of 8
    r = post(proxy, "/img2img", {"model": MODEL, "prompt": "sky", "init_image": init, "strength": 0.5, "seed": 3})
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert png_size(base64.b64decode(image["base64"])) == (296, 264) == (image["width"], image["height"])
    assert (r.json()["parameters"]["width"], r.json()["parameters"]["height"]) == (296, 264)
    a1111 = {"prompt": "sky", "init_images": [init], "denoising_strength": 0.5, "steps": 2, "seed": 3}
    r = post(proxy, "/sdapi/v1/img2img", {**a1111, "override_settings": {"sd_model_checkpoint": MODEL}})
    assert r.status_code == 200, r.text
    assert png_size(base64.b64decode(r.json()["images"][0])) == (296, 264)
    assert json.loads(r.json()["info"])["width"] == 296
    # a size asked for wins
    r = post(
        proxy,
        "/sdapi/v1/img2img",
        {**a1111, "width": 256, "height": 256, "override_settings": {"sd_model_checkpoint": MODEL}},
    )
    assert png_size(base64.b64decode(r.json()["images"][0])) == (256, 256)
