"""Switching between models: part "memory", the estimate of each model of the embedded default against what
its worker measured (RSS of its process tree after one request; goal: within 25%).

    .venv/bin/python -m bench.switch --memory

(The switch-time and batching parts of issue 17 are to come here too.)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench.common import save, start_proxy, table
from tests.harness import REPO, wait_until

MiB = 2**20


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
            measured = proxy.status()[name]["need"]
            est = estimates[name]
            rows[name] = {
                "estimate_mb": est["ram"] / MiB,
                "measured_mb": measured["ram"] / MiB,
                "source": measured["source"],
                "estimate_over_measured": est["ram"] / measured["ram"],
            }
    finally:
        proxy.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", action="store_true", help="estimate against measured memory (the default)")
    parser.parse_args()
    rows = memory()
    path = save("switch_memory", rows)
    print(
        table(
            [
                (
                    n,
                    f"estimate {r['estimate_mb']:.0f} MiB, measured {r['measured_mb']:.0f} MiB, "
                    f"ratio {r['estimate_over_measured']:.2f}",
                )
                for n, r in rows.items()
            ]
        )
    )
    print(f"saved {Path(path).relative_to(REPO)}")


if __name__ == "__main__":
    main()
