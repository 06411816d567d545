"""Where a request for a model goes: here, forwarded to one other node, or nowhere. Pure: plain data in
(``ClusterView``), one answer out; the random choice is injected. The rules, in order (issue 27):

1. a forwarded request is served here (one hop at most);
2. the model is ready here and not saturated: here;
3. it is ready on some nodes: the one with the fewest outstanding requests (per slot) among two of them
   picked at random (power of two choices; here wins a tie); unless every one is saturated and ``replicas``
   allows another load, then placement (5) over the nodes that have none, where it fits;
4. it is loading somewhere (or a load lease reserves it there): there (here when here is one of them);
5. nowhere: placement by memory over the live nodes that can serve it, best first: fits in what is free
   without evicting > has its weights on disk > this node > most free memory > fewest loads in progress.
   A remote node is a candidate only where the model fits in its free memory plus its idle models' (a busy
   model is never evicted for a remote request); this node always is (its own admission waits or answers
   507). No candidate: the remote node whose budget can hold the model, to wait there (else one that can
   serve it, whose admission answers 507); 404 when no live node can serve it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.cluster.view import ClusterView, ModelPresence, NodeInfo


@dataclass(frozen=True)
class Here:
    reason: str = "ready"  # forwarded, ready, busy, loading, place


@dataclass(frozen=True)
class Forward:
    node: str
    advertise: str
    reason: str  # ready, busy, loading, place, wait, too-big


@dataclass(frozen=True)
class NotFound:
    pass


Route = Here | Forward | NotFound

_RNG = random.Random()  # one for the process: seeding a new one per request costs a getrandom call and more


def route(
    view: ClusterView,
    model: str,
    *,
    forwarded: bool,
    replicas: int = 1,
    rng: random.Random | None = None,
) -> Route:
    """Where a request for ``model`` (its canonical name) goes; see the module's docstring."""
    if forwarded:
        return Here("forwarded")
    me = view.me
    mine = me.model(model) if me is not None else None
    if mine is not None and mine.state == "ready" and not mine.saturated:
        return Here("ready")
    holders = view.holders(model)
    loaders = view.loaders(model)
    if holders:
        if all(_presence(n, model).saturated for n in holders) and len(holders) + len(loaders) < replicas:
            placed = _place(view, model, exclude={n.node for n in (*holders, *loaders)}, extra=True)
            if placed is not None:
                return placed
        busy_here = mine is not None and mine.state == "ready"
        return _to(view, _two_choices(view, model, holders, rng or _RNG), "busy" if busy_here else "ready")
    if loaders:
        return _to(view, _least_outstanding(view, model, loaders), "loading")
    placed = _place(view, model, exclude=set())
    return placed if placed is not None else NotFound()


def _presence(node: NodeInfo, model: str) -> ModelPresence:
    p = node.model(model)
    return p if p is not None else ModelPresence(model, "stopped")


def _load(node: NodeInfo, model: str) -> float:
    p = _presence(node, model)
    return p.outstanding / p.parallel


def _least_outstanding(view: ClusterView, model: str, nodes: Sequence[NodeInfo]) -> NodeInfo:
    return min(nodes, key=lambda n: (_load(n, model), n.node != view.here, n.node))


def _two_choices(view: ClusterView, model: str, nodes: Sequence[NodeInfo], rng: random.Random) -> NodeInfo:
    picked = list(nodes) if len(nodes) <= 2 else rng.sample(list(nodes), 2)
    return _least_outstanding(view, model, picked)


def _to(view: ClusterView, node: NodeInfo, reason: str) -> Here | Forward:
    if node.node == view.here:
        return Here(reason)
    return Forward(node.node, node.advertise, reason)


def fits_free(node: NodeInfo, model: str) -> bool:
    """The model's need fits in what the node has free, evicting nothing."""
    p = _presence(node, model)
    return p.ram <= node.free_ram and (p.vram == 0 or any(f >= p.vram for f in node.free_vram))


def fits_idle(node: NodeInfo, model: str) -> bool:
    """The need fits in what is free plus what the node's idle loaded models hold (which its admission may
    evict); busy models' memory does not count. VRAM: the freest GPU plus every idle model's VRAM, since the
    registry does not say which GPU a model is on (an optimistic bound; the node's admission is exact)."""
    p = _presence(node, model)
    idle = [m for m in node.models if m.name != model and m.state == "ready" and not m.busy]
    ram_ok = p.ram <= node.free_ram + sum(m.ram for m in idle)
    vram_ok = p.vram == 0 or (bool(node.free_vram) and p.vram <= max(node.free_vram) + sum(m.vram for m in idle))
    return ram_ok and vram_ok and within_budget(node, model)


def within_budget(node: NodeInfo, model: str) -> bool:
    """The need is no more than the node's whole budget (0: budget not published, taken as no limit)."""
    p = _presence(node, model)
    ram_ok = node.ram_budget == 0 or p.ram <= node.ram_budget
    vram_ok = p.vram == 0 or not node.vram_budget or any(b >= p.vram for b in node.vram_budget)
    return ram_ok and vram_ok


def _place(view: ClusterView, model: str, exclude: set[str], extra: bool = False) -> Here | Forward | None:
    """Where to load it; ``extra``: one more replica, only where it fits (else None: the holders serve)."""
    serving = [n for n in view.serving(model) if n.node not in exclude]
    if not serving:
        return None
    candidates = [n for n in serving if (n.node == view.here and not extra) or fits_idle(n, model)]
    if candidates:
        best = max(
            candidates,
            key=lambda n: (
                fits_free(n, model),
                model in n.weights,
                n.node == view.here,
                n.free_ram + sum(n.free_vram),
                -n.loads_in_progress,
                # the same answer on every node for the same view: the name decides the last tie
                [-ord(c) for c in n.node],
            ),
        )
        return _to(view, best, "place")
    if extra:
        return None
    roomy = [n for n in serving if within_budget(n, model)]
    if roomy:
        best = max(roomy, key=lambda n: (n.free_ram + sum(n.free_vram), [-ord(c) for c in n.node]))
        return _to(view, best, "wait")
    return _to(view, serving[0], "too-big")  # its admission answers 507 in the client's dialect
