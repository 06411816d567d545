"""Content digests of a model's weights (Ollama's ``sha256:<hex>``), for /api/pull.

Hashing a multi-GB file takes seconds, so it runs in a thread (hashlib releases the GIL on large
updates), once per file: the result is cached by path, size and mtime in ``models/.cache/digests.json``.
Concurrent requests for the same file share one computation. A model with no single weight file (a
folder, a package's voice, an external server) gets the digest of its configuration instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from pathlib import Path

import anyio.to_thread

from proxy.config import ModelConfig

log = logging.getLogger("proxy.digests")

_CHUNK = 4 * 1024 * 1024


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def config_digest(cfg: ModelConfig) -> tuple[str, int]:
    """What identifies a model that is not one file: the digest of its backend, options, cmd or url, and
    that text's length."""
    parts = {"name": cfg.name, "backend": cfg.backend, "options": cfg.options, "cmd": cfg.cmd, "url": cfg.url}
    text = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest(), len(text)


class Digests:
    """sha256 of weight files, cached on disk (None: in memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._cache: dict[str, str] = {}
        self._running: dict[str, asyncio.Future[str]] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text())
                if isinstance(data, dict):
                    self._cache = {str(k): str(v) for k, v in data.items()}
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s: %s", path, exc)

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self._cache, indent=1, sort_keys=True))
            tmp.replace(self.path)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.path, exc)

    @staticmethod
    def weight_file(cfg: ModelConfig) -> Path | None:
        path = cfg.model_path
        return path if path is not None and path.is_file() else None

    async def of_file(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(anyio.to_thread.run_sync(_sha256, path))
            self._running[key] = running
            try:
                digest = await asyncio.shield(running)
            finally:
                del self._running[key]
            self._cache[key] = digest
            self._save()
            return digest
        return await asyncio.shield(running)

    async def of_model(self, cfg: ModelConfig) -> tuple[str, int]:
        """``sha256:<hex>`` and the size it covers (the config's length where there is no single file)."""
        path = self.weight_file(cfg)
        if path is None:
            digest, size = config_digest(cfg)
            return f"sha256:{digest}", size
        return f"sha256:{await self.of_file(path)}", path.stat().st_size
