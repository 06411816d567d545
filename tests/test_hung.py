"""Hung workers (issue 11, item 8) against a live proxy: limits.worker_idle_timeout, /unload's unload_grace
and ?force=true. Fake worker processes for the edge cases; one SIGSTOPped SmolLM2 on the real path.

The stall watchdog (CPU-based, test_lifecycle.py) is turned off here, so what ends a request is the idle
timeout alone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from tests.harness import LiveProxy, fake_config, gone, smollm2_config, wait_until
from tests.test_lifecycle import _pieces, _stream_chat, chat

MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]
IDLE = {"worker_idle_timeout": "3s", "stall_timeout": "0"}


def test_a_stream_its_worker_stops_feeding_ends_with_an_error_and_the_worker_restarts(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("stuck", "--hang-after", "2", "--tokens", "10")], limits=IDLE)
    assert chat(proxy, "stuck", max_tokens=2).status_code == 200  # not streamed: no hang
    pid = proxy.status()["stuck"]["pid"]
    lines = list(_stream_chat(proxy, "stuck"))  # two chunks, then silence until the idle timeout
    count, end = _pieces(lines)
    assert count == 2 and end is not None and "sent nothing for 3s (limits.worker_idle_timeout)" in end
    wait_until(lambda: proxy.status()["stuck"]["state"] == "stopped")
    assert "sent nothing for 3s" in proxy.status()["stuck"]["last_error"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert "sent nothing for 3s (limits.worker_idle_timeout); killed" in proxy.log()
    # Ollama's dialect ends its stream with an {"error": ...} line
    with httpx.stream(
        "POST",
        proxy.url + "/api/chat",
        timeout=60,
        json={"model": "stuck", "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        ollama_lines = [json.loads(line) for line in r.iter_lines() if line]
    assert "sent nothing for 3s" in ollama_lines[-1]["error"] and not ollama_lines[-1].get("done")
    wait_until(lambda: proxy.status()["stuck"]["state"] == "stopped")  # (that one was killed too)
    assert chat(proxy, "stuck", max_tokens=2).status_code == 200  # and the next request starts it again
    assert proxy.status()["stuck"]["pid"] not in (None, pid)


def test_an_answer_that_is_not_streamed_counts_from_the_send(make_proxy: MakeProxy) -> None:
    """No byte comes before a whole non-streamed answer (OpenAI's stream: false reaches the worker as such;
    Ollama's is streamed from the worker and gathered in the proxy): one slower than the idle timeout is
    cut, as a 503 with Retry-After."""
    proxy = make_proxy([fake_config("slow", "--delay", "600")], limits=IDLE)
    body = {"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": False}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert r.json()["error"]["code"] == "worker_hung" and "sent nothing for 3s" in r.json()["error"]["message"]


def test_a_slow_stream_is_not_hung_the_timeout_counts_from_the_last_byte(make_proxy: MakeProxy) -> None:
    # 20 chunks at 4 a second: 5 s in all, longer than the 3 s idle timeout, never 3 s without a byte
    proxy = make_proxy([fake_config("slow", "--rate", "4", "--tokens", "20")], limits=IDLE)
    assert _pieces(list(_stream_chat(proxy, "slow"))) == (20, "done")


def _unload_in_thread(proxy: LiveProxy, path: str, result: dict[str, Any]) -> threading.Thread:
    thread = threading.Thread(target=lambda: result.update(httpx.post(proxy.url + path, timeout=120).json()))
    thread.start()
    return thread


@pytest.mark.parametrize("force", [False, True])
def test_unload_waits_at_most_unload_grace_and_force_kills_at_once(
    make_proxy: MakeProxy, tmp_path: Path, force: bool
) -> None:
    gate = tmp_path / "gate"  # never opened: the stream is held for ever
    grace = "2s" if not force else "600s"  # forced: no wait at all, whatever the grace
    proxy = make_proxy([fake_config("f", "--gate", str(gate), "--tokens", "20")], defaults={"unload_grace": grace})
    stream = _stream_chat(proxy, "f")
    lines = [next(stream)]
    pid = proxy.status()["f"]["pid"]
    result: dict[str, Any] = {}
    unloading = _unload_in_thread(proxy, "/unload/f?force=true" if force else "/unload/f", result)
    lines += list(stream)  # ends when the worker is killed
    count, end = _pieces(lines)
    assert count == 1 and end is not None and "went away" in end
    unloading.join(120)
    assert result == {"unloaded": ["f"]}
    assert proxy.status()["f"]["state"] == "stopped" and gone([pid])
    if force:
        assert "model f: forced unload requested; killing it with 1 requests in flight" in proxy.log()
    else:
        assert "model f: unload: 1 requests still in flight after unload_grace (2s); killing" in proxy.log()


@pytest.mark.real
def test_a_sigstopped_real_worker_is_killed_after_the_idle_timeout_and_restarts(
    make_proxy: MakeProxy, openai_for: OpenAIFor
) -> None:
    # longer than a fake's: a real prefill on a loaded 2-core box must not count as a hang
    proxy = make_proxy([smollm2_config()], limits={**IDLE, "worker_idle_timeout": "30s"})
    client = openai_for(proxy)
    client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    chunks = client.chat.completions.create(
        model="smollm2:135m",
        messages=[{"role": "user", "content": "Write a long story."}],
        max_tokens=1500,
        stream=True,
        extra_body={"logit_bias": {"2": -100, "0": -100}},  # its end banned: far longer than the test
    )
    stream = iter(chunks)
    next(stream)
    pid = proxy.status()["smollm2:135m"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(openai.APIError, match="sent nothing for 30s"):
            for _ in stream:
                pass
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)  # a no-op once it is killed
    wait_until(lambda: proxy.status()["smollm2:135m"]["state"] == "stopped")  # its exit seen
    assert gone([pid]) and "sent nothing for 30s" in proxy.status()["smollm2:135m"]["last_error"]
    r = client.chat.completions.create(model="smollm2:135m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert r.choices[0].message.content is not None
    assert proxy.status()["smollm2:135m"]["pid"] not in (None, pid)


@pytest.mark.real
def test_a_keep_alive_sent_while_a_real_model_stops_wins(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    """Issue 11, item 11. A SIGSTOPped worker ignores SIGTERM: its stop lasts unload_grace, the window in which
    a request sends its keep_alive; the reload keeps that value, not the config's (5m)."""
    proxy = make_proxy([smollm2_config()], defaults={"unload_grace": "20s"})
    client = openai_for(proxy)
    hi: list[Any] = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="smollm2:135m", messages=hi, max_tokens=1, extra_body={"keep_alive": "2m"})
    pid = proxy.status()["smollm2:135m"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    result: dict[str, Any] = {}
    unloading = _unload_in_thread(proxy, "/unload/smollm2:135m", result)
    wait_until(lambda: proxy.status()["smollm2:135m"]["state"] == "stopping")
    r = client.chat.completions.create(
        model="smollm2:135m", messages=hi, max_tokens=1, extra_body={"keep_alive": "17m"}
    )
    assert r.choices[0].message.content is not None
    unloading.join(120)
    assert result == {"unloaded": ["smollm2:135m"]} and gone([pid])
    status = proxy.status()["smollm2:135m"]
    assert status["pid"] not in (None, pid) and status["keep_alive"] == "17m"
