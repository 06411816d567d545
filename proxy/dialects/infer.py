"""Seed 001's inference API (``POST /infer``, ``/v1/infer``): its request checked against its own
bounds, then the same canonical image request as every other image dialect; the answer shaped back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.config import ModelConfig
from proxy.dialects.images import from_inference
from proxy.errors import BadRequest
from proxy.wire import ImageRequest, ImageResult

# seed 001's bounds (the canonical request allows more: guidance 0-30, sizes up to the model's max_size)
GUIDANCE = (1.0, 20.0)
SIZE = (256, 1024)
MAX_ID = 200


def request_id(body: Mapping[str, Any]) -> str | None:
    """The caller's own ``id``, echoed back (optional)."""
    value = body.get("id")
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID:
        raise BadRequest(f"'id' must be a string of 1 to {MAX_ID} characters", param="id")
    return value


def model_id(body: Mapping[str, Any]) -> str:
    value = body.get("model_id")
    if not isinstance(value, str) or not value:
        raise BadRequest("'model_id' is required: a model's name, alias or content id", param="model_id")
    return value


def _bounded(body: Mapping[str, Any], key: str, lo: float, hi: float) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f"'{key}' must be a number", param=key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", param=key)


def from_infer(body: Mapping[str, Any], cfg: ModelConfig) -> ImageRequest:
    """Seed 001's request -> the canonical image request (400 naming the field when out of bounds)."""
    _bounded(body, "guidance_scale", *GUIDANCE)
    for key in ("width", "height"):
        _bounded(body, key, *SIZE)
    return from_inference(body, cfg, img2img=False)


def response(rid: str | None, cfg: ModelConfig, canonical: ImageRequest, result: ImageResult) -> dict[str, Any]:
    """Seed 001's response: the id, the model, the images with their seeds and sizes, the time, the
    parameters used."""
    return {
        "id": rid,
        "model_id": cfg.name,
        "images": [
            {"base64": i["base64"], "seed": i["seed"], "width": i["width"], "height": i["height"]}
            for i in result["images"]
        ],
        "processing_time": result["processing_time"],
        "parameters": {
            "prompt": canonical["prompt"],
            "negative_prompt": canonical["negative_prompt"],
            "num_inference_steps": canonical["steps"],
            "guidance_scale": canonical["guidance_scale"],
            "width": canonical["width"],
            "height": canonical["height"],
            "seed": canonical["seed"],
            "num_images": canonical["n"],
        },
    }
