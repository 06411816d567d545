"""The proxy process stays light: it never imports torch, diffusers or llama_cpp (workers do)."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.harness import LiveProxy

HEAVY = ("torch", "diffusers", "llama_cpp", "numpy", "transformers", "faster_whisper", "ctranslate2", "piper",
         "onnxruntime", "av", "PIL", "TTS")


def test_proxy_side_imports_no_backend() -> None:
    code = (
        "import sys, proxy.app, proxy.__main__, proxy.manager, proxy.supervisor, proxy.dialects.ollama,"
        " proxy.api.transcription, proxy.api.speech, proxy.api.images;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_running_proxy_maps_no_backend_library(smollm2_proxy: LiveProxy) -> None:
    r = httpx.post(smollm2_proxy.url + "/api/generate", json={"model": "smollm2", "prompt": "hi", "stream": False,
                                                              "options": {"num_predict": 2}}, timeout=60)
    assert r.status_code == 200
    assert smollm2_proxy.proc is not None
    with open(f"/proc/{smollm2_proxy.proc.pid}/maps") as fh:
        maps = fh.read()
    assert "libllama" not in maps and "libtorch" not in maps and "numpy" not in maps
