"""A handle on one worker process: spawn, wait until ready, watch, stop, keep its log tail.

No HTTP framework here and no policy: the manager decides when; this module knows how.
Workers run in their own process group (stopped with SIGTERM to the group, then SIGKILL after the
grace period) and die with the proxy (PR_SET_PDEATHSIG, see ``proxy.worker.guard``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from proxy.config import ModelConfig
from proxy.errors import LoadTimeout, ModelLoadFailed
from proxy.modellogs import ModelLog
from proxy.spares import SpareKey, Spares, handoff_line
from proxy.upstream import Upstream
from proxy.wire import handoff_path, output_lines, read_progress

log = logging.getLogger("proxy.supervisor")

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_HEALTH_POLL_FIRST = 0.02
_HEALTH_POLL_MAX = 0.25


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment of a worker (and of the helpers the proxy runs under a model's interpreter)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # A failed GGML_ASSERT prints a backtrace by forking a debugger and waiting for it; in a
    # multi-threaded worker that child can hang for ever, leaving a stuck worker and an orphan
    # (issue 16). Without the backtrace, an assertion ends the worker at once.
    env.setdefault("GGML_NO_BACKTRACE", "1")
    env.update(extra)
    return env


class Worker:
    """One start of one model. A new start makes a new Worker."""

    def __init__(
        self,
        config: ModelConfig,
        runtime_dir: Path,
        on_exit: Callable[[Worker], None],
        *,
        logs: ModelLog | None = None,
        spares: Spares | None = None,
    ) -> None:
        self.config = config
        self.spares = spares  # warm spare workers (proxy.spares): the start takes the one of its key
        self.runtime_dir = runtime_dir
        self.on_exit = on_exit
        self.process: asyncio.subprocess.Process | None = None
        self.upstream: Upstream | None = None
        # its model's log (ring, file, followers); this worker's own lines are those after _log_from
        self.logs = logs if logs is not None else ModelLog(config.name, None, 0, lines=200)
        self._log_from = self.logs.count
        self.stopping = False
        self.returncode: int | None = None
        self.socket_path: str | None = None  # an internal worker's Unix socket, removed when it is reaped
        self.kill_reason: str | None = None  # why we killed it, when we did (the stall watchdog)
        self._readers: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        # its load's progress lines (proxy.wire.progress_line) until it is ready: fraction 0..1 and phase
        self.on_progress: Callable[[float, str], None] | None = None
        self.from_spare = False  # it was a warm spare (its imports done before its spec came)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.logs.tail(lines, since=self._log_from))

    # -- start --------------------------------------------------------------------------------
    def _argv(self) -> tuple[list[str], str | None, str]:
        """The command line, the Unix socket (internal workers) and the base URL."""
        cfg = self.config
        if cfg.facts.entry is None:  # a server of its own
            assert cfg.cmd is not None  # config guarantees cmd when there is no url
            port = _free_port()
            cmd = [part.replace("${PORT}", str(port)) for part in cfg.cmd]
            argv = [sys.executable, "-m", "proxy.worker.guard", str(os.getpid()), "--", *cmd]
            return argv, None, f"http://127.0.0.1:{port}"
        sock = str(self.runtime_dir / f"{abs(hash((cfg.name, id(self))))}.sock")
        python = cfg.python or sys.executable
        argv = [python, "-m", "proxy.worker", "--socket", sock, "--spec", json.dumps(self._spec())]
        argv += ["--parent-pid", str(os.getpid())]
        return argv, sock, "http://worker"

    def _spec(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "backend": cfg.backend,
            "entry": cfg.facts.entry,
            "name": cfg.name,
            "model_path": str(cfg.model_path) if cfg.model_path else None,
            "options": dict(cfg.options),
            "parallel": cfg.parallel,
            "cache_dir": str(cfg.cache_dir) if cfg.cache_dir else None,
            "limits": dict(cfg.worker_limits),
            "prompt_cache": dict(cfg.prompt_cache) if cfg.prompt_cache is not None else None,
        }

    def _env(self) -> dict[str, str]:
        return worker_env(self.config.env)

    async def _read(self, stream: asyncio.StreamReader | None, watch_ready: bool) -> None:
        async for text in output_lines(stream):
            if watch_ready and text.startswith('{"event": "ready"'):
                self._ready.set()
                continue
            if watch_ready and text.startswith('{"event": "spare"'):  # a spare taken while it imported
                continue
            progress = read_progress(text) if watch_ready else None
            if progress is not None:
                if not self._ready.is_set() and self.on_progress is not None:
                    self.on_progress(*progress)
                continue
            if watch_ready and text.startswith('{"event": "error"'):
                text = self._failure(text)
            self.logs.append(text)
            log.debug("[%s] %s", self.config.name, text)

    def _failure(self, line: str) -> str:
        """A request the worker failed (its one-line report): logged at warning level, kept in the tail."""
        try:
            event = json.loads(line)
            text = f"{event['what']}: {event['traceback']}"
        except (ValueError, KeyError, TypeError):
            text = line
        log.warning("model %s: worker %s: %s", self.config.name, self.pid, text)
        return text

    async def start(self) -> None:
        """Spawn the worker and return when it is ready; on failure no process is left."""
        cfg = self.config
        if cfg.url is not None:  # already running elsewhere: only routed to
            self.upstream = Upstream(cfg.url, name=cfg.name, idle_timeout=cfg.idle_timeout)
            if not await self.upstream.health(cfg.health_path):
                await self.upstream.aclose()
                raise ModelLoadFailed(f"model '{cfg.name}': the server at {cfg.url} is not reachable")
            return
        argv, sock, base_url = self._argv()
        key = SpareKey.of(cfg) if self.spares is not None and sock is not None else None
        spare = await self.spares.take(key) if self.spares is not None and key is not None else None
        if spare is not None and sock is not None:
            self.process, self.from_spare = spare.process, True
            assert self.process.stdin is not None
            self.process.stdin.write(handoff_line(sock, self._spec()))
            self.process.stdin.close()  # one line; a spare that died already fails below, like any worker
        else:
            try:
                self.process = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                    env=self._env(),
                )
            except OSError as exc:
                raise ModelLoadFailed(f"model '{cfg.name}': cannot start its worker: {exc}") from exc
        internal = sock is not None
        self._readers = [
            asyncio.create_task(self._read(self.process.stdout, watch_ready=internal)),
            asyncio.create_task(self._read(self.process.stderr, watch_ready=False)),
        ]
        self.socket_path = sock
        self.upstream = Upstream(base_url, uds=sock, name=cfg.name, idle_timeout=cfg.idle_timeout, on_hung=self._hung)
        try:
            await asyncio.wait_for(self._until_ready(internal), timeout=cfg.load_timeout)
        except TimeoutError:
            await self._kill_now()
            raise LoadTimeout(
                f"model '{cfg.name}' did not load within {cfg.load_timeout:g}s; its log ends:\n{self.log_tail()}",
                retry_after=cfg.load_timeout,
            ) from None
        except BaseException:
            await self._kill_now()
            raise
        self._watch = asyncio.create_task(self._watch_exit())

    async def _until_ready(self, internal: bool) -> None:
        assert self.process is not None
        exited = asyncio.ensure_future(self.process.wait())
        try:
            ready: asyncio.Future[Any] = asyncio.ensure_future(self._ready.wait() if internal else self._poll_health())
            try:
                await asyncio.wait({exited, ready}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ready.cancel()
            if exited.done():
                await asyncio.gather(*self._readers, return_exceptions=True)  # collect the last words
                self.returncode = exited.result()
                raise ModelLoadFailed(
                    f"model '{self.config.name}': its worker exited with code {self.returncode} while loading; "
                    f"its log ends:\n{self.log_tail()}",
                )
        finally:
            if not exited.done():
                exited.cancel()

    async def _poll_health(self) -> None:
        """External servers say nothing on stdout: ask their health endpoint until it is 200."""
        assert self.upstream is not None
        delay = _HEALTH_POLL_FIRST
        while not await self.upstream.health(self.config.health_path):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _HEALTH_POLL_MAX)

    async def _watch_exit(self) -> None:
        assert self.process is not None
        self.returncode = await self.process.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if not self.stopping:
            log.warning(
                "model %s: worker %s exited with code %s; its output ends:\n%s",
                self.config.name,
                self.pid,
                self.returncode,
                self.log_tail(),
            )
            self.on_exit(self)

    # -- stop ---------------------------------------------------------------------------------
    def _signal_group(self, sig: int) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    async def _kill_now(self) -> None:
        self.stopping = True
        self._signal_group(signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> None:
        if self.process is not None:
            self.returncode = await self.process.wait()
            # children that outlived the leader (an external server's helpers) go too
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
        await asyncio.gather(*self._readers, return_exceptions=True)
        if self.upstream is not None:
            await self.upstream.aclose()
        if self.socket_path is not None:  # the worker cannot remove them when it was killed
            for path in (self.socket_path, handoff_path(self.socket_path)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()

    async def stop(self, grace: float) -> None:
        """SIGTERM to the group, up to ``grace`` seconds, then SIGKILL. Idempotent."""
        self.stopping = True
        if self.process is None:
            if self.upstream is not None:
                await self.upstream.aclose()
            return
        if self.process.returncode is None:  # a worker that exited on its own is only reaped
            if grace <= 0:
                self._signal_group(signal.SIGKILL)
            else:
                self._signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(self.process.wait()), timeout=grace)
                except TimeoutError:
                    log.warning(
                        "model %s: worker %s ignored SIGTERM for %gs; killing", self.config.name, self.pid, grace
                    )
                    self._signal_group(signal.SIGKILL)
        await self._reap()

    def cpu_seconds(self) -> float | None:
        """CPU time the worker and its children have used so far; None with no process to measure."""
        if self.process is None or self.process.returncode is not None:
            return None
        import psutil

        from proxy import proctree

        try:
            return proctree.cpu_seconds(self.process.pid)
        except psutil.Error:
            return None

    def kill(self, reason: str) -> None:
        """SIGKILL the group now, as a crash would: the exit is reported through ``on_exit``."""
        self.kill_reason = reason
        self._signal_group(signal.SIGKILL)

    def _hung(self, why: str) -> None:
        """A request got no byte from this worker for its idle timeout (``Upstream``): kill it, once."""
        if self.kill_reason is None and self.process is not None and self.process.returncode is None:
            log.warning("model %s: worker %s: %s", self.config.name, self.pid, why)
            self.kill(why)

    def kill_sync(self) -> None:
        """Last resort at interpreter exit, when no event loop is left to await in."""
        self._signal_group(signal.SIGKILL)
