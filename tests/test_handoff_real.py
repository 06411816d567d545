"""The stream handoff on the real path (issue 23): a live proxy, the real llama.cpp worker on SmolLM2, clients
on raw sockets (to see the HTTP framing and the connection's reuse) and the official SDK.

A streamed ``/v1/chat/completions`` of a local worker is written by the worker itself to the client's socket
(``proxy.handoff``, ``proxy.worker.handoff``); the proxy writes the head and the last chunk. What must hold as
with the relay: a well-framed chunked body, the connection kept alive for the next request, usage counted
(and not sent unless asked), a client that goes away stops the generation, a worker that dies mid-stream ends
the stream with an error event, and whatever is not plain HTTP/1.1 is relayed as before.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.harness import LiveProxy, running, smollm2_config, wait_until

pytestmark = pytest.mark.real

NAME = "smollm2:135m"
NO_END = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>: it never stops by itself


def chat(max_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Count from one to ten."}],
        "max_tokens": max_tokens,
        "stream": True,
        **extra,
    }


def metric(proxy: LiveProxy, name: str) -> float:
    text = httpx.get(proxy.url + "/metrics", timeout=10).text
    found = re.search(rf'^{name}\{{model="{re.escape(NAME)}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


class Conn:
    """One HTTP/1.1 connection on a raw socket: requests one after another, answers read to their end."""

    def __init__(self, proxy: LiveProxy, version: str = "1.1") -> None:
        self.proxy = proxy
        self.version = version
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=60)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, path: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/{self.version}\r\nHost: 127.0.0.1:{self.proxy.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the connection closed")
        self.buf += data

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(marker)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def answer(self) -> tuple[int, dict[str, str], list[bytes]]:
        """(status, headers, the body's chunks as framed; one item when it has a length)."""
        head = self._until(b"\r\n\r\n").decode()
        status_line, *lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        status = int(status_line.split()[1])
        if headers.get("transfer-encoding") == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self._until(b"\r\n").split(b";")[0], 16)
                data = self._exactly(size)
                assert self._exactly(2) == b"\r\n", "a chunk must end with CRLF"
                if size == 0:
                    return status, headers, chunks
                chunks.append(data)
        if "content-length" in headers:
            return status, headers, [self._exactly(int(headers["content-length"]))]
        while True:  # until the connection closes (HTTP/1.0)
            try:
                self._more()
            except EOFError:
                body, self.buf = self.buf, b""
                return status, headers, [body]


def events(chunks: list[bytes]) -> list[str]:
    return [e[len("data: ") :] for e in b"".join(chunks).decode().split("\n\n") if e.startswith("data: ")]


@pytest.fixture
def loaded(smollm2_proxy: LiveProxy) -> LiveProxy:
    """The proxy, its model loaded: a request that waits for a load is relayed (its loading comments first)."""
    assert httpx.post(smollm2_proxy.url + "/load/" + NAME, timeout=120).status_code == 200
    return smollm2_proxy


@pytest.fixture
def conn(loaded: LiveProxy) -> Iterator[Conn]:
    """A connection to the proxy, opened once its model is loaded (a connection idle for longer than
    server.header_timeout before its first request is closed)."""
    c = Conn(loaded)
    yield c
    c.close()


def test_a_handed_off_stream_is_well_framed_and_its_connection_serves_the_next_requests(
    smollm2_proxy: LiveProxy, conn: Conn
) -> None:
    before = metric(smollm2_proxy, "proxy_stream_handoffs_total")
    for _ in range(2):  # two streams on one connection, then an answer that is not streamed
        conn.send("/v1/chat/completions", chat(stream_options={"include_usage": True}))
        status, headers, chunks = conn.answer()
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
        assert headers["cache-control"] == "no-cache"  # the head is the proxy's, as with the relay
        sent = events(chunks)
        assert sent[-1] == "[DONE]"
        usage = [json.loads(e)["usage"] for e in sent[:-1] if json.loads(e).get("usage")]
        assert len(usage) == 1 and 0 < usage[0]["completion_tokens"] <= 12  # asked for: sent
        assert len(chunks) > 3  # a chunk per token, as made
    conn.send("/v1/chat/completions", {**chat(), "stream": False})
    status, _, body = conn.answer()
    assert status == 200 and json.loads(body[0])["choices"][0]["message"]["content"]
    assert metric(smollm2_proxy, "proxy_stream_handoffs_total") == before + 2


def test_usage_the_client_did_not_ask_for_is_counted_and_not_sent(smollm2_proxy: LiveProxy, conn: Conn) -> None:
    tokens = metric(smollm2_proxy, "proxy_generated_tokens_total")
    handed = metric(smollm2_proxy, "proxy_stream_handoffs_total")
    conn.send("/v1/chat/completions", chat(max_tokens=8))
    status, _, chunks = conn.answer()
    sent = events(chunks)
    assert status == 200 and sent[-1] == "[DONE]"
    assert not [e for e in sent[:-1] if "usage" in json.loads(e)]
    assert 0 < metric(smollm2_proxy, "proxy_generated_tokens_total") - tokens <= 8
    assert metric(smollm2_proxy, "proxy_stream_handoffs_total") == handed + 1


def test_the_sdk_streams_through_the_handoff(loaded: LiveProxy) -> None:
    smollm2_proxy = loaded
    handed = metric(smollm2_proxy, "proxy_stream_handoffs_total")
    with openai.OpenAI(base_url=smollm2_proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        for _ in range(2):  # the SDK's pooled connection, reused
            stream = client.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text
    assert metric(smollm2_proxy, "proxy_stream_handoffs_total") == handed + 2


def test_a_worker_refusal_is_the_status_it_was(smollm2_proxy: LiveProxy, conn: Conn) -> None:
    """A request the worker refuses as its stream begins (a prompt its context cannot hold: only the worker
    counts it) is answered as over HTTP: its status and error body, the client's socket untouched."""
    too_long = [{"role": "user", "content": "word " * 20000}]
    conn.send("/v1/chat/completions", {**chat(), "messages": too_long})
    status, _, body = conn.answer()
    assert status == 400, body
    assert json.loads(b"".join(body))["error"]["code"] == "context_length_exceeded"
    conn.send("/v1/chat/completions", chat(max_tokens=4))  # the connection goes on
    assert conn.answer()[0] == 200


def test_http_1_0_is_relayed(loaded: LiveProxy) -> None:
    smollm2_proxy = loaded
    """The handoff is for HTTP/1.1 clients only: an HTTP/1.0 client's stream is relayed, whole."""
    handed = metric(smollm2_proxy, "proxy_stream_handoffs_total")
    old = Conn(smollm2_proxy, version="1.0")
    try:
        old.send("/v1/chat/completions", chat(max_tokens=6))
        status, _, body = old.answer()
    finally:
        old.close()
    assert status == 200
    assert events(body)[-1] == "[DONE]"
    assert metric(smollm2_proxy, "proxy_stream_handoffs_total") == handed


def busy(proxy: LiveProxy) -> tuple[int, int]:
    """(the proxy's leases, the worker's requests in flight) for the model."""
    status = proxy.status()[NAME]
    return status["in_flight"], (status.get("worker") or {}).get("in_flight", 0)


def test_a_client_that_goes_away_stops_the_generation(loaded: LiveProxy) -> None:
    smollm2_proxy = loaded
    gone = Conn(smollm2_proxy)
    gone.send("/v1/chat/completions", chat(max_tokens=8000, logit_bias=NO_END))
    try:
        gone._until(b"data: ")  # it streams
        wait_until(lambda: busy(smollm2_proxy) == (1, 1), timeout=30)
    finally:
        gone.close()
    wait_until(lambda: busy(smollm2_proxy) == (0, 0), timeout=15)  # not 8000 tokens later


@pytest.fixture(scope="module")
def own_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    """A proxy of its own: its worker is killed."""
    with running(tmp_path_factory.mktemp("handoff"), [smollm2_config(keep_alive="10m")]) as live:
        yield live


def test_a_worker_that_dies_mid_stream_ends_it_with_an_error_event(own_proxy: LiveProxy) -> None:
    assert httpx.post(own_proxy.url + "/load/" + NAME, timeout=120).status_code == 200  # not a load's relay
    c = Conn(own_proxy)
    try:
        c.send("/v1/chat/completions", chat(max_tokens=8000, logit_bias=NO_END))
        head = c._until(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" in head.lower()
        c._until(b"data: ")
        (worker,) = own_proxy.workers()
        worker.send_signal(signal.SIGKILL)
        rest = b""
        while not rest.endswith(b"0\r\n\r\n"):  # the stream ends, framed: the last chunk comes
            c._more()
            rest, c.buf = rest + c.buf, b""
    finally:
        c.close()
    assert b'"error"' in rest and b"ended the answer early" in rest
    assert b"[DONE]" not in rest
    assert metric(own_proxy, "proxy_stream_handoffs_total") == 1
