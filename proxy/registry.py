"""The catalog of the manager's runtimes: each model's ``Runtime`` by name, and the names that find it (its
name, its aliases, with or without ``:latest``, a discovered model's content id); a new catalog merged in
(a rescan, a config reload). The manager owns the runtimes' states; this only keeps and finds them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from proxy.config import ModelConfig
from proxy.errors import ModelNotFound
from proxy.runtime import Runtime, State

log = logging.getLogger("proxy.manager")  # its lines are the manager's, as before the split


class Registry:
    def __init__(self, configs: Iterable[ModelConfig], keep_alive: float) -> None:
        self.keep_alive = keep_alive  # the default keep_alive (settings.keep_alive), for models without one
        self.runtimes: dict[str, Runtime] = {}
        self._names: dict[str, Runtime] = {}
        self._content_ids: dict[str, str] = {}  # a discovered model's content id -> its name
        for cfg in configs:
            self.runtimes[cfg.name] = self._new_runtime(cfg)
        self.index()

    def lookup(self, name: object) -> Runtime:
        if not isinstance(name, str) or not name:
            raise ModelNotFound(str(name))
        rt = self._names.get(name)
        if rt is None and name.endswith(":latest"):
            rt = self._names.get(name[: -len(":latest")])
        if rt is None and ":" not in name:
            rt = self._names.get(f"{name}:latest")
        if rt is None:
            raise ModelNotFound(name)
        return rt

    @property
    def configs(self) -> list[ModelConfig]:
        return [rt.config for rt in self.runtimes.values() if not rt.retired]

    @property
    def pending_configs(self) -> list[ModelConfig]:
        """The new configs of loaded models that restart with them when idle (a reload)."""
        return [rt.pending for rt in self.runtimes.values() if rt.pending is not None and not rt.retired]

    def _new_runtime(self, cfg: ModelConfig) -> Runtime:
        return Runtime(cfg, self.default_keep_alive(cfg))

    def default_keep_alive(self, cfg: ModelConfig) -> float:
        return cfg.keep_alive if cfg.keep_alive is not None else self.keep_alive

    def index(self) -> None:
        self._names = {}
        for rt in self.runtimes.values():
            if not rt.retired:
                for name in (rt.config.name, *rt.config.aliases):
                    self._names[name] = rt
        for cid, name in self._content_ids.items():
            owner = self.runtimes.get(name)
            if owner is not None and not owner.retired:
                self._names.setdefault(cid, owner)

    def add_content_id(self, name: str, content_id: str) -> None:
        """Let ``content_id`` name the model ``name`` too (unless that name is taken)."""
        self._content_ids[content_id] = name
        self.index()

    def replace(self, configs: list[ModelConfig], settle: Callable[[Runtime], None], *, defaults: bool) -> None:
        """Merge a new catalog (``ModelManager.replace_models``): a model still in it is kept, with its new
        config ``pending`` when it changed; one no longer in it is retired; a new one is added. ``settle``
        (the manager's ``_forget_or_stop``) is called on each kept or retired one; ``defaults``: the default
        keep_alive changed (a reload), every model's default is taken anew."""
        if defaults:
            for rt in self.runtimes.values():
                rt.default_keep_alive = self.default_keep_alive(rt.config)
        wanted = {cfg.name: cfg for cfg in configs}
        for name, rt in list(self.runtimes.items()):
            if name in wanted:
                rt.retired = False
                cfg = wanted[name]
                rt.pending = cfg if cfg != rt.config else None
                if rt.pending is not None and rt.state not in (State.STOPPED, State.FAILED):
                    log.info("model %s: its config changed; it restarts with it when its requests in flight end", name)
                settle(rt)
            elif not rt.retired:
                rt.retired = True
                rt.pending = None
                log.info("model %s: no longer in the catalog; it unloads when idle", name)
                settle(rt)
        for name, cfg in wanted.items():
            if name not in self.runtimes:
                self.runtimes[name] = self._new_runtime(cfg)
        self.index()

    def renew(self, rt: Runtime) -> None:
        """A stopped model takes its pending config: its need found anew, its keep_alive the new default."""
        assert rt.pending is not None
        rt.config, rt.pending = rt.pending, None
        rt.need, rt.need_task = None, None
        rt.default_keep_alive = rt.keep_alive = self.default_keep_alive(rt.config)
        rt.keep_alive_set = False
        rt.failures, rt.retry_at = 0, 0.0  # a new config deserves a try at once
        self.index()

    def forget(self, rt: Runtime) -> None:
        if self.runtimes.get(rt.config.name) is rt:
            del self.runtimes[rt.config.name]
