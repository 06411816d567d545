"""Speech to text with faster-whisper (CTranslate2): int8 on the CPU, float16 on CUDA.

A model folder may come split over several packages (the embedded default ships Whisper base as
``model.bin.part1`` + ``model.bin.part2``): the first load assembles it, once, into the cache
folder, with the ``vocabulary.json`` CTranslate2 needs, written atomically.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.wire import Segment
from proxy.worker.backends.base import InvalidRequest, TooLarge

log = logging.getLogger("proxy.worker.whisper")

_RATE = 16000  # what Whisper listens at
_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
_COPIED = ("config.json", "tokenizer.json", "preprocessor_config.json")


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' (a part of the model) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def vocabulary(tokenizer_json: Path) -> list[str]:
    """The tokenizer's tokens in id order, then Whisper's timestamp tokens."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    by_id: dict[int, str] = {i: tok for tok, i in data["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    size = max(by_id) + 1
    missing = [i for i in range(size) if i not in by_id]
    if missing:
        raise ValueError(f"tokenizer.json has no token for ids {missing[:5]}")
    return [by_id[i] for i in range(size)] + [f"<|{i * 0.02:.2f}|>" for i in range(_TIMESTAMPS)]


def assemble(folder: Path, part_dirs: list[Path], cache_dir: Path) -> Path:
    """A complete CTranslate2 folder: ``folder`` itself when it has model.bin, else one assembled once."""
    if (folder / "model.bin").is_file():
        return folder
    parts = sorted(
        (p for d in [folder, *part_dirs] for p in d.rglob("model.bin.part*")),
        key=lambda p: int(p.name.rsplit("part", 1)[1]),
    )
    if not parts:
        raise FileNotFoundError(f"no model.bin or model.bin.partN in {folder}")
    ident = hashlib.sha256("|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime}" for p in parts).encode())
    target = cache_dir / f"whisper-{ident.hexdigest()[:16]}"
    if (target / "model.bin").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".assembling-", dir=cache_dir))
    try:
        with (staging / "model.bin").open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        for name in _COPIED:
            if (folder / name).is_file():
                shutil.copy2(folder / name, staging / name)
        (staging / "vocabulary.json").write_text(json.dumps(vocabulary(folder / "tokenizer.json")))
        try:
            os.rename(staging, target)  # atomic: a half-written folder is never seen as done
        except OSError:
            if not (target / "model.bin").is_file():  # not another worker that won the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("assembled %s from %d parts", target, len(parts))
    return target


def _too_long(limit: float, seconds: float | None = None) -> TooLarge:
    length = f"is {seconds:.0f} s long" if seconds is not None else "runs longer"
    return TooLarge(f"the audio {length}; the limit is {limit:g} s (limits.max_audio_seconds)", param="file")


def declared_seconds(container: Any) -> float | None:
    """The duration the file's header declares (the container's, else its audio stream's), if any."""
    if container.duration:  # in AV_TIME_BASE units (microseconds)
        return float(container.duration) / 1_000_000
    stream = container.streams.audio[0]
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return None


def _readable(frames: Iterator[Any]) -> Iterator[Any]:
    """The frames PyAV can decode, skipping the damaged ones (as faster-whisper's own decoder does)."""
    import av

    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def decode_bounded(audio: Any, max_seconds: float) -> Any:
    """16 kHz mono float32 samples of ``audio``; over ``max_seconds`` is a 413: refused from the header's
    duration before decoding, or, when the header says nothing (or lies), as soon as the decoded samples
    pass the limit. Memory stays within the limit's worth of samples."""
    import av
    import numpy as np

    limit = int(max_seconds * _RATE)
    chunks: list[Any] = []
    count = 0
    try:
        with av.open(audio, mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequest("the file holds no audio stream", param="file")
            declared = declared_seconds(container)
            if declared is not None and declared > max_seconds:
                raise _too_long(max_seconds, declared)
            resampler = av.AudioResampler(format="s16", layout="mono", rate=_RATE)
            for frame in _readable(container.decode(audio=0)):
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    count += len(samples)
                    if count > limit:
                        raise _too_long(max_seconds)
                    chunks.append(samples)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except (InvalidRequest, TooLarge):
        raise
    except Exception as exc:  # PyAV's errors for anything it cannot read
        raise InvalidRequest(f"could not decode the audio file: {type(exc).__name__}: {exc}", param="file") from exc
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32) / 32768.0


class WhisperBackend:
    def __init__(self, name: str, model_path: str, options: dict[str, Any]) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.options = dict(options)
        self.model: Any = None
        self.device = "cpu"
        self.compute_type = "int8"

    @staticmethod
    def prepare() -> None:
        import faster_whisper  # noqa: F401  (imported before the load thread starts)

    def load(self) -> None:
        import ctranslate2
        from faster_whisper import WhisperModel

        cache = Path(self.options.get("cache_dir") or tempfile.gettempdir())
        parts = [_package_dir(p) for p in self.options.get("part_packages", [])]
        folder = assemble(self.model_path, parts, cache)
        device = self.options.get("device", "auto")
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        compute = self.options.get("compute_type", "auto")
        if compute == "auto":
            compute = "float16" if device == "cuda" else "int8"
        self.device, self.compute_type = device, compute
        self.model = WhisperModel(
            str(folder), device=device, compute_type=compute, cpu_threads=int(self.options.get("cpu_threads") or 0)
        )

    def progress(self) -> float:
        return 1.0 if self.model is not None else 0.0

    def info(self) -> dict[str, Any]:
        return {"backend": "whisper", "device": self.device, "compute_type": self.compute_type}

    def close(self) -> None:
        self.model = None

    def transcribe(self, audio: Any, params: dict[str, Any]) -> tuple[dict[str, Any], Iterator[Segment]]:
        """Decode and start transcribing; returns the header (language, duration) and the segments."""
        samples = decode_bounded(audio, float(self.options.get("max_audio_seconds") or 3600.0))
        if len(samples) == 0:
            raise InvalidRequest("the audio file holds no audio", param="file")
        segments, info = self.model.transcribe(
            samples,
            task=params.get("task", "transcribe"),
            language=params.get("language") or self.options.get("language"),
            initial_prompt=params.get("prompt") or None,
            temperature=params.get("temperature", 0.0) or 0.0,
            word_timestamps=bool(params.get("word_timestamps")),
            beam_size=int(self.options.get("beam_size", 5)),
            vad_filter=bool(self.options.get("vad_filter", False)),
        )
        header = {"language": info.language, "duration": float(info.duration)}
        return header, (_segment(s) for s in segments)


def _segment(s: Any) -> Segment:
    out: Segment = {
        "id": s.id - 1 if s.id else 0,
        "seek": s.seek,
        "start": round(float(s.start), 3),
        "end": round(float(s.end), 3),
        "text": s.text,
        "tokens": list(s.tokens),
        "temperature": float(s.temperature or 0.0),
        "avg_logprob": float(s.avg_logprob),
        "compression_ratio": float(s.compression_ratio),
        "no_speech_prob": float(s.no_speech_prob),
    }
    if s.words:
        out["words"] = [
            {"word": w.word, "start": round(float(w.start), 3), "end": round(float(w.end), 3)} for w in s.words
        ]
    return out
