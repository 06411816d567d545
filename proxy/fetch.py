"""Fetching an image or audio URL a request names, under the rules a server open to users needs.

- http and https only; any other scheme is refused.
- The host's addresses are resolved here, and every one is checked. A loopback, private, link-local,
  cloud metadata (169.254.169.254, fd00:ec2::254), unspecified, multicast or otherwise non-public address is
  refused unless ``limits.fetch.allowed_hosts`` names the host, the address or a network holding it. IPv4
  inside IPv6 (mapped, 6to4, NAT64) is checked as the IPv4 address.
- The connection goes to the addresses that were checked: aiohttp's resolver is pinned to them
  (``_Pinned``), so a DNS answer that changes between the check and the connect (rebinding) cannot
  swap them.
- Redirects are followed here, at most ``MAX_REDIRECTS``, and each new URL is checked like the first.
- ``limits.fetch.max_bytes`` bounds the answer as it streams (a Content-Length over it is refused before
  any of the body is read), and ``limits.fetch.timeout`` bounds the whole fetch, redirects included.
- What comes back must be one of the kind's types by its first bytes (``proxy.dialects.media.sniff``), and
  a Content-Type that names another kind (text/html, ...) is refused.

A refused or failed fetch raises ``FetchFailed`` (400), which names the URL's host and why.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import yarl
from aiohttp.abc import AbstractResolver, ResolveResult

from proxy.config import FetchLimits
from proxy.dialects.media import NAMES, SNIFF_BYTES, MediaKind, declared_ok, sniff
from proxy.errors import FetchFailed

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
CHUNK = 64 * 1024
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# (host, port) -> the addresses it resolves to
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Fetched:
    url: str  # where it came from, after redirects
    media_type: str  # by its bytes
    data: bytes


def _ip(address: str) -> IP:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone is not part of the address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip.sixtofour is not None:
            return ip.sixtofour
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def refusal(address: str) -> str | None:
    """Why an address is not one to fetch from unless allowed; None: a public address."""
    ip = _ip(address)
    if ip in METADATA or ipaddress.ip_address(address.split("%", 1)[0]) in METADATA:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_unspecified:
        return "the unspecified address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


class _Pinned(AbstractResolver):
    """aiohttp's resolver for one fetch: a host resolves to the addresses checked for it, and nothing else."""

    def __init__(self) -> None:
        self._pins: dict[str, list[str]] = {}

    def pin(self, host: str, addresses: list[str]) -> None:
        self._pins[host.lower()] = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = self._pins.get(host.lower())
        if not addresses:
            raise OSError(f"host {host!r} was not checked")
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class Fetcher:
    """Fetches URLs by ``limits`` (``limits.fetch``); ``resolve`` is the DNS lookup (injectable for tests)."""

    def __init__(self, limits: FetchLimits, resolve: Resolve = system_resolve) -> None:
        self.limits = limits
        self._resolve = resolve
        self._names = frozenset(h for h in limits.allowed_hosts if not _network(h))
        self._networks = tuple(n for h in limits.allowed_hosts if (n := _network(h)) is not None)

    async def fetch(self, url: str, kind: MediaKind, *, param: str | None = None) -> Fetched:
        """The URL's bytes, checked to be ``kind`` (FetchFailed naming the host and why)."""
        state = {"host": _host_of(url)}
        try:
            async with asyncio.timeout(self.limits.timeout):
                return await self._fetch(url, kind, param, state)
        except TimeoutError:
            raise FetchFailed(
                state["host"], f"no whole answer within {self.limits.timeout:g} s (limits.fetch.timeout)", param=param
            ) from None

    async def _fetch(self, url: str, kind: MediaKind, param: str | None, state: dict[str, str]) -> Fetched:
        pins = _Pinned()
        connector = aiohttp.TCPConnector(resolver=pins, use_dns_cache=False, force_close=True)
        headers = {"Accept": f"{kind}/*", "User-Agent": "llm-lifecycle-proxy"}
        async with aiohttp.ClientSession(
            connector=connector, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(), headers=headers
        ) as session:
            for hop in range(MAX_REDIRECTS + 1):
                target = self._parse(url, param)
                host = target.raw_host or ""
                state["host"] = host
                where = f" (redirected to it from {hop} URL{'s' if hop > 1 else ''} before)" if hop else ""
                addresses = await self._checked(host, target.port or 0, param, where)
                pins.pin(host, addresses)
                try:
                    async with session.get(target, allow_redirects=False) as response:
                        if response.status in REDIRECTS:
                            location = response.headers.get("Location")
                            if not location:
                                raise FetchFailed(host, f"it answered {response.status} with no Location", param=param)
                            url = str(target.join(yarl.URL(location)))
                            continue
                        return await self._body(response, target, kind, param)
                except aiohttp.ClientError as exc:
                    raise FetchFailed(host, f"the request failed ({type(exc).__name__}){where}", param=param) from None
                except ValueError as exc:  # a Location yarl cannot read
                    raise FetchFailed(host, f"its redirect is not a URL ({exc})", param=param) from None
        raise FetchFailed(state["host"], f"more than {MAX_REDIRECTS} redirects", param=param)

    def _parse(self, url: str, param: str | None) -> yarl.URL:
        try:
            target = yarl.URL(url)
        except (ValueError, TypeError):
            raise FetchFailed(_host_of(url), "it is not a URL", param=param) from None
        if target.scheme not in ("http", "https"):
            raise FetchFailed(target.raw_host or "", f"its scheme '{target.scheme}' is not http or https", param=param)
        if not target.raw_host:
            raise FetchFailed("", "the URL has no host", param=param)
        return target

    async def _checked(self, host: str, port: int, param: str | None, where: str) -> list[str]:
        """The host's addresses, every one allowed (FetchFailed: one is not, or the name does not resolve)."""
        literal = _literal(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                addresses = await self._resolve(host, port)
            except OSError:
                raise FetchFailed(host, f"its name does not resolve{where}", param=param) from None
            if not addresses:
                raise FetchFailed(host, f"its name does not resolve{where}", param=param)
        if host.lower() in self._names:
            return addresses
        for address in addresses:
            why = refusal(address)
            if why is not None and not any(_ip(address) in n or _raw(address) in n for n in self._networks):
                seen = f"{address} is" if literal is not None else f"it resolves to {address},"
                raise FetchFailed(host, f"{seen} {why}{where}; limits.fetch.allowed_hosts can allow it", param=param)
        return addresses

    async def _body(
        self, response: aiohttp.ClientResponse, target: yarl.URL, kind: MediaKind, param: str | None
    ) -> Fetched:
        host = target.raw_host or ""
        if response.status != 200:
            raise FetchFailed(host, f"it answered {response.status} {response.reason or ''}".rstrip(), param=param)
        declared = response.headers.get("Content-Type")
        if not declared_ok(declared, kind):
            raise FetchFailed(host, f"its Content-Type is {declared}, not {NAMES[kind]}", param=param)
        cap = self.limits.max_bytes
        if response.content_length is not None and response.content_length > cap:
            raise FetchFailed(
                host, f"its answer is {response.content_length} bytes, over {cap} (limits.fetch.max_bytes)", param=param
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in response.content.iter_chunked(CHUNK):
            total += len(chunk)
            if total > cap:
                raise FetchFailed(host, f"its answer is over {cap} bytes (limits.fetch.max_bytes)", param=param)
            chunks.append(chunk)
        data = b"".join(chunks)
        media = sniff(data[:SNIFF_BYTES], kind)
        if media is None:
            raise FetchFailed(host, f"what it answered is not {NAMES[kind]} (by its bytes)", param=param)
        return Fetched(str(target), media, data)


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def _raw(address: str) -> IP:
    return ipaddress.ip_address(address.split("%", 1)[0])


def _network(entry: str) -> Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


def _host_of(url: str) -> str:
    try:
        return yarl.URL(url).raw_host or ""
    except (ValueError, TypeError):
        return ""
