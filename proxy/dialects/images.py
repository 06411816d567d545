"""Image requests in three dialects -> one canonical request, and the answer back: pure functions.

Dialects: the older inference API (/txt2img, /img2img), AUTOMATIC1111's (/sdapi/v1/*), OpenAI's
(/v1/images/generations). The canonical request (DESIGN.md): prompt, negative_prompt, steps,
guidance_scale, width, height, seed, n, init_image, strength, scheduler.
"""

from __future__ import annotations

import base64
import binascii
import json
import random
from collections.abc import Mapping
from typing import Any

from proxy.backends import DiffusersOptions
from proxy.config import ModelConfig
from proxy.errors import BadRequest
from proxy.wire import SAMPLERS, ImageRequest

MAX_PROMPT = 1000
MAX_IMAGES = 4
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8", b"BM")
_DEFAULTS = DiffusersOptions()


def _defaults(cfg: ModelConfig) -> DiffusersOptions:
    """The model's own defaults (its ``model:`` section), else diffusers' options' defaults."""
    return cfg.model_options if isinstance(cfg.model_options, DiffusersOptions) else _DEFAULTS


def _number(body: Mapping[str, Any], key: str, default: Any, lo: float, hi: float, integer: bool = True) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) or (not integer and isinstance(value, float))
    if isinstance(value, bool) or not ok:
        raise BadRequest(f"'{key}' must be {'an integer' if integer else 'a number'}", param=key)
    if not lo <= value <= hi:
        raise BadRequest(f"'{key}' must be between {lo:g} and {hi:g}, got {value}", param=key)
    return value


def _size(body: Mapping[str, Any], key: str, default: int, cfg: ModelConfig) -> int:
    top = _defaults(cfg).max_size
    value = _number(body, key, default, 256, top)
    if value % 8:
        raise BadRequest(f"'{key}' must be a multiple of 8 between 256 and {top}, got {value}", param=key)
    return int(value)


def _image(data: Any, key: str) -> str:
    if not isinstance(data, str) or not data:
        raise BadRequest(f"'{key}' must be a base64 image", param=key)
    try:
        raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"'{key}' is not valid base64", param=key) from None
    is_webp = raw[:4] == b"RIFF" and raw[8:12] == b"WEBP"
    if not (raw.startswith(_MAGIC) or is_webp):
        raise BadRequest(f"'{key}' is not a PNG, JPEG, WebP, GIF or BMP image", param=key)
    return data


def _prompt(body: Mapping[str, Any], key: str = "prompt", required: bool = True) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise BadRequest(f"'{key}' must be a non-empty string", param=key)
    if len(value) > MAX_PROMPT:
        raise BadRequest(f"'{key}' is {len(value)} characters; the limit is {MAX_PROMPT}", param=key)
    return value


def _sampler(value: Any, key: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.lower() not in SAMPLERS:
        raise BadRequest(f"'{key}' must be one of {', '.join(SAMPLERS)}, got {value!r}", param=key)
    return value.lower()


def _seed(value: Any, key: str = "seed") -> int:
    if value is None or value == -1:
        return random.randrange(2**32)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise BadRequest(f"'{key}' must be an integer from 0 to 2**32-1 (or -1 for random)", param=key)
    return value


def _canonical(
    cfg: ModelConfig,
    prompt: str,
    negative: str,
    steps: int,
    guidance: float,
    width: int,
    height: int,
    seed: int,
    n: int,
    init: str | None,
    strength: float,
    sampler: str | None,
) -> ImageRequest:
    out: ImageRequest = {
        "prompt": prompt,
        "negative_prompt": negative,
        "steps": steps,
        "guidance_scale": float(guidance),
        "width": width,
        "height": height,
        "seed": seed,
        "n": n,
        "scheduler": sampler,
    }
    if init is not None:
        if int(steps * strength) < 1:  # diffusers would run no step at all and fail
            raise BadRequest(
                f"with an init image, steps x strength must be at least 1 (got {steps} x {strength:g})",
                param="strength",
            )
        out["init_image"] = init
        out["strength"] = float(strength)
    return out


def _size_from_init(out: ImageRequest, body: Mapping[str, Any], cfg: ModelConfig) -> ImageRequest:
    """An img2img request that names no size keeps its init image's (the worker reads it)."""
    if "init_image" in out and body.get("width") is None and body.get("height") is None:
        out["size_from_init"] = True
        out["max_size"] = _defaults(cfg).max_size
    return out


def from_inference(body: Mapping[str, Any], cfg: ModelConfig, img2img: bool) -> ImageRequest:
    """The older inference API's /txt2img and /img2img."""
    o = _defaults(cfg)
    out = _canonical(
        cfg,
        _prompt(body),
        _prompt(body, "negative_prompt", required=False),
        _number(body, "num_inference_steps", o.steps, 1, 150),
        _number(body, "guidance_scale", o.guidance_scale, 0, 30, integer=False),
        _size(body, "width", o.width, cfg),
        _size(body, "height", o.height, cfg),
        _seed(body.get("seed")),
        _number(body, "num_images", 1, 1, MAX_IMAGES),
        _image(body.get("init_image"), "init_image") if img2img else None,
        _number(body, "strength", 0.75, 0, 1, integer=False),
        _sampler(body.get("scheduler"), "scheduler"),
    )
    return _size_from_init(out, body, cfg)


def from_a1111(body: Mapping[str, Any], cfg: ModelConfig, img2img: bool) -> ImageRequest:
    """AUTOMATIC1111's /sdapi/v1/txt2img and /sdapi/v1/img2img."""
    o = _defaults(cfg)
    batch = _number(body, "batch_size", 1, 1, MAX_IMAGES)
    n_iter = _number(body, "n_iter", 1, 1, MAX_IMAGES)
    if batch * n_iter > MAX_IMAGES:
        raise BadRequest(f"'batch_size' x 'n_iter' must be at most {MAX_IMAGES}", param="batch_size")
    init = None
    if img2img:
        images = body.get("init_images")
        if not isinstance(images, list) or not images:
            raise BadRequest("'init_images' must be a non-empty array of base64 images", param="init_images")
        init = _image(images[0], "init_images")
    out = _canonical(
        cfg,
        _prompt(body),
        _prompt(body, "negative_prompt", required=False),
        _number(body, "steps", o.steps, 1, 150),
        _number(body, "cfg_scale", o.guidance_scale, 0, 30, integer=False),
        _size(body, "width", o.width, cfg),
        _size(body, "height", o.height, cfg),
        _seed(body.get("seed")),
        batch * n_iter,
        init,
        _number(body, "denoising_strength", 0.75, 0, 1, integer=False),
        _sampler(body.get("sampler_name") or body.get("sampler_index"), "sampler_name"),
    )
    return _size_from_init(out, body, cfg)


def from_openai(body: Mapping[str, Any], cfg: ModelConfig) -> ImageRequest:
    """OpenAI's /v1/images/generations (``size`` as "WxH"; only b64_json answers)."""
    o = _defaults(cfg)
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise BadRequest("'response_format' must be \"b64_json\": images are not hosted here", param="response_format")
    size = body.get("size") or f"{o.width}x{o.height}"
    if not isinstance(size, str) or "x" not in size:
        raise BadRequest('\'size\' must be "WIDTHxHEIGHT", e.g. "512x512"', param="size")
    w, _, h = size.partition("x")
    if not (w.isascii() and w.isdigit() and h.isascii() and h.isdigit()):  # "²" is a digit to str.isdigit
        raise BadRequest('\'size\' must be "WIDTHxHEIGHT", e.g. "512x512"', param="size")
    dims = {"width": int(w), "height": int(h)}
    return _canonical(
        cfg,
        _prompt(body),
        "",
        o.steps,
        float(o.guidance_scale),
        _size(dims, "width", o.width, cfg),
        _size(dims, "height", o.height, cfg),
        _seed(body.get("seed")),
        _number(body, "n", 1, 1, MAX_IMAGES),
        None,
        0.0,
        None,
    )


_NOT_ECHOED = ("init_image", "size_from_init", "max_size")


def _made_size(canonical: Mapping[str, Any], result: Mapping[str, Any] | None) -> dict[str, int]:
    """The size the images came out at (an img2img without a size keeps its init image's)."""
    images = (result or {}).get("images") or []
    first = images[0] if images and "width" in images[0] and "height" in images[0] else canonical
    return {"width": int(first["width"]), "height": int(first["height"])}


def parameters(canonical: Mapping[str, Any], result: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**{k: v for k, v in canonical.items() if k not in _NOT_ECHOED}, **_made_size(canonical, result)}


def a1111_response(
    request: Mapping[str, Any], canonical: Mapping[str, Any], result: Mapping[str, Any]
) -> dict[str, Any]:
    seeds = [img["seed"] for img in result["images"]]
    info = {
        "prompt": canonical["prompt"],
        "negative_prompt": canonical["negative_prompt"],
        "seed": seeds[0],
        "all_seeds": seeds,
        **_made_size(canonical, result),
        "sampler_name": canonical.get("scheduler") or "",
        "cfg_scale": canonical["guidance_scale"],
        "steps": canonical["steps"],
        "batch_size": len(seeds),
    }
    params = {k: v for k, v in request.items() if k != "init_images"}
    return {"images": [img["base64"] for img in result["images"]], "parameters": params, "info": json.dumps(info)}
