"""Each lifecycle rule once on the real path: a live proxy and the real llama.cpp worker on SmolLM2."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.harness import LiveProxy, gone, smollm2_config, wait_until

MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]
MODEL = "smollm2:135m"


def worker_socket(pid: int) -> str:
    cmd = psutil.Process(pid).cmdline()
    return cmd[cmd.index("--socket") + 1]


def worker_health(pid: int) -> dict[str, Any]:
    transport = httpx.HTTPTransport(uds=worker_socket(pid))
    with httpx.Client(transport=transport, base_url="http://worker", timeout=5) as c:
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
    wait_until(lambda: proxy.status()[MODEL]["state"] == "stopped", timeout=15)
    assert proxy.workers() == []


def test_disconnect_stops_generation_in_the_real_worker(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([smollm2_config()])
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "stream": True,
    }
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        pid = proxy.status()[MODEL]["pid"]
        assert worker_health(pid)["in_flight"] == 1
    wait_until(lambda: worker_health(pid)["in_flight"] == 0, timeout=1.5)
    wait_until(lambda: proxy.status()[MODEL]["in_flight"] == 0, timeout=1.5)
    # and the worker is idle again: its CPU time stops growing
    proc = psutil.Process(pid)

    def idle() -> bool:
        before = sum(proc.cpu_times()[:2])
        with httpx.Client(transport=httpx.HTTPTransport(uds=worker_socket(pid))) as c:
            c.get("http://worker/health")  # a round trip as the measuring interval
            c.get("http://worker/health")
        return sum(proc.cpu_times()[:2]) - before < 0.05

    wait_until(idle, timeout=2)


def test_real_worker_killed_mid_stream_gives_an_error_then_restarts(
    make_proxy: MakeProxy, openai_for: OpenAIFor
) -> None:
    proxy = make_proxy([smollm2_config()])
    client = openai_for(proxy)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=1500, stream=True
    )
    chunks = iter(stream)
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
    wait_until(lambda: gone(pids), timeout=10)


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
