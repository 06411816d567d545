"""The prompt cache (issue 22).

    .venv/bin/python -m bench.prompt_cache [--rounds 3] [--quick]

``switch``: two SmolLM2 configs (the same GGUF; ``smol-b`` with ``prompt_cache: false``) and room for one
(``limits.max_loaded_models: 1``). Each round a new conversation of about 3,000 tokens: its turn on A; a short
request for B (a switch: A unloads and saves its states); the conversation's next turn on A, timed to its first
content token, A's load included (A reads its state back from disk); then, B loaded, the same turn on B: a
cold prefill on a loaded model, and the greedy answer the return must match. Goal: return / cold <= 0.1
(held-back check: <= 0.3, same answer). The cost: A's save at unload (its worker's log line: seconds, bytes).

``interleaved``: one model loaded, two conversations of about 3,000 tokens taking turns; each turn after the
first, timed to its first token, against a new conversation's first turn on the same loaded model.
Goal: <= 0.3.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import median, save, start_proxy, table
from tests.harness import REPO, LiveProxy, smollm2_config

A, B = "smol-a", "smol-b"
WORDS = (
    "river stone market winter lantern harbor meadow copper violin garden thunder pepper candle mirror "
    "orchard velvet compass bridge falcon ember glacier marble saddle window anchor basket cedar "
).split()


def _text(seed: int, words: int) -> str:
    out, x = [], seed * 7919 + 13
    for i in range(words):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(WORDS[x % len(WORDS)] + ("." if i % 12 == 11 else ""))
    return " ".join(out)


def conversation(seed: int, turns: int = 6, words: int = 330) -> list[dict[str, Any]]:
    """About 3,000 tokens of SmolLM2's: a numbered conversation (its first line makes it its own)."""
    messages: list[dict[str, Any]] = []
    for t in range(turns):
        messages.append({"role": "user", "content": f"Conversation {seed}, note {t}: {_text(seed * 100 + t, words)}"})
        messages.append({"role": "assistant", "content": f"Noted {t}. {_text(seed * 100 + t + 50, words // 4)}"})
    messages.append({"role": "user", "content": "Which word comes up most often in these notes? Answer in a sentence."})
    return messages


def ask(
    client: httpx.Client, model: str, messages: list[dict[str, Any]], tokens: int = 16
) -> tuple[float, str, dict[str, Any]]:
    """(time to the first content token, the greedy answer, usage)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece or choice.get("finish_reason"):  # the first token (or an answer that ends at once)
                    first = first if first is not None else time.perf_counter() - start
                    text.append(piece or "")
    if first is None:
        raise RuntimeError(f"no token from {model}")
    return first, "".join(text), usage


def _saves(proxy: LiveProxy, model: str) -> list[tuple[float, int]]:
    """(seconds, bytes) of each save at unload that the model's worker logged."""
    log = proxy.root / "logs" / f"{model}.log"
    found = re.findall(r"prompt cache: saved \d+ states \((\d+) bytes\) in ([\d.]+)s", log.read_text(errors="replace"))
    return [(float(s), int(b)) for b, s in found]


def switch(rounds: int) -> dict[str, Any]:
    models = [
        smollm2_config(name=A, aliases=[], model={**smollm2_config()["model"], "n_ctx": 4096}),
        smollm2_config(name=B, aliases=[], prompt_cache=False, model={**smollm2_config()["model"], "n_ctx": 4096}),
    ]
    proxy = start_proxy(models, limits={"max_loaded_models": 1, "warm_spare": True})  # the default
    ret, cold, same, cached, prompt = [], [], [], [], []
    try:
        with httpx.Client(base_url=proxy.url, timeout=600) as client:
            short = [{"role": "user", "content": "Hi."}]
            for r in range(rounds):
                messages = conversation(1000 + r)
                _, answer, _ = ask(client, A, messages)
                ask(client, B, short, 2)  # a switch: A saves at unload
                nxt = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And why?"}]
                t_ret, a_ret, usage = ask(client, A, nxt)  # the return: A's load, its state from disk
                ask(client, B, short, 2)
                t_cold, a_cold, usage_cold = ask(client, B, nxt)  # a cold prefill on a loaded model
                ret.append(t_ret)
                cold.append(t_cold)
                same.append(a_ret == a_cold)
                cached.append(int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
                prompt.append(int(usage_cold.get("prompt_tokens") or 0))
                print(f"round {r}: return {t_ret:.2f}s, cold {t_cold:.2f}s, same answer {a_ret == a_cold}", flush=True)
        saves = _saves(proxy, A)
    finally:
        proxy.stop()
    return {
        "prompt_tokens": median([float(p) for p in prompt]),
        "cached_tokens": median([float(c) for c in cached]),
        "return_ttft_s": median(ret),
        "cold_ttft_s": median(cold),
        "ratio": median(ret) / median(cold),
        "same_answer": all(same),
        "save_seconds": median([s for s, _ in saves]),
        "save_bytes": median([float(b) for _, b in saves]),
        "rounds": rounds,
    }


def interleaved(rounds: int) -> dict[str, Any]:
    models = [smollm2_config(name=A, aliases=[], model={**smollm2_config()["model"], "n_ctx": 4096})]
    proxy = start_proxy(models)
    turns, fresh = [], []
    try:
        with httpx.Client(base_url=proxy.url, timeout=600) as client:
            x, y = conversation(2001), conversation(2002)
            for r in range(rounds + 1):
                for conv in (x, y):
                    t, answer, _ = ask(client, A, conv)
                    if r > 0:
                        turns.append(t)
                    conv += [{"role": "assistant", "content": answer}, {"role": "user", "content": f"And {r}?"}]
                if r > 0:  # a new conversation of the same length: a whole prefill
                    fresh.append(ask(client, A, conversation(3000 + r))[0])
                    print(f"round {r}: turns {turns[-2:]}, new conversation {fresh[-1]:.2f}s", flush=True)
    finally:
        proxy.stop()
    return {"turn_ttft_s": median(turns), "new_ttft_s": median(fresh), "ratio": median(turns) / median(fresh)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prompt_cache")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round each")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    sw = switch(rounds)
    il = interleaved(rounds)
    path = save("prompt_cache", {"switch": sw, "interleaved": il})
    rows = [
        ("prompt tokens, reused after the switch", f"{sw['prompt_tokens']:.0f}, {sw['cached_tokens']:.0f}"),
        ("return after a switch, load included (TTFT)", f"{sw['return_ttft_s']:.2f} s"),
        ("cold prefill on a loaded model (TTFT)", f"{sw['cold_ttft_s']:.2f} s"),
        ("return / cold (goal <= 0.1, check <= 0.3)", f"{sw['ratio']:.3f}, same greedy answer: {sw['same_answer']}"),
        ("save at unload", f"{sw['save_seconds']:.2f} s, {sw['save_bytes'] / 2**20:.1f} MiB written"),
        ("interleaved: a turn (TTFT)", f"{il['turn_ttft_s']:.2f} s"),
        ("interleaved: a new conversation (TTFT)", f"{il['new_ttft_s']:.2f} s"),
        ("interleaved turn / new (goal <= 0.3)", f"{il['ratio']:.3f}"),
        ("results", str(Path(path).relative_to(REPO))),
    ]
    print(table(rows))


if __name__ == "__main__":
    main()
