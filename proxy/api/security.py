"""Requests a browser could be tricked into sending: refused before any route runs.

- ``Host``: a name not in ``server.allowed_hosts`` (besides localhost, 127.0.0.1, [::1] and the
  configured host) gets 403. DNS rebinding points an attacker's name at 127.0.0.1; the browser then
  sends that name as the Host, so checking it closes the hole (Ollama's CVE-2024-28224). When the proxy
  listens on every address (0.0.0.0, ::), any IP address is a fine Host too: rebinding needs a name.
- ``Origin``: a browser names the page that sent a request. A request that can change state (anything
  but GET, HEAD, OPTIONS) from an origin not in ``server.cors_origins`` (and not the proxy itself) gets
  403: a "simple" cross-site POST needs no CORS preflight, so CORS alone would not stop it.

JSON routes also refuse non-JSON content types (415, ``api.common.read_json``): a web page can send
``text/plain`` without a preflight, never ``application/json``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.api.errors import proxy_error
from proxy.config import Settings
from proxy.errors import Forbidden, ProxyError

_LOCAL = frozenset({"localhost", "127.0.0.1", "::1"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_EVERY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def _hostname(host: str) -> str:
    """``example.com:8080`` -> ``example.com``; ``[::1]:80`` -> ``::1``; lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    def __init__(self, settings: Settings) -> None:
        self.any_host = "*" in settings.allowed_hosts
        self.any_ip = settings.host.strip("[]") in _EVERY_ADDRESS
        self.hosts = _LOCAL | {_hostname(settings.host)} | {_hostname(h) for h in settings.allowed_hosts}
        if settings.cluster is not None:  # the name the other nodes reach this one by (its forwards' Host)
            self.hosts |= {_hostname(urlsplit(settings.cluster.advertise).netloc)}
        self.any_origin = "*" in settings.cors_origins
        self.origins = frozenset(o.rstrip("/").lower() for o in settings.cors_origins)

    def check_host(self, host: str | None) -> None:
        if host is None or self.any_host:  # no Host header: not a browser
            return
        name = _hostname(host)
        if name in self.hosts or (self.any_ip and _is_ip(name)):
            return
        raise Forbidden(f"host '{name}' is not allowed; add it to server.allowed_hosts to serve it")

    def check_origin(self, method: str, origin: str | None, host: str | None) -> None:
        if origin is None or method in _SAFE_METHODS or self.any_origin:
            return
        origin = origin.rstrip("/").lower()
        if origin in self.origins:
            return
        if host is not None and origin != "null" and urlsplit(origin).netloc == host.strip().lower():
            return  # the proxy's own pages
        raise Forbidden(f"cross-site request from origin '{origin}' refused; add it to server.cors_origins")


class RequestGuard:
    """ASGI middleware: the Host and Origin checks, answered in the caller's dialect (``api.errors``)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.policy = HostPolicy(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host, origin = _host_and_origin(scope["headers"])
            try:
                self.policy.check_host(host)
                self.policy.check_origin(scope["method"], origin, host)
            except ProxyError as exc:
                response = await proxy_error(Request(scope), exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_and_origin(headers: Iterable[tuple[bytes, bytes]]) -> tuple[str | None, str | None]:
    """The first Host and Origin headers, read from the ASGI scope's raw list (names come lower case) as
    Starlette's ``Headers.get`` reads them, without building a Request for every request that passes."""
    host = origin = None
    for name, value in headers:
        if name == b"host":
            if host is None:
                host = value.decode("latin-1")
        elif name == b"origin" and origin is None:
            origin = value.decode("latin-1")
    return host, origin
