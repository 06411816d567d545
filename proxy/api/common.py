"""What every route shares: the app's services, body reading, auth, and lease-bound streams."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from proxy import loading
from proxy.api import forwarding
from proxy.api.perkey import InFlight, caller_id
from proxy.auth import KeyRing, Principal, Role, key_from_headers
from proxy.clock import Clock
from proxy.cluster.net import ClusterNet
from proxy.config import ModelConfig, Settings
from proxy.dialects.blocks import frames
from proxy.dialects.gate import Limits
from proxy.dialects.shaping import require_model
from proxy.digests import Digests
from proxy.errors import BadRequest, Forbidden, ModelNotFound, PayloadTooLarge, ProxyError, UnsupportedMediaType
from proxy.events import EventBus, RequestNote
from proxy.handoff import Handoff
from proxy.jsonbody import OFF_LOOP_BYTES, parse_large, parse_small
from proxy.keepalive import keep_alive_of
from proxy.manager import ModelManager, ModelStatus
from proxy.metrics import Metrics
from proxy.modellogs import LogBook
from proxy.upstream import UpstreamStream

T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ClientOptions:
    """Settings a client API keeps across requests: AUTOMATIC1111's selected checkpoint (POST
    /sdapi/v1/options), used by its requests that name no model. Preferences, not model state: the
    manager still decides what loads. An admin's choice is the shared default; a user key's applies to
    that key only (``checkpoint_of``), so one user cannot move every other client's images."""

    sd_model_checkpoint: str | None = None  # the shared default (set with an admin key)
    per_caller: OrderedDict[str, str] = field(default_factory=OrderedDict)  # caller_id -> its own choice

    def checkpoint_of(self, caller: str | None) -> str | None:
        return self.per_caller.get(caller, self.sd_model_checkpoint) if caller else self.sd_model_checkpoint

    def choose(self, caller: str | None, name: str) -> None:
        """A user key's choice (``caller``), or the shared default (None: an admin's)."""
        if caller is None:
            self.sd_model_checkpoint = name
            return
        self.per_caller.pop(caller, None)
        self.per_caller[caller] = name
        while len(self.per_caller) > MAX_CALLER_OPTIONS:  # tokens are many: forget the oldest choices
            self.per_caller.popitem(last=False)


MAX_CALLER_OPTIONS = 10_000


@dataclass(frozen=True)
class Services:
    settings: Settings
    manager: ModelManager
    keys: KeyRing
    clock: Clock
    events: EventBus
    metrics: Metrics
    logs: LogBook
    options: ClientOptions = field(default_factory=ClientOptions)
    digests: Digests = field(default_factory=lambda: Digests(None))  # weight files' sha256 (/api/pull)
    # large bodies are parsed in a thread, this many at a time (each may take memory several times its
    # size while it is turned into Python objects)
    parses: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(PARSE_SLOTS))
    in_flight: InFlight = field(default_factory=InFlight)  # requests per caller (limits.max_concurrent_per_key)
    cluster: ClusterNet | None = None  # cluster: in config.yml (proxy.api.forwarding); None: this host alone


PARSE_SLOTS = 2


def services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def limits(request: Request) -> Limits:
    """What ``config.yml``'s limits bound in a request, for the gate (``proxy.dialects.gate``)."""
    return Limits.of(services(request).settings)


# a request the proxy makes to itself (a job: proxy.api.jobs) carries its owner's Principal in its ASGI
# scope, which no client can set
INTERNAL_PRINCIPAL = "proxy.internal_principal"


def guarded(role: Role) -> Callable[[Handler], Handler]:
    """Check the caller's key or token before the handler runs (401/403 in the caller's dialect); the
    handler then sees the models through ``caller(request)``."""

    def wrap(handler: Handler) -> Handler:
        async def checked(request: Request) -> Response:
            internal = request.scope.get(INTERNAL_PRINCIPAL)
            svc = services(request)
            net = svc.cluster
            if isinstance(internal, Principal):
                if internal.role < role:
                    raise Forbidden(f"this needs {role.name.lower()} rights")
                principal = internal
            elif net is not None and forwarding.FORWARD in request.headers:  # another node's, signed
                request, accepted = await forwarding.accept(net, request, svc.settings.max_body_bytes)
                principal = accepted.caller.principal
                if principal.role < role:
                    raise Forbidden(f"this needs {role.name.lower()} rights")
                request.state.caller = accepted.caller.id  # counted on the node it came to
                request.state.owner = accepted.caller.owner  # whose jobs (proxy.api.jobs.owner_of)
            else:
                key = key_from_headers(request.headers)
                principal = svc.keys.authenticate(key, role)
                who = caller_id(None if svc.keys.open else key, request.client.host if request.client else None)
                request.state.caller = who
                if role < Role.ADMIN:  # user routes count; an admin can always watch and unload
                    svc.in_flight.hold(request.scope, who, svc.settings.max_concurrent_per_key)
            request.state.principal = principal
            request.state.role = principal.role
            if net is None:
                return await handler(request)
            try:
                return await handler(request)
            except forwarding.Routing as routing:  # served by another node, or after a load lease
                who = getattr(request.state, "caller", None) or caller_id(None, None)
                return await forwarding.follow(net, request, handler, routing, principal, who)

        checked.__name__ = handler.__name__
        return checked

    return wrap


def public_principal(svc: Services) -> Principal:
    """Who a request without a key is on a public view (``public_listing``, public /metrics): it sees every
    model, unless keys scoped to some models are configured: then only the models that every scoped key
    may see, so leaving the key out shows a scoped caller nothing more. (A JWT's scope is not known before it
    comes: with scoped tokens, turn the public views off.)"""
    scopes = [Principal(Role.USER, models) for _, models in svc.keys.scopes]
    if not scopes:
        return Principal(Role.NONE)
    shared = (names for cfg in svc.manager.configs if all(p.allows(names := (cfg.name, *cfg.aliases)) for p in scopes))
    return Principal(Role.NONE, frozenset(name for names in shared for name in names))


def public_listing(enabled: Callable[[Settings], bool]) -> Callable[[Handler], Handler]:
    """A listing served without a key when ``enabled(settings)`` (Open WebUI fetches the audio listings
    with no Authorization header at all), of the models ``public_principal`` sees; a request that sends a
    key is checked as usual (401 for a bad one)."""

    def wrap(handler: Handler) -> Handler:
        user = guarded(Role.USER)(handler)

        async def checked(request: Request) -> Response:
            sent = "authorization" in request.headers or "x-api-key" in request.headers
            if sent or not enabled(services(request).settings):
                return await user(request)
            request.state.principal = public_principal(services(request))
            request.state.role = Role.NONE
            return await handler(request)

        checked.__name__ = handler.__name__
        return checked

    return wrap


def role_of(request: Request) -> Role:
    """The caller's role, as ``guarded`` found it."""
    role: Role = getattr(request.state, "role", Role.NONE)
    return role


_NOBODY = Principal(Role.NONE, frozenset())  # a route that checked no key sees no model


class View:
    """The caller's view of the models: only those its key or token is scoped to. Every route lists and
    resolves models through it (``caller(request)``), never through the manager directly, so a scoped
    caller sees only its models in every list and gets 404 for the others, as if they did not exist."""

    def __init__(self, manager: ModelManager, principal: Principal) -> None:
        self.manager = manager
        self.principal = principal

    def allows(self, cfg: ModelConfig) -> bool:
        return self.principal.allows((cfg.name, *cfg.aliases))

    @property
    def configs(self) -> list[ModelConfig]:
        return [cfg for cfg in self.manager.configs if self.allows(cfg)]

    def resolve(self, name: object) -> ModelConfig:
        """The model by that name or alias; ModelNotFound (404) when there is none or the caller may not see it."""
        cfg = self.manager.resolve(name)
        if not self.allows(cfg):
            raise ModelNotFound(str(name))
        return cfg

    def status(self) -> Iterator[ModelStatus]:
        for s in self.manager.status():
            if self.allows(s.config):
                yield dataclasses.replace(s, waiting=self.hide_others(s.waiting)) if s.waiting else s

    def hide_others(self, text: str | None) -> str | None:
        """A reason that may name other models ("waiting for memory: ...; unloading sd-xl", a 507's pinned
        models) with the models this caller may not see named "another model" instead."""
        if self.principal.models is None or not text:
            return text
        hidden = {n for cfg in self.manager.configs if not self.allows(cfg) for n in (cfg.name, *cfg.aliases)}
        if not hidden:
            return text
        names = "|".join(re.escape(n) for n in sorted(hidden, key=len, reverse=True))
        return re.sub(rf"(?<![\w.:-])(?:{names})(?![\w.:-])", "another model", text)

    async def unload_all(self, *, force: bool = False) -> list[str]:
        if self.principal.models is None:
            return await self.manager.unload_all(force=force)
        loaded = [s.name for s in self.status() if s.state in ("ready", "starting")]
        return [name for name in loaded if await self.manager.unload(name, force=force)]


def every_model(request: Request) -> None:
    """Views that span every model (the event stream, the last requests, a rescan) are for unscoped
    callers only: a scoped key or token gets 403 there, never a glimpse of the models it may not see."""
    principal: Principal = getattr(request.state, "principal", _NOBODY)
    if principal.models is not None:
        raise Forbidden("this view spans every model; it needs a key or token not scoped to some models")


def caller(request: Request) -> View:
    """The caller's view of the models (what ``guarded`` found it may see)."""
    principal: Principal = getattr(request.state, "principal", _NOBODY)
    return View(services(request).manager, principal)


def size_limited(request: Request, limit: int | None = None) -> Request:
    """The same request, whose body raises PayloadTooLarge (413) past ``limit`` (``limits.max_body_bytes``
    by default): by its declared length at once, else as it is read. Every route reads its body through this."""
    limit = limit if limit is not None else services(request).settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    seen = 0
    receive = request.receive

    async def counting() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"the request body is over the limit of {limit} bytes")
        return message

    return Request(request.scope, counting)


def _is_json(content_type: str | None) -> bool:
    """application/json or any ``+json`` type; no Content-Type at all is taken as JSON (scripts, curl
    --data-binary with -H omitted); browsers cannot send JSON cross-site without a CORS preflight."""
    if content_type is None:
        return True
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object: 415 unless it is sent as JSON, 413 past ``limits.max_json_bytes``, 400
    when it is not a JSON object (``proxy.jsonbody``). A large body is parsed in a thread, PARSE_SLOTS at
    a time, so the event loop never waits on it long."""
    content_type = request.headers.get("content-type")
    if not _is_json(content_type):
        raise UnsupportedMediaType(
            f"this endpoint takes JSON: send Content-Type: application/json (got '{content_type}')"
        )
    svc = services(request)
    limited = size_limited(request, svc.settings.max_json_bytes)
    raw = b"".join([chunk async for chunk in limited.stream()])
    if svc.cluster is not None and INTERNAL_PRINCIPAL not in request.scope:
        request.scope[forwarding.RAW] = raw  # forwarded as it came, if another node serves it
    if len(raw) <= OFF_LOOP_BYTES:
        return parse_small(raw)
    async with svc.parses:
        return await anyio.to_thread.run_sync(parse_large, raw, svc.settings.max_json_values)


async def kept(request: Request, limit: int | None = None) -> Request:
    """The request, its body bounded as ``size_limited`` bounds it; with a cluster, that body read whole and
    kept as the client sent it (``forwarding.RAW``: forwarded as it came if another node serves it, as
    ``read_json`` keeps a JSON body), and given again. Routes whose body is not JSON (multipart
    transcription) or that route before reading it (jobs) call this first."""
    limited = size_limited(request, limit)
    svc = services(request)
    scope = request.scope
    if svc.cluster is None or INTERNAL_PRINCIPAL in scope or forwarding.FORWARDED in scope:
        return limited
    raw = b"".join([chunk async for chunk in limited.stream()])
    scope[forwarding.RAW] = raw
    return forwarding.given_again(request, raw)


def routed(request: Request, name: str) -> ModelConfig:
    """The model ``name`` names, in the caller's view; with a cluster, ``forwarding.Routing`` when another
    node serves it (or a load lease must be taken first), ModelNotFound when no live node has it."""
    view = caller(request)
    net = services(request).cluster
    if net is None:
        return view.resolve(name)
    return forwarding.route_model(net, request.scope, name, view.resolve, lambda n: view.principal.allows((n,)))


def checked_keep_alive(request: Request, keep_alive: float | None) -> float | None:
    """A keep_alive the caller may ask for: 0 (unload now) and forever need an admin key (403); a user
    key's is capped at ``limits.max_user_keep_alive``."""
    if keep_alive is None or role_of(request) >= Role.ADMIN:
        return keep_alive
    if keep_alive == 0:
        raise Forbidden("unloading a model (keep_alive 0) needs an admin key", param="keep_alive")
    if math.isinf(keep_alive):
        raise Forbidden("keeping a model loaded for ever (negative keep_alive) needs an admin key", param="keep_alive")
    return min(keep_alive, services(request).settings.max_user_keep_alive)


def model_for(
    request: Request, body: dict[str, Any], needs: tuple[str, ...], refusal: str
) -> tuple[ModelConfig, float | None]:
    """The model a body names and its keep_alive (taken out of the body), if it can do one of ``needs``."""
    model = require_model(body)
    keep_alive = checked_keep_alive(request, keep_alive_of(body))
    cfg = routed(request, model)  # served here, or Routing (proxy.api.forwarding)
    note = RequestNote.of(request.scope)
    if note is not None:
        note.for_model(cfg.name)
    if not set(needs) & set(cfg.capabilities):
        raise BadRequest(f"model '{cfg.name}' {refusal}", param="model")
    return cfg, keep_alive


async def leased_stream(
    request: Request,
    cfg: ModelConfig,
    keep_alive: float | None,
    path: str,
    body: bytes,
    relay: Callable[[UpstreamStream], AsyncIterator[bytes]],
    on_error: Callable[[ProxyError], bytes],
    handoff: Handoff | None = None,
) -> Response:
    """A streamed SSE answer from the model's worker, with loading feedback while it loads (``proxy.loading``);
    ``handoff``: the worker may write it to the client itself (``proxy.handoff``)."""
    svc = services(request)
    interval = svc.settings.loading_comment_interval
    return await loading.leased_stream(
        svc.manager, cfg, keep_alive, request, path, body, relay, on_error, interval, handoff
    )


def json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


Events = list[tuple[str, dict[str, Any]]]


class EventTranslator(Protocol):
    """OpenAI chat chunks in, a dialect's named SSE events out (Anthropic's, the Responses API's)."""

    @property
    def done(self) -> bool: ...  # ended early (a stop sequence): the worker is stopped by closing its stream

    def start(self) -> Events: ...

    def feed(self, chunk: dict[str, Any]) -> Events: ...

    def finish(self) -> Events: ...


async def named_events(
    upstream: UpstreamStream, tr: EventTranslator, on_error: Callable[[ProxyError], Events]
) -> AsyncIterator[bytes]:
    """The worker's stream, translated event by event; an error ends it with the dialect's own events."""
    try:
        yield frames(tr.start())
        async for chunk in upstream.events():
            out = tr.feed(chunk)
            if out:
                yield frames(out)
            if tr.done:
                break
        yield frames(tr.finish())
    except ProxyError as exc:
        yield frames(on_error(exc))
