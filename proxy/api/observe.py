"""The request events' edge: an ASGI middleware that opens a ``RequestNote`` for each request and
ends it with the status once the answer (a stream included) is done. The operations endpoints
themselves (/health, /status, /metrics, /logs, the /ui page) are not observed: a scraper or a page watching the
proxy would otherwise fill the counters and the last requests with itself."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.events import EventBus, RequestNote
from proxy.streaming import DIRECT_SEND

UNOBSERVED = frozenset({"/health", "/status", "/status/events", "/status/requests", "/metrics", "/ui"})
UNOBSERVED_PREFIXES = ("/logs/", "/ui/")


def observed(path: str) -> bool:
    return path not in UNOBSERVED and not path.startswith(UNOBSERVED_PREFIXES)


class RequestEvents:
    def __init__(self, app: ASGIApp, bus: EventBus) -> None:
        self.app = app
        self.bus = bus

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[DIRECT_SEND] = send
        if scope["type"] != "http" or not observed(scope["path"]):
            await self.app(scope, receive, send)
            return
        note = RequestNote.open(scope, self.bus)
        status = 500  # what the client gets when the app raises before answering

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            note.end(status)
