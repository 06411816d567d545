"""The proxy process stays light: it never imports torch, diffusers or llama_cpp (workers do); and a
worker needs nothing of the proxy side but the wire contract (it may run under another interpreter)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.harness import REPO, LiveProxy

HEAVY = (
    "torch",
    "diffusers",
    "llama_cpp",
    "numpy",
    "transformers",
    "faster_whisper",
    "ctranslate2",
    "piper",
    "onnxruntime",
    "av",
    "PIL",
    "TTS",
    "rich",  # httpx's own CLI pulls in rich and pygments: the proxy's CLI imports httpx where it is used
    "pygments",
)


def test_proxy_side_imports_no_backend() -> None:
    code = (
        "import sys, proxy.app, proxy.__main__, proxy.manager, proxy.supervisor, proxy.dialects.ollama,"
        " proxy.api.transcription, proxy.api.speech, proxy.api.images;"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.real
def test_running_proxy_maps_no_backend_library(smollm2_proxy: LiveProxy) -> None:
    r = httpx.post(
        smollm2_proxy.url + "/api/generate",
        json={"model": "smollm2", "prompt": "hi", "stream": False, "options": {"num_predict": 2}},
        timeout=60,
    )
    assert r.status_code == 200
    assert smollm2_proxy.proc is not None
    with open(f"/proc/{smollm2_proxy.proc.pid}/maps") as fh:
        maps = fh.read()
    assert "libllama" not in maps and "libtorch" not in maps and "numpy" not in maps


# What a worker may import of this package: its own modules, the wire contract, and the shared
# response class (Starlette only, which a worker serves with anyway), the quiet uvicorn server (uvicorn only).
WORKER_MAY_IMPORT = ("proxy.worker", "proxy.wire", "proxy.streaming", "proxy.ticks")


def _proxy_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
    return [n for n in names if n == "proxy" or n.startswith("proxy.")]


def test_a_worker_imports_nothing_of_the_proxy_side_but_the_wire_contract() -> None:
    worker = REPO / "proxy" / "worker"
    found = {str(p.relative_to(REPO)): _proxy_imports(p) for p in sorted(worker.rglob("*.py"))}
    wrong = {f: [n for n in names if not n.startswith(WORKER_MAY_IMPORT)] for f, names in found.items()}
    assert not {f: n for f, n in wrong.items() if n}, wrong
    for shared in ("wire.py", "streaming.py", "ticks.py"):
        assert _proxy_imports(REPO / "proxy" / shared) == [], f"proxy/{shared} must not import the proxy side"
    # and at run time: the worker's server and entry point load no proxy-side dependency
    code = (
        "import sys, proxy.worker.__main__, proxy.worker.server, proxy.worker.audio, proxy.worker.pump;"
        "print(sorted(m for m in ('yaml', 'aiohttp', 'proxy.config', 'proxy.dialects', 'proxy.api',"
        " 'proxy.manager') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_the_wire_contract_needs_only_the_standard_library() -> None:
    code = (
        "import sys; before = set(sys.modules); import proxy.wire;"
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}"
        " - set(sys.stdlib_module_names) - {'proxy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
