"""The backend registry (proxy.backends) against what it describes: the config's Backend names and
defaults, and the worker code its entry points name (read as source: no backend library is imported)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import msgspec
import pytest
import yaml

from proxy.backends import BACKENDS, Backend, BackendInfo, Capability, Kind, ModelFileOptions
from proxy.config import DEFAULT_CAPABILITIES, load_settings
from proxy.supervisor import Worker
from tests.harness import REPO

WORKER_BACKENDS = REPO / "proxy" / "worker" / "backends"
# the worker method that serves each capability (clone rides on speech: speaker_wav in its request)
METHODS: dict[Capability, str] = {
    "chat": "chat",
    "completion": "completion",
    "embed": "embeddings",
    "image": "images",
    "speech": "speech",
    "transcribe": "transcribe",
}
# the backend capability a model's default (advertised) capability needs
SERVED_BY: dict[str, Capability] = {
    "completion": "completion",
    "tools": "chat",
    "embedding": "embed",
    "image": "image",
    "speech": "speech",
    "transcription": "transcribe",
}
WITH_ENTRY = [b for b in BACKENDS.values() if b.entry is not None]


def test_every_backend_name_has_one_entry() -> None:
    assert set(BACKENDS) == set(get_args(Backend))
    assert all(name == info.name for name, info in BACKENDS.items())
    assert all(
        info.kind in get_args(Kind) and info.capabilities <= set(get_args(Capability)) for info in BACKENDS.values()
    )


def _class(entry: str) -> ast.ClassDef:
    """The class an entry point names, found in its module's source under proxy/worker/backends."""
    module, _, name = entry.partition(":")
    package, _, stem = module.rpartition(".")
    assert package == "proxy.worker.backends", f"{entry}: not a worker backend"
    source = WORKER_BACKENDS / f"{stem}.py"
    assert source.is_file(), f"{entry}: no {source}"
    classes = [n for n in ast.parse(source.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name]
    assert classes, f"{entry}: no class {name} in {source}"
    return classes[0]


@pytest.mark.parametrize("info", WITH_ENTRY, ids=lambda b: b.name)
def test_entry_points_name_worker_classes_that_serve_the_capabilities(info: BackendInfo) -> None:
    assert info.entry is not None
    methods = {n.name for n in _class(info.entry).body if isinstance(n, ast.FunctionDef)}
    assert {"load", "progress", "info", "close"} <= methods
    served = {cap for cap, method in METHODS.items() if method in methods}
    assert served == info.capabilities - {"clone"}
    assert "clone" not in info.capabilities or "speech" in info.capabilities


@pytest.mark.parametrize("info", BACKENDS.values(), ids=lambda b: b.name)
def test_kinds_and_capabilities_agree_with_the_config_defaults(info: BackendInfo) -> None:
    needed = {SERVED_BY[c] for c in DEFAULT_CAPABILITIES[info.kind]}
    assert needed <= info.capabilities, f"{info.name}: its models advertise what its worker does not serve"
    # a worker loads a model file; a backend without a worker is a server of its own, with no options struct
    assert (info.entry is None) == (info.options is None)
    if info.options is not None:
        assert issubclass(info.options, ModelFileOptions)
        info.options()  # every option has a default, but the model file


def _load(tmp_path: Path, backend: str, model: dict[str, Any]) -> Any:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "m.yaml").write_text(
        yaml.safe_dump(
            {"name": "m", "backend": backend, "model": model}
            if model
            else {"name": "m", "backend": backend, "url": "http://127.0.0.1:1"}
        )
    )
    (tmp_path / "config.yml").write_text("{}")
    return load_settings(tmp_path / "config.yml").models[0]


@pytest.mark.parametrize("info", BACKENDS.values(), ids=lambda b: b.name)
def test_a_loaded_model_carries_its_backends_facts(tmp_path: Path, info: BackendInfo) -> None:
    cfg = _load(tmp_path, info.name, {"path": "weights"} if info.options else {})
    assert cfg.facts is info and cfg.kind == info.kind
    assert cfg.capabilities == DEFAULT_CAPABILITIES[info.kind]
    if info.options is None:
        assert cfg.model_options is None
        return
    assert type(cfg.model_options) is info.options
    assert cfg.model_path == tmp_path / "models" / "weights"
    # the worker gets the typed options as plain JSON, less the model file
    plain = {k: v for k, v in msgspec.structs.asdict(cfg.model_options).items() if k not in ("path", "package", "file")}
    assert dict(cfg.options) == plain == json.loads(json.dumps(plain))


@pytest.mark.parametrize("info", WITH_ENTRY, ids=lambda b: b.name)
def test_the_worker_is_told_its_entry_point(tmp_path: Path, info: BackendInfo) -> None:
    cfg = _load(tmp_path, info.name, {"path": "weights"})
    argv, _, _ = Worker(cfg, tmp_path, lambda w: None)._argv()
    spec = json.loads(argv[argv.index("--spec") + 1])
    assert spec["entry"] == info.entry and spec["backend"] == info.name and spec["options"] == dict(cfg.options)


def test_the_worker_side_imports_neither_registry_nor_config() -> None:
    """A worker may run under another interpreter: it reads its spec, not the proxy's config code."""
    code = (
        "import sys, proxy.worker.__main__, proxy.worker.server;"
        "print([m for m in ('proxy.backends', 'proxy.config', 'yaml') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
