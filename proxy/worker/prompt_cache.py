"""The prompt cache of a llama.cpp worker: the states (KV cache and tokens) of recent prompts, in RAM and on disk.

llama-cpp-python keeps one context: the next request reuses only the prefix it shares with the last one.
Here, before a request's prompt is evaluated (``PromptCache.prepare``, with the context's lock held), the
context that is about to be overwritten is kept (``llama_state_seq_get_data``: sequence 0's KV cells and
their tokens) when it would lose more than ``SLACK`` tokens, and the kept state with the longest common
token prefix (RAM first, then this model's files) is restored when it reuses more than the live context
does; llama-cpp-python's ``generate`` then evaluates only the rest (it trims the KV cache to the common
prefix itself). The RAM tier is an LRU bounded in bytes per model; an entry that a newer one extends
(all but ``SLACK`` of its tokens shared) is dropped.

On unload (``persist``, bounded in time) the live context and the RAM entries, most recent first, are
written under ``models/.cache/prompts/`` (a temporary file, then ``os.replace``), and the folder is trimmed
to its byte limit over every model (least recently used first, by mtime: a read touches the file). A file
is named by its key: the weights' sha256, every option the model was loaded with, the context's size and
the llama.cpp build; another key's files are never read. A file that is truncated, fails its CRC, or that
llama.cpp refuses is a miss, logged and deleted.

Why not llama-cpp-python's ``LlamaRAMCache`` (``Llama.set_cache``): it saves only at the end of a
completion (a stream that is closed early, or a conversation that moves to another, saves nothing in
between), its ``LlamaState`` copies the whole score buffer (n_batch x n_vocab floats: 100 MB for SmolLM2)
with every save, counts only the llama.cpp bytes against its capacity, and has no disk tier we could use
(``LlamaDiskCache`` pickles through diskcache, with no key for the weights or the load options).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("proxy.worker.prompt_cache")

MIN_TOKENS = 32  # a context shorter than this is not worth keeping
MIN_GAIN = 16  # a kept state is restored only when it reuses this many more tokens than the live context
SLACK = 32  # a context that loses fewer tokens than this to the next prompt (a chat's next turn) is not kept
MAGIC = b"LLPCACHE1\n"
SUFFIX = ".pcache"
_STALE_TMP = 600.0  # seconds: a temporary file older than this was left by a worker that was killed


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Entry:
    tokens: list[int]  # the prefix it reuses (evaluated in batches, as a cold prefill would)
    state: bytes
    cells: int = 0  # the KV cells its state holds (its tokens, then an answer's: cut at restore)
    path: Path | None = None  # its file, when it is on disk as it is here

    @property
    def nbytes(self) -> int:
        return len(self.state) + 4 * len(self.tokens)


@dataclass
class Stats:
    hits: int = 0  # requests that reused some of their prompt (the live context, RAM or disk)
    misses: int = 0
    tokens_reused: int = 0
    restores_ram: int = 0
    restores_disk: int = 0
    files_written: int = 0
    bytes_written: int = 0
    save_seconds: float = 0.0
    bad_files: int = 0  # truncated, corrupt or refused files deleted


class RamCache:
    """Kept states, least recently used first, bounded in bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self.nbytes = 0  # kept up to date, so that a report needs no lock

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, tokens: Sequence[int]) -> tuple[Entry | None, int]:
        found, longest = None, 0
        for entry in self._entries.values():
            n = common_prefix(entry.tokens, tokens)
            if n > longest:
                found, longest = entry, n
        return found, longest

    def touch(self, entry: Entry) -> None:
        self._entries.move_to_end(id(entry))

    def put(self, entry: Entry) -> None:
        if entry.nbytes > self.capacity:
            return
        for key, old in list(self._entries.items()):
            if common_prefix(old.tokens, entry.tokens) >= len(old.tokens) - SLACK:
                del self._entries[key]  # the new one extends it
                self.nbytes -= old.nbytes
        self._entries[id(entry)] = entry
        self.nbytes += entry.nbytes
        while self.nbytes > self.capacity:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def recent(self) -> list[Entry]:
        return list(reversed(self._entries.values()))


def _header(key: str, entry: Entry) -> tuple[bytes, bytes]:
    body = struct.pack(f"<{len(entry.tokens)}i", *entry.tokens)
    crc = zlib.crc32(entry.state, zlib.crc32(body))
    meta = json.dumps(
        {"key": key, "n_tokens": len(entry.tokens), "cells": entry.cells, "state_bytes": len(entry.state), "crc32": crc}
    ).encode()
    return MAGIC + struct.pack("<I", len(meta)) + meta, body


class BadFile(Exception):
    pass


class DiskStore:
    """This key's files in the prompt cache folder; the folder's bound over every model."""

    def __init__(self, folder: Path, key: str, limit: int) -> None:
        self.folder = folder
        self.key = key
        self.limit = limit
        self._index: dict[Path, list[int]] = {}  # this key's files -> their tokens (read from the headers)
        self.bad_files = 0

    def _mine(self) -> list[Path]:
        try:
            return sorted(self.folder.glob(f"{self.key[:32]}-*{SUFFIX}"))
        except OSError:
            return []

    def _read_head(self, path: Path, whole: bool) -> tuple[list[int], int, bytes | None]:
        with path.open("rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise BadFile("not a prompt cache file")
            raw = fh.read(4)
            if len(raw) != 4:
                raise BadFile("truncated header")
            (meta_len,) = struct.unpack("<I", raw)
            if meta_len > 4096:
                raise BadFile("header too long")
            try:
                meta = json.loads(fh.read(meta_len))
                n, size, crc = int(meta["n_tokens"]), int(meta["state_bytes"]), int(meta["crc32"])
                cells = int(meta["cells"])
            except (ValueError, KeyError, TypeError) as exc:
                raise BadFile(f"bad header: {exc}") from None
            if meta.get("key") != self.key:
                raise BadFile("its key is not the one its name says")
            if os.fstat(fh.fileno()).st_size != len(MAGIC) + 4 + meta_len + 4 * n + size:
                raise BadFile("truncated (its size is not what its header says)")
            body = fh.read(4 * n)
            tokens = list(struct.unpack(f"<{n}i", body))
            if not whole:
                return tokens, cells, None
            state = fh.read(size)
            if zlib.crc32(state, zlib.crc32(body)) != crc:
                raise BadFile("CRC mismatch")
            return tokens, cells, state

    def _drop(self, path: Path, why: str) -> None:
        log.warning("prompt cache: %s is a miss (%s); deleting it", path.name, why)
        self.bad_files += 1
        self._index.pop(path, None)
        with contextlib.suppress(OSError):
            path.unlink()

    def refresh(self) -> None:
        """The index follows the folder (another worker of the same key may have written files)."""
        present = self._mine()
        for path in list(self._index):
            if path not in present:
                del self._index[path]
        for path in present:
            if path in self._index:
                continue
            try:
                self._index[path] = self._read_head(path, whole=False)[0]
            except BadFile as exc:
                self._drop(path, str(exc))
            except (OSError, struct.error) as exc:
                log.warning("prompt cache: cannot read %s: %s", path.name, exc)

    def best(self, tokens: Sequence[int]) -> tuple[Path | None, int]:
        self.refresh()
        found, longest = None, 0
        for path, kept in self._index.items():
            n = common_prefix(kept, tokens)
            if n > longest:
                found, longest = path, n
        return found, longest

    def read(self, path: Path) -> Entry | None:
        try:
            tokens, cells, state = self._read_head(path, whole=True)
        except BadFile as exc:
            self._drop(path, str(exc))
            return None
        except (OSError, struct.error) as exc:
            log.warning("prompt cache: cannot read %s: %s", path.name, exc)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recently used
        assert state is not None
        return Entry(tokens, state, cells, path)

    def bad(self, path: Path, why: str) -> None:
        self._drop(path, why)

    def write(self, entry: Entry) -> int:
        """Write one entry (atomically); its bytes, 0 when it does not fit the bound at all."""
        head, body = _header(self.key, entry)
        total = len(head) + len(body) + len(entry.state)
        if total > self.limit:
            return 0
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{self.key[:32]}-{uuid.uuid4().hex[:16]}{SUFFIX}"
        tmp = self.folder / f".{path.name}.tmp"
        with tmp.open("wb") as fh:
            fh.write(head)
            fh.write(body)
            fh.write(entry.state)
        os.replace(tmp, path)
        for old, kept in list(self._index.items()):  # files it extends are superseded
            if common_prefix(kept, entry.tokens) >= len(kept) - SLACK:
                del self._index[old]
                with contextlib.suppress(OSError):
                    old.unlink()
        self._index[path] = list(entry.tokens)
        entry.path = path
        return total

    def nbytes(self) -> int:
        return folder_bytes(self.folder)

    def trim(self) -> None:
        trim(self.folder, self.limit)


def folder_bytes(folder: Path) -> int:
    total = 0
    with contextlib.suppress(OSError):
        for path in folder.glob(f"*{SUFFIX}"):
            with contextlib.suppress(OSError):
                total += path.stat().st_size
    return total


def trim(folder: Path, limit: int) -> None:
    """The folder's files, least recently used first, deleted until they fit ``limit``; stale temporary
    files (a worker killed while writing) too."""
    now = time.time()
    files: list[tuple[float, int, Path]] = []
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            try:
                st = path.stat()
            except OSError:
                continue
            if path.name.endswith(".tmp"):
                if now - st.st_mtime > _STALE_TMP:
                    with contextlib.suppress(OSError):
                        path.unlink()
            elif path.name.endswith(SUFFIX):
                files.append((st.st_mtime, st.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    for _, size, path in files:
        if total <= limit:
            break
        with contextlib.suppress(OSError):
            path.unlink()
        total -= size


def weights_sha256(model_path: str, cache_dir: Path | None) -> str:
    """The weights' sha256: from the proxy's digests cache (``models/.cache/digests.json``) or this cache's own
    (``prompts/weights.json``) while the file's size and mtime match, else hashed here (and kept in the latter)."""
    st = os.stat(model_path)
    key = str(Path(model_path).resolve())
    files = [cache_dir / "digests.json", cache_dir / "prompts" / "weights.json"] if cache_dir is not None else []
    for path in files:
        try:
            known = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            known = None
        if (
            isinstance(known, dict)
            and known.get("size") == st.st_size
            and known.get("mtime_ns") == st.st_mtime_ns
            and isinstance(known.get("sha256"), str)
        ):
            return str(known["sha256"])
    digest = hashlib.sha256()
    with open(model_path, "rb") as fh:
        while chunk := fh.read(4 * 1024 * 1024):
            digest.update(chunk)
    if files:
        own = files[1]
        with contextlib.suppress(OSError, ValueError, AttributeError):
            try:
                data = json.loads(own.read_text())
            except FileNotFoundError:
                data = {}
            data[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest.hexdigest()}
            own.parent.mkdir(parents=True, exist_ok=True)
            tmp = own.with_name(f".weights.{uuid.uuid4().hex[:8]}.tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, own)
    return digest.hexdigest()


def cache_key(sha256: str, options: dict[str, Any], n_ctx: int, build: str) -> str:
    """What a state belongs to: the weights, every load option (n_ctx as llama.cpp made it), the build."""
    material = {"format": 1, "weights": sha256, "options": options, "n_ctx": n_ctx, "build": build}
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Settings:
    ram: int
    disk: int  # the folder's bound, every model together; 0: no disk tier
    folder: Path | None
    save_seconds: float

    @staticmethod
    def of(raw: Any) -> Settings | None:
        """The spec's ``prompt_cache`` (None: off)."""
        if not isinstance(raw, dict):
            return None
        folder = raw.get("dir")
        return Settings(
            ram=int(raw.get("ram") or 0),
            disk=int(raw.get("disk") or 0),
            folder=Path(folder) if folder else None,
            save_seconds=float(raw.get("save_seconds") or 0.0),
        )


@dataclass
class PromptCache:
    """The cache of one ``Llama`` (its caller holds the context's lock for ``prepare``)."""

    llm: Any
    settings: Settings
    key: Callable[[], str | None]  # the disk key once known (the weights' hash runs in a thread)
    ram: RamCache = field(init=False)
    stats: Stats = field(default_factory=Stats)
    _disk: DiskStore | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # how many of the context's first tokens were evaluated in batches of two or more: only those are reused
    exact: int = field(default=0, init=False)
    unit: int = field(default=512, init=False)  # llama.cpp's ubatch: a prompt's tokens are evaluated in these

    def __post_init__(self) -> None:
        self.ram = RamCache(self.settings.ram)
        params = getattr(self.llm, "context_params", None)
        ubatch = int(getattr(params, "n_ubatch", 0) or 0)
        self.unit = max(2, min(int(getattr(self.llm, "n_batch", 512)), ubatch or 512))

    def evaluated(self, n_past: int, n: int) -> None:
        """``n`` tokens were evaluated after ``n_past`` (``Llama.eval``): the exact prefix grows by them when it
        reached ``n_past``, less a last token evaluated alone."""
        if self.exact > n_past:
            self.exact = n_past
        if self.exact == n_past:
            self.exact = n_past + n - (1 if n % self.unit == 1 else 0)

    # -- llama.cpp's state ---------------------------------------------------------------------
    def _live(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def _snapshot(self) -> Entry | None:
        """The context's state, its exact prefix as its tokens (the cells past it are cut at restore)."""
        import llama_cpp

        ctx = self.llm.ctx
        size = int(llama_cpp.llama_state_seq_get_size(ctx, 0))
        if size <= 0:
            return None
        buf = (ctypes.c_uint8 * size)()
        got = int(llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0))
        if got <= 0 or got > size:
            return None
        live = self._live()
        return Entry(live[: self.exact], ctypes.string_at(buf, got), cells=len(live))

    def _restore(self, entry: Entry) -> bool:
        """Sequence 0 becomes the entry's; False (and an empty context) when llama.cpp refuses it or the
        restore did nothing (its KV cells must end at the entry's last token: llama.cpp #26676)."""
        import llama_cpp

        llm = self.llm
        mem = llama_cpp.llama_get_memory(llm.ctx)
        llama_cpp.llama_memory_clear(mem, True)
        src = (ctypes.c_uint8 * len(entry.state)).from_buffer_copy(entry.state)
        n = len(entry.tokens)
        ok = int(llama_cpp.llama_state_seq_set_data(llm.ctx, src, len(entry.state), 0)) == len(entry.state)
        ok = ok and int(llama_cpp.llama_memory_seq_pos_max(mem, 0)) == entry.cells - 1 and n <= llm.n_ctx()
        if not ok:
            llama_cpp.llama_memory_clear(mem, True)
            llm.n_tokens = 0
            llm._requires_eval = True
            return False
        llm.input_ids[:n] = entry.tokens
        llm.n_tokens = n
        llm._requires_eval = True  # llama-cpp-python evaluates at least the last token again
        self.exact = n
        return True

    def _reuse_point(self, reused: int, length: int) -> int:
        """How many tokens to keep of a context sharing ``reused`` with a prompt of ``length`` tokens, so that
        the rest is evaluated as a cold prefill would: never one last token alone unless a cold prefill also
        evaluates it alone (its length is one more than a multiple of the ubatch)."""
        keep = min(reused, length - 1)
        alone = length % self.unit == 1
        if keep > 0 and ((length - keep) % self.unit == 1) != alone:
            keep -= (keep - length + 1) % self.unit if alone else 1
        return max(0, keep)

    # -- requests ----------------------------------------------------------------------------
    def disk(self) -> DiskStore | None:
        if self._disk is None and self.settings.folder is not None and self.settings.disk > 0:
            key = self.key()
            if key is not None:
                self._disk = DiskStore(self.settings.folder, key, self.settings.disk)
        return self._disk

    def prepare(self, tokens: Sequence[int]) -> None:
        """Before ``tokens`` are evaluated: keep the live context if it is about to be lost, and restore the
        kept state that shares the longest prefix with them when that beats the live context."""
        with self._lock:
            live = self._live()[: self.exact]
            reused = common_prefix(live, tokens)
            if len(live) >= MIN_TOKENS and len(live) - reused >= SLACK:
                snap = self._snapshot()
                if snap is not None:
                    self.ram.put(snap)
            entry, longest = self.ram.best(tokens)
            source = "ram"
            disk = self.disk()
            if disk is not None:
                path, on_disk = disk.best(tokens)
                if path is not None and on_disk > max(longest, reused) + MIN_GAIN:
                    read = disk.read(path)
                    if read is not None:
                        entry, longest, source = read, on_disk, "disk"
            if entry is not None and longest >= reused + MIN_GAIN:
                if self._restore(entry):
                    reused = longest
                    if source == "disk":
                        self.stats.restores_disk += 1
                        self.ram.put(entry)
                    else:
                        self.stats.restores_ram += 1
                        self.ram.touch(entry)
                else:
                    reused = 0
                    log.warning("prompt cache: llama.cpp refused a kept state of %d tokens", len(entry.tokens))
                    if entry.path is not None and disk is not None:
                        disk.bad(entry.path, "llama.cpp refused the state")
            # llama-cpp-python's generate keeps the context's first n_tokens where they match the prompt
            keep = self._reuse_point(reused, len(tokens))
            if keep < self.llm.n_tokens:
                self.llm.n_tokens = keep
                self.exact = min(self.exact, keep)

    def note(self, prompt_tokens: int, cached_tokens: int) -> None:
        with self._lock:
            if cached_tokens > 0:
                self.stats.hits += 1
                self.stats.tokens_reused += cached_tokens
            elif prompt_tokens > 0:
                self.stats.misses += 1

    # -- unload ------------------------------------------------------------------------------
    def persist(self, context: threading.Lock) -> None:
        """The live context and the RAM entries, most recent first, to disk within ``save_seconds``; then the
        folder's bound. The live context is read only if its lock comes in time (a generation abandoned at
        shutdown may still hold it)."""
        disk = self.disk()
        if disk is None:
            return
        began = time.monotonic()
        deadline = began + self.settings.save_seconds
        entries: list[Entry] = []
        if context.acquire(timeout=max(0.0, min(1.0, self.settings.save_seconds / 4))):
            try:
                if self.llm.n_tokens >= MIN_TOKENS:
                    snap = self._snapshot()
                    if snap is not None:
                        entries.append(snap)
            finally:
                context.release()
        with self._lock:
            for entry in self.ram.recent():
                if entries and common_prefix(entry.tokens, entries[0].tokens) >= len(entry.tokens) - SLACK:
                    continue  # the live context extends it
                entries.append(entry)
            disk.refresh()
            for entry in entries:
                if time.monotonic() >= deadline:
                    log.info("prompt cache: out of time to save; %d states not saved", len(entries))
                    break
                if entry.path is not None and entry.path.exists():
                    continue
                try:
                    written = disk.write(entry)
                except OSError as exc:
                    log.warning("prompt cache: cannot save a state: %s", exc)
                    break
                if written:
                    self.stats.files_written += 1
                    self.stats.bytes_written += written
            disk.trim()
            self.stats.save_seconds = time.monotonic() - began
        log.info(
            "prompt cache: saved %d states (%d bytes) in %.2fs",
            self.stats.files_written,
            self.stats.bytes_written,
            self.stats.save_seconds,
        )

    def report(self) -> dict[str, Any]:
        """What /status and /metrics show; no lock (a request's restore may hold it for a while)."""
        disk = self._disk
        return {
            "enabled": True,
            "hits": self.stats.hits,
            "misses": self.stats.misses,
            "tokens_reused": self.stats.tokens_reused,
            "restores_ram": self.stats.restores_ram,
            "restores_disk": self.stats.restores_disk,
            "entries_ram": len(self.ram),
            "ram_bytes": self.ram.nbytes,
            "ram_limit": self.ram.capacity,
            "disk_limit": self.settings.disk,
            "bad_files": self.stats.bad_files + (disk.bad_files if disk is not None else 0),
        }
