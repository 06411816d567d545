"""Time to first token on a cold model through the proxy vs the bare cost of doing it in a fresh Python.

Through the proxy: POST /unload, then a streaming chat request, timed until its first content chunk
(worker spawn, imports, GGUF load, prompt, first token). Bare: a fresh `python` that imports
llama_cpp, loads the same GGUF and streams the same chat until its first token, timed from spawn.
Interleaved rounds; medians. Goal: the proxy adds <= 150 ms.

    .venv/bin/python -m bench.cold_start [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import httpx
import psutil

from bench.common import median, save, start_proxy, table
from tests.harness import smollm2_config, smollm2_path

MODEL = "smollm2:135m"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello!"}]
BARE = """
import sys, json
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=2048, n_threads=2, n_gpu_layers=-1, n_batch=512, verbose=False)
for chunk in llm.create_chat_completion(messages=json.loads(sys.argv[2]), max_tokens=8, stream=True):
    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
        print("first", flush=True)
        break
"""


def quiet(limit: float = 15.0, deadline_s: float = 10.0) -> None:
    """Let the machine settle (the previous run's process exiting, page cache) before timing a start."""
    deadline = time.monotonic() + deadline_s
    while psutil.cpu_percent(interval=0.25) > limit and time.monotonic() < deadline:
        pass


def bare_ttft() -> float:
    quiet()
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(smollm2_path()), json.dumps(MESSAGES)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - start
    proc.wait()
    if line.strip() != "first":
        raise RuntimeError("the bare run produced no token")
    return elapsed


def proxy_ttft(client: httpx.Client) -> float:
    client.post("/unload").raise_for_status()
    quiet()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    raise RuntimeError("no token through the proxy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    proxy = start_proxy([smollm2_config()])
    results: dict[str, list[float]] = {"proxy": [], "bare": []}
    try:
        with httpx.Client(base_url=proxy.url, timeout=120) as client:
            bare_ttft()  # warm the page cache for both
            proxy_ttft(client)
            for _ in range(rounds):
                results["proxy"].append(proxy_ttft(client))
                results["bare"].append(bare_ttft())
    finally:
        proxy.stop()
    med = {k: median(v) * 1000 for k, v in results.items()}
    summary = {"rounds": rounds, "ttft_ms": med, "added_ms": med["proxy"] - med["bare"], "raw_s": results}
    path = save("cold_start", summary)
    print(
        table(
            [
                ("cold TTFT through the proxy", f"{med['proxy']:.0f} ms"),
                ("bare: fresh python, import, load, first token", f"{med['bare']:.0f} ms"),
                ("added by the proxy (goal <= 150 ms)", f"{summary['added_ms']:.0f} ms"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
