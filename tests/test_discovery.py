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
