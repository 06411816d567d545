"""A cluster of three proxies on this machine and a real redis-server (issue 27), with fake workers.

- a warm forward's added latency: a small non-streaming request for a model loaded on node a, sent to node
  b (which forwards it) against the same request sent to a; interleaved rounds; p50 and p99 of each, and
  their difference (goal <= 2 ms at p50)
- the entry node's CPU time per forwarded request (what the hop costs on an idle machine), and for scale the
  serving node's CPU time per direct request (the whole proxy's work for one request: parse, auth, worker call)
- the cold-load count: N simultaneous first requests for a model every node can serve (a 1 s load), spread
  over the three nodes (goal: exactly one load)
- the time to leave out a killed node: SIGKILL, then /cluster on another node polled every 20 ms until
  it says the node is not alive (goal <= 4 s)
- Redis commands per warm request: INFO commandstats around a run of warm forwarded requests, less the
  heartbeats' own (their count is the ZADDs, one per publication; the commands per heartbeat are
  measured idle first) (goal <= 0.05)

    .venv/bin/python -m bench.cluster [--requests N] [--first N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import redis
from prometheus_client.parser import text_string_to_metric_families

from bench.common import median, save, table
from tests.harness import LiveProxy, fake_config, wait_until
from tests.redis_server import RedisServer

SECRET = "bench-cluster-secret-0123456789abcdef"
BODY = {"model": "warm", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
# node a has the warm model; every node can serve the cold one (a 1 s load)
CATALOG = {"a": ("warm", "cold"), "b": ("cold",), "c": ("cold",)}


def start(root: Path, redis_url: str) -> dict[str, LiveProxy]:
    nodes = {}
    for name, models in CATALOG.items():
        configs = [fake_config(m, "--load-time", "1") if m == "cold" else fake_config(m) for m in models]
        cluster = {"redis_url": redis_url, "node": name, "secret": SECRET}
        nodes[name] = LiveProxy(root / name, configs, cluster=cluster)
    threads = [threading.Thread(target=n.start) for n in nodes.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for node in nodes.values():
        wait_until(lambda node=node: len(alive(node)) == 3, timeout=20)  # type: ignore[misc]
    return nodes


def alive(node: LiveProxy) -> set[str]:
    r = httpx.get(node.url + "/cluster", timeout=5)
    return {n["node"] for n in r.json()["nodes"] if n["alive"]}


def loads(node: LiveProxy, model: str) -> float:
    text = httpx.get(node.url + "/metrics", timeout=5).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "proxy_model_loads_total" and s.labels.get("model") == model
    )


async def timed(session: aiohttp.ClientSession, url: str) -> tuple[float, str]:
    start = time.perf_counter()
    async with session.post(url, json=BODY) as r:
        await r.read()
        assert r.status == 200, await r.text()
        return time.perf_counter() - start, r.headers.get("x-served-by", "")


async def latencies(urls: dict[str, str], rounds: int, per_round: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in urls}
    async with aiohttp.ClientSession() as session:
        for url in urls.values():  # warm the connections and the forward path
            for _ in range(5):
                await timed(session, url)
        for _ in range(rounds * per_round):  # one of each in turn: the machine's load drifts alike for both
            for name, url in urls.items():
                seconds, served_by = await timed(session, url)
                assert served_by == "a", served_by
                out[name].append(seconds)
    return out


def commands(client: redis.Redis) -> tuple[int, int]:
    """Every command Redis ran (those inside the heartbeat's Lua scripts included), and its ZADDs: one per
    node's heartbeat (its publication), which tells how many heartbeats ran."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values()), int(stats.get("cmdstat_zadd", {}).get("calls", 0))


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=100, help="per variant and round")
    parser.add_argument("--first", type=int, default=20, help="simultaneous first requests for the cold model")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, per_round = (2, 30) if args.quick else (args.rounds, args.requests)

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    server = RedisServer(root / "redis").start()
    nodes: dict[str, LiveProxy] = {}
    try:
        nodes = start(root, server.url)
        httpx.post(nodes["a"].url + "/load/warm", timeout=60).raise_for_status()
        wait_until(
            lambda: any(
                m["name"] == "warm" and m["state"] == "ready"
                for n in httpx.get(nodes["b"].url + "/cluster", timeout=5).json()["nodes"]
                for m in n["models"]
            ),
            timeout=10,
        )
        path = "/v1/chat/completions"
        urls = {"direct": nodes["a"].url + path, "forwarded": nodes["b"].url + path}
        entry = psutil.Process(nodes["b"].proc.pid) if nodes["b"].proc is not None else None
        cpu0 = sum(entry.cpu_times()[:2]) if entry is not None else 0.0
        lat = asyncio.run(latencies(urls, rounds, per_round))
        forwards = rounds * per_round + 5
        cpu_per_forward = (sum(entry.cpu_times()[:2]) - cpu0) / forwards if entry is not None else float("nan")

        serving = psutil.Process(nodes["a"].proc.pid) if nodes["a"].proc is not None else None
        direct_n = per_round * max(2, rounds // 2)  # a whole request's CPU on the node that serves it, for scale
        cpu0 = sum(serving.cpu_times()[:2]) if serving is not None else 0.0
        asyncio.run(latencies({"direct": urls["direct"]}, 1, direct_n))
        cpu_per_direct = (sum(serving.cpu_times()[:2]) - cpu0) / (direct_n + 5) if serving else float("nan")

        client = redis.Redis.from_url(server.url)
        (idle_calls, idle_beats), idle_t0 = commands(client), time.perf_counter()
        time.sleep(3.0)
        calls, beats = commands(client)
        idle_rate = (calls - idle_calls - 1) / (time.perf_counter() - idle_t0)
        per_beat = (calls - idle_calls - 1) / max(1, beats - idle_beats)  # the heartbeat's own commands
        warm_n = per_round * max(2, rounds // 2)
        run_start, run_beats = commands(client)
        asyncio.run(latencies({"forwarded": urls["forwarded"]}, 1, warm_n))
        calls, beats = commands(client)
        run_calls = calls - run_start - 1
        per_request = max(0.0, run_calls - (beats - run_beats) * per_beat) / (warm_n + 5)

        results: list[int] = []
        entries = [nodes[n] for n in ("a", "b", "c")] * (args.first // 3 + 1)

        def ask(node: LiveProxy) -> None:
            body = {**BODY, "model": "cold"}
            results.append(httpx.post(node.url + path, json=body, timeout=60).status_code)

        threads = [threading.Thread(target=ask, args=(n,)) for n in entries[: args.first]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        cold_loads = sum(loads(n, "cold") for n in nodes.values())

        proc = nodes["c"].proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        killed = time.perf_counter()
        proc.wait()
        wait_until(lambda: "c" not in alive(nodes["a"]), timeout=15, interval=0.02)
        exclusion = time.perf_counter() - killed
    finally:
        for node in nodes.values():
            node.stop()
        server.stop()

    med = {k: median(v) * 1000 for k, v in lat.items()}
    tail = {k: p99(v) * 1000 for k, v in lat.items()}
    summary = {
        "rounds": rounds,
        "per_round": per_round,
        "p50_ms": med,
        "p99_ms": tail,
        "added_p50_ms": med["forwarded"] - med["direct"],
        "added_p99_ms": tail["forwarded"] - tail["direct"],
        "entry_cpu_ms_per_forward": cpu_per_forward * 1000,
        "serving_cpu_ms_per_direct_request": cpu_per_direct * 1000,
        "first_requests": args.first,
        "first_requests_ok": results.count(200),
        "cold_loads": cold_loads,
        "exclusion_s": exclusion,
        "redis_idle_commands_per_s": idle_rate,
        "redis_commands_during_warm_run": run_calls,
        "redis_commands_per_warm_request": per_request,
    }
    out = save("cluster", summary)
    print(
        table(
            [
                ("p50 direct, forwarded", f"{med['direct']:.2f} ms, {med['forwarded']:.2f} ms"),
                ("added p50 (goal <= 2 ms)", f"{summary['added_p50_ms']:.2f} ms"),
                ("p99 direct, forwarded", f"{tail['direct']:.2f} ms, {tail['forwarded']:.2f} ms"),
                ("added p99", f"{summary['added_p99_ms']:.2f} ms"),
                ("entry node's CPU per forward", f"{cpu_per_forward * 1000:.2f} ms"),
                ("serving node's CPU per direct request", f"{cpu_per_direct * 1000:.2f} ms"),
                (f"loads for {args.first} first requests (goal 1)", f"{cold_loads:.0f} ({results.count(200)} ok)"),
                ("killed node left out after (goal <= 4 s)", f"{exclusion:.2f} s"),
                ("Redis commands per warm request (goal <= 0.05)", f"{per_request:.3f}"),
                ("Redis commands/s idle (heartbeats)", f"{idle_rate:.1f}"),
                ("results", str(out)),
            ]
        )
    )


if __name__ == "__main__":
    main()
