"""The prompt cache on the real path: a live proxy, the official SDKs, real SmolLM2 workers. One model with the
cache, a copy of it without (its answers are the cold prefills); interleaved conversations, an unload and a
proxy restart in between, through the OpenAI and Ollama dialects. The cache's own edge cases (bad files,
other keys, the disk bound) are in tests/test_prompt_cache.py."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.harness import running, smollm2_config, wait_until

pytestmark = pytest.mark.real

CACHED, COLD = "smollm2:135m", "smollm2-cold"
A = [{"role": "user", "content": "Tell me about the history of Rome, its roads and its emperors. " * 10}]
B = [{"role": "user", "content": "Write a short poem about cats and their many curious habits. " * 10}]


def models() -> list[dict[str, Any]]:
    return [smollm2_config(), smollm2_config(name=COLD, aliases=[], prompt_cache=False)]


def chat(client: openai.OpenAI, model: str, messages: list[dict[str, Any]]) -> tuple[str, int, int]:
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    usage = out.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    return out.choices[0].message.content or "", usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens or 0


def turn(messages: list[dict[str, Any]], answer: str, question: str) -> list[dict[str, Any]]:
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": question}]


def test_answers_after_interleaving_an_unload_and_a_restart_match_a_cold_prefill(tmp_path: Path) -> None:
    folder = tmp_path / "models" / ".cache" / "prompts"
    with running(tmp_path, models()) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        a1, prompt_a1, _ = chat(client, CACHED, A)
        b1, prompt_b1, _ = chat(client, CACHED, B)
        # A's next turn after B's: A's state comes back from RAM
        a2_messages = turn(A, a1, "And its bridges?")
        a2, prompt_a2, cached = chat(client, CACHED, a2_messages)
        assert cached >= prompt_a1 - 2
        assert a2 == chat(client, COLD, a2_messages)[0]

        status = proxy.status()[CACHED]["worker"]["prompt_cache"]
        assert status["enabled"] and status["restores_ram"] >= 1 and status["ram_bytes"] > 0
        off = {"enabled": False, "reason": "off in the model's config"}
        assert proxy.status()[COLD]["worker"]["prompt_cache"] == off
        metrics = httpx.get(proxy.url + "/metrics").text
        assert re.search(r'proxy_prompt_cache_hits_total\{model="smollm2:135m"\} [1-9]', metrics)
        assert re.search(r'proxy_prompt_cache_reused_tokens_total\{model="smollm2:135m"\} [1-9]', metrics)

        # an unload saves its states; B's next turn, through Ollama's dialect, reads B's back from disk
        assert httpx.post(proxy.url + f"/unload/{CACHED}", timeout=60).json() == {"unloaded": [CACHED]}
        assert len(list(folder.glob("*.pcache"))) >= 2
        assert re.search(r"proxy_prompt_cache_disk_bytes [1-9]", httpx.get(proxy.url + "/metrics").text)
        b2_messages = turn(B, b1, "Now one about dogs.")
        options = {"temperature": 0, "num_predict": 12}
        with ollama.Client(host=proxy.url) as oc:
            cold_b2 = oc.chat(model=COLD, messages=b2_messages, options=options)
            b2 = oc.chat(model=CACHED, messages=b2_messages, options=options)
        assert b2.message.content == cold_b2.message.content
        # Ollama counts the prompt tokens it evaluated: B's first turn was not evaluated again (the cold copy
        # evaluates all but the system prompt it shares with its last request)
        assert b2.prompt_eval_count is not None and cold_b2.prompt_eval_count is not None
        assert b2.prompt_eval_count < cold_b2.prompt_eval_count - 100 and prompt_b1 > 100
        client.close()

    # the proxy's shutdown saved them too; a new proxy on the same models/ reads them on demand
    with running(tmp_path, models()) as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0)
        a3_messages = turn(a2_messages, a2, "Which emperor built the most?")
        a3, prompt, cached = chat(client, CACHED, a3_messages)
        assert cached >= prompt_a2 - 2 and prompt > prompt_a2  # all but A's last answer and question
        wait_until(lambda: proxy.status()[CACHED]["worker"]["prompt_cache"]["restores_disk"] == 1, timeout=10)
        assert a3 == chat(client, COLD, a3_messages)[0]
        client.close()
