"""The fewest Settings an app or a manager is made with, for tests that build one without a config.yml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.config import Settings


def bare_settings(**fields: Any) -> Settings:
    """Settings with the required fields at harmless values (loopback, no keys, one queued request, 1-byte
    bodies); `fields` override or add any of Settings' fields."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "cors_origins": (),
        "models_dir": Path("."),
        "configs_dir": Path("."),
        "api_tokens": None,
        "keep_alive": 300.0,
        "load_timeout": 5.0,
        "unload_grace": 1.0,
        "max_loaded_models": None,
        "max_queue": 1,
        "max_body_bytes": 1,
        "log_level": "info",
    }
    base.update(fields)
    return Settings(**base)
