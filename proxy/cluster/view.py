"""What a node knows of the cluster: plain, frozen data (no I/O, no clock).

``ClusterNode`` (``proxy.cluster.node``) builds a ``ClusterView`` from Redis each heartbeat and from this node's
own state; ``routing.route`` reads it; ``GET /cluster`` and the union listings show it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

# a model's states as the manager names them (proxy.runtime.State)
HOLDING = ("starting", "ready", "stopping")  # states that hold memory on their node


@dataclass(frozen=True)
class ModelPresence:
    """One model of a node's catalog: its state there, its requests and its memory (bytes).

    ram and vram: what it holds while loaded (measured), else what it would need to load (its need: config,
    measured before, or estimated; 0 when not known yet)."""

    name: str
    state: str  # stopped, starting, ready, stopping, failed
    in_flight: int = 0
    queued: int = 0  # its requests waiting on that node (queue, load)
    ram: int = 0
    vram: int = 0
    parallel: int = 1  # requests it serves at once
    # what it is (llm, embedding, image, speech, transcription) and what the model lists say it can do, as
    # its node's config knows it; None: published by a node that does not say (listed as before: an LLM)
    kind: str | None = None
    capabilities: tuple[str, ...] | None = None

    @property
    def outstanding(self) -> int:
        return self.in_flight + self.queued

    @property
    def saturated(self) -> bool:
        """Every slot taken: one more request would wait."""
        return self.outstanding >= self.parallel

    @property
    def busy(self) -> bool:
        """Serving or waited for: never evicted to make room (admission's rule)."""
        return self.outstanding > 0 or self.state == "starting"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "ram": self.ram,
            "vram": self.vram,
            "parallel": self.parallel,
        }
        if self.kind is not None:
            d["kind"] = self.kind
        if self.capabilities is not None:
            d["capabilities"] = list(self.capabilities)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> ModelPresence:
        kind = d.get("kind")
        caps = d.get("capabilities")
        return cls(
            name=str(d["name"]),
            state=str(d["state"]),
            in_flight=int(d.get("in_flight", 0)),
            queued=int(d.get("queued", 0)),
            ram=int(d.get("ram", 0)),
            vram=int(d.get("vram", 0)),
            parallel=max(1, int(d.get("parallel", 1))),
            kind=str(kind) if kind is not None else None,
            capabilities=tuple(str(c) for c in caps) if isinstance(caps, list) else None,
        )

    @property
    def language_model(self) -> bool:
        """Listed by Ollama's /api/tags and /api/ps (it chats, completes or embeds), as a local model is;
        a model whose node published no capabilities is taken for one (as before they were published)."""
        return self.capabilities is None or bool({"completion", "embedding"} & set(self.capabilities))


@dataclass(frozen=True)
class LocalState:
    """What this node publishes of itself each heartbeat (``proxy.cluster.local.local_state`` reads it from the
    manager): every model of its catalog with its state, what it has room for, and its budgets."""

    models: tuple[ModelPresence, ...] = ()
    catalog: tuple[str, ...] = ()  # the models it can serve (canonical names)
    weights: tuple[str, ...] = ()  # those whose weights are on its disk
    free_ram: int = 0  # bytes it could admit without evicting anything
    free_vram: tuple[int, ...] = ()  # the same per GPU (NVML index order)
    ram_budget: int = 0  # the most all its models together may hold (limits.memory)
    vram_budget: tuple[int, ...] = ()
    config_hash: str = ""
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, canonical name) of its catalog's models


@dataclass(frozen=True)
class NodeInfo:
    """One node as the registry shows it. age: seconds since its last publication, by Redis's clock."""

    node: str
    advertise: str
    epoch: int
    config_hash: str
    models: tuple[ModelPresence, ...]
    catalog: tuple[str, ...]
    free_ram: int
    free_vram: tuple[int, ...]
    age: float
    alive: bool
    weights: tuple[str, ...] = ()
    ram_budget: int = 0
    vram_budget: tuple[int, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()  # (alias, canonical name)

    @cached_property
    def _by_name(self) -> dict[str, ModelPresence]:
        return {m.name: m for m in self.models}

    def model(self, name: str) -> ModelPresence | None:
        return self._by_name.get(name)

    def state_of(self, name: str) -> str | None:
        m = self.model(name)
        return m.state if m is not None else None

    @property
    def loads_in_progress(self) -> int:
        return sum(1 for m in self.models if m.state == "starting")

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "advertise": self.advertise,
            "epoch": self.epoch,
            "config_hash": self.config_hash,
            "models": [m.to_json() for m in self.models],
            "catalog": list(self.catalog),
            "weights": list(self.weights),
            "free_ram": self.free_ram,
            "free_vram": list(self.free_vram),
            "ram_budget": self.ram_budget,
            "vram_budget": list(self.vram_budget),
            "aliases": [list(a) for a in self.aliases],
            "age": self.age,
            "alive": self.alive,
        }


def node_from(local: LocalState, *, node: str, advertise: str, epoch: int, age: float, alive: bool) -> NodeInfo:
    return NodeInfo(
        node=node,
        advertise=advertise,
        epoch=epoch,
        config_hash=local.config_hash,
        models=local.models,
        catalog=local.catalog,
        free_ram=local.free_ram,
        free_vram=local.free_vram,
        age=age,
        alive=alive,
        weights=local.weights,
        ram_budget=local.ram_budget,
        vram_budget=local.vram_budget,
        aliases=local.aliases,
    )


def publication(info: NodeInfo) -> dict[str, Any]:
    """What a node stores in Redis (age and alive are the reader's)."""
    d = info.to_json()
    del d["age"], d["alive"]
    return d


def from_publication(d: Mapping[str, Any], *, age: float, alive: bool) -> NodeInfo:
    return NodeInfo(
        node=str(d["node"]),
        advertise=str(d["advertise"]),
        epoch=int(d.get("epoch", 0)),
        config_hash=str(d.get("config_hash", "")),
        models=tuple(ModelPresence.from_json(m) for m in d.get("models", ())),
        catalog=tuple(str(n) for n in d.get("catalog", ())),
        free_ram=int(d.get("free_ram", 0)),
        free_vram=tuple(int(v) for v in d.get("free_vram", ())),
        age=age,
        alive=alive,
        weights=tuple(str(n) for n in d.get("weights", ())),
        ram_budget=int(d.get("ram_budget", 0)),
        vram_budget=tuple(int(v) for v in d.get("vram_budget", ())),
        aliases=tuple((str(a), str(n)) for a, n in d.get("aliases", ())),
    )


@dataclass(frozen=True)
class ClusterView:
    """Every node this node knows of (itself included, always alive), at one moment."""

    here: str
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    connected: bool = True  # False: Redis is out of reach, and the view is this node alone

    @property
    def me(self) -> NodeInfo | None:
        return self.nodes.get(self.here)

    @cached_property
    def _alive(self) -> tuple[NodeInfo, ...]:
        names = sorted(self.nodes, key=lambda n: (n != self.here, n))
        return tuple(self.nodes[n] for n in names if self.nodes[n].alive)

    def alive_nodes(self) -> Iterator[NodeInfo]:
        """The live nodes, this one first, then by name."""
        return iter(self._alive)

    def serving(self, model: str) -> list[NodeInfo]:
        """The live nodes whose catalog has the model."""
        return [n for n in self.alive_nodes() if model in n.catalog]

    def holders(self, model: str) -> list[NodeInfo]:
        """The live nodes where the model is ready."""
        return [n for n in self.alive_nodes() if n.state_of(model) == "ready"]

    def loaders(self, model: str) -> list[NodeInfo]:
        """The live nodes where the model is loading (or a load lease reserves it)."""
        return [n for n in self.alive_nodes() if n.state_of(model) == "starting"]

    def canonical(self, name: str) -> str | None:
        """A model's name as the live nodes' catalogs know it (itself, or the model an alias names); None when
        no live node knows it. This node's own names come first."""
        for n in self.alive_nodes():
            if name in n.catalog:
                return name
            for alias, model in n.aliases:
                if alias == name:
                    return model
        return None

    def catalog(self) -> list[str]:
        """Every model some live node can serve, each once, sorted."""
        return sorted({name for n in self.alive_nodes() for name in n.catalog})
