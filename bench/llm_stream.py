"""Streaming tokens/s of SmolLM2: through the proxy, the same worker reached directly, and in-process.

Interleaved rounds (proxy, direct, in-process, ...); medians of each path, and the median and quartiles of
the ratios taken round by round (adjacent runs share the host's slow drift; on this shared 2-core VM
single rounds scatter by +-10%). Goals: proxy/direct >= 0.99,
proxy/in-process >= 0.97.

    .venv/bin/python -m bench.llm_stream [--rounds N] [--tokens N] [--threads N] [--quick] [--relay]

The proxy path hands each stream off to the worker (``proxy.handoff``: the worker writes its tokens to the
client); ``--relay`` turns that off (``server.stream_handoff: false``), the path every token took before.

``--threads 1`` leaves one of this machine's two cores to the proxy and the client: the gap between
``--threads 2`` and ``--threads 1`` shows how much of the loss is CPU contention rather than the proxy's work.

The worker's own CPU per token beyond llama.cpp's: the worker process's CPU per token on the direct path (its
HTTP server, the pump thread, a token's JSON, and llama.cpp) less this process's CPU per token in-process
(llama.cpp alone, the same prompt and settings).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil

from bench.common import load, median, quartiles, runtime, save, start_proxy, table, worker_arg
from tests.harness import smollm2_config, smollm2_path

MODEL = "smollm2:135m"
# With its own system message the proxy adds none, so all three paths see the very same prompt (and the
# same llama.cpp prompt cache state).
PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."},
]


def _content_times(lines: Iterator[str]) -> list[float]:
    times = []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return times


def over_http(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        return start, _content_times(r.iter_lines())


def in_process(llm: Any, body: dict[str, Any]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    times = []
    for chunk in llm.create_chat_completion(
        messages=body["messages"], max_tokens=body["max_tokens"], temperature=0, seed=1, stream=True
    ):
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return start, times


def rates(start: float, times: list[float]) -> tuple[float, float]:
    """(tokens/s from request to last token, tokens/s from first to last token)."""
    total = len(times) / (times[-1] - start)
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    return total, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, worker and in-process alike")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 48 tokens")
    parser.add_argument(
        "--relay", action="store_true", help="server.stream_handoff off: the proxy relays every token (the old path)"
    )
    args = parser.parse_args()
    rounds, tokens = (3, 48) if args.quick else (args.rounds, args.tokens)

    from llama_cpp import Llama

    cfg = smollm2_config()
    cfg["model"]["n_threads"] = args.threads
    proxy = start_proxy([cfg], server={"stream_handoff": not args.relay})
    try:
        status = load(proxy, MODEL)
        sock = worker_arg(status["pid"], "--socket")
        llm = Llama(model_path=str(smollm2_path()), n_ctx=2048, n_threads=args.threads, verbose=False)
        body = {"model": MODEL, "messages": PROMPT, "max_tokens": tokens, "temperature": 0, "seed": 1, "stream": True}
        results: dict[str, list[tuple[float, float, int]]] = {"proxy": [], "direct": [], "in_process": []}
        with (
            httpx.Client(timeout=120) as via_proxy,
            httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://worker", timeout=120) as direct,
        ):
            runs = {
                "proxy": lambda: over_http(via_proxy, proxy.url + "/v1/chat/completions", body),
                "direct": lambda: over_http(direct, "/v1/chat/completions", body),
                "in_process": lambda: in_process(llm, body),
            }
            for run in runs.values():  # warm up every path once (prompt cache, connections)
                run()
            assert proxy.proc is not None
            proxy_process = psutil.Process(proxy.proc.pid)
            # whose CPU each path's tokens cost: the proxy's on the proxy path, the worker's on the direct path,
            # this process's (llama.cpp alone) in-process
            measured = {"proxy": proxy_process, "direct": psutil.Process(status["pid"]), "in_process": psutil.Process()}
            cpu = dict.fromkeys(runs, 0.0)
            worker_via_proxy = 0.0  # the worker's CPU on the proxy path (the handoff's writes are the worker's)
            for _ in range(rounds):
                for name, run in runs.items():
                    before = runtime(measured[name].pid)
                    worker_before = sum(measured["direct"].cpu_times()[:2])
                    start, times = run()
                    cpu[name] += runtime(measured[name].pid) - before
                    if name == "proxy":
                        worker_via_proxy += sum(measured["direct"].cpu_times()[:2]) - worker_before
                    results[name].append((*rates(start, times), len(times)))
        llm.close()
    finally:
        proxy.stop()

    med = {name: (median([r[0] for r in rs]), median([r[1] for r in rs])) for name, rs in results.items()}
    paired = {
        other: quartiles([p[0] / o[0] for p, o in zip(results["proxy"], results[other], strict=True)])
        for other in ("direct", "in_process")
    }
    summary = {
        "rounds": rounds,
        "threads": args.threads,
        "max_tokens": tokens,
        "tokens_per_s": {k: {"request_to_last": v[0], "first_to_last": v[1]} for k, v in med.items()},
        "ratio_proxy_direct": med["proxy"][0] / med["direct"][0],
        "ratio_proxy_in_process": med["proxy"][0] / med["in_process"][0],
        "paired_ratio_quartiles": paired,
        "proxy_cpu_us_per_token": cpu["proxy"] / sum(r[2] for r in results["proxy"]) * 1e6,
        "worker_cpu_us_per_token": cpu["direct"] / sum(r[2] for r in results["direct"]) * 1e6,
        "worker_cpu_us_per_token_via_proxy": worker_via_proxy / sum(r[2] for r in results["proxy"]) * 1e6,
        "handoff": not args.relay,
        "in_process_cpu_us_per_token": cpu["in_process"] / sum(r[2] for r in results["in_process"]) * 1e6,
        "raw": results,
    }
    path = save("llm_stream", summary)
    print(
        table(
            [
                ("llama.cpp threads", str(args.threads)),
                *[(f"{k} tok/s (request->last, first->last)", f"{v[0]:.1f}, {v[1]:.1f}") for k, v in med.items()],
                ("proxy / direct (goal >= 0.99): of medians", f"{summary['ratio_proxy_direct']:.3f}"),
                ("  round by round: q1, median, q3", ", ".join(f"{q:.3f}" for q in paired["direct"])),
                ("proxy / in-process (goal >= 0.97): of medians", f"{summary['ratio_proxy_in_process']:.3f}"),
                ("  round by round: q1, median, q3", ", ".join(f"{q:.3f}" for q in paired["in_process"])),
                ("proxy CPU per streamed token (user + system)", f"{summary['proxy_cpu_us_per_token']:.0f} us"),
                (
                    "worker CPU per token, direct; llama.cpp's in-process",
                    f"{summary['worker_cpu_us_per_token']:.0f} us, {summary['in_process_cpu_us_per_token']:.0f} us",
                ),
                (
                    "  the worker's own per token (the difference)",
                    f"{summary['worker_cpu_us_per_token'] - summary['in_process_cpu_us_per_token']:.0f} us",
                ),
                (
                    f"worker CPU per token via the proxy ({'relay' if args.relay else 'handoff'}); its own",
                    f"{summary['worker_cpu_us_per_token_via_proxy']:.0f} us, "
                    f"{summary['worker_cpu_us_per_token_via_proxy'] - summary['in_process_cpu_us_per_token']:.0f} us",
                ),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
