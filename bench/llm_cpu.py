"""The proxy's CPU per streamed token of SmolLM2, quickly: no direct or in-process path, only the proxy's (and its
worker's) CPU over a few streams one after another, and the proxy's CPU while idle with the model loaded (what a
slow stream's per-token figure also carries). ``bench.llm_stream`` is the full comparison; this is its proxy
column, for before/after runs on a busy machine.

    .venv/bin/python -m bench.llm_cpu [--streams N] [--tokens N] [--threads N] [--relay]

``--relay``: ``server.stream_handoff: false``, the path every streamed token took before the handoff (run it
alternately with the default for a before/after on the same machine).
"""

from __future__ import annotations

import argparse
import time

import httpx
import psutil

from bench.common import load, runtime, save, start_proxy, table
from bench.llm_stream import MODEL, PROMPT
from tests.harness import smollm2_config

IDLE = 10.0  # seconds of idle measured, the model loaded


def cpu(process: psutil.Process) -> float:
    return float(sum(process.cpu_times()[:2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    parser.add_argument(
        "--relay", action="store_true", help="server.stream_handoff off: the proxy relays every token (the old path)"
    )
    args = parser.parse_args()

    cfg = smollm2_config()
    cfg["model"]["n_threads"] = args.threads
    proxy = start_proxy([cfg], server={"stream_handoff": not args.relay})
    try:
        status = load(proxy, MODEL)
        assert proxy.proc is not None
        proxy_process, worker = psutil.Process(proxy.proc.pid), psutil.Process(status["pid"])
        body = {"model": MODEL, "messages": PROMPT, "max_tokens": args.tokens, "temperature": 0, "seed": 1}
        url = proxy.url + "/v1/chat/completions"
        with httpx.Client(timeout=300) as client:
            with client.stream("POST", url, json={**body, "stream": True}) as r:  # warm up
                for _ in r.iter_lines():
                    pass
            before, worker_idle_before = runtime(proxy_process.pid), runtime(worker.pid)
            time.sleep(IDLE)
            idle = (runtime(proxy_process.pid) - before) / IDLE
            worker_idle = (runtime(worker.pid) - worker_idle_before) / IDLE
            tokens = 0
            proxy_before, worker_before, start = runtime(proxy_process.pid), cpu(worker), time.perf_counter()
            for _ in range(args.streams):
                with client.stream("POST", url, json={**body, "stream": True}) as r:
                    tokens += sum(1 for line in r.iter_lines() if line.startswith("data: {") and '"content"' in line)
            seconds = time.perf_counter() - start
            # the proxy's on the scheduler's ns clock: a handed-off stream costs it a few ms (cpu_times: 10 ms ticks)
            proxy_cpu, worker_cpu = runtime(proxy_process.pid) - proxy_before, cpu(worker) - worker_before
    finally:
        proxy.stop()

    summary = {
        "streams": args.streams,
        "handoff": not args.relay,
        "proxy_cpu_us_per_stream": proxy_cpu / args.streams * 1e6,
        "threads": args.threads,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "proxy_cpu_us_per_token": proxy_cpu / tokens * 1e6,
        "worker_cpu_us_per_token": worker_cpu / tokens * 1e6,
        "proxy_idle_cpu_percent": idle * 100,
        "worker_idle_cpu_percent": worker_idle * 100,
    }
    path = save("llm_cpu", summary)
    print(
        table(
            [
                ("tokens, tokens/s", f"{tokens}, {summary['tokens_per_s']:.1f}"),
                ("path", "relay" if args.relay else "handoff"),
                ("proxy CPU per streamed token (user + system)", f"{summary['proxy_cpu_us_per_token']:.0f} us"),
                ("proxy CPU per stream", f"{summary['proxy_cpu_us_per_stream']:.0f} us"),
                ("worker CPU per token (llama.cpp included)", f"{summary['worker_cpu_us_per_token']:.0f} us"),
                ("proxy CPU idle, model loaded", f"{summary['proxy_idle_cpu_percent']:.3f}% of a core"),
                ("worker CPU idle, model loaded", f"{summary['worker_idle_cpu_percent']:.3f}% of a core"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
