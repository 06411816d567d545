"""The cluster at the HTTP edge: a model request routed to the node that serves it, a forward accepted.

Used by ``proxy.api.common`` only when ``cluster:`` is set (``Services.cluster``); a single host never
runs any of this. Where a request is routed: ``model_for`` (after ``guarded`` has checked the key and the
route has read the body and found the model's name, before the manager's acquire) calls ``route_model``,
which answers the local model when it is served here, else raises ``Routing``; ``guarded`` catches it and
``follow`` carries it out: the load lease first when the request would start a load (``ClusterNet.settle``),
then the handler again (served here, ``ROUTED`` in the scope) or the hop to the other node with the body
as the client sent it (``RAW``, kept by ``read_json``). A forward that arrives (``X-Cluster-Forward``) is
checked by ``accept`` (401 unless signed with the cluster's secret within 30 s) and served here whatever
the route (one hop at most), as the caller the entry node found, who is not counted again against
``limits.max_concurrent_per_key`` (its entry node counts it).

``ClusterHeaders``, an ASGI middleware, puts ``X-Served-By: <node>`` on every answer this node serves (a
forwarded answer keeps the serving node's), and on a forward's answer ``X-Cluster-Took``: this node's time
from the request to its answer's headers, which the entry node takes from the hop's time (the forward's
added time, in /metrics).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.api.perkey import SLOTS
from proxy.auth import Principal, key_from_headers
from proxy.clock import Clock
from proxy.cluster.hop import SERVED_BY, TOOK
from proxy.cluster.net import ClusterNet, Target
from proxy.cluster.routing import Forward, Here, NotFound, Route
from proxy.cluster.signing import FORWARD, Caller
from proxy.cluster.signing import Forward as Accepted
from proxy.config import ModelConfig
from proxy.errors import ModelNotFound, PayloadTooLarge, Unavailable
from proxy.errors import NotFound as NotFoundError
from proxy.jobs import owner_of_key

RAW = "proxy.cluster.raw_body"  # in the ASGI scope: the body as the client sent it (read_json keeps it)
FORWARDED = "proxy.cluster.forwarded"  # the node a verified forward came from
ROUTED = "proxy.cluster.routed"  # routed already: served here
ARRIVED = "proxy.cluster.arrived"  # when a forward arrived (the clock's monotonic seconds)


class Routing(Exception):
    """Not served here as it is: ``follow`` takes the lease, forwards, or runs the handler again."""

    def __init__(self, model: str, asked: str, decision: Route, replicas: int = 1, *, pinned: bool = False) -> None:
        super().__init__(model)
        self.model = model
        self.asked = asked
        self.decision = decision
        self.replicas = replicas  # its YAML's replicas where this node has it, else 1
        self.pinned = pinned  # only the decision's node has it (a job it stores): no other node is tried


def target_of(request: Request) -> str:
    """The path with its query, as signed: what ``request.url.path`` and ``.query`` say, read from the scope
    (building ``request.url`` costs more than the rest of the forward's routing)."""
    scope = request.scope
    path: str = scope["path"].replace("?", "%3F").replace("#", "%23").replace("\\", "%5C")
    query: bytes = scope.get("query_string", b"")
    return path + "?" + query.decode() if query else path


def route_model(
    net: ClusterNet, scope: Scope, name: str, resolve: Callable[[str], ModelConfig], allows: Callable[[str], bool]
) -> ModelConfig:
    """The local model to serve ``name`` with; Routing when the cluster serves it elsewhere (or a load
    lease must be taken first); ModelNotFound when no live node has it."""
    if scope.get(FORWARDED) is not None or scope.get(ROUTED) or RAW not in scope:
        return resolve(name)
    try:
        cfg: ModelConfig | None = resolve(name)
    except ModelNotFound:
        cfg = None
    if cfg is not None:
        model = cfg.name
    else:  # served elsewhere only: by its name or an alias another node publishes
        view = net.view()
        found = view.canonical(name) or view.canonical(name.removesuffix(":latest"))
        if found is None or not (allows(found) or allows(name)):
            raise ModelNotFound(name)
        model = found
    replicas = cfg.replicas if cfg is not None else 1
    decision = net.decide(model, replicas=replicas)
    if cfg is not None and isinstance(decision, Here) and not net.needs_lease(decision):
        return cfg
    if isinstance(decision, NotFound):
        raise ModelNotFound(name)
    raise Routing(model, name, decision, replicas)


def route_to_node(net: ClusterNet, scope: Scope, node: str, what: str) -> None:
    """Routing to ``node``, which alone has ``what`` (a job it stores), unless it is this node or the request
    came from another node; NotFound when no node of that name is known, Unavailable (503) when it is not
    alive (its jobs come back with it)."""
    if node == net.node or scope.get(FORWARDED) is not None or scope.get(ROUTED) or RAW not in scope:
        return
    info = net.view().nodes.get(node)
    if info is None:
        raise NotFoundError(f"{what} not found (no node '{node}' in the cluster)")
    if not info.alive:
        raise Unavailable(f"{what} is on node '{node}', which is not reachable now", retry_after=net.heartbeat * 3)
    raise Routing(what, what, Forward(node, info.advertise, "holds"), pinned=True)


async def accept(net: ClusterNet, request: Request, max_bytes: int) -> tuple[Request, Accepted]:
    """A forward from another node, verified (Unauthorized otherwise), and the request to serve it with:
    its body read (to check its digest) and given again to the handler."""
    chunks: list[bytes] = []
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > max_bytes:
            raise PayloadTooLarge(f"the request body is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    accepted = net.signer.verify(request.method, target_of(request), body, request.headers, net.clock.time())
    request.scope[FORWARDED] = accepted.node
    request.scope[ARRIVED] = net.clock.monotonic()
    return given_again(request, body), accepted


def given_again(request: Request, body: bytes) -> Request:
    """The request, its body (already read) given again to whoever reads it next."""
    sent = False
    receive = request.receive

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # the client's going away, as before

    return Request(request.scope, replay)


async def follow(
    net: ClusterNet,
    request: Request,
    handler: Callable[[Request], Awaitable[Response]],
    routing: Routing,
    principal: Principal,
    who: str,
) -> Response:
    decision = routing.decision
    if net.needs_lease(decision):
        decision, give_back = await net.settle(routing.model, decision, routing.replicas)
        if give_back is not None:
            held = request.scope.get(SLOTS)
            if isinstance(held, list):
                held.append(give_back)  # when the answer has been sent (PerKeyLimit)
            else:
                give_back()
    body: bytes = request.scope[RAW]
    if isinstance(decision, NotFound):
        raise ModelNotFound(routing.asked)
    if isinstance(decision, Here):
        request.scope[ROUTED] = True
        return await handler(given_again(request, body))
    assert isinstance(decision, Forward)
    targets = [Target(decision.node, decision.advertise)] if routing.pinned else net.targets(routing.model, decision)
    key = key_from_headers(request.headers)
    caller = Caller(principal, who, owner_of_key(key or ""))  # the owner: the jobs it makes and sees there
    return await net.hop.forward(request.method, target_of(request), request.headers, body, caller, targets)


class ClusterHeaders:
    """ASGI middleware: ``X-Served-By`` on every answer (unless a forwarded one has it), ``X-Cluster-Took``
    on the answers to forwards."""

    def __init__(self, app: ASGIApp, *, node: str, clock: Clock) -> None:
        self.app = app
        self.node = node.encode()
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        served_by = SERVED_BY.encode()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == served_by for k, _ in headers):
                    headers.append((served_by, self.node))
                arrived = scope.get(ARRIVED)
                if isinstance(arrived, float) and FORWARDED in scope:
                    took = self.clock.monotonic() - arrived
                    headers.append((TOOK.encode(), f"{took:.6f}".encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


__all__ = ["FORWARD", "ClusterHeaders", "Routing", "accept", "follow", "route_model"]
