"""Loading feedback (proxy/loading.py): a streamed /v1/* request that waits for its model's load gets its
headers at once and SSE comments until the answer; a load that fails ends the stream with the dialect's
error event; Ollama's NDJSON and a model with ``loading_feedback: false`` keep the old behaviour.

The slow loads are fake workers whose load lasts until the test creates a file (``--load-until``), so
nothing here depends on timing: what must come before the load ends is checked while it cannot have ended.
The real path (SmolLM2's own load, its worker's progress lines) is at the end.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import yaml
from openai.types.chat import ChatCompletionMessageParam

from proxy.config import load_settings
from proxy.supervisor import Worker
from tests.harness import LiveProxy, fake_config, running, smollm2_config, wait_until

MODELS = ("slow-raw", "slow-openai", "slow-anthropic", "slow-responses", "fails", "fails-anthropic", "quiet", "ndjson")
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gates")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, gates: Path) -> Iterator[LiveProxy]:
    never = str(gates / "never")  # --fail-unless a file nobody makes: the load fails once its gate opens
    models = [
        fake_config("slow-raw", "--load-until", str(gates / "slow-raw"), "--tokens", "3"),
        fake_config("slow-openai", "--load-until", str(gates / "slow-openai"), "--tokens", "3"),
        fake_config("slow-anthropic", "--load-until", str(gates / "slow-anthropic"), "--tokens", "3"),
        fake_config("slow-responses", "--load-until", str(gates / "slow-responses"), "--tokens", "3"),
        fake_config("fails", "--load-until", str(gates / "fails"), "--fail-unless", never),
        fake_config("fails-anthropic", "--load-until", str(gates / "fails-anthropic"), "--fail-unless", never),
        fake_config("quiet", "--load-until", str(gates / "quiet"), "--fail-unless", never, loading_feedback=False),
        fake_config("ndjson", "--load-until", str(gates / "ndjson"), "--fail-unless", never),
    ]
    with running(
        tmp_path_factory.mktemp("loading"),
        models,
        limits={"max_loaded_models": len(MODELS)},
        server={"loading_comment_interval": "50ms"},
    ) as live:
        yield live


def starting(proxy: LiveProxy, name: str) -> bool:
    return bool(proxy.status()[name]["state"] == "starting")


def open_gate(gates: Path, name: str) -> None:
    (gates / name).touch()


def test_comments_come_before_the_load_ends_then_the_answer(proxy: LiveProxy, gates: Path) -> None:
    body = {"model": "slow-raw", "messages": CHAT, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        comments: list[str] = []
        while len(comments) < 3:  # the load cannot end: its gate is closed
            line = next(lines)
            if line:
                assert line.startswith(": loading slow-raw"), line
                comments.append(line)
        assert starting(proxy, "slow-raw")
        open_gate(gates, "slow-raw")
        rest = [line for line in lines if line and not line.startswith(":")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in rest[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "tok tok tok "


def _when_starting(proxy: LiveProxy, gates: Path, name: str) -> threading.Thread:
    """Open the model's gate once the proxy says it is starting (the client got its headers before)."""

    def run() -> None:
        wait_until(lambda: starting(proxy, name))
        open_gate(gates, name)

    thread = threading.Thread(target=run, daemon=True)
    return thread


def test_the_openai_sdk_gets_its_stream_while_the_model_loads(proxy: LiveProxy, gates: Path) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    stream = client.chat.completions.create(model="slow-openai", messages=messages, stream=True)
    # the call returned with the load still waiting for its gate: the headers came first
    assert starting(proxy, "slow-openai")
    open_gate(gates, "slow-openai")
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok tok tok "
    client.close()


def test_the_anthropic_sdk_parses_a_stream_with_comments(proxy: LiveProxy, gates: Path) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)
    gate = _when_starting(proxy, gates, "slow-anthropic")
    gate.start()
    with client.messages.stream(model="slow-anthropic", max_tokens=3, messages=CHAT) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
    gate.join()
    assert text == "tok tok tok "
    client.close()


def test_the_responses_stream_starts_while_the_model_loads(proxy: LiveProxy, gates: Path) -> None:
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.responses.create(model="slow-responses", input="hi", stream=True)
    assert starting(proxy, "slow-responses")
    open_gate(gates, "slow-responses")
    kinds = [event.type for event in stream]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    client.close()


def test_a_load_that_fails_ends_the_stream_with_an_error_event(proxy: LiveProxy, gates: Path) -> None:
    body = {"model": "fails", "messages": CHAT, "stream": True}
    with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(lines).startswith(": loading fails")
        open_gate(gates, "fails")
        data = [line for line in lines if line.startswith("data: ")]
    assert len(data) == 1, data  # the error, and nothing else
    error = json.loads(data[0][6:])["error"]
    assert "exited with code 7" in error["message"]
    # the SDK raises it (the next request finds the model failed a moment ago: a 503 status, before any byte)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="fails", messages=CHAT, stream=True)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    client.close()


def test_the_anthropic_sdk_raises_the_error_event_of_a_failed_load(proxy: LiveProxy, gates: Path) -> None:
    client = anthropic.Anthropic(base_url=proxy.url, api_key="unused", max_retries=0, timeout=30)
    gate = _when_starting(proxy, gates, "fails-anthropic")
    gate.start()
    with pytest.raises(anthropic.APIStatusError) as info:  # noqa: PT012
        with client.messages.stream(model="fails-anthropic", max_tokens=3, messages=CHAT) as stream:  # type: ignore[arg-type]
            "".join(stream.text_stream)
    gate.join()
    assert "exited with code 7" in str(info.value)
    client.close()


def test_opted_out_and_ollama_streams_answer_with_a_status(proxy: LiveProxy, gates: Path) -> None:
    open_gate(gates, "quiet")
    body = {"model": "quiet", "messages": CHAT, "stream": True}
    r = httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503  # no early headers: the failed load is a status
    assert "exited with code 7" in r.json()["error"]["message"]
    open_gate(gates, "ndjson")  # Ollama's NDJSON sends nothing until loaded, as Ollama does
    r = httpx.post(proxy.url + "/api/chat", json={"model": "ndjson", "messages": CHAT, "stream": True}, timeout=60)
    assert r.status_code == 503
    assert "exited with code 7" in r.json()["error"]


def test_refusals_before_the_load_stay_statuses(proxy: LiveProxy) -> None:
    body = {"model": "nope", "messages": CHAT, "stream": True}
    assert httpx.post(proxy.url + "/v1/chat/completions", json=body, timeout=30).status_code == 404
    r = httpx.post(proxy.url + "/v1/messages", json={**body, "max_tokens": 3}, timeout=30)
    assert r.status_code == 404 and r.json()["type"] == "error"


# -- the real path ---------------------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_cold_stream_has_a_loading_comment_and_its_worker_reports_progress(tmp_path: Path) -> None:
    with running(tmp_path, [smollm2_config()]) as live:
        body = {"model": "smollm2", "messages": CHAT, "stream": True, "max_tokens": 4}
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    # the first line goes out when the load begins (the worker takes far longer to start than that)
    assert lines[0].startswith(": loading smollm2:135m"), lines[:3]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith(": loading smollm2:135m") for line in comments)
    print("comments seen during SmolLM2's cold load:", comments)


@pytest.mark.real
async def test_a_real_workers_progress_lines_reach_the_supervisor(tmp_path: Path) -> None:
    root = tmp_path
    (root / "configs").mkdir()
    (root / "configs" / "smollm2.yaml").write_text(yaml.safe_dump(smollm2_config()))
    (root / "config.yml").write_text(yaml.safe_dump({"api_tokens": None}))
    cfg = load_settings(root / "config.yml").models[0]
    seen: list[tuple[float, str]] = []
    worker = Worker(cfg, root, lambda w: None)
    worker.on_progress = lambda fraction, phase: seen.append((fraction, phase))
    try:
        await asyncio.wait_for(worker.start(), 120)
    finally:
        await worker.stop(5)
    phases = [phase for _, phase in seen]
    assert phases[:2] == ["importing", "loading weights"], seen  # both said before the ready line
    weights = [f for f, phase in seen if phase == "loading weights"]
    assert weights and weights == sorted(weights), seen  # llama.cpp's callback, as it goes
    print("progress lines from SmolLM2's worker:", seen)
