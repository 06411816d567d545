"""The context window as agents meet it, in every chat dialect: a prompt longer than the context is the
dialect's own error before any generation (Claude Code matches Anthropic's text to compact), an answer never
runs past the context, the model's YAML caps answers that ask for no cap, and the prompt tokens llama.cpp
reused from its cache are reported as cached (real SmolLM2 worker; a recording fake for the defaults)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.errors import ContextLengthExceeded, UpstreamError
from proxy.upstream import error_of
from tests.harness import LiveProxy, fake_config

MODEL = "smollm2:135m"
N_CTX = 2048  # tests/harness.py's smollm2_config
LONG = "hello " * 3000
MakeProxy = Callable[..., LiveProxy]


def _count(url: str, content: str) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    r = httpx.post(url + "/v1/messages/count_tokens", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return int(r.json()["input_tokens"])


@pytest.mark.real
def test_a_prompt_longer_than_the_context_is_each_dialects_own_error(smollm2_proxy: LiveProxy) -> None:
    url = smollm2_proxy.url
    n = _count(url, LONG)
    assert n > N_CTX
    ask = [{"role": "user", "content": LONG}]
    anthropic = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": f"prompt is too long: {n} tokens > {N_CTX} maximum"},
    }
    for stream in (False, True):  # the first loads the model: the streamed one then fails before its stream
        r = httpx.post(
            url + "/v1/messages?beta=true",
            json={"model": MODEL, "max_tokens": 32000, "messages": ask, "stream": stream},
            headers={"anthropic-version": "2023-06-01", "anthropic-beta": "context-management-2025-06-27"},
            timeout=120,
        )
        assert (r.status_code, r.json()) == (400, anthropic)
    openai_words = (
        f"This model's maximum context length is {N_CTX} tokens. However, your messages resulted in {n} tokens. "
        "Please reduce the length of the messages."
    )
    for stream in (False, True):
        r = httpx.post(
            url + "/v1/chat/completions", json={"model": MODEL, "messages": ask, "stream": stream}, timeout=120
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert (err["code"], err["type"], err["param"], err["message"]) == (
            "context_length_exceeded",
            "invalid_request_error",
            "messages",
            openai_words,
        )
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": LONG, "stream": True}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["message"] == openai_words
    r = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": ask, "stream": False}, timeout=120)
    assert (r.status_code, r.json()) == (
        400,
        {"error": f"the input length ({n} tokens) exceeds the context length ({N_CTX} tokens)"},
    )


@pytest.mark.real
def test_an_answer_never_runs_past_the_context(smollm2_proxy: LiveProxy) -> None:
    """A prompt that leaves a few tokens of room and a max_tokens far beyond it, the end-of-turn tokens
    banned so the model cannot stop on its own: the answer ends at the context's end (finish_reason length)."""
    url = smollm2_proxy.url
    k = 1900
    k += N_CTX - 10 - _count(url, "hello " * k)
    prompt = "hello " * k
    n = _count(url, prompt)
    assert N_CTX - 20 < n < N_CTX, n
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 32000,
        "logit_bias": {"0": -100, "1": -100, "2": -100},  # SmolLM2's <|endoftext|>, <|im_start|>, <|im_end|>
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == n
    assert answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"] <= N_CTX


@pytest.mark.real
def test_a_repeated_prompt_is_read_from_the_cache_in_every_dialect(smollm2_proxy: LiveProxy) -> None:
    """The second time a prompt comes, llama.cpp evaluates only its last two tokens (the prompt cache never
    evaluates a last token alone: llama.cpp's CPU kernels give a lone token other logits than a batch): Anthropic's
    cache_read_input_tokens, OpenAI's and the Responses API's cached_tokens say so; the counts add up to
    count_tokens."""
    url = smollm2_proxy.url
    text = "Tell me about the sea and the ships on it. " * 12
    n = _count(url, text)
    ask = {"model": MODEL, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": text}]}
    for stream in (False, True):
        usages = []
        for _ in range(2):
            r = httpx.post(url + "/v1/messages", json={**ask, "stream": stream}, timeout=120)
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
                usages.append(next(e["usage"] for e in events if e["type"] == "message_delta"))
            else:
                usages.append(r.json()["usage"])
        first, second = usages
        assert first["input_tokens"] + first["cache_read_input_tokens"] == n
        assert second["input_tokens"] + second["cache_read_input_tokens"] == n
        assert second["cache_read_input_tokens"] >= n - 2 and second["cache_creation_input_tokens"] == 0
    for stream in (False, True):
        body = {**ask, "stream": stream, "stream_options": {"include_usage": True}} if stream else ask
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data: {")]
            usage = next(c["usage"] for c in chunks if c.get("usage"))
        else:
            usage = r.json()["usage"]
        assert usage["prompt_tokens"] == n and usage["prompt_tokens_details"]["cached_tokens"] >= n - 2
    r = httpx.post(url + "/v1/responses", json={"model": MODEL, "input": text, "max_output_tokens": 2}, timeout=120)
    usage = r.json()["usage"]
    assert usage["input_tokens"] == n and usage["input_tokens_details"]["cached_tokens"] >= n - 2


def test_the_models_yaml_caps_answers_that_ask_for_no_cap_in_every_dialect(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """``sampling.max_tokens`` (or Ollama's ``num_predict``) in the YAML is the answer's cap when the request
    sends none (Codex sends none); a request's own cap wins."""
    record = tmp_path / "bodies.jsonl"
    models = [
        fake_config("capped", "--record", str(record), sampling={"max_tokens": 7}),
        fake_config("predict", "--record", str(record), sampling={"num_predict": 9}),
    ]
    proxy = make_proxy(models)
    hi = [{"role": "user", "content": "hi"}]
    calls: list[tuple[str, dict[str, Any]]] = [
        ("/v1/chat/completions", {"model": "capped", "messages": hi}),
        ("/v1/chat/completions", {"model": "capped", "messages": hi, "stream": True}),
        ("/v1/responses", {"model": "capped", "input": "hi"}),
        ("/api/chat", {"model": "capped", "messages": hi, "stream": False}),
        ("/api/generate", {"model": "capped", "prompt": "hi", "stream": False}),
        ("/v1/chat/completions", {"model": "predict", "messages": hi}),
        ("/v1/chat/completions", {"model": "capped", "messages": hi, "max_tokens": 3}),
        ("/v1/chat/completions", {"model": "capped", "messages": hi, "max_completion_tokens": 4}),
        ("/v1/responses", {"model": "capped", "input": "hi", "max_output_tokens": 5}),
        ("/api/chat", {"model": "capped", "messages": hi, "stream": False, "options": {"num_predict": 6}}),
    ]
    for path, body in calls:
        r = httpx.post(proxy.url + path, json=body, timeout=60)
        assert r.status_code == 200, (path, r.text)
    sent = [json.loads(line)["body"] for line in record.read_text().splitlines()]
    caps = [b.get("max_tokens", b.get("max_completion_tokens")) for b in sent]
    assert caps == [7, 7, 7, 7, 7, 9, 3, 4, 5, 6]
    assert all("num_predict" not in b for b in sent)


def test_a_worker_or_llama_server_saying_the_prompt_does_not_fit_is_typed() -> None:
    """Our worker's error body and llama-server's (``exceed_context_size_error``) carry the counts."""
    ours = {
        "error": {
            "message": "x",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "n_prompt_tokens": 30,
            "n_ctx": 16,
        }
    }
    server = {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 31,
            "n_ctx": 16,
        }
    }
    for body, n in ((ours, 30), (server, 31)):
        exc = error_of(400, json.dumps(body).encode())
        assert isinstance(exc, ContextLengthExceeded) and (exc.prompt_tokens, exc.n_ctx) == (n, 16)
    other = error_of(400, json.dumps({"error": {"message": "bad"}}).encode())
    assert isinstance(other, UpstreamError) and other.message == "bad"
