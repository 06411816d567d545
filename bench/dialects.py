"""Streaming tokens/s of SmolLM2 through the translated dialects against /v1/chat/completions (relayed as is).

The same prompt, greedy (temperature 0), the same number of tokens, through the same proxy and worker:
``/v1/messages`` (Anthropic's events) and ``/v1/responses`` (the Responses API's events), each against
``/v1/chat/completions`` in interleaved rounds; medians of each path and the median and quartiles of the
ratios taken round by round. Goal: messages / chat >= 0.98 (the translation must not cost what the relay
saved). Also the proxy's CPU per streamed token on each path.

    .venv/bin/python -m bench.dialects [--rounds N] [--tokens N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import psutil

from bench.common import load, median, quartiles, save, start_proxy, table
from tests.harness import smollm2_config

MODEL = "smollm2:135m"
SYSTEM = "You are a helpful assistant."
USER = "Write a long story about a lighthouse keeper and the sea."


def _times(lines: Iterator[str], is_token: Callable[[dict[str, Any]], bool]) -> list[float]:
    times = []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        if is_token(json.loads(line[6:])):
            times.append(time.perf_counter())
    return times


def _chat_token(chunk: dict[str, Any]) -> bool:
    return bool(chunk.get("choices") and chunk["choices"][0]["delta"].get("content"))


def _messages_token(event: dict[str, Any]) -> bool:
    return event.get("type") == "content_block_delta" and bool(event["delta"].get("text"))


def _responses_token(event: dict[str, Any]) -> bool:
    return event.get("type") == "response.output_text.delta" and bool(event.get("delta"))


def run(client: httpx.Client, url: str, body: dict[str, Any], is_token: Callable[[dict[str, Any]], bool]) -> float:
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        times = _times(r.iter_lines(), is_token)
    return len(times) / (times[-1] - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 48 tokens")
    args = parser.parse_args()
    rounds, tokens = (3, 48) if args.quick else (args.rounds, args.tokens)

    proxy = start_proxy([smollm2_config()])
    try:
        load(proxy, MODEL)
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
        chat = {"model": MODEL, "messages": messages, "max_tokens": tokens, "temperature": 0, "stream": True}
        anthropic = {
            "model": MODEL,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": USER}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        responses = {
            "model": MODEL,
            "instructions": SYSTEM,
            "input": USER,
            "max_output_tokens": tokens,
            "temperature": 0,
            "stream": True,
        }
        assert proxy.proc is not None
        process = psutil.Process(proxy.proc.pid)
        results: dict[str, list[float]] = {"chat": [], "messages": [], "responses": []}
        cpu: dict[str, float] = dict.fromkeys(results, 0.0)
        with httpx.Client(base_url=proxy.url, timeout=120) as client:
            paths = {
                "chat": lambda: run(client, "/v1/chat/completions", chat, _chat_token),
                "messages": lambda: run(client, "/v1/messages", anthropic, _messages_token),
                "responses": lambda: run(client, "/v1/responses", responses, _responses_token),
            }
            for path in paths.values():  # warm up every path once (prompt cache, connections)
                path()
            for _ in range(rounds):
                for name, path in paths.items():
                    before = sum(process.cpu_times()[:2])
                    results[name].append(path())
                    cpu[name] += sum(process.cpu_times()[:2]) - before
    finally:
        proxy.stop()

    med = {name: median(rates) for name, rates in results.items()}
    paired = {
        name: quartiles([d / c for d, c in zip(results[name], results["chat"], strict=True)])
        for name in ("messages", "responses")
    }
    cpu_per_token = {name: cpu[name] / (rounds * tokens) * 1e6 for name in cpu}
    summary = {
        "rounds": rounds,
        "max_tokens": tokens,
        "tokens_per_s": med,
        "ratio_messages_chat": med["messages"] / med["chat"],
        "ratio_responses_chat": med["responses"] / med["chat"],
        "paired_ratio_quartiles": paired,
        "proxy_cpu_us_per_token": cpu_per_token,
        "raw": results,
    }
    path = save("dialects", summary)
    print(
        table(
            [
                *[(f"{k} tok/s (request -> last token)", f"{v:.1f}") for k, v in med.items()],
                ("messages / chat (goal >= 0.98): of medians", f"{summary['ratio_messages_chat']:.3f}"),
                ("  round by round: q1, median, q3", ", ".join(f"{q:.3f}" for q in paired["messages"])),
                ("responses / chat: of medians", f"{summary['ratio_responses_chat']:.3f}"),
                ("  round by round: q1, median, q3", ", ".join(f"{q:.3f}" for q in paired["responses"])),
                *[(f"proxy CPU per token, {k} (<= max_tokens)", f"{v:.0f} us") for k, v in cpu_per_token.items()],
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
