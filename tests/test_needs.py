"""Need-finding (proxy/needs.py) with the manager, the ManualClock and a GGUF read the test holds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from proxy import needs
from proxy.memory import estimate_llama_cpp
from tests.test_manager import make, model, settle
from tests.test_memory import FACTS


async def test_a_gguf_need_read_begun_before_a_reload_is_not_kept_for_the_new_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # issue 25, defect 9a: the estimate for n_ctx 8192 was still being read when a reload made it 1024
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    reading, gate = asyncio.Event(), asyncio.Event()

    async def held_read(path: Path, python: str | None, timeout: float = 120.0) -> dict[str, Any] | None:
        reading.set()
        await gate.wait()
        return {**FACTS, "metadata": {}}

    monkeypatch.setattr(needs, "read_gguf", held_read)
    before = model("g", backend="llama_cpp", model_path=gguf, cmd=None, options={"n_ctx": 8192})
    after = model("g", backend="llama_cpp", model_path=gguf, cmd=None, options={"n_ctx": 1024})
    manager, _ = make(before)
    finding = asyncio.create_task(manager.needs.ensure(manager.registry.lookup("g")))
    await asyncio.wait_for(reading.wait(), 5)
    manager.replace_models([after])  # stopped: it takes the new config at once
    gate.set()
    need = await asyncio.wait_for(finding, 5)
    old, new = estimate_llama_cpp(FACTS, before.options, False), estimate_llama_cpp(FACTS, after.options, False)
    assert old != new
    assert need == new and next(s.need for s in manager.status()) == new
    await settle()
    await manager.shutdown()
