"""proxy/cluster/routing.py: the issue's rules as tables, and properties with hypothesis."""

from __future__ import annotations

import random
from typing import Any

import pytest

from proxy.cluster.routing import Forward, Here, NotFound, Route, route
from proxy.cluster.view import ClusterView, ModelPresence, NodeInfo

GiB = 1 << 30


def node(name: str, *models: ModelPresence, catalog: tuple[str, ...] = ("m",), **kw: Any) -> NodeInfo:
    base: dict[str, Any] = {
        "node": name,
        "advertise": f"http://{name}",
        "epoch": 1,
        "config_hash": "",
        "models": models,
        "catalog": catalog,
        "free_ram": 8 * GiB,
        "free_vram": (),
        "age": 0.0,
        "alive": True,
        "weights": catalog,
        "ram_budget": 16 * GiB,
    }
    base.update(kw)
    return NodeInfo(**base)


def view(*nodes: NodeInfo, here: str = "a") -> ClusterView:
    return ClusterView(here, {n.node: n for n in nodes})


def go(v: ClusterView, model: str = "m", **kw: Any) -> Route:
    return route(v, model, forwarded=kw.pop("forwarded", False), rng=random.Random(0), **kw)


def to(name: str, reason: str) -> Forward:
    return Forward(name, f"http://{name}", reason)


READY = ModelPresence("m", "ready", ram=GiB, parallel=2)
BUSY = ModelPresence("m", "ready", in_flight=2, ram=GiB, parallel=2)
LOADING = ModelPresence("m", "starting", ram=GiB)
STOPPED = ModelPresence("m", "stopped", ram=GiB)

TABLE: list[tuple[str, ClusterView, Route]] = [
    ("ready here", view(node("a", READY), node("b", READY)), Here("ready")),
    ("ready elsewhere", view(node("a", STOPPED), node("b", READY)), to("b", "ready")),
    ("busy here, free there", view(node("a", BUSY), node("b", READY)), to("b", "busy")),
    ("busy everywhere: here wins a tie", view(node("a", BUSY), node("b", BUSY)), Here("busy")),
    ("loading elsewhere", view(node("a", STOPPED), node("b", LOADING)), to("b", "loading")),
    ("loading here", view(node("a", LOADING), node("b", STOPPED)), Here("loading")),
    ("nowhere: here fits", view(node("a", STOPPED), node("b", STOPPED)), Here("place")),
    (
        "nowhere: here has no room, b has",
        view(node("a", STOPPED, free_ram=0), node("b", STOPPED)),
        to("b", "place"),
    ),
    ("nowhere: only b serves it", view(node("a", catalog=()), node("b", STOPPED)), to("b", "place")),
    ("no node serves it", view(node("a", catalog=()), node("b", catalog=())), NotFound()),
    ("a dead holder is left out", view(node("a", STOPPED), node("b", READY, alive=False)), Here("place")),
]


@pytest.mark.parametrize(("case", "v", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_rules(case: str, v: ClusterView, expected: Route) -> None:
    assert go(v) == expected


def test_forwarded_is_always_here() -> None:
    assert go(view(node("a", catalog=()), node("b", READY)), forwarded=True) == Here("forwarded")
