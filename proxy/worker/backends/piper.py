"""Text to speech with a Piper voice (ONNX), through piper-tts.

Piper synthesises sentence by sentence, so a streamed answer starts after the first sentence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.wire import SpeechRequest
from proxy.worker.audio import encode
from proxy.worker.backends.base import InvalidRequest


class PiperBackend:
    def __init__(self, name: str, model_path: str, options: dict[str, Any]) -> None:
        self.name = name
        self.model_path = Path(model_path)
        self.options = dict(options)
        self.voice: Any = None
        self.sample_rate = 0
        self.speakers: dict[str, int] = {}

    @staticmethod
    def prepare() -> None:
        import piper  # noqa: F401  (imported before the load thread starts)

    def load(self) -> None:
        from piper import PiperVoice

        config = self.options.get("config_file") or str(self.model_path) + ".json"
        self.voice = PiperVoice.load(self.model_path, config_path=config, use_cuda=bool(self.options.get("use_cuda")))
        self.sample_rate = int(self.voice.config.sample_rate)
        self.speakers = dict(self.voice.config.speaker_id_map or {})

    def progress(self) -> float:
        return 1.0 if self.voice is not None else 0.0

    def info(self) -> dict[str, Any]:
        device = "cuda" if self.options.get("use_cuda") else "cpu"
        return {
            "backend": "piper",
            "device": device,
            "sample_rate": self.options.get("sample_rate") or self.sample_rate,
        }

    def close(self) -> None:
        self.voice = None

    def _pcm(self, text: str, speaker: str, speed: float) -> Iterator[bytes]:
        from piper import SynthesisConfig

        syn = SynthesisConfig(
            speaker_id=self.speakers.get(speaker) if self.speakers else None,
            length_scale=1.0 / (speed * float(self.options.get("speed") or 1.0)),
            noise_scale=self.options.get("noise_scale"),
            noise_w_scale=self.options.get("noise_w_scale"),
        )
        for chunk in self.voice.synthesize(text, syn_config=syn):
            yield chunk.audio_int16_bytes

    def speech(self, body: SpeechRequest) -> Iterator[bytes]:
        """Encoded audio for ``body`` (input, voice, response_format, speed), chunk by chunk."""
        speaker = body.get("voice") or "default"
        if self.speakers and speaker not in self.speakers:
            raise InvalidRequest(f"unknown voice '{speaker}'; voices: {', '.join(self.speakers)}", param="voice")
        if body.get("speaker_wav"):
            raise InvalidRequest(
                "a Piper voice cannot clone voices: speaker_wav is for XTTS models", param="speaker_wav"
            )
        return encode(
            self._pcm(str(body["input"]), speaker, float(body.get("speed") or 1.0)),
            self.sample_rate,
            str(body.get("response_format") or "wav"),
            self.options.get("sample_rate"),
        )
