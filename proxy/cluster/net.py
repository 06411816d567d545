"""This node's side of the cluster's network: where a model request goes, the load lease around a first
load, and the hop to the node that serves it. No HTTP framework here (``proxy.api.forwarding`` is the
edge) and no Redis: the registry is ``proxy.cluster.node.ClusterNode``, seen through ``Registry`` so that
importing this module (as ``proxy.api.common`` does) never loads redis-py.

The route is read from the in-memory view (``routing.route``): no Redis round trip on a warm request. A
request that would start a load (routing's placement: nobody has the model, nobody loads it) first takes
the model's load lease for the chosen node; when another node's lease wins, routing is asked again with
that lease in the view and the request follows the load. The lease is given back ``2 x heartbeat`` after
the request that took it has been answered, by when every node's view shows the model where it loaded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from proxy.clock import Clock
from proxy.cluster.hop import Hop, Outcome, Target
from proxy.cluster.routing import Forward, Here, NotFound, Route, route
from proxy.cluster.signing import Signer
from proxy.cluster.view import ClusterView

log = logging.getLogger("proxy.cluster")

PLACING = frozenset({"place", "wait", "too-big"})  # routing's reasons that mean a load nobody has started


class Registry(Protocol):
    """What the network needs of the registry (``ClusterNode``)."""

    def view(self) -> ClusterView: ...

    def touch(self) -> None: ...

    async def lease(
        self, model: str, *, node: str | None = None, ram: int = 0, vram: int = 0, replicas: int = 1
    ) -> Any: ...

    async def release(self, lease: Any) -> None: ...


class ClusterNet:
    def __init__(
        self,
        node: str,
        secret: str,
        registry: Registry,
        clock: Clock,
        *,
        heartbeat: float = 1.0,
        on_forward: Callable[[Outcome], None] | None = None,
    ) -> None:
        self.node = node
        self.registry = registry
        self.clock = clock
        self.heartbeat = heartbeat
        self.signer = Signer(secret, node)
        self.hop = Hop(self.signer, clock, on_forward=on_forward)
        self._tasks: set[asyncio.Task[None]] = set()

    def view(self) -> ClusterView:
        return self.registry.view()

    def decide(self, model: str, *, forwarded: bool = False, replicas: int = 1) -> Route:
        """Where a request for ``model`` (its canonical name) goes now (no I/O)."""
        return route(self.registry.view(), model, forwarded=forwarded, replicas=replicas)

    def needs_lease(self, decision: Route) -> bool:
        return isinstance(decision, Here | Forward) and decision.reason in PLACING

    async def settle(self, model: str, decision: Route, replicas: int = 1) -> tuple[Route, Callable[[], None] | None]:
        """A placement (``needs_lease``) with its load lease taken: the same decision and the lease's
        give-back (call it when the request has been answered), or, when another node's lease won, where
        the request goes now (the loading node), with nothing to give back."""
        target = decision.node if isinstance(decision, Forward) else self.node
        info = self.registry.view().nodes.get(target)
        need = info.model(model) if info is not None else None
        ram, vram = (need.ram, need.vram) if need is not None else (0, 0)
        lease = await self.registry.lease(model, node=target, ram=ram, vram=vram, replicas=replicas)
        if lease is None:  # another node's lease won: the view now shows it loading there
            return self.decide(model, replicas=replicas), None
        return decision, lambda: self._release_later(lease)

    def _release_later(self, lease: Any) -> None:
        """Give the lease back once every node's view shows the model where it loaded."""
        self.registry.touch()
        self.clock.call_later(2 * self.heartbeat, lambda: self._spawn(self.registry.release(lease)))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:  # never let a give-back fail loudly: the lease lapses on its own
                log.exception("cluster: giving back a load lease failed")

        task = asyncio.ensure_future(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def seen(self, view: ClusterView) -> None:
        """A heartbeat's view of the registry: the forwards in flight to a node it shows dead end now (the
        hop's ``cut``). Only a view read from Redis says a node is dead: while Redis is out of reach, or once a
        node stopped cleanly (it is gone from the registry, not dead), its forwards go on."""
        if not view.connected:
            return
        for name in self.hop.open_to():
            info = view.nodes.get(name)
            if info is not None and not info.alive:
                log.warning("cluster: node %s is dead: its %d forwards in flight end", name, self.hop.cut(name))

    def targets(self, model: str, first: Forward) -> list[Target]:
        """Where to forward: the chosen node, then the other live nodes that have the model ready or
        loading (tried only when the first cannot be reached)."""
        view = self.registry.view()
        out = [Target(first.node, first.advertise)]
        for info in (*view.holders(model), *view.loaders(model)):
            if info.node not in (self.node, first.node) and all(t.node != info.node for t in out):
                out.append(Target(info.node, info.advertise))
        return out

    async def close(self) -> None:
        await self.hop.close()
        for task in list(self._tasks):
            task.cancel()


__all__ = ["ClusterNet", "Forward", "Here", "NotFound", "Registry", "Route", "Target"]
