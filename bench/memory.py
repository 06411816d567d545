"""Memory: the proxy's own RSS with no model loaded, with SmolLM2 loaded, and what an unload returns.

Also checks that no model library is mapped into the proxy process (/proc/PID/maps).
Goal: proxy RSS <= 64 MB with no model loaded.

    .venv/bin/python -m bench.memory
"""

from __future__ import annotations

import argparse

import httpx
import psutil

from bench.common import load, save, start_proxy, table
from tests.harness import gone, smollm2_config, wait_until

MODEL = "smollm2:135m"
MiB = 2**20


def mapped_libraries(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as fh:
        maps = fh.read()
    return [lib for lib in ("libllama", "libggml", "libtorch", "numpy", "onnxruntime", "ctranslate2") if lib in maps]


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    proxy = start_proxy([smollm2_config()])
    try:
        assert proxy.proc is not None
        me = psutil.Process(proxy.proc.pid)
        idle_rss = me.memory_info().rss
        available_before = psutil.virtual_memory().available
        status = load(proxy, MODEL)
        r = httpx.post(
            proxy.url + "/v1/chat/completions",
            timeout=60,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16},
        )
        r.raise_for_status()
        worker_rss = psutil.Process(status["pid"]).memory_info().rss
        loaded_rss = me.memory_info().rss
        available_loaded = psutil.virtual_memory().available
        libraries = mapped_libraries(me.pid)
        httpx.post(proxy.url + "/unload", timeout=60).raise_for_status()
        wait_until(lambda: gone([status["pid"]]))
        available_after = psutil.virtual_memory().available
        after_rss = me.memory_info().rss
    finally:
        proxy.stop()
    summary = {
        "proxy_rss_mb_idle": idle_rss / MiB,
        "proxy_rss_mb_with_model_loaded": loaded_rss / MiB,
        "proxy_rss_mb_after_unload": after_rss / MiB,
        "worker_rss_mb": worker_rss / MiB,
        "available_mb": {
            "before": available_before / MiB,
            "loaded": available_loaded / MiB,
            "after_unload": available_after / MiB,
        },
        "returned_by_unload_mb": (available_after - available_loaded) / MiB,
        "model_libraries_in_proxy": libraries,
    }
    path = save("memory", summary)
    print(
        table(
            [
                ("proxy RSS, no model loaded (goal <= 64 MB)", f"{idle_rss / MiB:.1f} MiB"),
                ("proxy RSS, SmolLM2 loaded and used", f"{loaded_rss / MiB:.1f} MiB"),
                ("worker RSS", f"{worker_rss / MiB:.1f} MiB"),
                (
                    "system available: before, loaded, after unload",
                    f"{available_before / MiB:.0f}, {available_loaded / MiB:.0f}, {available_after / MiB:.0f} MiB",
                ),
                ("returned by the unload", f"{summary['returned_by_unload_mb']:.0f} MiB"),
                ("model libraries mapped in the proxy", ", ".join(libraries) or "none"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
