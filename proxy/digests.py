"""The sha256 of a model's weights: Ollama's ``sha256:<hex>`` digest for /api/pull, and the content id
that discovered models answer to (its first hex digits, ``proxy.discovery``).

Hashing a multi-GB file takes seconds, so it runs in a thread (hashlib releases the GIL on large
updates), once per path + size + mtime: the result is cached in ``models/.cache/digests.json``.
Concurrent requests for the same weights share one computation. A folder's digest covers each file's
relative path and bytes, in sorted order. For /api/pull, a model with no single weight file (a folder,
a package's voice, an external server) gets the digest of its configuration instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import anyio.to_thread

from proxy.config import ModelConfig
from proxy.jsonfile import read_dict, write_atomic

log = logging.getLogger("proxy.digests")

_CHUNK = 4 * 1024 * 1024


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))


def _stamp(path: Path) -> tuple[int, int]:
    """(total size, latest mtime in ns) of a file or a folder's files."""
    stats = [f.stat() for f in _files(path)]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def _sha256(path: Path) -> str:
    """A file's sha256; a folder's: over each file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for f in _files(path):
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def config_digest(cfg: ModelConfig) -> tuple[str, int]:
    """What identifies a model that is not one file: the digest of its backend, options, cmd or url, and
    that text's length."""
    parts = {"name": cfg.name, "backend": cfg.backend, "options": cfg.options, "cmd": cfg.cmd, "url": cfg.url}
    text = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(text).hexdigest(), len(text)


class Digests:
    """sha256 of weight files and folders, cached on disk (None: in memory only). ``sha256`` blocks (call
    it in a thread); ``of_file`` and ``of_model`` run it in one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        # resolved path -> size, mtime_ns, sha256
        self._cache: dict[str, dict[str, Any]] = {k: v for k, v in read_dict(path).items() if isinstance(v, dict)}
        self._running: dict[str, asyncio.Future[str]] = {}

    def _save(self) -> None:
        with self._lock:
            data = dict(self._cache)
        write_atomic(self.path, data)

    @staticmethod
    def weight_file(cfg: ModelConfig) -> Path | None:
        path = cfg.model_path
        return path if path is not None and path.is_file() else None

    def sha256(self, path: Path) -> str:
        """The hex sha256 of a file or folder, from the cache while its size and mtime are unchanged.
        Blocking; OSError when it cannot be read."""
        key = str(path.resolve())
        size, mtime = _stamp(path)
        with self._lock:
            hit = self._cache.get(key)
        if hit and hit.get("size") == size and hit.get("mtime_ns") == mtime and isinstance(hit.get("sha256"), str):
            return str(hit["sha256"])
        digest = _sha256(path)
        with self._lock:
            self._cache[key] = {"size": size, "mtime_ns": mtime, "sha256": digest}
        self._save()
        return digest

    async def of_file(self, path: Path) -> str:
        """``sha256`` in a thread; concurrent calls for the same path share one computation."""
        key = str(path.resolve())
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        running = asyncio.ensure_future(anyio.to_thread.run_sync(self.sha256, path))
        self._running[key] = running
        try:
            return await asyncio.shield(running)
        finally:
            if self._running.get(key) is running:
                del self._running[key]

    async def of_model(self, cfg: ModelConfig) -> tuple[str, int]:
        """``sha256:<hex>`` and the size it covers (the config's length where there is no single file)."""
        path = self.weight_file(cfg)
        if path is None:
            digest, size = config_digest(cfg)
            return f"sha256:{digest}", size
        return f"sha256:{await self.of_file(path)}", path.stat().st_size
