"""XTTS v2 through coqui-tts' own loading code: named speakers, voice cloning from a reference
recording (conditioning latents cached per voice), streaming through ``inference_stream``.

Runs in its own venv (coqui-tts needs torchaudio; see scripts/setup_xtts.sh). Reference audio is
read with soundfile rather than torchaudio.load, which needs torchcodec and FFmpeg.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.wire import SpeechRequest
from proxy.worker.audio import encode
from proxy.worker.backends.base import InvalidRequest

_COND_RATE = 22050
_REFERENCE_SECONDS = 30  # how much of a speaker_wav conditions the voice


class XttsBackend:
    def __init__(self, name: str, model_path: str, options: dict[str, Any]) -> None:
        self.name = name
        self.folder = Path(model_path)
        self.options = dict(options)
        self.model: Any = None
        self.device = "cpu"
        self.sample_rate = 24000
        self._latents: dict[str, tuple[Any, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def prepare() -> None:
        import torch  # noqa: F401
        from TTS.tts.models.xtts import Xtts  # noqa: F401

    def load(self) -> None:
        import torch
        from TTS.tts.configs.xtts_config import XttsConfig
        from TTS.tts.models.xtts import Xtts

        if self.options.get("threads"):
            torch.set_num_threads(int(self.options["threads"]))
        device = self.options.get("device", "auto")
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        config = XttsConfig()
        config.load_json(str(self.folder / "config.json"))
        model = Xtts(config)
        model.load_checkpoint(config, checkpoint_dir=str(self.folder), eval=True)
        self.model = model.to(self.device)
        self.sample_rate = int(config.model_args.output_sample_rate)

    def progress(self) -> float:
        return 1.0 if self.model is not None else 0.0

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backend": "xtts", "device": self.device, "sample_rate": self.sample_rate}
        if self.device == "cuda":
            import torch

            out["vram_bytes"] = int(torch.cuda.memory_allocated())
        return out

    def close(self) -> None:
        self.model = None
        self._latents.clear()

    def _speakers(self) -> dict[str, Any]:
        manager = getattr(self.model, "speaker_manager", None)
        return dict(manager.speakers) if manager is not None else {}

    def _reference(self, speaker_wav: str) -> tuple[str, bytes]:
        voices = Path(self.options.get("voices_dir") or self.folder / "voices")
        files = {p.name: p for p in voices.iterdir()} if voices.is_dir() else {}
        if speaker_wav in files:
            data = files[speaker_wav].read_bytes()
        else:
            try:
                data = base64.b64decode(speaker_wav, validate=True)
            except ValueError as exc:
                raise InvalidRequest("'speaker_wav' is not base64 audio", param="speaker_wav") from exc
        return hashlib.sha256(data).hexdigest(), data

    def _conditioning(self, voice: str, speaker_wav: str | None) -> tuple[Any, Any]:
        """GPT conditioning latents and speaker embedding, cached per voice."""
        if not speaker_wav:
            speakers = self._speakers()
            if not speakers:
                raise InvalidRequest("this model has no named speakers: send speaker_wav", param="voice")
            name = voice if voice in speakers else self.options.get("default_voice") or next(iter(speakers))
            if name not in speakers:
                raise InvalidRequest(f"unknown voice '{voice}'; voices: {', '.join(speakers)}", param="voice")
            entry = speakers[name]
            return entry["gpt_cond_latent"], entry["speaker_embedding"]
        key, data = self._reference(speaker_wav)
        with self._lock:
            if key not in self._latents:
                self._latents[key] = self._latents_from(data)
            return self._latents[key]

    def _latents_from(self, data: bytes) -> tuple[Any, Any]:
        import soundfile
        import torch
        import torchaudio

        try:  # only the first 30 s are used: read no more than that, before resampling
            with soundfile.SoundFile(io.BytesIO(data)) as sound:
                rate = sound.samplerate
                samples = sound.read(frames=rate * _REFERENCE_SECONDS, dtype="float32", always_2d=True)
        except Exception as exc:  # libsndfile's errors for anything it cannot read
            raise InvalidRequest(f"'speaker_wav' could not be read as audio: {exc}", param="speaker_wav") from exc
        audio = torch.from_numpy(samples.mean(axis=1)).unsqueeze(0)
        if rate != _COND_RATE:
            audio = torchaudio.functional.resample(audio, rate, _COND_RATE)
        audio = audio[:, : _COND_RATE * _REFERENCE_SECONDS].to(self.device)
        with torch.inference_mode():
            return (
                self.model.get_gpt_cond_latents(audio, _COND_RATE),
                self.model.get_speaker_embedding(audio, _COND_RATE),
            )

    def _pcm(self, text: str, language: str, latents: tuple[Any, Any], speed: float) -> Iterator[bytes]:
        import numpy as np
        import torch

        gpt_cond_latent, speaker_embedding = latents
        with torch.inference_mode():
            for chunk in self.model.inference_stream(
                text,
                language,
                gpt_cond_latent,
                speaker_embedding,
                stream_chunk_size=int(self.options.get("stream_chunk_size", 20)),
                temperature=float(self.options.get("temperature", 0.7)),
                speed=speed,
            ):
                samples = chunk.detach().cpu().numpy().reshape(-1)
                yield (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()

    def speech(self, body: SpeechRequest) -> Iterator[bytes]:
        latents = self._conditioning(str(body.get("voice") or "default"), body.get("speaker_wav"))
        language = str(body.get("language") or self.options.get("language") or "en")
        speed = float(body.get("speed") or 1.0) * float(self.options.get("speed") or 1.0)
        fmt = str(body.get("response_format") or "wav")
        return encode(
            self._pcm(str(body["input"]), language, latents, speed),
            self.sample_rate,
            fmt,
            self.options.get("sample_rate"),
        )
