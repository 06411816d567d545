"""Large embeddings answers: how long /health waits while the proxy decodes and reshapes them (issue 26).

A fake worker answers ``--inputs`` vectors of ``--dim`` floats (2048 x 576 is about 24 MB of JSON, SmolLM2's
width at OpenAI's input limit); the proxy relays them as OpenAI's base64 (what the openai SDK asks for) and as
Ollama's ``/api/embed``. Meanwhile a thread asks /health every 10 ms: its slowest answer is the event loop's
longest stall. ``--tree /work/main`` runs the proxy from another checkout (the baseline).

    python -m bench.embeddings [--inputs 2048] [--dim 576] [--tree PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import httpx

import tests.harness
from bench.common import save, start_proxy, table
from bench.json_bodies import Watch
from tests.harness import fake_config

ROUTES = {
    "openai_base64": ("/v1/embeddings", {"encoding_format": "base64"}),
    "openai_float": ("/v1/embeddings", {"encoding_format": "float"}),
    "ollama_embed": ("/api/embed", {}),
}


def run(inputs: int, dim: int, tree: str | None) -> dict[str, Any]:
    if tree:
        tests.harness.REPO = Path(tree)  # the proxy from there; the fake worker stays this checkout's
    proxy = start_proxy([fake_config("fake", "--embedding-dim", str(dim))])
    assert proxy.proc is not None
    out: dict[str, Any] = {"tree": tree or str(tests.harness.REPO), "inputs": inputs, "dim": dim}
    texts = [f"text {i}" for i in range(inputs)]
    try:
        assert httpx.post(proxy.url + "/load/fake", timeout=60).status_code == 200
        for label, (path, extra) in ROUTES.items():
            body = {"model": "fake", "input": texts, **extra}
            with Watch(proxy.url, proxy.proc.pid) as watch:
                started = time.perf_counter()
                r = httpx.post(proxy.url + path, json=body, timeout=300)
                took = time.perf_counter() - started
            out[f"{label}_status"] = r.status_code
            out[f"{label}_answer_mb"] = len(r.content) / 1e6
            out[f"{label}_seconds"] = took
            out[f"{label}_health_worst_ms"] = watch.worst * 1e3
    finally:
        proxy.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--tree", help="run the proxy from this checkout (the baseline)")
    args = parser.parse_args()
    result = run(args.inputs, args.dim, args.tree)
    print(table([(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in result.items()]))
    save("embeddings" + ("_baseline" if args.tree else ""), result)


if __name__ == "__main__":
    main()
