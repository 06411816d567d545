"""One caller cannot take the box (issue 26), on live proxies: connections that never finish their headers
are closed (server.header_timeout), open connections are capped without locking out /health
(server.max_connections), one key's requests in flight are bounded (limits.max_concurrent_per_key) while
another key is served, and a user key's A1111 checkpoint is its own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.harness import LiveProxy, fake_config

MakeProxy = Callable[..., LiveProxy]
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
HALF = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"


@contextlib.contextmanager
def half_sent(proxy: LiveProxy, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each sent half a request's headers, then nothing."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            s.sendall(HALF)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def closed_by_server(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sent before closing ``sock`` (b"" for nothing), or None if it is still open at the
    deadline (time.monotonic())."""
    got = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return None
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def test_half_sent_headers_are_closed_and_health_still_answers(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], server={"header_timeout": "2s"})
    started = time.monotonic()
    with half_sent(proxy, 50) as socks:
        assert httpx.get(proxy.url + "/health", timeout=5).status_code == 200
        deadline = time.monotonic() + 10
        answers = [closed_by_server(s, deadline) for s in socks]
        assert all(a is not None for a in answers), f"{answers.count(None)} of 50 still open after 10 s"
        assert all(a is not None and a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
        assert time.monotonic() - started >= 1.5  # the timeout, not an early refusal
    # a request that trickles its headers has one deadline for all of them, however often bytes come
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as trickle:
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 200
        deadline = time.monotonic() + 10
        closed: bytes | None = None
        for byte in request:
            trickle.sendall(bytes([byte]))
            closed = closed_by_server(trickle, min(deadline, time.monotonic() + 0.2))
            if closed is not None or time.monotonic() > deadline:
                break
        assert closed is not None and closed.startswith(b"HTTP/1.1 408"), "a trickled request was never closed"
    # an ordinary request on a kept-alive connection, with pauses between requests, is untouched
    with httpx.Client(base_url=proxy.url, timeout=10) as client:
        for _ in range(3):
            body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
            assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_past_max_connections_the_oldest_waiting_ones_make_room(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("fake")], server={"header_timeout": "60s", "max_connections": 20})
    with half_sent(proxy, 40) as socks:
        # each connection past the 20th closed the oldest waiting one: /health, the newest, gets in
        assert httpx.get(proxy.url + "/health", timeout=5).status_code == 200
        deadline = time.monotonic() + 10
        oldest = [closed_by_server(s, deadline) for s in socks[:20]]
        assert all(a == b"" for a in oldest), oldest
        newest = [closed_by_server(s, time.monotonic() + 0.2) for s in socks[-10:]]
        assert all(a is None for a in newest), newest  # still waiting: the 60 s header timeout is far


def test_one_key_over_its_concurrency_gets_429_another_key_is_served(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    tokens = {"api_key": ["key-a", "key-b"], "admin_key": ["admin-key"]}
    fake = fake_config("fake", "--gate", str(gate), parallel=4)
    proxy = make_proxy([fake], tokens=tokens, limits={"max_concurrent_per_key": 1})
    a = openai.OpenAI(base_url=proxy.url + "/v1", api_key="key-a", max_retries=0)
    b = openai.OpenAI(base_url=proxy.url + "/v1", api_key="key-b", max_retries=0)
    with a, b, concurrent.futures.ThreadPoolExecutor(1) as pool:
        stream = a.chat.completions.create(model="fake", messages=MSG, stream=True)
        held = iter(stream)
        assert next(held).choices[0].delta.content == "tok "  # the stream holds key A's one slot
        with pytest.raises(openai.RateLimitError) as info:
            a.chat.completions.create(model="fake", messages=MSG)
        assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
        assert "max_concurrent_per_key" in info.value.message
        with ollama.Client(host=proxy.url, headers={"Authorization": "Bearer key-a"}) as ol:
            with pytest.raises(ollama.ResponseError) as refused:
                ol.chat(model="fake", messages=[{"role": "user", "content": "hi"}], stream=False)
            assert refused.value.status_code == 429
        with anthropic.Anthropic(base_url=proxy.url, api_key="key-a", max_retries=0) as an:
            with pytest.raises(anthropic.RateLimitError):
                an.messages.create(model="fake", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        # another key is served meanwhile, and an admin route is not counted against key A's holder
        answer = b.chat.completions.create(model="fake", messages=MSG, max_tokens=2)
        assert answer.choices[0].message.content
        assert httpx.get(proxy.url + "/status", headers={"Authorization": "Bearer admin-key"}).status_code == 200
        gate.touch()
        rest = pool.submit(lambda: [c.choices[0].delta.content for c in held if c.choices])
        assert rest.result(timeout=30)
        stream.close()
        # the slot came back when the stream ended: key A is served again
        again = a.chat.completions.create(model="fake", messages=MSG, max_tokens=2)
        assert again.choices[0].message.content


def _status(proxy: LiveProxy, key: str) -> Any:
    r = httpx.get(proxy.url + "/sdapi/v1/options", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["sd_model_checkpoint"]


def _choose(proxy: LiveProxy, key: str, model: str) -> None:
    body = {"sd_model_checkpoint": model}
    r = httpx.post(proxy.url + "/sdapi/v1/options", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert r.status_code == 200 and r.json() is None, r.text


def test_a_user_keys_a1111_checkpoint_is_its_own_an_admins_is_the_default(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    (tmp_path / "sd").mkdir()
    painters = [{"name": n, "backend": "diffusers", "model": {"path": str(tmp_path / "sd")}} for n in ("sd-a", "sd-b")]
    tokens = {"api_key": ["key-a", "key-b"], "admin_key": ["admin-key"]}
    proxy = make_proxy(painters, tokens=tokens)
    assert {_status(proxy, k) for k in ("key-a", "key-b", "admin-key")} == {"sd-a"}
    _choose(proxy, "key-a", "sd-b")
    assert (_status(proxy, "key-a"), _status(proxy, "key-b"), _status(proxy, "admin-key")) == ("sd-b", "sd-a", "sd-a")
    _choose(proxy, "admin-key", "sd-b")  # the shared default: every key that chose none follows it
    assert (_status(proxy, "key-b"), _status(proxy, "admin-key")) == ("sd-b", "sd-b")
    _choose(proxy, "key-a", "sd-a")
    assert (_status(proxy, "key-a"), _status(proxy, "key-b")) == ("sd-a", "sd-b")


def test_callers_are_told_apart_by_key_else_by_address_and_the_key_never_kept() -> None:
    from proxy.api.perkey import InFlight, caller_id
    from proxy.errors import TooManyRequests

    a, b = caller_id("secret-key-a", "10.0.0.1"), caller_id("secret-key-b", "10.0.0.1")
    assert a != b and "secret" not in a and a == caller_id("secret-key-a", "10.0.0.2")  # the key, not the address
    assert caller_id(None, "10.0.0.1") != caller_id(None, "10.0.0.2")  # open mode: per client address
    counts = InFlight()
    scope: dict[str, Any] = {"proxy.key_slots": []}
    counts.hold(scope, a, 2)
    counts.hold(scope, a, 2)
    with pytest.raises(TooManyRequests):
        counts.hold(scope, a, 2)
    counts.hold(scope, b, 2)  # another caller is not held back
    for give in scope["proxy.key_slots"]:
        give()
    assert counts.of(a) == counts.of(b) == 0


def test_when_every_connection_is_serving_a_new_one_gets_503(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    proxy = make_proxy([fake_config("fake", "--gate", str(gate), parallel=2)], server={"max_connections": 2})
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.Client(base_url=proxy.url, timeout=30) as one, httpx.Client(base_url=proxy.url, timeout=30) as two:
        with (
            one.stream("POST", "/v1/chat/completions", json=body) as a,
            two.stream("POST", "/v1/chat/completions", json=body) as b,
        ):
            readers = [a.iter_bytes(), b.iter_bytes()]
            for reader in readers:
                assert b"tok" in next(reader) or b"tok" in next(reader)  # past any loading comment: held
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as third:
                answer = closed_by_server(third, time.monotonic() + 10)
                assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
                assert b"retry-after: 1" in answer.lower()
            gate.touch()
            assert all(b"[DONE]" in b"".join(reader) for reader in readers)
    assert httpx.get(proxy.url + "/health", timeout=5).status_code == 200  # room again
