"""Runner options a request may ask for (Ollama's ``options.num_ctx``), which only a reload can change.

A model's YAML lists the ones it honours (``runtime_options: [num_ctx]``); the manager reloads the model
with a value that differs from the loaded one (``ModelManager.acquire``). Which backends take which (and as
what ``model:`` option) is in the backend registry (``BackendInfo.runtime_options``). This module is the pure
part: reading them from Ollama's ``options``, the bound on a value, and what a load's config becomes.
No I/O, no HTTP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from proxy.backends import BACKENDS, Backend
from proxy.config import ModelConfig
from proxy.errors import BadRequest

# Ollama's runner options: fixed when a model loads; those not in a model's runtime_options are ignored
RUNNER_OPTIONS = ("num_ctx", "num_gpu", "num_thread", "num_batch")
# the largest num_ctx taken when the GGUF does not say its own context length
MAX_CONTEXT = 131072


def requested(options: Any) -> dict[str, Any]:
    """The runner options in an Ollama request's ``options`` ({} when none). ``num_ctx`` must be an integer
    >= 1 (else 400); the others are only named (they are ignored). Sampling options are not ours
    (``dialects.ollama.options_to_openai``)."""
    if not isinstance(options, dict):
        return {}  # absent; a non-object is refused by options_to_openai
    out = {key: options[key] for key in RUNNER_OPTIONS if options.get(key) is not None}
    value = out.get("num_ctx")
    if value is not None:
        if isinstance(value, float) and value.is_integer():
            out["num_ctx"] = value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadRequest(
                f"'options.num_ctx' must be an integer of at least 1, got {value!r}", param="options.num_ctx"
            )
    return out


def check_bound(key: str, value: int, context_length: int) -> None:
    """``num_ctx`` past the model's own context length (its GGUF's, else ``MAX_CONTEXT``) is a 400."""
    limit = context_length if context_length > 0 else MAX_CONTEXT
    if value > limit:
        raise BadRequest(f"'options.{key}' may be at most {limit} for this model, got {value}", param=f"options.{key}")


def backend_options(backend: Backend, wants: Mapping[str, int]) -> dict[str, int]:
    """The request's runner options as the backend's ``model:`` options ({"num_ctx": 2048} -> {"n_ctx": 2048})."""
    names = BACKENDS[backend].runtime_options
    return {names[k]: v for k, v in wants.items() if k in names}


def fits(options: Mapping[str, Any], wants: Mapping[str, Any]) -> bool:
    """Does a worker loaded with ``options`` serve a request that wants these backend options?"""
    return all(options.get(k) == v for k, v in wants.items())


def with_options(cfg: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """A ModelConfig whose ``options`` (what its worker gets, and what its memory need is found from)
    carry ``overrides``; the config itself when there are none."""
    if not overrides:
        return cfg
    return dataclasses.replace(cfg, options={**cfg.options, **overrides})
