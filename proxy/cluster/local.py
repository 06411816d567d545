"""This node's own state for the registry (``LocalState``), read from its manager: plain reads, as /status does.

Free memory is admission's view (``proxy.admission``): the budget less what the loaded and loading models are
counted at, and no more than what the box has available now less the reserve; per GPU the same with VRAM.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from proxy.admission import budgets
from proxy.cluster.view import HOLDING, LocalState, ModelPresence
from proxy.config import ModelConfig
from proxy.room import snapshot
from proxy.runtime import ModelStatus

if TYPE_CHECKING:
    from proxy.manager import ModelManager


def config_hash(configs: Iterable[ModelConfig]) -> str:
    """A short digest of the model catalog's configs: nodes that differ show different hashes."""
    text = "\n".join(sorted(repr(c) for c in configs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def presence(st: ModelStatus) -> ModelPresence:
    need = st.need or st.config.memory  # a need not found yet: its YAML's, else 0 (unknown)
    return ModelPresence(
        name=st.name,
        state=st.state,
        in_flight=st.in_flight,
        queued=st.queued,
        ram=need.ram if need is not None else 0,
        vram=need.vram if need is not None else 0,
        parallel=st.config.parallel,
        kind=st.config.kind,
        capabilities=tuple(st.config.listed_capabilities),
    )


def _has_weights(config: ModelConfig) -> bool:
    return config.model_path is None or config.model_path.exists()


def local_state(manager: ModelManager) -> LocalState:
    """Every model of the manager's catalog with its state and memory, and the room left on this node."""
    statuses = list(manager.status())
    models = tuple(presence(st) for st in statuses)
    limits = manager.settings.memory
    snap = snapshot(manager.probe)
    whole = budgets(limits, snap)
    ram = cast(dict[str, int], whole["ram"])
    gpus = cast(list[dict[str, int]], whole["gpus"])
    holding = [m for m in models if m.state in HOLDING]
    free_ram = min(int(ram["budget"]) - sum(m.ram for m in holding), snap.ram_available - limits.reserve_ram)
    on_gpu: dict[int, int] = {}
    for st, m in zip(statuses, models, strict=True):
        if m.state in HOLDING and st.device and st.device.startswith("cuda:"):
            index = int(st.device.split(":")[1].split(",")[0])
            on_gpu[index] = on_gpu.get(index, 0) + m.vram
    free_vram = tuple(
        max(0, min(int(g["budget"]) - on_gpu.get(int(g["index"]), 0), int(g["free"]) - limits.reserve_vram))
        for g in gpus
    )
    configs = manager.configs
    return LocalState(
        models=models,
        catalog=tuple(c.name for c in configs),
        weights=tuple(c.name for c in configs if _has_weights(c)),
        free_ram=max(0, free_ram),
        free_vram=free_vram,
        ram_budget=int(ram["budget"]),
        vram_budget=tuple(int(g["budget"]) for g in gpus),
        config_hash=config_hash(configs),
        aliases=tuple((alias, c.name) for c in configs for alias in c.aliases),
    )


def quick_state(manager: ModelManager, last: LocalState) -> LocalState:
    """``last`` with each model's state and request counts as they are now: plain reads of the manager's
    runtimes (``ModelManager.world``), no memory probe, so it is cheap enough to run after every request
    (``ClusterNode.touch``); memory figures stay the last heartbeat's."""
    now = manager.world().models
    models = []
    for m in last.models:
        v = now.get(m.name)
        if v is not None:
            m = dataclasses.replace(m, state=v.state, in_flight=v.in_flight, queued=len(v.tickets))
        models.append(m)
    return dataclasses.replace(last, models=tuple(models))
