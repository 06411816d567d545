"""The seed's service API (``POST /api/v1/run``): its three request shapes made into the requests of the
models' usual routes, and those routes' answers made into the service's outputs. Pure functions.

- describe an image: ``{"image_url", "prompt"?}`` on a vision model -> a chat with the image ->
  ``{"description"}``
- a product description: ``{"image_description", "prompt"?}`` on a chat model -> a chat whose answer the
  model's structured output holds to ``PRODUCT_SCHEMA`` -> ``{"title", "description", "keywords",
  "categories"}``
- text to speech: ``{"text", "voice"?, "audio_prompt_url"?}`` on a speech model -> ``/v1/audio/speech``
  (the voice sample, fetched by the proxy, as XTTS's ``speaker_wav``) -> ``{"audio", "content_type"}``

A job made here is stored as ``{SERVICE_KEY: kind, "request": the route's input}`` on the jobs engine
(``proxy.jobs``); its runner (``proxy.api.jobs.executor``) runs the route and shapes the output by kind.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from proxy.dialects.shaping import optional
from proxy.errors import BadRequest

SERVICE_KEY = "_service"  # a stored job's input made by /api/v1/run: {SERVICE_KEY: kind, "request": {...}}
Kind = Literal["describe", "product", "speech"]
KINDS: dict[str, Kind] = {"image_url": "describe", "image_description": "product", "text": "speech"}
SHAPES = (
    "{'image_url', 'prompt'?} (describe an image), {'image_description', 'prompt'?} (a product description) "
    "or {'text', 'voice'?, 'audio_prompt_url'?} (text to speech)"
)
DESCRIBE_PROMPT = "Describe this image in detail."
DESCRIBE_TOKENS = 512
PRODUCT_TOKENS = 768
PRODUCT_SYSTEM = (
    "You write product listings for an online shop. From the description of a product's picture, answer "
    "with JSON only: a short title, a description for buyers, search keywords and shop categories."
)
PRODUCT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 80},
        "description": {"type": "string", "maxLength": 300},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 6},
        "categories": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["title", "description", "keywords", "categories"],
    "additionalProperties": False,
}


def kind_of(service_input: dict[str, Any]) -> Kind:
    """Which of the three shapes an input is, by its key (BadRequest: none, or more than one)."""
    found = [kind for key, kind in KINDS.items() if key in service_input]
    if len(found) != 1:
        raise BadRequest(f"'input' must be one of {SHAPES}", param="input")
    return found[0]


def _text(service_input: dict[str, Any], key: str) -> str:
    value = service_input.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"'input.{key}' must be a non-empty string", param=f"input.{key}")
    return value


def _max_tokens(service_input: dict[str, Any], default: int) -> int:
    value = service_input.get("max_tokens", default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest("'input.max_tokens' must be a positive integer", param="input.max_tokens")
    return value


def _prompt(service_input: dict[str, Any]) -> str | None:
    value = service_input.get("prompt")
    if value is not None and not isinstance(value, str):
        raise BadRequest("'input.prompt' must be a string", param="input.prompt")
    return value or None


def image_url(service_input: dict[str, Any]) -> str:
    return _text(service_input, "image_url")


def describe_request(service_input: dict[str, Any], data_url: str) -> dict[str, Any]:
    """A chat with the image (already a data URL) and the prompt."""
    text = _prompt(service_input) or DESCRIBE_PROMPT
    content = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": data_url}}]
    out: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": _max_tokens(service_input, DESCRIBE_TOKENS),
    }
    temperature = optional(service_input, "temperature", (int, float), "a number")
    if temperature is not None:
        out["temperature"] = temperature
    return out


def product_request(service_input: dict[str, Any]) -> dict[str, Any]:
    """A chat whose answer is held to ``PRODUCT_SCHEMA`` by the model's structured output."""
    description = _text(service_input, "image_description")
    prompt = _prompt(service_input)
    user = f"Picture of the product: {description}" + (f"\n\n{prompt}" if prompt else "")
    return {
        "messages": [{"role": "system", "content": PRODUCT_SYSTEM}, {"role": "user", "content": user}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "product", "schema": PRODUCT_SCHEMA, "strict": True},
        },
        "max_tokens": _max_tokens(service_input, PRODUCT_TOKENS),
    }


def audio_prompt_url(service_input: dict[str, Any]) -> str | None:
    if service_input.get("audio_prompt_url") is None:
        return None
    return _text(service_input, "audio_prompt_url")


def speech_request(service_input: dict[str, Any], speaker_wav: str | None) -> dict[str, Any]:
    """``/v1/audio/speech``'s body: the text, the voice, and the voice sample in base64 when one was given."""
    out: dict[str, Any] = {"input": _text(service_input, "text"), "response_format": "wav"}
    voice = optional(service_input, "voice", str, "a string")
    if voice:
        out["voice"] = voice
    language = optional(service_input, "language", str, "a string")
    if language:
        out["language"] = language
    if speaker_wav is not None:
        out["speaker_wav"] = speaker_wav
    return out


def _content(output: Any) -> str:
    try:
        content = output["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError("the model's answer holds no message") from None
    if not isinstance(content, str):
        raise ValueError("the model's answer holds no text")
    return content


def shape_output(kind: Kind, output: Any) -> dict[str, Any]:
    """The route's answer as the service's output (ValueError: an answer the service cannot read)."""
    if kind == "describe":
        return {"description": _content(output).strip(), "usage": output.get("usage")}
    if kind == "product":
        try:
            product = json.loads(_content(output))
        except json.JSONDecodeError:
            raise ValueError("the model's answer is not JSON (cut short by max_tokens?)") from None
        if not isinstance(product, dict) or any(key not in product for key in PRODUCT_SCHEMA["required"]):
            raise ValueError("the model's answer is not a product (title, description, keywords, categories)")
        return {key: product[key] for key in PRODUCT_SCHEMA["required"]}
    if not isinstance(output, dict) or "base64" not in output:
        raise ValueError("the speech model answered no audio")
    return {"audio": output["base64"], "content_type": output.get("content_type", "audio/wav")}
