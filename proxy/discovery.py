"""Model discovery: weights dropped into ``models/`` with no YAML become models with defaults.

- ``*.gguf`` -> ``llama_cpp``, named from the file with ``:latest`` (split parts after the first and
  ``mmproj-*`` projectors are not models of their own); an ``mmproj-X*.gguf`` beside ``X.gguf`` is its image
  projector (``model.mmproj``): a vision model
- a diffusers folder (``model_index.json``) -> ``diffusers``; a single ``.safetensors`` / ``.ckpt`` with
  exactly one diffusers folder beside it (its configs) -> ``diffusers``
- a Piper ``.onnx`` with its ``.onnx.json`` -> ``piper``
- a CTranslate2 Whisper folder (``model.bin`` + ``config.json``) -> ``whisper``

A YAML in ``configs/`` that names the same weights (or a name already taken) wins. A file that cannot be
read is skipped with a warning. Each discovered model also answers to a content id: the first
``ID_LENGTH`` hex digits of the sha256 of its weights, computed in a thread (never on the event loop),
once per path + size + mtime (``proxy.digests``, cached in ``models/.cache/digests.json``).

No I/O on import; ``scan`` reads directory entries and a few bytes per file (start-up, ``POST
/models/rescan``: run it in a thread from async code).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from proxy.backends import Backend
from proxy.config import ModelConfig, Settings, model_from_options
from proxy.digests import Digests
from proxy.errors import ConfigError, ModelNotFound
from proxy.manager import ModelManager

log = logging.getLogger("proxy.discovery")

ID_LENGTH = 12
_SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")


@dataclass(frozen=True)
class Found:
    """Weights that make a model: what backend, under what name, which file or folder, which options."""

    name: str
    backend: Backend
    path: Path
    options: dict[str, Any]


def _readable(path: Path, magic: bytes = b"") -> bool:
    """Can we read it (and does it start as its format does)? A warning names it when not."""
    try:
        with path.open("rb") as fh:
            head = fh.read(max(len(magic), 1))
    except OSError as exc:
        log.warning("discovery: skipping %s: cannot read it (%s)", path, exc.strerror or exc)
        return False
    if magic and not head.startswith(magic):
        log.warning("discovery: skipping %s: not a %s file", path, magic.decode())
        return False
    return True


def _is_diffusers(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _is_whisper(folder: Path) -> bool:
    return (folder / "model.bin").is_file() and (folder / "config.json").is_file()


def _name(stem: str) -> str:
    return stem.lower().replace(" ", "-")


def _projector(entries: list[Path], stem: str) -> Path | None:
    """The image projector beside a GGUF: ``mmproj-<stem>*.gguf`` (the first by name when there are several,
    as ``-f16`` beside ``-q8_0``), which makes it a vision model."""
    prefix = f"mmproj-{stem}".lower()
    for entry in entries:
        name = entry.name.lower()
        if name.startswith(prefix) and name.endswith(".gguf") and entry.is_file() and _readable(entry, b"GGUF"):
            return entry
    return None


def _in_folder(folder: Path) -> Iterable[Found]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        log.warning("discovery: skipping %s: cannot list it (%s)", folder, exc.strerror or exc)
        return
    subfolders = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    configs = [d for d in subfolders if _is_diffusers(d)]
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_file():
            continue
        suffix = entry.suffix.lower()
        if suffix == ".gguf":
            stem = entry.stem
            split = _SPLIT_PART.search(stem)
            if entry.name.lower().startswith("mmproj") or (split and int(split.group(1)) != 1):
                continue
            if split:
                stem = stem[: split.start()]
            if _readable(entry, b"GGUF"):
                projector = _projector(entries, stem)
                options = {"mmproj": str(projector)} if projector is not None else {}
                yield Found(f"{_name(stem)}:latest", "llama_cpp", entry, options)
        elif suffix == ".onnx":
            if not entry.with_name(entry.name + ".json").is_file():
                log.warning("discovery: skipping %s: a Piper voice needs its %s.json beside it", entry, entry.name)
            elif _readable(entry):
                yield Found(_name(entry.stem), "piper", entry, {})
        elif suffix in (".safetensors", ".ckpt"):
            if len(configs) != 1:
                log.warning(
                    "discovery: skipping %s: a single-file checkpoint needs exactly one diffusers folder "
                    "(with model_index.json) beside it for its configs; found %d",
                    entry,
                    len(configs),
                )
            elif _readable(entry):
                yield Found(_name(entry.stem), "diffusers", entry, {"config": str(configs[0])})
    for sub in subfolders:
        if sub.name == "__pycache__":
            continue
        if _is_diffusers(sub):
            if _readable(sub / "model_index.json"):
                yield Found(_name(sub.name), "diffusers", sub, {})
        elif _is_whisper(sub):
            if _readable(sub / "model.bin"):
                yield Found(_name(sub.name), "whisper", sub, {})
        else:
            yield from _in_folder(sub)


def find(models_dir: Path) -> list[Found]:
    """Every set of weights under ``models_dir`` that makes a model (not ``.cache`` or hidden folders)."""
    if not models_dir.is_dir():
        return []
    return list(_in_folder(models_dir))


def _taken_paths(models: Iterable[ModelConfig]) -> set[Path]:
    return {m.model_path.resolve() for m in models if m.model_path is not None}


def scan(settings: Settings, configured: tuple[ModelConfig, ...]) -> list[ModelConfig]:
    """The models discovered under ``settings.models_dir`` that no configured model already covers."""
    taken = _taken_paths(configured)
    names = {n for m in configured for n in (m.name, *m.aliases)}
    out: list[ModelConfig] = []
    for found in find(settings.models_dir):
        path = found.path.resolve()
        if path in taken or any(t.is_relative_to(path) for t in taken if found.path.is_dir()):
            continue  # a YAML names these weights: it wins
        bare = found.name.removesuffix(":latest")
        if found.name in names or bare in names:
            log.warning("discovery: skipping %s: the name '%s' is already used", found.path, found.name)
            continue
        try:
            cfg = model_from_options(settings, found.name, found.backend, {"path": str(path), **found.options})
        except ConfigError as exc:
            log.warning("discovery: skipping %s: %s", found.path, exc)
            continue
        names.update((found.name, bare))
        out.append(cfg)
    if out:
        log.info("discovered %d models in %s: %s", len(out), settings.models_dir, ", ".join(c.name for c in out))
    return out


# -- content ids -------------------------------------------------------------------------------------
def content_id(digests: Digests, weights: Path) -> str | None:
    """The short content id of these weights, or None (with a warning) when they cannot be read. Blocking:
    call it in a thread."""
    try:
        return digests.sha256(weights)[:ID_LENGTH]
    except OSError as exc:
        log.warning("discovery: no content id for %s: %s", weights, exc)
        return None


def looks_like_content_id(name: str) -> bool:
    return len(name) == ID_LENGTH and all(c in "0123456789abcdef" for c in name)


class Discovery:
    """Discovery for a running proxy: the configured models plus what ``scan`` finds, handed to the
    manager (the one owner of model state) at start-up and on each rescan; content ids hashed in a
    thread afterwards and registered with the manager as they come."""

    def __init__(self, settings: Settings, configured: tuple[ModelConfig, ...], digests: Digests) -> None:
        self.settings = settings
        self.configured = configured
        self.digests = digests
        self.found: list[ModelConfig] = []
        self._hashing: asyncio.Task[None] | None = None
        # awaited after each rescan has replaced the manager's catalog (the jobs of removed models end)
        self.on_catalog: list[Callable[[], Awaitable[None]]] = []

    def scan_now(self) -> list[ModelConfig]:
        """Blocking scan (start-up, before the manager exists): the whole catalog."""
        self.found = scan(self.settings, self.configured)
        return [*self.configured, *self.found]

    async def rescan(self, manager: ModelManager, settings: Settings | None = None) -> list[str]:
        """Scan again (in a thread) and replace the manager's catalog; the names discovered. With
        ``settings`` (a config reload), its models are the configured ones from now on."""
        if settings is not None:
            self.settings, self.configured = settings, settings.models
        self.found = await anyio.to_thread.run_sync(scan, self.settings, self.configured)
        manager.replace_models([*self.configured, *self.found], settings)
        self.hash_soon(manager)
        for listener in self.on_catalog:
            await listener()
        return [c.name for c in self.found]

    def hash_soon(self, manager: ModelManager) -> None:
        """Hash the discovered models' weights one at a time in a thread (cached ones cost a stat)."""
        if self._hashing is not None:
            self._hashing.cancel()
        found = list(self.found)

        async def hash_all() -> None:
            for cfg in found:
                if cfg.model_path is None:
                    continue
                cid = await anyio.to_thread.run_sync(content_id, self.digests, cfg.model_path)
                if cid is not None:
                    manager.add_content_id(cfg.name, cid)

        self._hashing = asyncio.create_task(hash_all())

    async def resolve(self, manager: ModelManager, name: str) -> ModelConfig:
        """A model by name, alias or content id; a content id not known yet waits for the hashing."""
        try:
            return manager.resolve(name)
        except ModelNotFound:
            if not looks_like_content_id(name) or self._hashing is None:
                raise
        await asyncio.wait({self._hashing})  # never raises; a cancelled hashing (a rescan) just ends it
        return manager.resolve(name)

    async def close(self) -> None:
        if self._hashing is not None:
            self._hashing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hashing
