"""Need-finding: what a model needs in memory, found once per config (``memory.py``'s docstring has the order:
config, measured, estimate), the GGUF facts it takes (read once per file, shared with /api/show and the
runtime options' bound), and the peaks a loaded worker is measured at.

``Needs`` is a service the manager owns, with the cache file (``MemoryStore``) and the probe injected; it
holds no model state of its own but the reads in progress. The manager's runtimes hold each model's need
(``NeedHolder``): a read that began for one config is stored only while the model still has that config,
so a reload (a changed YAML, other runtime options) during the read never gets the old config's need.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from proxy import memory
from proxy.config import ModelConfig
from proxy.memory import MemoryProbe, MemoryStore, Need
from proxy.supervisor import worker_env

log = logging.getLogger("proxy.needs")


class NeedHolder(Protocol):
    """What ``Needs.ensure`` reads and writes of a model (the manager's ``Runtime``)."""

    need: Need | None
    # a GGUF read in progress for it, with the config it was begun for
    need_task: asyncio.Task[tuple[ModelConfig, Need]] | None

    @property
    def effective(self) -> ModelConfig: ...


class Needs:
    def __init__(self, store: MemoryStore, probe: MemoryProbe) -> None:
        self.store = store
        self.probe = probe
        self._gguf_reads: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._estimating: asyncio.Task[None] | None = None

    async def ensure(self, holder: NeedHolder) -> Need:
        """Its need, found once; only a GGUF not read before takes a wait (a subprocess). A read finished
        for a config the model no longer has is not kept: the need is found again for the one it has."""
        while True:
            cfg = holder.effective
            if holder.need is None:
                holder.need = self.now(cfg)
            if holder.need is not None:
                return holder.need
            task = holder.need_task
            if task is None:
                task = holder.need_task = asyncio.ensure_future(self._read_need(cfg))
            read_for, need = await asyncio.shield(task)
            if holder.need_task is task:
                holder.need_task = None
            if holder.need is not None and holder.effective == cfg:
                return holder.need  # found meanwhile, for this same config
            if read_for == holder.effective:
                holder.need = need
                return need
            # its config changed while the file was read: that need is not its need now

    async def _read_need(self, cfg: ModelConfig) -> tuple[ModelConfig, Need]:
        return cfg, await self.from_gguf(cfg)

    def fingerprint(self, cfg: ModelConfig) -> str:
        parts = {"backend": cfg.backend, "options": dict(cfg.options), "parallel": cfg.parallel, "cmd": cfg.cmd}
        return memory.fingerprint(parts, memory.model_files(cfg.backend, cfg.model_path, cfg.options))

    def gpu_for(self, cfg: ModelConfig) -> bool:
        return any(cfg.gpus is None or g.index in cfg.gpus for g in self.probe.gpus())

    def now(self, cfg: ModelConfig) -> Need | None:
        """config, else measured, else an estimate (memory.py's docstring); None: the GGUF must be read."""
        if cfg.url is not None:
            return Need(0, 0, "none")
        if cfg.memory is not None:
            return cfg.memory
        measured = self.store.measured(cfg.name, self.fingerprint(cfg))
        if measured is not None:
            return measured
        if cfg.cmd is not None:
            log.info("model %s: a cmd without memory: in its config; admitted unchecked until measured", cfg.name)
            return Need(0, 0, "unknown")
        path = cfg.model_path
        if path is None:
            return Need(0, 0, "unknown")
        gpu = self.gpu_for(cfg)
        how = cfg.facts.estimate  # by backend (proxy.backends)
        try:
            if how == "gguf":
                facts = self.store.gguf(memory.file_key(path))
                return memory.estimate_llama_cpp(facts, cfg.options, gpu, cfg.parallel) if facts else None
            if how == "diffusers":
                return memory.estimate_diffusers(cfg.options, path, gpu)
            return memory.estimate_by_files(cfg.backend, path, cfg.options, gpu)
        except (OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("model %s: no memory estimate (%s); admitted unchecked until measured", cfg.name, exc)
        return Need(0, 0, "unknown")

    async def from_gguf(self, cfg: ModelConfig) -> Need:
        assert cfg.model_path is not None
        try:
            facts = await self.gguf_facts(cfg)
            if facts is not None:
                return memory.estimate_llama_cpp(facts, cfg.options, self.gpu_for(cfg), cfg.parallel)
            return memory.estimate_by_files(cfg.backend, cfg.model_path, cfg.options, self.gpu_for(cfg))
        except (OSError, KeyError, TypeError, ValueError) as exc:
            log.warning("model %s: no memory estimate (%s); admitted unchecked until measured", cfg.name, exc)
        return Need(0, 0, "unknown")

    async def gguf_metadata(self, cfg: ModelConfig) -> dict[str, Any] | None:
        """A llama.cpp model's GGUF metadata as Ollama's /api/show has it (the same reader and cache as the
        memory estimate); None for other models or a file that cannot be read."""
        facts = await self.gguf_facts(cfg)
        metadata = facts.get("metadata") if facts is not None else None
        return dict(metadata) if isinstance(metadata, dict) else None

    async def gguf_facts(self, cfg: ModelConfig) -> dict[str, Any] | None:
        """A llama.cpp model's GGUF facts (read_gguf), read once per file; None when there are none."""
        path = cfg.model_path
        if cfg.facts.estimate != "gguf" or path is None or not path.is_file():
            return None
        key = memory.file_key(path)
        facts = self.store.gguf(key)
        if facts is None or "metadata" not in facts:  # not read yet, or read before /api/show wanted it
            task = self._gguf_reads.get(key)
            if task is None:  # one read per file, however many ask at once (it takes seconds)
                task = self._gguf_reads[key] = asyncio.ensure_future(read_gguf(path, cfg.python))
                task.add_done_callback(lambda _: self._gguf_reads.pop(key, None))
            facts = await asyncio.shield(task)
            if facts is None:
                return None
            self.store.put_gguf(key, facts)
        return facts

    def measure(self, cfg: ModelConfig, effective: ModelConfig, peak: Need, pid: int | None) -> Need:
        """The worker's RSS (process tree) and VRAM now: the new peak of this load (``peak`` when it cannot
        be read); a peak that grew is remembered for the config it runs with (``effective``)."""
        if pid is None:
            return peak
        ram = self.probe.rss(pid)
        if ram is None:
            return peak
        vram = sum(self.probe.vram(pid).values())
        new = Need(max(peak.ram, ram), max(peak.vram, vram), "measured")
        grew = new.ram > peak.ram * 1.05 or new.vram > peak.vram * 1.05
        if grew and cfg.url is None and cfg.memory is None:
            self.store.put_measured(cfg.name, self.fingerprint(effective), new)
        return new

    def estimate_soon(self, holders: Callable[[], Iterable[NeedHolder]]) -> None:
        """Find every model's need in the background (for /status), once."""
        if self._estimating is None:

            async def all_needs() -> None:
                for holder in list(holders()):
                    with contextlib.suppress(Exception):
                        await self.ensure(holder)

            self._estimating = asyncio.get_running_loop().create_task(all_needs())

    def reads(self) -> list[asyncio.Future[Any]]:
        """What is being read now (the estimates, the GGUF reads): shutdown cancels them."""
        return [t for t in (self._estimating, *self._gguf_reads.values()) if t is not None and not t.done()]


async def read_gguf(path: Path, python: str | None, timeout: float = 120.0) -> dict[str, Any] | None:
    """Run ``proxy.worker.gguf_meta`` under the model's interpreter; None when it cannot say."""
    try:
        proc = await asyncio.create_subprocess_exec(
            python or sys.executable,
            "-m",
            "proxy.worker.gguf_meta",
            str(path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=worker_env({}),  # the same PYTHONPATH a worker gets
        )
    except OSError as exc:
        log.warning("cannot read %s's metadata: %s", path, exc)
        return None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        log.warning("reading %s's metadata took more than %gs", path, timeout)
        return None
    except asyncio.CancelledError:  # the proxy is stopping: the reader must not outlive it
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    for line in out.decode(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            answer = json.loads(line)
            if "facts" in answer:
                return dict(answer["facts"])
            log.warning("cannot read %s's metadata: %s", path, answer.get("error"))
            return None
    log.warning("cannot read %s's metadata: %s", path, err.decode(errors="replace")[-500:])
    return None
