"""A client that goes away from an answer that is not streamed (issue 11, item 5), on the real path: a live
proxy, the real llama.cpp worker on SmolLM2.

The request is sent on a raw socket, which is closed once the worker is generating. Each request here
would run for minutes (thousands of tokens on two loaded cores: end-of-text is banned, or a JSON schema asks
for hundreds of items); the test waits, with a deadline far below that, until the proxy's lease and the
worker's slot are both free, and then a short request is answered. Before the fix the proxy waited for the
whole answer and the worker generated it to the end.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import LiveProxy, running, smollm2_config, wait_until

pytestmark = pytest.mark.real

NAME = "smollm2:135m"  # the name /status lists it under (requests use the alias)
NO_END = {"0": -100, "1": -100, "2": -100}  # <|endoftext|>, <|im_start|>, <|im_end|>
LONG_JSON = {"type": "array", "items": {"type": "string", "minLength": 20}, "minItems": 450}


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    model = smollm2_config(keep_alive="10m")
    model["model"]["n_ctx"] = 8192
    with running(tmp_path_factory.mktemp("gone"), [model]) as live:
        yield live


def send(proxy: LiveProxy, path: str, body: dict[str, Any]) -> socket.socket:
    """A request on a raw socket, left unread: closing the socket is the client going away."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    sock.sendall(head.encode() + data)
    return sock


def busy(proxy: LiveProxy) -> tuple[int, int]:
    """(the proxy's leases, the worker's requests in flight) for the model."""
    status = proxy.status()[NAME]
    return status["in_flight"], (status.get("worker") or {}).get("in_flight", 0)


def drop_while_generating(proxy: LiveProxy, path: str, body: dict[str, Any]) -> None:
    assert httpx.post(proxy.url + "/load/" + NAME, timeout=120).status_code == 200
    sock = send(proxy, path, body)
    try:
        wait_until(lambda: busy(proxy) == (1, 1), timeout=30)
    finally:
        sock.close()
    wait_until(lambda: busy(proxy) == (0, 0), timeout=15)
    short = httpx.post(
        proxy.url + "/v1/completions",
        json={"model": "smollm2", "prompt": "Hello", "max_tokens": 4},
        timeout=60,
    )
    assert short.status_code == 200, short.text


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/completions",
            {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 8000, "logit_bias": NO_END},
        ),
        (
            "/v1/chat/completions",
            {
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 8000,
                "logit_bias": NO_END,
            },
        ),
        (
            "/api/generate",
            {"model": "smollm2", "prompt": "List words.", "stream": False, "format": LONG_JSON},
        ),
    ],
)
def test_a_dropped_answer_stops_and_frees_the_model(proxy: LiveProxy, path: str, body: dict[str, Any]) -> None:
    drop_while_generating(proxy, path, body)
    assert "exited" not in Path(proxy.log_path).read_text()
