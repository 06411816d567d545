"""Discovery's names (proxy/discovery.py): a YAML wins over weights dropped into models/ under the same name,
with or without Ollama's ``:latest`` (issue 25, item 6: nothing tested that a YAML wins by name)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from proxy.discovery import scan
from proxy.manager import ModelManager
from proxy.memory import MemoryStore
from tests.fake_memory import FakeProbe
from tests.test_manager import model, settings


async def test_a_yaml_named_foo_wins_over_a_discovered_foo_gguf(tmp_path: Path) -> None:
    for stem in ("Foo", "bar", "baz", "qux"):
        (tmp_path / f"{stem}.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    # by its name, by an alias with :latest, by its name with :latest
    configured = (model("foo"), model("other", aliases=("baz:latest",)), model("qux:latest"))
    s = dataclasses.replace(settings(*configured), models_dir=tmp_path)
    found = scan(s, configured)
    assert [c.name for c in found] == ["bar:latest"]
    manager = ModelManager(
        dataclasses.replace(s, models=(*configured, *found)), probe=FakeProbe(), store=MemoryStore(None)
    )
    assert manager.resolve("foo").backend == manager.resolve("foo:latest").backend == "external"  # the YAML's
    assert manager.resolve("bar").model_path == tmp_path / "bar.gguf"
    await manager.shutdown()


def test_a_gguf_with_an_mmproj_beside_it_is_a_vision_model(tmp_path: Path) -> None:
    """``X.gguf`` takes ``mmproj-X*.gguf`` as its projector (``model.mmproj``, ``vision``); the projector is
    no model of its own, and one whose model is not there pairs with nothing."""
    for name in ("Seer-7B.gguf", "mmproj-Seer-7B-f16.gguf", "plain.gguf", "mmproj-gone-f16.gguf"):
        (tmp_path / name).write_bytes(b"GGUF\x03\x00\x00\x00")
    found = {c.name: c for c in scan(dataclasses.replace(settings(), models_dir=tmp_path), ())}
    assert sorted(found) == ["plain:latest", "seer-7b:latest"]
    seer, plain = found["seer-7b:latest"], found["plain:latest"]
    assert seer.vision and seer.options["mmproj"] == str(tmp_path / "mmproj-Seer-7B-f16.gguf")
    assert not plain.vision and plain.options.get("mmproj") is None
