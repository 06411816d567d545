"""The URL fetcher (proxy/fetch.py) against a local HTTP server the test starts on 127.0.0.1: it is a
loopback address, so every allowed case names 127.0.0.1 in ``limits.fetch.allowed_hosts`` and the
refusals are checked without it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.config import FetchLimits
from proxy.errors import FetchFailed
from proxy.fetch import Fetcher, refusal

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 100
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 100
ALLOW = FetchLimits(allowed_hosts=("127.0.0.1",), max_bytes=4096, timeout=5.0)


@pytest.fixture
async def server() -> AsyncIterator[str]:
    hang = asyncio.Event()

    async def png(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def unlabelled(request: web.Request) -> web.Response:
        return web.Response(body=JPEG, content_type="application/octet-stream")

    async def wav(request: web.Request) -> web.Response:
        return web.Response(body=WAV, content_type="audio/wav")

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>hello</html>", content_type="text/html")

    async def lying(request: web.Request) -> web.Response:  # says PNG, is text
        return web.Response(body=b"not an image at all", content_type="image/png")

    async def big(request: web.Request) -> web.Response:
        return web.Response(body=PNG + b"\x00" * 10_000, content_type="image/png")

    async def streamed(request: web.Request) -> web.StreamResponse:  # no Content-Length: the cap must count
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(PNG)
        for _ in range(100):
            await response.write(b"\x00" * 1000)
        await response.write_eof()
        return response

    async def slow(request: web.Request) -> web.Response:
        await hang.wait()
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def missing(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/a.png", png)
    app.router.add_get("/unlabelled", unlabelled)
    app.router.add_get("/voice.wav", wav)
    app.router.add_get("/page", html)
    app.router.add_get("/lying.png", lying)
    app.router.add_get("/big.png", big)
    app.router.add_get("/streamed.png", streamed)
    app.router.add_get("/slow.png", slow)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        hang.set()
        await runner.cleanup()


async def refused(fetcher: Fetcher, url: str, kind: str = "image") -> FetchFailed:
    with pytest.raises(FetchFailed) as info:
        await fetcher.fetch(url, "image" if kind == "image" else "audio", param="image_url")
    assert info.value.status == 400 and info.value.param == "image_url"
    return info.value


async def test_an_allowed_host_is_fetched_and_typed_by_its_bytes(server: str) -> None:
    fetcher = Fetcher(ALLOW)
    got = await fetcher.fetch(f"{server}/a.png", "image")
    assert (got.media_type, got.data) == ("image/png", PNG)
    got = await fetcher.fetch(f"{server}/unlabelled", "image")
    assert got.media_type == "image/jpeg"
    got = await fetcher.fetch(f"{server}/voice.wav", "audio")
    assert got.media_type == "audio/wav"


async def test_a_loopback_address_is_refused_unless_allowed(server: str) -> None:
    exc = await refused(Fetcher(FetchLimits()), f"{server}/a.png")
    assert exc.host == "127.0.0.1" and "loopback" in exc.message and "allowed_hosts" in exc.message


async def test_a_name_that_resolves_to_a_private_address_is_refused(server: str) -> None:
    async def private(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    exc = await refused(Fetcher(FetchLimits(), private), "http://images.example/a.png")
    assert exc.host == "images.example" and "10.1.2.3" in exc.message and "private" in exc.message

    # one bad address among good ones is enough to refuse
    async def mixed(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "192.168.0.1"]

    exc = await refused(Fetcher(FetchLimits(), mixed), "http://images.example/a.png")
    assert "192.168.0.1" in exc.message


async def test_the_connection_goes_to_the_address_that_was_checked(server: str) -> None:
    """A name allowed by the rules connects to the address its check resolved, never a second lookup's."""
    port = int(server.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["169.254.169.254"]])  # a rebinding DNS server would answer this

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    fetcher = Fetcher(FetchLimits(allowed_hosts=("127.0.0.0/8",), max_bytes=4096, timeout=5.0), rebinding)
    got = await fetcher.fetch(f"http://images.example:{port}/a.png", "image")
    assert got.data == PNG


async def test_a_redirect_to_a_refused_address_is_refused(server: str) -> None:
    fetcher = Fetcher(ALLOW)
    exc = await refused(fetcher, f"{server}/redirect?to=http://169.254.169.254/latest/meta-data/")
    assert exc.host == "169.254.169.254" and "metadata" in exc.message and "redirected" in exc.message
    exc = await refused(fetcher, f"{server}/redirect?to=http://[::1]:1/a.png")
    assert "loopback" in exc.message
    # an allowed redirect is followed
    got = await fetcher.fetch(f"{server}/redirect?to=/a.png", "image")
    assert got.data == PNG


async def test_redirects_are_bounded(server: str) -> None:
    exc = await refused(Fetcher(ALLOW), f"{server}/loop")
    assert "more than 5 redirects" in exc.message


async def test_an_answer_over_the_size_cap_is_refused(server: str) -> None:
    exc = await refused(Fetcher(ALLOW), f"{server}/big.png")
    assert "max_bytes" in exc.message and "10108 bytes" in exc.message  # by its Content-Length, before reading
    exc = await refused(Fetcher(ALLOW), f"{server}/streamed.png")
    assert "over 4096 bytes" in exc.message  # counted while it streams


async def test_the_content_type_is_checked_against_the_bytes(server: str) -> None:
    exc = await refused(Fetcher(ALLOW), f"{server}/page")
    assert "text/html" in exc.message
    exc = await refused(Fetcher(ALLOW), f"{server}/lying.png")
    assert "not a PNG, JPEG, GIF, WebP or BMP image" in exc.message
    exc = await refused(Fetcher(ALLOW), f"{server}/a.png", "audio")
    assert "Content-Type is image/png" in exc.message
    exc = await refused(Fetcher(ALLOW), f"{server}/missing")
    assert "404" in exc.message


async def test_a_fetch_that_takes_too_long_is_refused(server: str) -> None:
    fetcher = Fetcher(FetchLimits(allowed_hosts=("127.0.0.1",), max_bytes=4096, timeout=0.3))
    async with asyncio.timeout(10):  # without the fetch's own timeout, this fails here rather than hanging
        exc = await refused(fetcher, f"{server}/slow.png")
    assert "limits.fetch.timeout" in exc.message and exc.host == "127.0.0.1"


async def test_only_http_and_https_are_fetched() -> None:
    fetcher = Fetcher(ALLOW)
    for url in ("file:///etc/passwd", "ftp://127.0.0.1/a.png", "gopher://127.0.0.1/", "not a url"):
        exc = await refused(fetcher, url)
        assert "scheme" in exc.message or "not a URL" in exc.message


async def test_a_name_that_does_not_resolve_is_refused() -> None:
    async def nothing(host: str, port: int) -> list[str]:
        raise OSError("no such name")

    exc = await refused(Fetcher(FetchLimits(), nothing), "https://nowhere.invalid/a.png")
    assert exc.host == "nowhere.invalid" and "does not resolve" in exc.message


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a00:1", "private"),  # NAT64 around 10.0.0.1
        ("100.64.0.1", "not a public"),  # carrier-grade NAT
    ],
)
def test_addresses_that_are_not_public_are_refused(address: str, why: str) -> None:
    reason = refusal(address)
    assert reason is not None and why in reason


def test_public_addresses_pass() -> None:
    assert refusal("93.184.216.34") is None
    assert refusal("2606:2800:220:1:248:1893:25c8:1946") is None
