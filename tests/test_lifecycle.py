"""Lifecycle rules and edge cases against a live proxy with fake worker processes (tests/fake_worker.py).

test_lifecycle_real.py covers on the real SmolLM2 worker: one start for concurrent first requests, keep_alive
0 with overlapping requests, a disconnect, a crash mid-stream, a load that fails and then works, /unload
waiting for a stream, pin_keep_alive, a new load from the config, the LRU tie-break, SIGKILL of the proxy.
What a real model cannot be made to do is here only: hang while loading or mid-answer (stall watchdog), end
an answer early, ignore SIGTERM, spawn children of its own, call two tools at once; and the queue limits.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama as ollama_sdk
import openai
import psutil
import pytest

from tests.harness import FAKE_WORKER, LiveProxy, answers, fake_config, free_port, gone, wait_until

MakeProxy = Callable[..., LiveProxy]
OpenAIFor = Callable[[LiveProxy], openai.OpenAI]


def chat(proxy: LiveProxy, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60)


def worker_health(proxy: LiveProxy, name: str) -> dict[str, Any]:
    """The fake worker's own /health (in_flight, generated), found from its command line."""
    pid = proxy.status()[name]["pid"]
    cmdline = psutil.Process(pid).cmdline()
    port = cmdline[cmdline.index("--port") + 1]
    health: dict[str, Any] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).json()
    return health


def test_concurrent_first_requests_start_exactly_one_worker(make_proxy: MakeProxy, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    proxy = make_proxy([fake_config("slow", "--load-time", "1", "--pidfile", str(pidfile))])
    results: list[int] = []

    def one() -> None:
        results.append(chat(proxy, "slow").status_code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 8
    assert len(pidfile.read_text().split()) == 1


def test_idle_timer_starts_when_in_flight_reaches_zero(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    proxy = make_proxy([fake_config("f", "--gate", str(gate), "--tokens", "30")])
    stream = _stream_chat(proxy, "f", keep_alive="200ms")
    lines = [next(stream)]  # the stream is in flight, held by its worker until the gate opens
    pid = proxy.status()["f"]["pid"]
    with pytest.raises(AssertionError):  # watched for a second, five times its keep_alive: it stays
        wait_until(lambda: proxy.status()["f"]["state"] != "ready", timeout=1)
    assert proxy.status()["f"]["in_flight"] == 1
    gate.touch()
    lines += list(stream)
    assert _pieces(lines) == (30, "done")
    wait_until(lambda: proxy.status()["f"]["state"] == "stopped")  # then the 200 ms run out
    wait_until(lambda: gone([pid]))


def test_keep_alive_zero_negative_and_absent(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("f")], defaults={"keep_alive": "5m"})
    assert chat(proxy, "f", keep_alive=-1).status_code == 200
    assert proxy.status()["f"]["expires_at"] == "never"
    assert chat(proxy, "f").status_code == 200  # absent keeps the current value
    assert proxy.status()["f"]["keep_alive"] == "-1"
    assert chat(proxy, "f", keep_alive="10m").status_code == 200
    assert proxy.status()["f"]["keep_alive"] == "10m"
    pid = proxy.status()["f"]["pid"]
    assert chat(proxy, "f", keep_alive=0).status_code == 200
    wait_until(lambda: proxy.status()["f"]["state"] == "stopped", timeout=30)
    wait_until(lambda: gone([pid]))


def test_eviction_unloads_idle_model_with_shortest_keep_alive(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("a"), fake_config("b"), fake_config("c")], limits={"max_loaded_models": 2})
    assert chat(proxy, "a", keep_alive="1h").status_code == 200
    assert chat(proxy, "b", keep_alive="1m").status_code == 200
    b_pid = proxy.status()["b"]["pid"]
    assert chat(proxy, "c").status_code == 200
    status = proxy.status()
    assert (status["a"]["state"], status["b"]["state"], status["c"]["state"]) == ("ready", "stopped", "ready")
    wait_until(lambda: gone([b_pid]))


def test_busy_model_is_not_evicted_the_request_waits(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    proxy = make_proxy(
        [fake_config("a", "--gate", str(gate), "--tokens", "20"), fake_config("b")], limits={"max_loaded_models": 1}
    )
    stream = _stream_chat(proxy, "a")
    lines = [next(stream)]  # a is busy until the gate opens
    result: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: result.update(status=chat(proxy, "b").status_code))
    waiter.start()
    wait_until(lambda: httpx.get(proxy.url + "/status").json()["queued"] == 1)
    assert proxy.status()["a"]["state"] == "ready" and proxy.status()["a"]["in_flight"] == 1
    gate.touch()
    lines += list(stream)
    assert _pieces(lines) == (20, "done")  # the busy stream was not cut
    waiter.join(60)
    assert result["status"] == 200
    assert proxy.status()["b"]["state"] == "ready" and proxy.status()["a"]["state"] == "stopped"


def test_queue_beyond_max_queue_gets_503_with_retry_after(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    proxy = make_proxy(
        [fake_config("a", "--gate", str(gate), "--tokens", "30"), fake_config("b"), fake_config("c")],
        limits={"max_loaded_models": 1, "max_queue": 1},
    )
    busy = _stream_chat(proxy, "a")
    next(busy)  # a is busy until the gate opens
    waiter = threading.Thread(target=lambda: chat(proxy, "b"))
    waiter.start()
    wait_until(lambda: httpx.get(proxy.url + "/status").json()["queued"] == 1)
    refused = chat(proxy, "c")
    assert refused.status_code == 503
    assert int(refused.headers["Retry-After"]) >= 1
    assert "waiting" in refused.json()["error"]["message"]
    body = {"model": "c", "messages": [{"role": "user", "content": "x"}]}
    refused = httpx.post(proxy.url + "/api/chat", json=body)
    assert refused.status_code == 503 and "error" in refused.json()
    gate.touch()
    assert _pieces([next(busy), *busy])[1] == "done"
    waiter.join(60)


def test_crash_on_load_reports_the_workers_reason(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("broken", "--crash-on-load")])
    response = chat(proxy, "broken")
    assert response.status_code == 503
    message = response.json()["error"]["message"]
    assert "exited with code 7" in message and "file is corrupt" in message
    assert response.headers["Retry-After"]
    assert proxy.workers() == []
    status = proxy.status()["broken"]
    assert status["state"] == "failed" and "file is corrupt" in status["last_error"]


def test_hung_load_is_killed_at_the_load_timeout(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("hang", "--hang-on-load", load_timeout="1s")])
    response = httpx.post(proxy.url + "/api/generate", json={"model": "hang", "prompt": "x"}, timeout=30)
    assert response.status_code == 503
    assert "did not load within 1s" in response.json()["error"]
    wait_until(lambda: proxy.workers() == [], timeout=30)


def test_worker_dying_mid_stream_ends_with_an_error_and_restarts(make_proxy: MakeProxy, openai_for: OpenAIFor) -> None:
    proxy = make_proxy([fake_config("crashy", "--crash-after", "5", "--tokens", "20", "--rate", "50")])
    client = openai_for(proxy)
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in client.chat.completions.create(
            model="crashy", messages=[{"role": "user", "content": "x"}], stream=True
        ):
            got.extend(c.delta.content or "" for c in chunk.choices)
    assert len(got) == 5
    assert "went away" in str(info.value)
    wait_until(lambda: proxy.status()["crashy"]["state"] == "stopped")
    assert "exited unexpectedly" in proxy.status()["crashy"]["last_error"]
    # Ollama's dialect: an NDJSON {"error": ...} line ends the stream
    lines = []
    with httpx.stream(
        "POST",
        proxy.url + "/api/chat",
        timeout=60,
        json={"model": "crashy", "messages": [{"role": "user", "content": "x"}]},
    ) as response:
        assert response.status_code == 200
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert "error" in lines[-1] and all(not line.get("done") for line in lines)
    # and the next request starts it again
    response = chat(proxy, "crashy", max_tokens=3)
    assert response.status_code == 200


def test_client_disconnect_stops_generation_and_releases_the_lease(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("long", "--rate", "100", "--tokens", "100000")])
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        timeout=60,
        json={"model": "long", "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
        assert worker_health(proxy, "long")["in_flight"] == 1
    wait_until(lambda: worker_health(proxy, "long")["in_flight"] == 0, timeout=30)
    generated = worker_health(proxy, "long")["generated"]
    assert generated < 100000  # it stopped long before the end of its answer
    wait_until(lambda: proxy.status()["long"]["in_flight"] == 0, timeout=30)
    # generation really stopped (its generator is closed): the count stays put, at 100 chunks/s otherwise
    assert worker_health(proxy, "long")["generated"] == generated


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_proxy_stops_every_worker(make_proxy: MakeProxy, tmp_path: Path, sig: int) -> None:
    """Shutdown stops each worker with SIGTERM (each records it), and SIGKILLs one that ignores it after
    the grace; not only the parent-death signal, which would kill them without a SIGTERM."""
    signals = {name: tmp_path / f"{name}.signals" for name in ("a", "b")}
    proxy = make_proxy(
        [
            fake_config("a", "--signals", str(signals["a"])),
            fake_config("b", "--ignore-sigterm", "--signals", str(signals["b"])),
        ],
        defaults={"unload_grace": "1s"},
    )
    assert chat(proxy, "a").status_code == 200 and chat(proxy, "b").status_code == 200
    pids = {name: proxy.status()[name]["pid"] for name in ("a", "b")}
    trees = {name: _tree(pid) for name, pid in pids.items()}  # an external cmd runs under its guard
    assert proxy.stop(sig) in (0, -sig)  # uvicorn re-raises the signal once it has shut down
    wait_until(lambda: gone([p for tree in trees.values() for p in tree]), timeout=30)
    for name, path in signals.items():
        received, pid = path.read_text().split()
        assert received == "SIGTERM" and int(pid) in trees[name], name
    assert f"worker {pids['b']} ignored SIGTERM for 1s; killing" in proxy.log()


def _tree(pid: int) -> set[int]:
    """A process and its descendants' pids."""
    return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}


def test_killing_the_proxy_leaves_no_worker(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("a"), fake_config("b", "--ignore-sigterm")])
    assert chat(proxy, "a").status_code == 200 and chat(proxy, "b").status_code == 200
    pids = [p.pid for p in proxy.workers()]
    proxy.stop(signal.SIGKILL)
    wait_until(lambda: gone(pids), timeout=30)


def test_external_server_at_a_url_is_routed_to_but_never_stopped(make_proxy: MakeProxy) -> None:
    import subprocess

    port = free_port()
    server = subprocess.Popen([sys.executable, FAKE_WORKER, "--port", str(port)])
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/health"), timeout=20)
        proxy = make_proxy([{"name": "remote", "backend": "external", "url": f"http://127.0.0.1:{port}"}])
        assert chat(proxy, "remote").json()["choices"][0]["message"]["content"].startswith("tok")
        lines = httpx.post(
            proxy.url + "/api/chat",
            timeout=30,
            json={"model": "remote", "messages": [{"role": "user", "content": "x"}]},
        ).text
        assert json.loads(lines.splitlines()[-1])["done"] is True
        assert httpx.post(proxy.url + "/unload/remote").status_code == 200
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)


def _openai_stream_lines(proxy: LiveProxy, model: str) -> list[str]:
    with httpx.stream(
        "POST",
        proxy.url + "/v1/chat/completions",
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True},
    ) as r:
        assert r.status_code == 200
        return [line for line in r.iter_lines() if line and not line.startswith(":")]  # data, not load comments


def _ollama_stream_lines(proxy: LiveProxy, model: str) -> list[dict[str, Any]]:
    with httpx.stream(
        "POST",
        proxy.url + "/api/chat",
        timeout=60,
        json={"model": model, "messages": [{"role": "user", "content": "x"}]},
    ) as r:
        assert r.status_code == 200
        return [json.loads(line) for line in r.iter_lines() if line]


def test_a_stream_its_worker_ends_early_ends_with_an_error_not_silently(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("short", "--end-after", "3", "--tokens", "10")])
    lines = _openai_stream_lines(proxy, "short")
    assert len(lines) == 4 and "data: [DONE]" not in lines
    assert "ended the answer early" in json.loads(lines[-1][len("data: ") :])["error"]["message"]
    out = _ollama_stream_lines(proxy, "short")
    assert "ended the answer early" in out[-1]["error"] and not any(line.get("done") for line in out)
    response = httpx.post(
        proxy.url + "/api/chat",
        timeout=60,
        json={"model": "short", "messages": [{"role": "user", "content": "x"}], "stream": False},
    )
    assert response.status_code == 503 and "ended the answer early" in response.json()["error"]


def test_a_worker_that_stops_making_progress_is_killed_and_its_streams_get_an_error(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("stuck", "--hang-after", "3", "--tokens", "10")], limits={"stall_timeout": "2s"})
    assert chat(proxy, "stuck", max_tokens=2).status_code == 200
    pid = proxy.status()["stuck"]["pid"]
    # idle, it uses no CPU, as it should: left alone past the stall timeout (polled, not slept)
    with pytest.raises(AssertionError):
        wait_until(lambda: proxy.status()["stuck"]["pid"] != pid, timeout=3)
    lines = _openai_stream_lines(proxy, "stuck")  # ends once the watchdog has killed the stuck worker
    assert len(lines) == 4 and "went away" in json.loads(lines[-1][len("data: ") :])["error"]["message"]
    wait_until(lambda: proxy.status()["stuck"]["state"] == "stopped")
    assert "made no progress for 2s" in proxy.status()["stuck"]["last_error"]
    assert not psutil.pid_exists(pid)
    assert "made no progress" in proxy.log()


def test_a_worker_crash_reaches_the_log_at_warning_level_with_its_last_words(make_proxy: MakeProxy) -> None:
    proxy = make_proxy([fake_config("crashy", "--crash-after", "2", "--tokens", "10")])
    lines = _openai_stream_lines(proxy, "crashy")
    assert "error" in lines[-1]
    wait_until(lambda: "fake worker: crashing after 2 chunks" in proxy.log(), timeout=30)
    entry = next(line for line in proxy.log().splitlines() if "exited with code 3" in line)
    assert "WARNING" in entry and "crashy" in entry


def test_both_dialects_send_the_worker_the_same_request(
    make_proxy: MakeProxy, tmp_path: Path, openai_for: OpenAIFor
) -> None:
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("rec", "--record", str(record))])
    messages = [{"role": "user", "content": "Name a colour."}]
    list(
        openai_for(proxy).chat.completions.create(
            model="rec",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    with ollama_sdk.Client(host=proxy.url, timeout=60) as client:
        client.chat(model="rec", messages=messages, options={"num_predict": 8, "temperature": 0})
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    assert [s["path"] for s in sent] == ["/v1/chat/completions"] * 2
    ignore = ("stream", "stream_options")  # how the answer travels back, not what is asked
    openai_body, ollama_body = ({k: v for k, v in s["body"].items() if k not in ignore} for s in sent)
    assert openai_body == ollama_body == {"model": "rec", "messages": messages, "max_tokens": 8, "temperature": 0}


WEATHER_TOOL: Any = {  # typed by neither SDK: each has its own tool type
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_two_tool_calls_at_once_pass_through_both_dialects(
    make_proxy: MakeProxy, tmp_path: Path, openai_for: OpenAIFor
) -> None:
    """Tools reach the worker in OpenAI's shape from either dialect, and two parallel tool calls, streamed
    in interleaved pieces, come back as two calls with their own arguments (SmolLM2 rarely calls tools,
    so a fake worker makes the calls)."""
    record = tmp_path / "bodies.jsonl"
    proxy = make_proxy([fake_config("tooly", "--tool-calls", "--record", str(record))])
    messages: Any = [{"role": "user", "content": "Weather and time in Paris?"}]
    calls: dict[int, dict[str, str]] = {}
    stream = openai_for(proxy).chat.completions.create(
        model="tooly", messages=messages, tools=[WEATHER_TOOL], stream=True
    )
    finish = None
    for chunk in stream:
        for call in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(call.index, {"name": "", "arguments": ""})
            slot["name"] += (call.function and call.function.name) or ""
            slot["arguments"] += (call.function and call.function.arguments) or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    with ollama_sdk.Client(host=proxy.url, timeout=60) as client:
        reply = client.chat(model="tooly", messages=messages, tools=[WEATHER_TOOL])
    got = [(c.function.name, dict(c.function.arguments)) for c in reply.message.tool_calls or []]
    assert got == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    assert [body["tools"] for body in sent] == [[WEATHER_TOOL], [WEATHER_TOOL]]


def _stream_chat(proxy: LiveProxy, model: str, **extra: object) -> Iterator[str]:
    """The SSE data lines of a streamed chat, yielded as they come (the stream stays open between reads); the
    comments sent while its model loads (loading feedback, tests/test_loading.py) are skipped."""
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True, **extra}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        yield from (line for line in r.iter_lines() if line and not line.startswith(":"))


def _pieces(lines: list[str]) -> tuple[int, str | None]:
    """The content chunks of an OpenAI SSE stream and how it ended ([DONE], or its error's message)."""
    events = [json.loads(line[len("data: ") :]) for line in lines if line != "data: [DONE]"]
    errors = [e["error"]["message"] for e in events if "error" in e]
    content = sum(1 for e in events for c in e.get("choices", []) if c["delta"].get("content"))
    return content, (errors[0] if errors else "done" if lines[-1] == "data: [DONE]" else None)


def test_keep_alive_zero_waits_for_every_overlapping_request(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """With keep_alive 0, the end of one request does not unload the model under another one still
    streaming: the idle timer starts only when the in-flight count reaches zero."""
    gate = tmp_path / "gate"
    proxy = make_proxy([fake_config("f", "--gate", str(gate), "--tokens", "40", parallel=2)])  # two at once
    long = _stream_chat(proxy, "f", keep_alive=0)
    lines = [next(long)]  # the long stream is open, held by its worker after its first chunk
    assert proxy.status()["f"]["in_flight"] == 1
    pid = proxy.status()["f"]["pid"]
    assert chat(proxy, "f", keep_alive=0, max_tokens=3).status_code == 200  # a short request, done meanwhile
    assert proxy.status()["f"]["state"] == "ready" and proxy.status()["f"]["pid"] == pid
    gate.touch()
    lines += list(long)
    assert _pieces(lines) == (40, "done")  # every chunk, then [DONE]: not cut when the short one ended
    wait_until(lambda: proxy.status()["f"]["state"] == "stopped", timeout=30)  # and then keep_alive 0 holds
    wait_until(lambda: gone([pid]), timeout=30)


def test_unload_waits_for_the_stream_in_flight(make_proxy: MakeProxy, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    # /unload waits for it at most unload_grace (test_hung.py: then kills)
    proxy = make_proxy([fake_config("f", "--gate", str(gate), "--tokens", "20")], defaults={"unload_grace": "120s"})
    stream = _stream_chat(proxy, "f")
    lines = [next(stream)]
    pid = proxy.status()["f"]["pid"]
    result: dict[str, Any] = {}
    unloading = threading.Thread(target=lambda: result.update(httpx.post(proxy.url + "/unload/f", timeout=60).json()))
    unloading.start()
    wait_until(lambda: "model f: unload requested; waiting for 1 requests in flight" in proxy.log())
    assert unloading.is_alive() and proxy.status()["f"]["state"] == "ready"  # waiting, the stream untouched
    gate.touch()
    lines += list(stream)
    assert _pieces(lines) == (20, "done")
    unloading.join(60)
    assert result == {"unloaded": ["f"]}
    assert proxy.status()["f"]["state"] == "stopped" and gone([pid])


def test_unload_sends_sigterm_and_kills_a_worker_that_ignores_it(make_proxy: MakeProxy, tmp_path: Path) -> None:
    signals = {name: tmp_path / f"{name}.signals" for name in ("a", "b")}
    proxy = make_proxy(
        [
            fake_config("a", "--signals", str(signals["a"])),
            fake_config("b", "--ignore-sigterm", "--signals", str(signals["b"])),
        ],
        defaults={"unload_grace": "1s"},
    )
    assert chat(proxy, "a").status_code == 200 and chat(proxy, "b").status_code == 200
    pids = {name: proxy.status()[name]["pid"] for name in ("a", "b")}
    trees = {name: _tree(pid) for name, pid in pids.items()}  # an external cmd runs under its guard
    for name in ("a", "b"):
        assert httpx.post(proxy.url + f"/unload/{name}", timeout=60).json() == {"unloaded": [name]}
        assert gone([pids[name]]), name  # gone when /unload answers
        wait_until(lambda: gone(list(trees[name])))  # noqa: B023 (waited on within the iteration)
        received, pid = signals[name].read_text().split()
        assert received == "SIGTERM" and int(pid) in trees[name], name
    log = proxy.log()
    assert f"worker {pids['b']} ignored SIGTERM for 1s; killing" in log
    assert f"worker {pids['a']} ignored SIGTERM" not in log
    assert proxy.workers() == []


def test_unload_stops_the_processes_an_external_cmd_started(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """An external server's own children (a shell's background job here) go with it: the whole process
    group is stopped, not only the process the proxy started."""
    child = tmp_path / "child.pid"
    script = f'sleep 1000 & echo $! > {child}; exec "$0" "$@"'
    cmd = ["bash", "-c", script, sys.executable, FAKE_WORKER, "--port", "${PORT}"]
    proxy = make_proxy([{"name": "spawner", "backend": "external", "cmd": cmd}])
    assert chat(proxy, "spawner").status_code == 200
    pid, sleeper = proxy.status()["spawner"]["pid"], int(child.read_text())
    assert sleeper in _tree(pid) and psutil.Process(sleeper).name() == "sleep"
    assert httpx.post(proxy.url + "/unload/spawner", timeout=60).json() == {"unloaded": ["spawner"]}
    wait_until(lambda: gone([pid, sleeper]), timeout=30)


def test_a_failed_load_is_retried_after_the_backoff(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """A model that fails to load answers 503 with the reason, to every request that waited for that
    start; requests within the backoff start no new worker; a request after it starts one, which loads."""
    weights, pidfile = tmp_path / "weights", tmp_path / "pids"
    proxy = make_proxy([fake_config("flaky", "--fail-unless", str(weights), "--pidfile", str(pidfile))])
    firsts: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: firsts.append(chat(proxy, "flaky"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the first requests share one start, and each gets its failure
    assert all(r.status_code == 503 and "file is corrupt" in r.json()["error"]["message"] for r in firsts)
    assert proxy.status()["flaky"]["state"] == "failed"
    again = [chat(proxy, "flaky") for _ in range(4)]
    assert all(r.status_code == 503 and "file is corrupt" in r.json()["error"]["message"] for r in again)
    assert all(int(r.headers["Retry-After"]) >= 1 for r in again)
    # refused within the backoff (1 s after one failure, then 2 s, ...) without a new start: one start for
    # the seven requests (two or three if this machine stalled past a backoff), not one each
    starts = len(pidfile.read_text().split())
    assert starts <= 3
    weights.touch()  # now it can load: a request after the backoff starts it again
    ok = wait_until(lambda: (r := chat(proxy, "flaky")).status_code == 200 and r, timeout=30)
    assert ok.json()["choices"][0]["message"]["content"].startswith("tok")
    assert len(pidfile.read_text().split()) == starts + 1  # the failed starts, then one that worked
    assert proxy.status()["flaky"]["state"] == "ready" and proxy.status()["flaky"]["last_error"] is None


STREAMS: dict[str, tuple[str, dict[str, Any], str]] = {  # route, body, the end of a complete stream
    "openai": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "data: [DONE]"),
    "ollama": ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}, '"done":true'),
    "anthropic": ("/v1/messages", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 50}, "message_stop"),
    "responses": ("/v1/responses", {"input": "x"}, "response.completed"),
}


@pytest.mark.parametrize("dialect", STREAMS)
def test_each_dialect_relays_a_piece_while_the_worker_holds_the_rest(
    make_proxy: MakeProxy, tmp_path: Path, dialect: str
) -> None:
    """The proxy streams: the first piece reaches the client while the worker still holds the rest (a
    proxy that buffered whole answers would wait for the gate, which opens only after that piece)."""
    gate = tmp_path / "gate"
    proxy = make_proxy([fake_config("f", "--gate", str(gate), "--tokens", "5")])
    path, body, end = STREAMS[dialect]
    with httpx.stream(
        "POST", proxy.url + path, json={"model": "f", "stream": True, **body}, timeout=httpx.Timeout(60, read=30)
    ) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(line for line in lines if "tok" in line)]  # held by the worker after this piece
        assert not gate.exists() and proxy.status()["f"]["in_flight"] == 1
        gate.touch()
        seen += list(lines)
    text = "".join(seen).replace(" ", "")
    assert end.replace(" ", "") in text and text.count("tok") >= 5


def test_requests_beyond_the_parallel_slots_wait_in_the_proxy(make_proxy: MakeProxy, tmp_path: Path) -> None:
    """The (parallel+1)th request waits in the proxy's queue, not in the worker; max_queue bounds it (503)."""
    gate = tmp_path / "gate"
    proxy = make_proxy([fake_config("a", "--gate", str(gate), "--tokens", "10", parallel=2)], limits={"max_queue": 1})
    first, second = _stream_chat(proxy, "a"), _stream_chat(proxy, "a")
    held = [[next(first)], [next(second)]]  # both slots hold a stream until the gate opens
    result: dict[str, int] = {}
    third = threading.Thread(target=lambda: result.update(status=chat(proxy, "a").status_code))
    third.start()
    wait_until(lambda: httpx.get(proxy.url + "/status").json()["queued"] == 1)
    assert worker_health(proxy, "a")["in_flight"] == 2  # the third never reached the worker
    refused = chat(proxy, "a")
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    gate.touch()
    held[0] += first
    held[1] += second
    assert _pieces(held[0]) == (10, "done") and _pieces(held[1]) == (10, "done")
    third.join(60)
    assert result["status"] == 200
