"""A cold worker's first request pays for no imports: what it would import lazily (anyio's parts, since anyio
4.x) is imported with the HTTP stack, while the weights load (proxy.worker.__main__._import_http_stack)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.harness import LiveProxy, smollm2_config


@pytest.mark.real
def test_a_cold_workers_first_stream_imports_nothing(tmp_path: Path) -> None:
    # the worker's interpreter logs each import on stderr (its model's log): none may come after the load
    cfg = smollm2_config(env={"PYTHONPROFILEIMPORTTIME": "1"})
    proxy = LiveProxy(tmp_path, [cfg]).start()
    try:
        body = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
        with httpx.stream("POST", proxy.url + "/v1/chat/completions", json=body, timeout=120) as r:
            assert r.status_code == 200
            assert any(line.startswith("data: {") for line in r.iter_lines())
    finally:
        proxy.stop()
    log = (tmp_path / "logs" / "smollm2_135m.log").read_text().splitlines()
    loaded = next(i for i, line in enumerate(log) if "INFO loaded in" in line)
    assert any(line.startswith("import time:") for line in log[:loaded])  # the imports are being logged
    late = [line for line in log[loaded:] if line.startswith("import time:")]
    assert late == [], "\n".join(late)
