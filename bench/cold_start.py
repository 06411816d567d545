"""Time to first token on a cold model through the proxy vs the bare cost of doing it in a fresh Python.

Through the proxy: POST /unload, then a streaming chat request, timed until its first content chunk
(worker spawn, imports, GGUF load, prompt, first token). Bare: a fresh `python` that imports
llama_cpp, loads the same GGUF and streams the same chat until its first token, timed from spawn.
Interleaved rounds; medians. Goal: the proxy adds <= 150 ms (issue 23: <= 30 ms).

``--warm-spare on|off`` sets ``limits.warm_spare`` (default on, the proxy's default: after the first load a
spare waits, so each /unload-then-request loads in it). ``--fresh``: a new proxy for each round, and its first
request timed once its start-up is over (no warm spare still importing, the CPU quiet): the first load of a
backend, which a warm spare at start-up (issue 23) spares the imports.

    .venv/bin/python -m bench.cold_start [--rounds N] [--quick] [--warm-spare on|off] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.common import median, save, start_proxy, table
from tests.harness import LiveProxy, smollm2_config, smollm2_path

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


def proxy_ttft(client: httpx.Client, unload: bool = True) -> float:
    if unload:
        client.post("/unload").raise_for_status()
    quiet()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
                return time.perf_counter() - start
    raise RuntimeError("no token through the proxy")


def settled(client: httpx.Client) -> None:
    """The proxy's start-up over: the CPU quiet and no warm spare still importing."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        quiet()
        spares = client.get("/status").json().get("spares", [])
        if all(s["state"] == "waiting" for s in spares):
            return


def fresh_ttft(root: Path, spare: bool) -> float:
    """A new proxy's first request, once its start-up is over (``root``'s models/ kept across rounds: its
    cache of the GGUF's facts, read once, as a restarted proxy has it)."""
    proxy = LiveProxy(root, [smollm2_config()], limits={"warm_spare": spare}).start()
    try:
        with httpx.Client(base_url=proxy.url, timeout=120) as client:
            settled(client)
            return proxy_ttft(client, unload=False)
    finally:
        proxy.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--warm-spare", choices=["on", "off"], default="on")
    parser.add_argument("--fresh", action="store_true", help="a new proxy each round: its first request")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    spare = args.warm_spare == "on"
    results: dict[str, list[float]] = {"proxy": [], "bare": []}
    bare_ttft()  # warm the page cache for both
    if args.fresh:
        root = Path(tempfile.mkdtemp(prefix="bench-"))
        fresh_ttft(root, spare)  # the GGUF's facts read (the first start ever of a model), then cached
        for _ in range(rounds):
            results["proxy"].append(fresh_ttft(root, spare))
            results["bare"].append(bare_ttft())
    else:
        proxy = start_proxy([smollm2_config()], limits={"warm_spare": spare})
        try:
            with httpx.Client(base_url=proxy.url, timeout=120) as client:
                proxy_ttft(client)
                for _ in range(rounds):
                    if spare:
                        settled(client)  # the spare that the last load asked for, ready
                    results["proxy"].append(proxy_ttft(client))
                    results["bare"].append(bare_ttft())
        finally:
            proxy.stop()
    med = {k: median(v) * 1000 for k, v in results.items()}
    summary = {
        "rounds": rounds,
        "warm_spare": spare,
        "fresh": args.fresh,
        "ttft_ms": med,
        "added_ms": med["proxy"] - med["bare"],
        "raw_s": results,
    }
    path = save("cold_start", summary)
    print(
        table(
            [
                ("cold TTFT through the proxy", f"{med['proxy']:.0f} ms"),
                ("bare: fresh python, import, load, first token", f"{med['bare']:.0f} ms"),
                ("added by the proxy (goal <= 30 ms)", f"{summary['added_ms']:.0f} ms"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
