"""One in-process stream of what happens: model state changes, loads, unloads, requests.

Domain code, no HTTP. The manager publishes the model events (it owns model state); the request path
publishes request events through ``RequestNote``, one per request (``proxy.api.observe`` opens and ends
it; the leased call notes the model, the worker's first byte and the tokens). Readers:

- listeners (``EventBus.listen``) are called synchronously inside ``publish`` and must be cheap and never
  raise: ``proxy.metrics`` counts with them, so no event is ever lost to a counter;
- subscribers (``EventBus.subscribe``) each get a bounded ``Feed``: a slow one loses its oldest events
  (counted in ``Feed.dropped``) and never blocks the manager or the event loop (``/status/events``).

The bus also keeps the last ``RECENT`` request ends (``EventBus.recent``), for a page's "last requests".
Every event is a frozen dataclass with a ``kind`` (the SSE event name) and ``as_dict()`` (its JSON).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

log = logging.getLogger("proxy.events")

RECENT = 100  # request ends kept for /status/requests
FEED_SIZE = 1000  # events a subscriber may fall behind by before it loses the oldest

T = TypeVar("T")


class UnloadReason(enum.StrEnum):
    """Why a model's worker went away (the ``reason`` label of ``proxy_model_unloads_total``)."""

    IDLE = "idle"  # keep_alive ran out, or was 0
    EVICTED = "evicted"  # made room for another model
    ADMIN = "admin"  # /unload, keep_alive 0 from an admin key, the Ollama unload
    CRASH = "crash"  # the worker exited on its own, or the stall watchdog killed it
    CONFIG = "config"  # its config changed or was removed (config reload)
    OPTIONS = "options"  # a request asked for other runtime options (num_ctx): reloaded with them
    SHUTDOWN = "shutdown"  # the proxy is stopping


@dataclass(frozen=True, kw_only=True)
class Event:
    kind: ClassVar[str] = "event"
    at: float = field(default_factory=time.time)  # wall clock, seconds

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True, kw_only=True)
class StateChanged(Event):
    kind: ClassVar[str] = "state"
    model: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True, kw_only=True)
class LoadStarted(Event):
    kind: ClassVar[str] = "load_start"
    model: str


@dataclass(frozen=True, kw_only=True)
class LoadProgress(Event):
    """A loading model's progress, 0..1 (published by whoever reads it from the worker)."""

    kind: ClassVar[str] = "load_progress"
    model: str
    progress: float
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class LoadEnded(Event):
    kind: ClassVar[str] = "load_end"
    model: str
    seconds: float
    ok: bool
    error: str | None = None


@dataclass(frozen=True, kw_only=True)
class Unloaded(Event):
    kind: ClassVar[str] = "unload"
    model: str
    reason: UnloadReason
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class ConfigReloaded(Event):
    """A reload (SIGHUP, a watched file) applied: the models it added, removed and changed (these restart
    when idle), and the settings that wait for a restart of the proxy."""

    kind: ClassVar[str] = "config_reload"
    trigger: str
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    needs_restart: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ConfigRejected(Event):
    """A reload refused whole (the old configuration keeps serving): why, naming the file and key."""

    kind: ClassVar[str] = "config_rejected"
    trigger: str
    error: str


@dataclass(frozen=True, kw_only=True)
class RequestStarted(Event):
    kind: ClassVar[str] = "request_start"
    id: int
    model: str
    route: str
    method: str


@dataclass(frozen=True, kw_only=True)
class RequestEnded(Event):
    kind: ClassVar[str] = "request_end"
    id: int
    model: str  # "" when the request named no model the proxy serves
    route: str  # the route's template (/v1/models/{model:path}), never the raw path
    method: str
    status: int
    seconds: float
    tokens: int | None  # generated tokens, where the answer said (its usage)
    ttft: float | None  # seconds to the worker's first byte of a streamed answer
    handed_off: bool = False  # its worker wrote the streamed answer to the client itself (proxy.handoff)


class Feed(Generic[T]):
    """One subscriber's bounded queue: ``put`` never blocks; when full, the oldest item goes."""

    def __init__(self, size: int, on_close: Callable[[Feed[T]], None] | None = None) -> None:
        self._items: deque[T] = deque(maxlen=size)
        self._wake = asyncio.Event()
        self._on_close = on_close
        self.dropped = 0
        self.closed = False

    def put(self, item: T) -> None:
        if self._items.maxlen is not None and len(self._items) == self._items.maxlen:
            self.dropped += 1
        self._items.append(item)
        self._wake.set()

    def get_nowait(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        self._wake.clear()
        return items

    async def get(self) -> list[T]:
        """Everything queued, waiting for at least one item."""
        while not self._items:
            self._wake.clear()
            await self._wake.wait()
        return self.get_nowait()

    async def __aiter__(self) -> AsyncIterator[T]:
        while not self.closed:
            for item in await self.get():
                yield item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self._on_close is not None:
                self._on_close(self)


class EventBus:
    def __init__(self, recent: int = RECENT) -> None:
        self._listeners: list[Callable[[Event], None]] = []
        self._feeds: list[Feed[Event]] = []
        self._recent: deque[RequestEnded] = deque(maxlen=recent)
        self._ids = 0

    def listen(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` with every event, synchronously (it must be cheap and not raise)."""
        self._listeners.append(listener)

    def subscribe(self, size: int = FEED_SIZE) -> Feed[Event]:
        """A bounded feed of the events from now on; ``close()`` it when done."""
        feed: Feed[Event] = Feed(size, on_close=self._feeds.remove)
        self._feeds.append(feed)
        return feed

    @property
    def subscribers(self) -> int:
        return len(self._feeds)

    def publish(self, event: Event) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a reader's bug must not break the manager's state change
                log.exception("event listener %r failed on %s", listener, event.kind)
        for feed in self._feeds:
            feed.put(event)
        if isinstance(event, RequestEnded) and (event.model or event.status >= 400):
            self._recent.append(event)

    def recent(self) -> list[RequestEnded]:
        """The last request ends that named a model or failed, oldest first."""
        return list(self._recent)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids


_NOTE_KEY = "proxy.request_note"


class RequestNote:
    """One request as the events see it: opened when it arrives, told its model, the worker's first
    byte and its token count on the way, ended once with the status. The one publisher of request
    events. It lives in the request's ASGI scope (``RequestNote.of(scope)``)."""

    def __init__(
        self, bus: EventBus, scope: MutableMapping[str, Any], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._bus = bus
        self._scope = scope
        self._clock = clock
        self.id = bus.next_id()
        self.method = str(scope.get("method", ""))
        self.began = clock()
        self.model = ""
        self.tokens: int | None = None
        self.first_byte: float | None = None
        self.handed_off = False  # the worker writes the answer (proxy.handoff)
        self._started = False
        self._ended = False

    @staticmethod
    def open(scope: MutableMapping[str, Any], bus: EventBus) -> RequestNote:
        note = RequestNote(bus, scope)
        scope[_NOTE_KEY] = note
        return note

    @staticmethod
    def of(scope: MutableMapping[str, Any]) -> RequestNote | None:
        note = scope.get(_NOTE_KEY)
        return note if isinstance(note, RequestNote) else None

    @property
    def route(self) -> str:
        """The template of the route it matched (set by the router, Starlette's ``scope["route"]``)."""
        return str(getattr(self._scope.get("route"), "path", ""))

    def for_model(self, model: str) -> None:
        """The request names this model: publishes its start (once)."""
        self.model = model
        if not self._started:
            self._started = True
            self._bus.publish(RequestStarted(id=self.id, model=model, route=self.route, method=self.method))

    def first_chunk(self) -> None:
        if self.first_byte is None:
            self.first_byte = self._clock()

    def add_tokens(self, n: int) -> None:
        self.tokens = (self.tokens or 0) + n

    def end(self, status: int) -> None:
        """Publish its end (once)."""
        if self._ended:
            return
        self._ended = True
        ttft = self.first_byte - self.began if self.first_byte is not None else None
        self._bus.publish(
            RequestEnded(
                id=self.id,
                model=self.model,
                route=self.route,
                method=self.method,
                status=status,
                seconds=self._clock() - self.began,
                tokens=self.tokens,
                ttft=ttft,
                handed_off=self.handed_off,
            )
        )
