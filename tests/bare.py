"""The fewest Settings and ModelConfigs tests build without a config.yml, and a throwaway local HTTP server."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.config import DetailsSection, ModelConfig, Settings


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


def bare_model(name: str, **fields: Any) -> ModelConfig:
    """A ModelConfig for the fake workers (an external backend, completion only); `fields` override any field."""
    base: dict[str, Any] = {
        "name": name,
        "aliases": (),
        "backend": "external",
        "source": "test",
        "options": {},
        "model_path": None,
        "cmd": ("x",),
        "url": None,
        "health_path": "/health",
        "python": None,
        "env": {},
        "sampling": {},
        "system": None,
        "system_time": False,
        "keep_alive": None,
        "pin_keep_alive": False,
        "parallel": 1,
        "load_timeout": 5.0,
        "unload_grace": 1.0,
        "capabilities": ("completion",),
        "vision": False,
        "details": DetailsSection(),
    }
    base.update(fields)
    return ModelConfig(**base)


@contextlib.contextmanager
def served(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A stdlib HTTP server on a free loopback port in a thread, for as long as the block lasts: host:port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
