"""Each lifecycle rule once on the real path: a live proxy and the real llama.cpp worker on SmolLM2.

Streams that must outlast another request ban SmolLM2's end tokens (``logit_bias``), so they run to
``max_tokens`` and a cut stream cannot pass for a short answer.
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionChunk

from tests.harness import LiveProxy, fake_config, gone, smollm2_config, smollm2_path, wait_until

pytestmark = pytest.mark.real

MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]
MODEL = "smollm2:135m"
NO_END = {"2": -100, "0": -100}  # <|im_end|> and <|endoftext|>: generation runs to max_tokens


def open_stream(client: openai.OpenAI, max_tokens: int, **extra: Any) -> Iterator[ChatCompletionChunk]:
    """A streamed chat of exactly ``max_tokens`` tokens, with usage; extra goes in the body."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"logit_bias": NO_END, **extra},
    )
    return iter(stream)


def finish(chunks: Iterator[ChatCompletionChunk], seen: int = 1) -> tuple[int, str | None, int]:
    """Read a stream to its end: the chunks with content, the finish reason, the usage's completion tokens
    (an error event raises openai.APIError). ``seen``: content chunks already read."""
    content, reason, tokens = seen, None, -1
    for chunk in chunks:
        for choice in chunk.choices:
            content += bool(choice.delta.content)
            reason = choice.finish_reason or reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return content, reason, tokens


def worker_socket(pid: int) -> str:
    cmd = psutil.Process(pid).cmdline()
    return cmd[cmd.index("--socket") + 1]


def worker_health(pid: int) -> dict[str, Any]:
    transport = httpx.HTTPTransport(uds=worker_socket(pid))
    with httpx.Client(transport=transport, base_url="http://worker", timeout=30) as c:
        health: dict[str, Any] = c.get("/health").json()
        return health


def test_concurrent_first_requests_share_one_real_worker(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    proxy = make_proxy([smollm2_config()])
    client = openai_for(proxy)
    answers: list[str] = []

    def ask() -> None:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        answers.append(r.choices[0].message.content or "")

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 4
    workers = [p for p in proxy.workers() if "proxy.worker" in " ".join(p.cmdline())]
    assert len(workers) == 1


def test_keep_alive_zero_unloads_the_real_worker_and_memory_returns(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([smollm2_config()])
    r = httpx.post(
        proxy.url + "/api/generate",
        json={"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}, "keep_alive": 0},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["done"] is True
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped", timeout=30)
    assert proxy.workers() == []


def test_disconnect_stops_generation_in_the_real_worker(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    proxy = make_proxy([smollm2_config()])
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1900,  # with its end banned: far more than the test waits for below
        "logit_bias": NO_END,
        "stream": True,
    }
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        pid = proxy.status()[MODEL]["pid"]
        assert worker_health(pid)["in_flight"] == 1
    wait_until(lambda: worker_health(pid)["in_flight"] == 0, timeout=30)
    wait_until(lambda: proxy.status()[MODEL]["in_flight"] == 0, timeout=30)
    # and the worker is idle again, not only its count: over a whole second it uses (almost) no CPU, where
    # a generation still running (the slot let go too early, issue 16) keeps a core busy for many seconds
    proc = psutil.Process(pid)
    wait_until(lambda: proc.cpu_percent(interval=1.0) < 5.0, timeout=10, interval=0)
    # the next request gets a whole answer from the same worker
    chunks = open_stream(openai_for(proxy), 16)
    content, reason, tokens = finish(chunks, seen=0)
    assert (reason, tokens) == ("length", 16) and content == tokens
    assert proxy.status()[MODEL]["pid"] == pid


def test_real_worker_killed_mid_stream_gives_an_error_then_restarts(
    make_proxy: MakeProxy, openai_for: OpenAIFor
) -> None:
    proxy = make_proxy([smollm2_config()])
    client = openai_for(proxy)
    chunks = open_stream(client, 1500)  # its end banned: far longer than the kill takes
    next(chunks)
    pid = proxy.status()[MODEL]["pid"]
    os.kill(pid, signal.SIGKILL)
    try:
        for _ in chunks:
            pass
        raise AssertionError("the stream ended without an error")
    except openai.APIError as exc:
        assert "went away" in str(exc)
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped")
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None
    assert proxy.status()[MODEL]["pid"] != pid


def test_bad_model_path_fails_clearly_and_leaves_no_process(make_proxy: MakeProxy) -> None:
    cfg = smollm2_config(name="missing")
    cfg.pop("aliases")
    cfg["model"] = {"path": "nowhere/missing.gguf"}
    proxy = make_proxy([cfg])
    r = httpx.post(
        proxy.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "missing", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "missing.gguf" in message and "exited with code 1" in message
    assert proxy.workers() == []


def test_sigkill_of_the_proxy_leaves_no_real_worker(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([smollm2_config()])
    assert httpx.post(proxy.url + "/load/" + MODEL, timeout=60).status_code == 200
    pids = [p.pid for p in proxy.workers()]
    assert pids
    proxy.stop(signal.SIGKILL)
    wait_until(lambda: gone(pids), timeout=30)


def test_unload_endpoint_stops_the_real_worker(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([smollm2_config()])
    assert httpx.post(proxy.url + "/load/smollm2", timeout=60).json() == {"loaded": MODEL}
    pid = proxy.status()[MODEL]["pid"]
    assert proxy.status()[MODEL]["memory_bytes"] > 50_000_000
    cmdline = psutil.Process(pid).cmdline()
    socket_path = Path(cmdline[cmdline.index("--socket") + 1])
    assert socket_path.exists()
    assert httpx.get(proxy.url + "/unload", timeout=60).status_code == 405  # state changes are POSTs
    assert httpx.post(proxy.url + "/unload", timeout=60).json() == {"unloaded": [MODEL]}
    assert gone([pid])
    assert not socket_path.exists()  # the worker's socket goes with it, not at shutdown
    assert httpx.post(proxy.url + "/unload/" + MODEL, timeout=60).json() == {"unloaded": []}


def test_a_killed_proxys_runtime_dir_is_swept_at_the_next_start(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="rd-"))  # short: a Unix socket's path has at most 107 bytes
    monkeypatch.setenv("TMPDIR", str(tmp))  # the proxies' runtime dirs go here
    first = make_proxy([smollm2_config()])
    assert httpx.post(first.url + "/load/smollm2", timeout=60).status_code == 200
    pids = [p.pid for p in first.workers()]
    (left,) = list(tmp.glob("llm-proxy-*"))
    assert list(left.glob("*.sock"))
    first.stop(signal.SIGKILL)
    wait_until(lambda: gone(pids), timeout=15)
    assert left.exists()  # nobody removed it
    second = make_proxy([smollm2_config()])
    assert not left.exists()
    (own,) = list(tmp.glob("llm-proxy-*"))  # the live proxy's own dir is kept
    assert httpx.post(second.url + "/load/smollm2", timeout=60).status_code == 200
    assert own.exists()


def test_keep_alive_zero_does_not_cut_an_overlapping_stream(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    """keep_alive 0 unloads when the last request ends, not when one of two does: a short embedding
    request ends while a long chat still streams, and the chat gets all its tokens (M1)."""
    proxy = make_proxy([smollm2_config(parallel=2)])  # chat and embeddings side by side (their own contexts)
    client = openai_for(proxy)
    client.embeddings.create(model=MODEL, input="warm up", extra_body={"keep_alive": "5m"})
    pid = proxy.status()[MODEL]["pid"]
    chunks = open_stream(client, 64, keep_alive=0)
    first = next(chunks)
    assert first.choices[0].delta.role == "assistant" or first.choices[0].delta.content is not None
    short = client.embeddings.create(model=MODEL, input="hello", extra_body={"keep_alive": 0})
    assert len(short.data[0].embedding) > 100
    content, reason, tokens = finish(chunks, seen=int(bool(first.choices[0].delta.content)))
    assert (reason, tokens) == ("length", 64) and content == tokens  # every token: not cut
    assert proxy.status()[MODEL]["pid"] in (pid, None)
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped", timeout=30)  # then keep_alive 0 holds
    wait_until(lambda: gone([pid]), timeout=30)


def test_unload_waits_for_the_real_workers_stream(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    proxy = make_proxy([smollm2_config()], defaults={"unload_grace": "120s"})  # it waits at most that long
    chunks = open_stream(openai_for(proxy), 64)
    first = next(chunks)
    pid = proxy.status()[MODEL]["pid"]
    result: dict[str, Any] = {}
    unloading = threading.Thread(
        target=lambda: result.update(httpx.post(proxy.url + "/unload/" + MODEL, timeout=120).json())
    )
    unloading.start()
    wait_until(lambda: f"model {MODEL}: unload requested; waiting for 1 requests in flight" in proxy.log(), timeout=30)
    content, reason, tokens = finish(chunks, seen=int(bool(first.choices[0].delta.content)))
    assert (reason, tokens) == ("length", 64) and content == tokens
    unloading.join(120)
    assert result == {"unloaded": [MODEL]}
    assert gone([pid]) and proxy.status()[MODEL]["state"] == "stopped"


def test_a_model_that_failed_to_load_loads_after_the_backoff(make_proxy: MakeProxy, tmp_path: Path) -> None:
    weights = tmp_path / "late.gguf"
    cfg = smollm2_config(name="late")
    cfg.pop("aliases")
    cfg["model"] = {"path": str(weights), "n_ctx": 512, "n_threads": 2}
    proxy = make_proxy([cfg])
    body = {"model": "late", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    failed = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60)
    assert failed.status_code == 503 and "late.gguf" in failed.json()["error"]["message"]
    assert proxy.status()["late"]["state"] == "failed" and proxy.workers() == []
    weights.symlink_to(smollm2_path())  # the file arrives: the next request after the backoff loads it
    ok = wait_until(
        lambda: (r := httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60)).status_code == 200 and r,
        timeout=60,
        interval=0.2,
    )
    assert ok.json()["choices"][0]["message"]["role"] == "assistant"
    assert proxy.status()["late"]["state"] == "ready" and proxy.status()["late"]["last_error"] is None


def test_pinned_keep_alive_and_a_new_load_from_the_config(make_proxy: MakeProxy) -> None:
    pinned = smollm2_config(name="pinned", keep_alive="10m", pin_keep_alive=True)
    pinned.pop("aliases")
    proxy = make_proxy([smollm2_config(), pinned])  # the shipped config says keep_alive: 10m

    def generate(model: str, **extra: Any) -> None:
        body = {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 2}, **extra}
        assert httpx.post(proxy.url + "/api/generate", json=body, timeout=60).status_code == 200

    generate("pinned", keep_alive=0)  # the client's 0 is ignored: the model stays, for its 10 minutes
    pid = proxy.status()["pinned"]["pid"]
    generate("pinned", keep_alive="1h")
    status = proxy.status()["pinned"]
    assert (status["state"], status["pid"], status["keep_alive"]) == ("ready", pid, "10m")
    generate(MODEL, keep_alive="1h")
    assert proxy.status()[MODEL]["keep_alive"] == "1h"
    generate(MODEL)  # absent: the current value stays while it is loaded
    assert proxy.status()[MODEL]["keep_alive"] == "1h"
    assert httpx.post(proxy.url + "/unload/" + MODEL, timeout=60).json() == {"unloaded": [MODEL]}
    generate(MODEL)  # a new load starts from the config's 10m, not the last client's 1h
    assert proxy.status()[MODEL]["keep_alive"] == "10m"


def test_eviction_breaks_a_keep_alive_tie_by_least_recent_use(make_proxy: MakeProxy) -> None:
    a, b = smollm2_config(name="lru-a"), smollm2_config(name="lru-b")
    for cfg in (a, b):
        cfg.pop("aliases")
    proxy = make_proxy([a, b, fake_config("newcomer")], limits={"max_loaded_models": 2})

    def ask(model: str) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200

    ask("lru-a")
    ask("lru-b")
    ask("lru-a")  # both keep 10m (their config); a is now the more recently used
    b_pid = proxy.status()["lru-b"]["pid"]
    ask("newcomer")
    status = proxy.status()
    assert [status[m]["state"] for m in ("lru-a", "lru-b", "newcomer")] == ["ready", "stopped", "ready"]
    assert gone([b_pid])
