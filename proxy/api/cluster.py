"""The cluster as clients see it: ``GET /cluster`` (admin key), and the other nodes' models for the union
listings (/v1/models, /api/tags, /api/ps: each model once). A single host (no ``cluster:``) answers 404
here and lists only its own models."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.api.common import caller, every_model, guarded, services
from proxy.auth import Role
from proxy.cluster.view import ModelPresence, NodeInfo
from proxy.errors import NotFound


@guarded(Role.ADMIN)
async def cluster(request: Request) -> Response:
    every_model(request)
    net = services(request).cluster
    if net is None:
        raise NotFound("this proxy is not in a cluster (no cluster: section in config.yml)")
    view = net.view()
    nodes = [view.nodes[name].to_json() for name in sorted(view.nodes, key=lambda n: (n != view.here, n))]
    return JSONResponse({"here": view.here, "connected": view.connected, "nodes": nodes})


def other_models(request: Request) -> list[tuple[str, NodeInfo]]:
    """The models live other nodes serve that this one does not, each once with the first node that has
    it, as far as the caller may see."""
    net = services(request).cluster
    if net is None:
        return []
    mine = caller(request)
    here = {n for cfg in mine.manager.configs for n in (cfg.name, *cfg.aliases)}
    found: dict[str, NodeInfo] = {}
    for node in net.view().alive_nodes():
        for name in node.catalog:
            if name not in here and name not in found and mine.principal.allows((name,)):
                found[name] = node
    return sorted(found.items())


def loaded_elsewhere(request: Request) -> list[tuple[ModelPresence, NodeInfo]]:
    """The models ready on live other nodes and not ready here, each once, as far as the caller may see."""
    net = services(request).cluster
    if net is None:
        return []
    mine = caller(request)
    ready_here = {s.name for s in mine.status() if s.state == "ready"}
    found: dict[str, tuple[ModelPresence, NodeInfo]] = {}
    view = net.view()
    for node in view.alive_nodes():
        if node.node == view.here:
            continue
        for m in node.models:
            if m.state == "ready" and m.name not in ready_here and m.name not in found:
                if mine.principal.allows((m.name,)):
                    found[m.name] = (m, node)
    return [found[n] for n in sorted(found)]


routes = [Route("/cluster", cluster, methods=["GET"])]
