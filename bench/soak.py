"""Soak: three models of three kinds with room for one, clients that walk away, many requests.

SmolLM2 chat (half streamed), Piper speech (streamed wav) and Whisper transcription share a proxy
with ``max_loaded_models: 1``, so nearly every other request is a switch. 10% of the requests of
every kind are dropped by their clients (a stream after its first chunk, a plain request after a
random wait). Requests go out at a fixed concurrency until the count is reached or the time
bound runs out; then the proxy is stopped.

Reports: requests lost (neither dropped by their client nor answered in full: errors, truncated
streams, 5xx), worker crashes (an unexpected exit in the proxy's log), orphans (processes ever seen
under the proxy that are still alive after it stopped), and the proxy's open fds and RSS at the
start and the end. Goal: 0 lost, 0 crashes, 0 orphans, fds and RSS flat.

    .venv/bin/python -m bench.soak [--requests 2000] [--concurrency 64] [--max-seconds 1500]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time
from typing import Any

import httpx
import psutil

from bench.common import save, start_proxy, table
from tests.harness import REPO, smollm2_config, wait_until

MODELS = ["smollm2", "piper-joe", "whisper-base"]
DROP = 0.10


def configs() -> list[dict[str, Any]]:
    import yaml

    out = [smollm2_config(keep_alive="5m")]
    for name in ("piper", "whisper"):
        out.append(yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text()))
    return out


class Soak:
    def __init__(self, url: str, clip: bytes, rng: random.Random) -> None:
        self.url = url
        self.clip = clip
        self.rng = rng
        self.results: collections.Counter[str] = collections.Counter()
        self.lost: list[str] = []

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        kind = MODELS[i % 3]
        drop = self.rng.random() < DROP
        wait = self.rng.uniform(0.05, 5.0)
        try:
            if kind == "smollm2":
                ok = await self.chat(client, stream=i % 2 == 0, drop=drop, wait=wait)
            elif kind == "piper-joe":
                ok = await self.speech(client, drop=drop, wait=wait)
            else:
                ok = await self.transcribe(client, drop=drop, wait=wait)
        except httpx.TimeoutException:
            ok = "dropped" if drop else "lost: timeout"
        except httpx.HTTPError as exc:
            ok = f"lost: {type(exc).__name__}: {exc}"
        key = "dropped" if ok == "dropped" else ("ok" if ok == "ok" else "lost")
        self.results[f"{kind} {key}"] += 1
        if key == "lost":
            self.lost.append(f"{kind}: {ok}")

    async def chat(self, client: httpx.AsyncClient, stream: bool, drop: bool, wait: float) -> str:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 16,
            "stream": stream,
        }
        if not stream:
            timeout = httpx.Timeout(600, read=wait) if drop else httpx.Timeout(600)
            r = await client.post("/v1/chat/completions", json=body, timeout=timeout)
            if r.status_code != 200:
                return f"lost: {r.status_code} {r.text[:200]}"
            return "ok" if r.json()["choices"][0]["message"]["content"] is not None else "lost: no content"
        last = ""
        async with client.stream("POST", "/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                return f"lost: {r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line:
                    continue
                if drop:
                    return "dropped"
                last = line
                if '"error"' in line:
                    return f"lost: {line[:200]}"
        return "ok" if last == "data: [DONE]" else f"lost: stream ended with {last[:200]!r}"

    async def speech(self, client: httpx.AsyncClient, drop: bool, wait: float) -> str:
        body = {
            "model": "piper-joe",
            "input": "The soak goes on. It goes on a little longer.",
            "response_format": "pcm",
        }
        size = 0
        async with client.stream("POST", "/v1/audio/speech", json=body, timeout=600) as r:
            if r.status_code != 200:
                return f"lost: {r.status_code} {(await r.aread())[:200]!r}"
            async for chunk in r.aiter_raw():
                if drop:
                    return "dropped"
                size += len(chunk)
        return "ok" if size > 22050 else f"lost: only {size} bytes of audio"

    async def transcribe(self, client: httpx.AsyncClient, drop: bool, wait: float) -> str:
        timeout = httpx.Timeout(600, read=wait) if drop else httpx.Timeout(600)
        r = await client.post(
            "/v1/audio/transcriptions",
            data={"model": "whisper-base"},
            files={"file": ("clip.wav", self.clip, "audio/wav")},
            timeout=timeout,
        )
        if r.status_code != 200:
            return f"lost: {r.status_code} {r.text[:200]}"
        # a transcript, not its accuracy: Piper's voice varies from one synthesis to the next
        return "ok" if r.json()["text"].strip() else "lost: an empty transcript"


def alive(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def proxy_probe(pid: int) -> tuple[int, float]:
    proc = psutil.Process(pid)
    return proc.num_fds(), proc.memory_info().rss / 2**20


async def soak(
    url: str, proxy_pid: int, requests: int, concurrency: int, max_seconds: float, seen: set[int]
) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=None)) as client:
        r = await client.post(
            "/v1/audio/speech",
            timeout=120,
            json={"model": "piper-joe", "input": "This is the soak clip.", "response_format": "wav"},
        )
        r.raise_for_status()
        runner = Soak(url, r.content, random.Random(2026))
        fds0, rss0 = proxy_probe(proxy_pid)
        started = time.monotonic()
        deadline = started + max_seconds
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(requests):
            queue.put_nowait(i)

        async def lane() -> None:
            while time.monotonic() < deadline:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await runner.one(client, i)
                for proc in psutil.Process(proxy_pid).children(recursive=True):
                    seen.add(proc.pid)

        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        fds1, rss1 = proxy_probe(proxy_pid)
    # the clients' connections closed: what the proxy still holds (its connections to the loaded
    # worker stay pooled); polled until it stops dropping, for at most 10 s
    closed = proxy_probe(proxy_pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = proxy_probe(proxy_pid)
        if now[0] >= closed[0]:
            break
        closed = now
    return {
        "requests_sent": requests - queue.qsize(),
        "seconds": round(elapsed, 1),
        "results": dict(sorted(runner.results.items())),
        "lost": len(runner.lost),
        "lost_examples": runner.lost[:10],
        "proxy_fds (start, end, clients closed)": [fds0, fds1, closed[0]],
        "proxy_rss_mib (start, end, clients closed)": [round(rss0, 1), round(rss1, 1), round(closed[1], 1)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=1500.0, help="stop sending new requests after this")
    args = parser.parse_args()
    proxy = start_proxy(configs(), limits={"max_loaded_models": 1, "max_queue": 1024})
    assert proxy.proc is not None
    seen: set[int] = set()
    try:
        result = asyncio.run(soak(proxy.url, proxy.proc.pid, args.requests, args.concurrency, args.max_seconds, seen))
    finally:
        seen.update(p.pid for p in proxy.workers())
        proxy.stop()
    try:
        wait_until(lambda: not alive(seen), timeout=15)
    except AssertionError:
        pass  # counted below
    orphans = alive(seen)
    log = proxy.log()
    result["crashes"] = log.count("exited with code")
    result["stalls_killed"] = log.count("made no progress")
    result["orphans"] = len(orphans)
    result["workers_seen"] = len(seen)
    path = save("soak", result)
    rows = [(k, str(v)) for k, v in result.items() if k != "lost_examples"]
    print(table(rows))
    for example in result["lost_examples"]:
        print("  lost:", example)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
