"""Configuration errors stop start-up with one message naming the file, the key and the problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import voices
from proxy.config import load_settings
from proxy.errors import ConfigError
from tests.harness import REPO


def write(tmp_path: Path, config: dict[str, Any], models: dict[str, dict[str, Any]]) -> Path:
    (tmp_path / "configs").mkdir(exist_ok=True)
    for name, data in models.items():
        (tmp_path / "configs" / name).write_text(yaml.safe_dump(data))
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


GOOD = {"name": "m", "backend": "external", "url": "http://127.0.0.1:1"}


def test_the_shipped_configuration_loads() -> None:
    settings = load_settings(REPO / "config.yml")
    model = next(m for m in settings.models if m.name == "smollm2:135m")
    assert model.model_path is not None and model.model_path.is_file()
    assert model.keep_alive == 600 and settings.keep_alive == 300 and settings.port == 11434
    assert settings.max_wait_for_switch == 30 and model.priority == 0  # the defaults
    assert settings.jobs_max_queued_per_key == 100 and settings.jobs_max_bytes_per_key == 64 * 2**20


@pytest.mark.parametrize(
    ("config", "models", "file", "key"),
    [
        ({"server": {"port": "x"}}, {}, "config.yml", "server.port"),
        ({"bogus": 1}, {}, "config.yml", "bogus"),
        ({"limits": {"max_queue": 1, "zz": 2}}, {}, "config.yml", "limits.zz"),
        ({"defaults": {"keep_alive": "forever"}}, {}, "config.yml", "defaults.keep_alive"),
        ({"limits": {"max_loaded_models": 0}}, {}, "config.yml", "limits.max_loaded_models"),
        ({"limits": {"max_audio_seconds": 0}}, {}, "config.yml", "limits.max_audio_seconds"),
        ({"limits": {"max_audio_seconds": ".inf"}}, {}, "config.yml", "limits.max_audio_seconds"),
        ({"limits": {"max_image_pixels": 0}}, {}, "config.yml", "limits.max_image_pixels"),
        ({"limits": {"max_wait_for_switch": "0s"}}, {}, "config.yml", "limits.max_wait_for_switch"),
        ({"limits": {"max_wait_for_switch": "soon"}}, {}, "config.yml", "limits.max_wait_for_switch"),
        ({"limits": {"max_concurrent_per_key": -1}}, {}, "config.yml", "limits.max_concurrent_per_key"),
        ({"server": {"max_connections": -1}}, {}, "config.yml", "server.max_connections"),
        ({"server": {"header_timeout": "soon"}}, {}, "config.yml", "server.header_timeout"),
        ({"jobs": {"max_queued_per_key": 0}}, {}, "config.yml", "jobs.max_queued_per_key"),
        ({"jobs": {"max_bytes_per_key": "lots"}}, {}, "config.yml", "jobs.max_bytes_per_key"),
        ({}, {"a.yaml": {**GOOD, "priority": "high"}}, "a.yaml", "priority"),
        ({}, {"a.yaml": {**GOOD, "colour": "red"}}, "a.yaml", "colour"),
        ({}, {"a.yaml": {**GOOD, "keep_alive": "soon"}}, "a.yaml", "keep_alive"),
        ({}, {"a.yaml": {**GOOD, "template": {"sys": "x"}}}, "a.yaml", "template.sys"),
        ({}, {"a.yaml": {**GOOD, "span_gpus": True}}, "a.yaml", "span_gpus"),  # not a llama_cpp model
        (
            {},
            {"a.yaml": {"name": "m", "backend": "llama_cpp", "model": {"n_ctx": "big", "path": "x"}}},
            "a.yaml",
            "model.n_ctx",
        ),
        (
            {},
            {"a.yaml": {"name": "m", "backend": "llama_cpp", "model": {"package": "no_such_pkg", "file": "x"}}},
            "a.yaml",
            "model.package",
        ),
        (
            {},
            {"a.yaml": {"name": "m", "backend": "llama_cpp", "model": {"path": "x", "mmproj": "no-such.gguf"}}},
            "a.yaml",
            "model.mmproj",
        ),
        (
            {},
            {"a.yaml": {"name": "m", "backend": "llama_cpp", "model": {"path": "x", "chat_handler": "Llava15"}}},
            "a.yaml",
            "model.chat_handler",  # a handler with no projector to load
        ),
        ({}, {"a.yaml": {"name": "m", "backend": "external"}}, "a.yaml", "cmd"),
        ({}, {"a.yaml": {"name": "m", "backend": "vllm"}}, "a.yaml", "backend"),
        ({}, {"a.yaml": GOOD, "b.yaml": GOOD}, "b.yaml", "name"),
    ],
)
def test_errors_name_file_and_key(
    tmp_path: Path, config: dict[str, Any], models: dict[str, dict[str, Any]], file: str, key: str
) -> None:
    path = write(tmp_path, config, models)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.file.endswith(file)
    assert info.value.key == key
    assert file in str(info.value) and key in str(info.value)


def test_files_a_model_names_are_resolved_against_models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not against the working directory: the proxy and the worker read the same files wherever they run."""
    models = tmp_path / "models"
    (models / "refs").mkdir(parents=True)
    (models / "refs" / "ref.wav").write_bytes(b"RIFF")
    (models / "voice.json").write_text(json.dumps({"speaker_id_map": {"ann": 0, "bob": 1}}))
    path = write(
        tmp_path,
        {},
        {
            "p.yaml": {"name": "p", "backend": "piper", "model": {"path": "voice.onnx", "config_file": "voice.json"}},
            "x.yaml": {"name": "x", "backend": "xtts", "model": {"path": "xtts", "voices_dir": "refs"}},
            "y.yaml": {"name": "y", "backend": "xtts", "model": {"path": str(models / "other")}},
        },
    )
    monkeypatch.chdir(tmp_path)
    piper, xtts, plain = load_settings(path).models
    assert piper.options["config_file"] == str(models / "voice.json") and voices.speakers(piper) == ["ann", "bob"]
    assert xtts.options["voices_dir"] == str(models / "refs") and voices.voice_files(xtts) == ["ref.wav"]
    assert plain.options["voices_dir"] == str(models / "other" / "voices")  # the default, beside the model


def test_bad_config_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, {"server": {"prot": 1}}, {})
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "--config", str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 2
    assert "config.yml: server.prot: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_is_the_console_script() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "proxy"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and "--config" in result.stdout and "--port" in result.stdout


def test_max_wait_for_switch_and_priority_are_read(tmp_path: Path) -> None:
    path = write(tmp_path, {"limits": {"max_wait_for_switch": "2m"}}, {"a.yaml": {**GOOD, "priority": 5}})
    settings = load_settings(path)
    assert settings.max_wait_for_switch == 120 and settings.models[0].priority == 5


def test_parallel_defaults_per_backend_and_a_yamls_value_wins(tmp_path: Path) -> None:
    # issue 25, defect 9c: an external server (vLLM, llama-server) batches requests; one at a time wasted it
    models: dict[str, dict[str, Any]] = {
        "a.yaml": GOOD,
        "b.yaml": {**GOOD, "name": "one", "parallel": 1},
        "c.yaml": {"name": "g", "backend": "llama_cpp", "model": {"path": "m.gguf"}},
    }
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    settings = load_settings(write(tmp_path, {"models_dir": str(tmp_path)}, models))
    assert {m.name: m.parallel for m in settings.models} == {"m": 4, "one": 1, "g": 1}


def test_connection_and_per_key_limits_are_read(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"limits": {"max_queue": 100}}, {}))
    assert (settings.header_timeout, settings.max_connections) == (10, 1000)  # the defaults
    assert settings.max_concurrent_per_key == 50  # half of max_queue: one key never fills the queue alone
    config = {"server": {"header_timeout": "0", "max_connections": 0}, "limits": {"max_concurrent_per_key": 3}}
    settings = load_settings(write(tmp_path, config, {}))
    assert (settings.header_timeout, settings.max_connections, settings.max_concurrent_per_key) == (0, 0, 3)


def test_a_models_mmproj_is_found_under_models_absolute_or_in_a_package(tmp_path: Path) -> None:
    """``model.mmproj`` as ``model:`` names its file: under models/, absolute, or {package, file}; a model
    with one is a vision model."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "mmproj-a.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj-b.gguf").write_bytes(b"GGUF")
    path = write(
        tmp_path,
        {},
        {
            "a.yaml": {"name": "a", "model": {"path": "a.gguf", "mmproj": "mmproj-a.gguf"}},
            "b.yaml": {"name": "b", "model": {"path": "b.gguf", "mmproj": str(tmp_path / "mmproj-b.gguf")}},
            "c.yaml": {"name": "c", "model": {"path": "c.gguf", "mmproj": {"package": "proxy", "file": "wire.py"}}},
            "d.yaml": {"name": "d", "model": {"path": "d.gguf"}},
        },
    )
    a, b, c, d = sorted(load_settings(path).models, key=lambda m: m.name)
    assert a.options["mmproj"] == str(models / "mmproj-a.gguf") and a.vision
    assert b.options["mmproj"] == str(tmp_path / "mmproj-b.gguf") and b.vision
    assert c.options["mmproj"] == str(REPO / "proxy" / "wire.py") and c.vision
    assert d.options["mmproj"] is None and not d.vision
