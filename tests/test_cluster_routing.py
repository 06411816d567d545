"""proxy/cluster/routing.py: the issue's rules as tables, and properties with hypothesis."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
    # placement, in the order
    (
        "fits without evicting beats has its weights",
        view(
            node("a", catalog=()),
            node("b", STOPPED, ModelPresence("x", "ready", ram=8 * GiB), free_ram=0),
            node("c", STOPPED, weights=()),
        ),
        to("c", "place"),
    ),
    (
        "has its weights beats this node",
        view(node("a", STOPPED, weights=()), node("b", STOPPED)),
        to("b", "place"),
    ),
    (
        "this node beats more free memory",
        view(node("a", STOPPED), node("b", STOPPED, free_ram=15 * GiB)),
        Here("place"),
    ),
    (
        "most free memory",
        view(node("a", catalog=()), node("b", STOPPED, free_ram=3 * GiB), node("c", STOPPED, free_ram=5 * GiB)),
        to("c", "place"),
    ),
    (
        "fewest loads in progress",
        view(
            node("a", catalog=()),
            node("b", STOPPED, ModelPresence("x", "starting", ram=0)),
            node("c", STOPPED, ModelPresence("x", "stopped", ram=0)),
        ),
        to("c", "place"),
    ),
    (
        "a busy model is never evicted for a remote request: wait where it fits the budget",
        view(
            node("a", catalog=()), node("b", STOPPED, ModelPresence("x", "ready", in_flight=1, ram=8 * GiB), free_ram=0)
        ),
        to("b", "wait"),
    ),
    (
        "an idle model may be evicted there",
        view(
            node("a", catalog=()),
            node("b", STOPPED, ModelPresence("x", "ready", ram=8 * GiB), free_ram=0),
            node("c", STOPPED, ModelPresence("x", "ready", in_flight=1, ram=8 * GiB), free_ram=0),
        ),
        to("b", "place"),
    ),
    (
        "bigger than every budget: its node answers 507",
        view(node("a", catalog=()), node("b", STOPPED, ram_budget=GiB // 2)),
        to("b", "too-big"),
    ),
    ("bigger than this node's budget: here answers 507", view(node("a", STOPPED, ram_budget=GiB // 2)), Here("place")),
    (
        "GPU: what fits in one GPU's free VRAM beats more VRAM free in all that needs an eviction",
        view(
            node("a", catalog=()),
            node(
                "b",
                ModelPresence("m", "stopped", vram=4 * GiB),
                ModelPresence("x", "ready", vram=2 * GiB),
                free_vram=(3 * GiB, 3 * GiB),
                vram_budget=(8 * GiB, 8 * GiB),
            ),
            node(
                "c", ModelPresence("m", "stopped", vram=4 * GiB), free_vram=(0, 4 * GiB), vram_budget=(8 * GiB, 8 * GiB)
            ),
        ),
        to("c", "place"),
    ),
]

REPLICAS: list[tuple[str, ClusterView, int, Route]] = [
    (
        "one replica: the busy holder",
        view(node("a", catalog=()), node("b", BUSY), node("c", STOPPED)),
        1,
        to("b", "ready"),
    ),
    (
        "two replicas: a second load",
        view(node("a", catalog=()), node("b", BUSY), node("c", STOPPED)),
        2,
        to("c", "place"),
    ),
    (
        "two replicas, one loading: wait for the holders",
        view(node("a", catalog=()), node("b", BUSY), node("c", LOADING), node("d", STOPPED)),
        2,
        to("b", "ready"),
    ),
    (
        "two replicas, no room for a second: the holder",
        view(node("a", catalog=()), node("b", BUSY), node("c", STOPPED, free_ram=0)),
        2,
        to("b", "ready"),
    ),
    ("two replicas, here has room", view(node("a", STOPPED), node("b", BUSY)), 2, Here("place")),
    (
        "two replicas, here has no room: the holder",
        view(node("a", STOPPED, free_ram=0), node("b", BUSY)),
        2,
        to("b", "ready"),
    ),
]


@pytest.mark.parametrize(("case", "v", "replicas", "expected"), REPLICAS, ids=[t[0] for t in REPLICAS])
def test_replicas(case: str, v: ClusterView, replicas: int, expected: Route) -> None:
    assert go(v, replicas=replicas) == expected


def test_power_of_two_choices_spreads_over_the_holders_and_prefers_the_less_loaded() -> None:
    load = {"b": 0, "c": 1, "d": 2}
    v = view(
        node("a", catalog=()),
        *(node(n, ModelPresence("m", "ready", in_flight=k, parallel=4)) for n, k in load.items()),
    )
    rng = random.Random(1)
    picks = [route(v, "m", forwarded=False, rng=rng) for _ in range(300)]
    counts = {n: sum(1 for p in picks if isinstance(p, Forward) and p.node == n) for n in load}
    # two of three drawn, the less loaded wins: b in 2/3 of draws, c in 1/3, d never
    assert counts["d"] == 0 and 150 < counts["b"] < 250 and 50 < counts["c"] < 150


@pytest.mark.parametrize(("case", "v", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_rules(case: str, v: ClusterView, expected: Route) -> None:
    assert go(v) == expected


def test_forwarded_is_always_here() -> None:
    assert go(view(node("a", catalog=()), node("b", READY)), forwarded=True) == Here("forwarded")


# -- properties -------------------------------------------------------------------------------------------------
STATES = ("stopped", "starting", "ready", "stopping", "failed")


@st.composite
def clusters(draw: st.DrawFn) -> ClusterView:
    names = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=4, unique=True))
    out = []
    for name in names:
        models = []
        for model in draw(st.lists(st.sampled_from(("m", "x", "y")), unique=True, max_size=3)):
            parallel = draw(st.integers(1, 4))
            models.append(
                ModelPresence(
                    model,
                    draw(st.sampled_from(STATES)),
                    in_flight=draw(st.integers(0, parallel)),
                    queued=draw(st.integers(0, 3)),
                    ram=draw(st.integers(0, 12)) * GiB,
                    vram=draw(st.sampled_from((0, 0, 2 * GiB, 6 * GiB))),
                    parallel=parallel,
                )
            )
        gpus = draw(st.integers(0, 2))
        out.append(
            node(
                name,
                *models,
                catalog=tuple(m.name for m in models),
                weights=tuple(m.name for m in models if draw(st.booleans())),
                free_ram=draw(st.integers(0, 16)) * GiB,
                free_vram=tuple(draw(st.integers(0, 8)) * GiB for _ in range(gpus)),
                ram_budget=draw(st.sampled_from((0, 8 * GiB, 16 * GiB))),
                vram_budget=tuple(8 * GiB for _ in range(gpus)),
                alive=name == names[0] or draw(st.booleans()),
            )
        )
    return ClusterView(names[0], {n.node: n for n in out})


def idle_room(n: NodeInfo, model: str) -> tuple[int, int]:
    """What the node could give the model without touching a busy model: free memory plus idle models'."""
    idle = [m for m in n.models if m.name != model and m.state == "ready" and m.in_flight == 0 and m.queued == 0]
    return n.free_ram + sum(m.ram for m in idle), max(n.free_vram, default=0) + sum(m.vram for m in idle)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(clusters(), st.sampled_from(("m", "x", "y", "z")), st.integers(1, 3), st.integers(0, 2**32))
def test_properties(v: ClusterView, model: str, replicas: int, seed: int) -> None:
    r = route(v, model, forwarded=False, replicas=replicas, rng=random.Random(seed))
    assert route(v, model, forwarded=True, replicas=replicas, rng=random.Random(seed)) == Here("forwarded")
    serving = [n for n in v.alive_nodes() if model in n.catalog]
    if not serving:
        assert r == NotFound()
        return
    assert r != NotFound()  # a model some live node serves is never 404
    me = v.nodes[v.here].model(model)
    if me is not None and me.state == "ready" and not me.saturated:
        assert r == Here("ready")
    if isinstance(r, Forward):
        target = v.nodes[r.node]
        assert target.alive and model in target.catalog and r.node != v.here
        assert r.advertise == target.advertise
        need = target.model(model)
        assert need is not None
        if r.reason == "place":
            # placement never over a node's budget, and never counts on a busy model's memory there
            ram, vram = idle_room(target, model)
            assert need.ram <= ram and need.vram <= vram
            assert target.ram_budget == 0 or need.ram <= target.ram_budget
            assert need.vram == 0 or any(b >= need.vram for b in target.vram_budget)
        if r.reason == "wait":
            assert target.ram_budget == 0 or need.ram <= target.ram_budget
        if v.holders(model):
            assert r.reason in ("ready", "busy", "place") and (r.reason == "place" or target.state_of(model) == "ready")


def test_canonical_names_from_every_live_nodes_aliases() -> None:
    v = view(
        node("a", catalog=("m",), aliases=(("mm", "m"),)),
        node("b", catalog=("n",), aliases=(("nn", "n"),)),
        node("c", catalog=("o",), aliases=(("oo", "o"),), alive=False),
    )
    assert [v.canonical(x) for x in ("m", "mm", "nn", "n", "oo", "zz")] == ["m", "m", "n", "n", None, None]
