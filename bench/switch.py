"""Switching between models (issue 17).

    .venv/bin/python -m bench.switch --memory     estimate against measured memory, each model of the embedded default

``--memory``: a proxy over the embedded default's configs with a fresh ``models/``; each model's estimate
from /status, then its measured peak (the worker tree's RSS, taken by the manager after each request)
after one ordinary request and, for llama.cpp, one that fills its context: the estimate counts the whole
KV cache and compute buffer, which a short request leaves mostly untouched (not resident).
    .venv/bin/python -m bench.switch --switch     a switch's time to first token / a bare cold load (goal <= 1.15)
    .venv/bin/python -m bench.switch --batching   64 requests alternating between two models (goal >= 3x)

``--switch``: two SmolLM2 configs (different names, the same GGUF) and room for one
(``limits.max_loaded_models: 1``); A loaded and idle, then a streamed request for B, timed to its first
content token. Against it, the bare cold load of bench.cold_start: a fresh Python that imports llama_cpp,
loads the GGUF and streams its first token, timed from process start. Interleaved rounds, medians.
``--warm-spare on|off|both`` picks ``limits.warm_spare`` for the proxy (both: one proxy each, interleaved).

``--batching``: 64 non-streamed requests alternating A, B, A, ... at concurrency 8, against a proxy with
the default ``limits.max_wait_for_switch`` (30 s: batches by model) and one with 0.001 s (every request
for the other model is overdue at once, so the queue serves in arrival order: about one switch per
request). Switches are the rise of ``proxy_model_loads_total``; the longest wait is the slowest
request's whole time, against the bound.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import re
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.cold_start import MESSAGES, bare_ttft, quiet
from bench.common import median, save, start_proxy, table
from tests.harness import REPO, LiveProxy, smollm2_config, wait_until

MiB = 2**20
A, B = "smol-a", "smol-b"


def _wav(url: str) -> bytes:
    r = httpx.post(
        url + "/v1/audio/speech",
        json={"model": "piper-joe", "input": "Hello there, this is a short test.", "response_format": "wav"},
        timeout=120,
    )
    r.raise_for_status()
    return r.content


def _use(url: str, name: str, wav: bytes) -> None:
    """One ordinary request, so what is loaded lazily (pages of the weights, buffers) is counted."""
    if name == "smollm2:135m":
        body: dict[str, Any] = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
        httpx.post(url + "/v1/chat/completions", json=body, timeout=120).raise_for_status()
    elif name == "piper-joe":
        _wav(url)
    elif name == "whisper-base":
        files = {"file": ("a.wav", wav, "audio/wav")}
        httpx.post(url + "/v1/audio/transcriptions", files=files, data={"model": name}, timeout=120).raise_for_status()


def _fill_context(url: str, name: str, n_ctx: int) -> None:
    """A prompt of nearly ``n_ctx`` tokens (" word" is one token in SmolLM2's vocabulary), so the KV cache
    and the compute buffer that a llama.cpp estimate counts in full are resident when the peak is taken."""
    content = "word " * (n_ctx - 200)
    body = {"model": name, "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()


def memory() -> dict[str, Any]:
    models = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "configs").glob("*.yaml"))]
    proxy = start_proxy(models, limits={"max_loaded_models": 1})  # a fresh models/: no cached measurement
    rows: dict[str, Any] = {}
    try:

        def needs() -> dict[str, Any] | None:
            status = proxy.status()
            found = {n: s["need"] for n, s in status.items()}
            return found if all(found.values()) else None

        estimates = wait_until(needs, timeout=120)
        wav = b""
        for cfg in models:
            name = cfg["name"]
            httpx.post(f"{proxy.url}/load/{name}", timeout=300).raise_for_status()
            if name == "piper-joe" or not wav:
                wav = _wav(proxy.url) if name == "piper-joe" else wav
            _use(proxy.url, name, wav)
            one = proxy.status()[name]["need"]
            if cfg["backend"] == "llama_cpp":
                _fill_context(proxy.url, name, int(cfg["model"].get("n_ctx") or 4096))
            measured = proxy.status()[name]["need"]
            est = estimates[name]
            rows[name] = {
                "estimate_mb": est["ram"] / MiB,
                "after_one_request_mb": one["ram"] / MiB,
                "measured_mb": measured["ram"] / MiB,
                "source": measured["source"],
                "estimate_over_measured": est["ram"] / measured["ram"],
            }
    finally:
        proxy.stop()
    return rows


# -- switch time ---------------------------------------------------------------------------------------
def _pair(**limits: Any) -> LiveProxy:
    """A proxy with two SmolLM2 configs (same GGUF, different names) and room for one."""
    models = [smollm2_config(name=A, aliases=[]), smollm2_config(name=B, aliases=[])]
    return start_proxy(models, limits={"max_loaded_models": 1, **limits})


def _ttft(client: httpx.Client, model: str) -> float:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {") and '"content"' in line and '"content":""' not in line:
                took = time.perf_counter() - start
                for _ in lines:  # let the answer end, so the model is idle
                    pass
                return took
    raise RuntimeError(f"no token from {model}")


def _settled(proxy: LiveProxy, loaded: str, spare: bool) -> None:
    """The switched-to model loaded and the other stopped; with the warm spare on, a spare waiting."""

    def done() -> bool:
        status = proxy.status()
        idle = status[loaded]["state"] == "ready" and all(
            s["state"] == "stopped" for n, s in status.items() if n != loaded
        )
        spares = httpx.get(proxy.url + "/status", timeout=10).json().get("spares", [])
        return idle and (not spare or any(s.get("state") == "waiting" for s in spares))

    wait_until(done, timeout=120)


def switch(rounds: int, variants: list[str]) -> dict[str, Any]:
    proxies = {v: _pair(warm_spare=v == "on") for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    times["bare"] = []
    try:
        clients = {v: httpx.Client(base_url=p.url, timeout=120) for v, p in proxies.items()}
        bare_ttft()  # the page cache, for everyone
        for v, client in clients.items():
            _ttft(client, A)
            _settled(proxies[v], A, v == "on")
        target = {v: B for v in variants}
        for _ in range(rounds):
            for v, client in clients.items():
                quiet()
                times[v].append(_ttft(client, target[v]))
                _settled(proxies[v], target[v], v == "on")
                target[v] = A if target[v] == B else B
            times["bare"].append(bare_ttft())
        for client in clients.values():
            client.close()
    finally:
        for p in proxies.values():
            p.stop()
    med = {k: median(v) for k, v in times.items()}
    return {
        "rounds": rounds,
        "ttft_ms": {k: v * 1000 for k, v in med.items()},
        "switch_over_bare": {v: med[v] / med["bare"] for v in variants},
        "raw_s": times,
    }


# -- batching -----------------------------------------------------------------------------------------
def _loads(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(r"^proxy_model_loads_total\{[^}]*\} (\S+)$", text, re.M))


def _one(url: str, model: str) -> float:
    body = {"model": model, "messages": MESSAGES, "max_tokens": 4}
    start = time.perf_counter()
    httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def batching(requests: int, concurrency: int) -> dict[str, Any]:
    """The same alternating requests twice: at ``concurrency`` (the queue batches them by model) and one at a
    time (every request a switch: what a scheduler in arrival order does with alternating arrivals, as the
    proxy did before the queue). Both with the default ``max_wait_for_switch`` of 30 s."""
    out: dict[str, Any] = {}
    for label, lanes in (("batches", concurrency), ("one switch per request", 1)):
        bound = 30.0
        proxy = _pair(max_wait_for_switch=bound, max_queue=requests * 2)
        try:
            _one(proxy.url, A)
            before = _loads(proxy.url)
            quiet()
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
                urls = [proxy.url] * requests
                waits = list(pool.map(_one, urls, [(A, B)[i % 2] for i in range(requests)]))
            total = time.perf_counter() - start
            out[label] = {
                "max_wait_for_switch_s": bound,
                "concurrency": lanes,
                "switches": _loads(proxy.url) - before,
                "total_s": total,
                "longest_wait_s": max(waits),
                "median_wait_s": median(waits),
            }
        finally:
            proxy.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true", help="estimate against measured memory (the default)")
    parser.add_argument("--switch", action="store_true", help="switch TTFT against a bare cold load")
    parser.add_argument("--batching", action="store_true", help="64 alternating requests: batches vs one switch each")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warm-spare", choices=["on", "off", "both"], default="both")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 16 requests")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    rows: list[tuple[str, str]] = []
    if args.switch:
        variants = ["off", "on"] if args.warm_spare == "both" else [args.warm_spare]
        res = switch(rounds, variants)
        path = save("switch_time", res)
        rows += [("bare cold load, first token", f"{res['ttft_ms']['bare']:.0f} ms")]
        for v in variants:
            rows.append(
                (
                    f"switch, first token (warm_spare {v})",
                    f"{res['ttft_ms'][v]:.0f} ms, {res['switch_over_bare'][v]:.2f}x bare (goal <= 1.15)",
                )
            )
        rows.append(("results", str(Path(path).relative_to(REPO))))
    if args.batching:
        n = 16 if args.quick else args.requests
        res = batching(n, args.concurrency)
        path = save("switch_batching", res)
        for label, r in res.items():
            rows.append(
                (
                    f"{n} requests, {label} (concurrency {r['concurrency']})",
                    f"{r['switches']:.0f} switches, {r['total_s']:.1f} s, longest wait {r['longest_wait_s']:.1f} s",
                )
            )
        speedup = res["one switch per request"]["total_s"] / res["batches"]["total_s"]
        rows.append(("batches vs one switch per request (goal >= 3x)", f"{speedup:.2f}x faster"))
        rows.append(("results", str(Path(path).relative_to(REPO))))
    if args.memory or not (args.switch or args.batching):
        mem = memory()
        path = save("switch_memory", mem)
        rows += [
            (
                n,
                f"estimate {r['estimate_mb']:.0f} MiB, measured peak {r['measured_mb']:.0f} MiB "
                f"({r['after_one_request_mb']:.0f} after one request), ratio {r['estimate_over_measured']:.2f}",
            )
            for n, r in mem.items()
        ]
        rows.append(("results", str(Path(path).relative_to(REPO))))
    print(table(rows))


if __name__ == "__main__":
    main()
