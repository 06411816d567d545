"""Wall time of one image through the proxy vs the same pipeline called in-process, and the proxy's RSS.

Uses the tiny random-weight pipeline the tests build (tests/sd_build.py); 256x256, the same seed and
steps on both paths, torch pinned to the same thread count. Interleaved rounds, medians. Goal: speed
through the proxy >= 0.98 of in-process, and the proxy's memory as it was (no torch in it).

    .venv/bin/python -m bench.images [--rounds N] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.common import load, median, save, start_proxy, table
from tests.sd_build import build

MiB = 2**20


def via_proxy(client: httpx.Client, steps: int) -> float:
    start = time.perf_counter()
    r = client.post(
        "/txt2img",
        json={
            "model": "tiny-sd",
            "prompt": "a lighthouse",
            "seed": 1,
            "width": 256,
            "height": 256,
            "num_inference_steps": steps,
        },
    )
    r.raise_for_status()
    return time.perf_counter() - start


def in_process(pipe: Any, steps: int) -> float:
    import io

    import torch

    start = time.perf_counter()
    image = pipe(
        prompt="a lighthouse",
        num_inference_steps=steps,
        guidance_scale=7.5,
        width=256,
        height=256,
        generator=torch.Generator("cpu").manual_seed(1),
    ).images[0]
    image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 steps")
    args = parser.parse_args()
    rounds, steps = (2, 5) if args.quick else (args.rounds, args.steps)
    os.environ["HF_HUB_OFFLINE"] = "1"
    folder = build(Path(tempfile.mkdtemp(prefix="bench-sd-")))

    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(2)
    model = {"name": "tiny-sd", "backend": "diffusers", "model": {"path": str(folder), "threads": 2}}
    proxy = start_proxy([model])
    results: dict[str, list[float]] = {"proxy": [], "in_process": []}
    try:
        assert proxy.proc is not None
        me = psutil.Process(proxy.proc.pid)
        rss_before = me.memory_info().rss
        load(proxy, "tiny-sd")
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        with httpx.Client(base_url=proxy.url, timeout=600) as client:
            via_proxy(client, 1)
            in_process(pipe, 1)
            for _ in range(rounds):
                results["proxy"].append(via_proxy(client, steps))
                results["in_process"].append(in_process(pipe, steps))
        rss_after = me.memory_info().rss
    finally:
        proxy.stop()
    med = {k: median(v) for k, v in results.items()}
    summary = {
        "rounds": rounds,
        "steps": steps,
        "seconds": med,
        "ratio": med["in_process"] / med["proxy"],
        "proxy_rss_mb": {"before": rss_before / MiB, "after": rss_after / MiB},
        "raw_s": results,
    }
    path = save("images", summary)
    print(
        table(
            [
                ("one 256x256 image, proxy / in-process", f"{med['proxy']:.2f} s / {med['in_process']:.2f} s"),
                ("speed ratio (goal >= 0.98)", f"{summary['ratio']:.3f}"),
                ("proxy RSS before, after", f"{rss_before / MiB:.1f} MiB, {rss_after / MiB:.1f} MiB"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
