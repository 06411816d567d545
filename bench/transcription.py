"""Real-time factor of Whisper base on a ~30 s clip: through the proxy vs faster-whisper in-process.

The clip is Piper's voice reading a text (made in-process first). Interleaved rounds (proxy,
in-process, ...), medians. RTF = processing time / audio duration (lower is faster); the ratio
reported is in-process RTF / proxy RTF (goal >= 0.97).

    .venv/bin/python -m bench.transcription [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import httpx
import yaml

from bench.common import load, median, save, start_proxy, table
from tests.harness import REPO
from tests.test_transcription import speak

TEXT = (
    "The lighthouse stood at the end of the rocky point, and every night the keeper climbed its long stair. "
    "He trimmed the wick, wound the clockwork, and watched the beam sweep across the dark water. "
    "Ships passed far out at sea, their small lights moving slowly from east to west. "
    "In the morning he wrote the weather in his book, made tea, and slept until the afternoon. "
    "Storms came in the autumn, and then he did not sleep at all, but sat by the lamp and listened to the wind."
)


def via_proxy(client: httpx.Client, wav: bytes) -> float:
    start = time.perf_counter()
    r = client.post("/v1/audio/transcriptions", data={"model": "whisper-base"}, files={"file": ("a.wav", wav)})
    r.raise_for_status()
    return time.perf_counter() - start


def in_process(model: Any, wav_path: str, beam_size: int) -> float:
    start = time.perf_counter()
    segments, _ = model.transcribe(wav_path, beam_size=beam_size)
    "".join(s.text for s in segments)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round on a ~10 s clip")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    wav = speak(TEXT.split(". ")[0] + "." if args.quick else TEXT)
    duration = (len(wav) - 44) / 2 / 22050

    from faster_whisper import WhisperModel

    config = yaml.safe_load((REPO / "configs" / "whisper.yaml").read_text())
    proxy = start_proxy([config])
    results: dict[str, list[float]] = {"proxy": [], "in_process": []}
    try:
        load(proxy, "whisper-base")
        folder = next((proxy.root / "models" / ".cache").glob("whisper-*"))
        wav_path = proxy.root / "clip.wav"
        wav_path.write_bytes(wav)
        model = WhisperModel(str(folder), device="cpu", compute_type="int8")
        with httpx.Client(base_url=proxy.url, timeout=600) as client:
            for _ in range(rounds):
                results["proxy"].append(via_proxy(client, wav))
                results["in_process"].append(in_process(model, str(wav_path), config["model"]["beam_size"]))
    finally:
        proxy.stop()
    rtf = {k: median(v) / duration for k, v in results.items()}
    summary = {
        "audio_seconds": duration,
        "rounds": rounds,
        "rtf": rtf,
        "ratio_in_process_over_proxy": rtf["in_process"] / rtf["proxy"],
        "raw_s": results,
    }
    path = save("transcription", summary)
    print(
        table(
            [
                ("audio", f"{duration:.1f} s"),
                ("RTF through the proxy", f"{rtf['proxy']:.3f}"),
                ("RTF in-process", f"{rtf['in_process']:.3f}"),
                ("in-process / proxy (goal >= 0.97)", f"{summary['ratio_in_process_over_proxy']:.3f}"),
                ("results", str(path)),
            ]
        )
    )


if __name__ == "__main__":
    main()
