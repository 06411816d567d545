"""XTTS on the real path: a tiny random-weight XTTS v2 checkpoint, built with coqui-tts' own classes,
loaded by a worker running under its own venv (`python:` in the model config), through a live proxy.

The output is noise (random weights) but goes through the real loading, conditioning and streaming
code. Needs `.venv-xtts` (scripts/setup_xtts.sh); skipped, saying so, when it is absent.
"""

from __future__ import annotations

import base64
import io
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.harness import REPO, LiveProxy, gone, running

XTTS_PYTHON = REPO / ".venv-xtts" / "bin" / "python"
SPEAKERS = ["Ana Florence", "Claribel Dervla"]

pytestmark = pytest.mark.skipif(not XTTS_PYTHON.exists(), reason="no .venv-xtts: run scripts/setup_xtts.sh")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("xtts") / "tiny-xtts"
    subprocess.run(
        [str(XTTS_PYTHON), str(REPO / "tests" / "xtts_build.py"), str(folder)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return folder


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Iterator[LiveProxy]:
    model = {
        "name": "xtts-tiny",
        "backend": "xtts",
        "python": str(XTTS_PYTHON),
        "model": {
            "path": str(checkpoint),
            "speakers": SPEAKERS,
            "threads": 2,
            "stream_chunk_size": 5,
            "sample_rate": 16000,
        },
        "load_timeout": "180s",
    }
    with running(tmp_path_factory.mktemp("xtts-proxy"), [model]) as live:
        yield live


def wav_info(data: bytes) -> tuple[int, int]:
    with wave.open(io.BytesIO(data)) as w:
        return w.getframerate(), w.getnframes()


def test_named_speakers_through_the_openai_sdk(proxy: LiveProxy) -> None:
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="unused", max_retries=0) as client:
        default = client.audio.speech.create(
            model="xtts-tiny", voice="alloy", input="hello world", response_format="wav"
        ).content
        named = client.audio.speech.create(
            model="xtts-tiny", voice="Claribel Dervla", input="hello world", response_format="wav"
        ).content
    for data in (default, named):
        rate, frames = wav_info(data)
        assert rate == 16000 and frames > 1000  # the model's 24 kHz, resampled as its YAML asks
    status = proxy.status()["xtts-tiny"]
    assert status["worker"]["backend"] == "xtts" and status["worker"]["device"] == "cpu"
    assert ".venv-xtts" in " ".join(p.cmdline()[0] for p in proxy.workers())


def test_cloning_from_speaker_wav_and_voice_files(proxy: LiveProxy, checkpoint: Path) -> None:
    reference = base64.b64encode((checkpoint / "voices" / "ref.wav").read_bytes()).decode()
    for speaker_wav in (reference, "ref.wav"):
        r = httpx.post(
            proxy.url + "/api/tts",
            timeout=120,
            json={"model": "xtts-tiny", "text": "hello world", "speaker_wav": speaker_wav},
        )
        assert r.status_code == 200, r.text
        assert wav_info(r.content)[0] == 16000


def test_a_long_speaker_wav_is_read_only_as_far_as_it_is_used(proxy: LiveProxy) -> None:
    """Issue 11 item 7: twenty minutes of 48 kHz reference (a ~1 MB FLAC) is read only for its first 30 s:
    the worker's peak memory does not grow by the ~0.5 GB a whole read and resample would take."""
    from tests.test_transcription import peak_rss, silence

    thirty = base64.b64encode(silence(30, "flac", "flac", 48000)).decode()  # the most that is used
    body = {"model": "xtts-tiny", "text": "hello", "speaker_wav": thirty}
    assert httpx.post(proxy.url + "/api/tts", timeout=120, json=body).status_code == 200
    (worker,) = proxy.workers()
    before = peak_rss(worker.pid)
    long_one = base64.b64encode(silence(20 * 60, "flac", "flac", 48000)).decode()
    r = httpx.post(proxy.url + "/api/tts", timeout=120, json={**body, "speaker_wav": long_one})
    assert r.status_code == 200, r.text
    assert peak_rss(worker.pid) - before < 128 * 1024 * 1024


STREAM_CHUNKS = """
import sys, torch
from proxy.worker.backends.xtts import XttsBackend
backend = XttsBackend("xtts-tiny", sys.argv[1], {"threads": 2, "stream_chunk_size": 5})
backend.prepare()
backend.load()
torch.manual_seed(0)
chunks = list(backend.speech({"model": "xtts-tiny", "input": "hello world this is a test", "response_format": "pcm"}))
print(len(chunks), sum(map(len, chunks)))
"""


def test_the_backend_yields_audio_as_the_model_makes_it(checkpoint: Path) -> None:
    # Counted at the backend: on the wire, chunks that arrive together on a busy machine merge into one read.
    out = subprocess.run(
        [str(XTTS_PYTHON), "-c", STREAM_CHUNKS, str(checkpoint)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    count, size = map(int, out.stdout.split()[-2:])
    assert count >= 2 and size % 2 == 0  # 15 audio tokens in chunks of 5: several pieces of int16 PCM


def test_streaming_is_chunked_pcm(proxy: LiveProxy) -> None:
    with httpx.stream(
        "POST",
        proxy.url + "/api/tts",
        timeout=120,
        json={"model": "xtts-tiny", "text": "hello world this is a test", "stream": True, "format": "pcm"},
    ) as r:
        assert r.status_code == 200
        assert r.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.headers
        body = r.read()
    assert len(body) > 1000 and len(body) % 2 == 0


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"voice": "Nobody"}, ("Nobody", "Ana Florence", "default")),
        ({"speaker_wav": "not base64 !!"}, ("speaker_wav", "ref.wav")),
        ({"language": "xx"}, ("language", "en")),
    ],
)
def test_bad_input_is_refused_before_the_worker(proxy: LiveProxy, body: dict[str, Any], words: tuple[str, ...]) -> None:
    r = httpx.post(proxy.url + "/api/tts", json={"model": "xtts-tiny", "text": "hello", **body}, timeout=60)
    assert r.status_code == 400
    assert all(w in r.json()["error"] for w in words), r.json()


def test_undecodable_reference_is_a_400_from_the_worker(proxy: LiveProxy) -> None:
    junk = base64.b64encode(b"this is not audio at all" * 10).decode()
    r = httpx.post(
        proxy.url + "/api/tts", json={"model": "xtts-tiny", "text": "hello", "speaker_wav": junk}, timeout=120
    )
    assert r.status_code == 400 and "speaker_wav" in r.json()["error"]


def test_unload_returns_the_process(proxy: LiveProxy) -> None:
    r = httpx.post(proxy.url + "/api/tts", json={"model": "xtts-tiny", "text": "hi"}, timeout=120)
    assert r.status_code == 200
    pid = proxy.status()["xtts-tiny"]["pid"]
    assert httpx.post(proxy.url + "/unload/xtts-tiny", timeout=60).json() == {"unloaded": ["xtts-tiny"]}
    assert gone([pid])
