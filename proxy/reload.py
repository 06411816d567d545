"""Config reload without dropping models: ``SIGHUP``, or a change ``proxy serve --watch`` sees, re-reads
config.yml, configs/*.yaml and api_tokens.yml.

The new configuration is read whole first (in a thread); any error refuses all of it: the reason goes to
the log and the events (``ConfigRejected``) and the old configuration keeps serving. Otherwise:

- models: the manager takes the new catalog through the one path a rescan takes (``Discovery.rescan`` ->
  ``ModelManager.replace_models``): new models appear, removed ones unload when idle, changed ones restart
  once their requests in flight are done (later requests wait for the restart and load the new config),
  unchanged loaded ones keep their worker and pid;
- keys and limits (``limits.*``, ``defaults.*``, ``server.metrics_public``,
  ``server.loading_comment_interval``) apply to the next request;
- ``RESTART_ONLY`` settings (where the proxy listens, its directories, its log level) wait for a restart
  of the proxy: a reload that changes one says so in the log and the event.

No HTTP here: the app hands in ``install``, which puts the new settings and keys where requests read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio.to_thread

from proxy.auth import KeyRing
from proxy.config import ModelConfig, Settings, load_settings
from proxy.discovery import Discovery
from proxy.errors import ConfigError
from proxy.events import ConfigRejected, ConfigReloaded, EventBus
from proxy.manager import ModelManager

log = logging.getLogger("proxy.reload")

# Settings a running proxy cannot take: each is read once, at start-up (the socket, the Host/Origin policy
# and CORS middleware, the memory and content-id caches, the jobs database, the log files, logging).
RESTART_ONLY = (
    "host",
    "port",
    "header_timeout",
    "max_connections",
    "cors_origins",
    "allowed_hosts",
    "models_dir",
    "data_dir",
    "jobs_ttl",
    "jobs_max_queued",
    "jobs_max_queued_per_key",
    "jobs_max_bytes_per_key",
    "log_dir",
    "log_file_bytes",
    "log_level",
    "cluster",  # the node's name, Redis and secret are taken at start (proxy/cluster/node.py)
)

Install = Callable[[Settings, KeyRing], None]


@dataclass(frozen=True)
class ReloadFrom:
    """Where a serving proxy re-reads its configuration from (``create_app(..., reload=)``): config.yml's
    path, the command line's overrides (host, port), and what triggers a reload."""

    path: Path
    overrides: Mapping[str, Any] = field(default_factory=dict)
    signal: bool = True  # SIGHUP (only where the event loop runs in the main thread)
    watch: bool = False  # file changes (proxy serve --watch)


def read(path: Path, overrides: Mapping[str, Any]) -> tuple[Settings, KeyRing]:
    """The whole configuration, or a ConfigError (blocking: file reads)."""
    settings = load_settings(path, **overrides)
    return settings, KeyRing.load(settings.api_tokens, settings.jwt_secret)


def _changes(before: Mapping[str, ModelConfig], after: Mapping[str, ModelConfig]) -> tuple[list[str], ...]:
    added = [n for n in after if n not in before]
    removed = [n for n in before if n not in after]
    changed = [n for n in after if n in before and after[n] != before[n]]
    return added, removed, changed


class Reloader:
    """Re-reads the configuration on demand (``reload``), on SIGHUP (``listen``) and on file changes
    (``watch``), one reload at a time."""

    def __init__(
        self,
        path: Path,
        overrides: Mapping[str, Any],
        settings: Settings,
        manager: ModelManager,
        discovery: Discovery,
        events: EventBus,
        install: Install,
    ) -> None:
        self.path = path
        self.overrides = dict(overrides)
        self.settings = settings
        self.manager = manager
        self.discovery = discovery
        self.events = events
        self.install = install
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._signal = False

    async def reload(self, trigger: str) -> bool:
        """Read and apply the configuration; False when it was refused (the old one keeps serving)."""
        async with self._lock:
            try:
                settings, keys = await anyio.to_thread.run_sync(read, self.path, self.overrides)
            except ConfigError as exc:
                log.error("config reload (%s) refused; the old configuration keeps serving: %s", trigger, exc)
                self.events.publish(ConfigRejected(trigger=trigger, error=str(exc)))
                return False
            # what the catalog was (a model that waits to restart counts by the config it will take)
            before = {c.name: c for c in self.manager.configs}
            before.update({c.name: c for c in self.manager.pending_configs})
            await self.discovery.rescan(self.manager, settings)
            catalog = dataclasses.replace(settings, models=tuple(self.manager.configs))
            after = {c.name: c for c in (*self.discovery.configured, *self.discovery.found)}
            added, removed, changed = _changes(before, after)
            restart = [f for f in RESTART_ONLY if getattr(settings, f) != getattr(self.settings, f)]
            self.settings = settings
            self.install(catalog, keys)
            log.info(
                "config reloaded (%s): %s added, %s removed, %s changed (they restart when idle)",
                trigger,
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
                ", ".join(changed) or "none",
            )
            if restart:
                log.warning("config reload (%s): %s change only at the next restart", trigger, ", ".join(restart))
            self.events.publish(
                ConfigReloaded(
                    trigger=trigger,
                    added=tuple(added),
                    removed=tuple(removed),
                    changed=tuple(changed),
                    needs_restart=tuple(restart),
                )
            )
            return True

    def soon(self, trigger: str) -> None:
        """Reload in a task (from a signal handler or a callback)."""
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def listen(self) -> None:
        """Reload on SIGHUP (the main thread's event loop only: where the server runs)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.soon, "SIGHUP")
        self._signal = True

    def watched(self) -> tuple[list[Path], Callable[[Any, str], bool]]:
        """The folders to watch (not recursively) and the filter that keeps the configuration's files."""
        files = {self.path.resolve()}
        if self.settings.api_tokens is not None:
            files.add(self.settings.api_tokens.resolve())
        configs = self.settings.configs_dir.resolve()
        folders = {f.parent for f in files} | ({configs} if configs.is_dir() else set())

        def wanted(change: Any, path: str) -> bool:
            p = Path(path)
            return p in files or (p.parent == configs and p.suffix in (".yaml", ".yml"))

        return sorted(f for f in folders if f.is_dir()), wanted

    def watch(self) -> None:
        """Reload when config.yml, api_tokens.yml or a file in configs/ changes (watchfiles, debounced)."""
        from watchfiles import awatch

        folders, wanted = self.watched()

        async def run() -> None:
            async for changes in awatch(*folders, watch_filter=wanted, recursive=False):
                names = sorted({Path(p).name for _, p in changes})
                await self.reload(f"changed: {', '.join(names)}")

        log.info("watching %s for configuration changes", ", ".join(str(f) for f in folders))
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._signal:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._signal = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
