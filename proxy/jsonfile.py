"""The small JSON caches under ``models/.cache/`` (memory needs, weight digests): read leniently, written
atomically (a temporary file beside it, then a rename), never fatal: a problem is a warning and the proxy
goes on with what it has in memory."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("proxy.cache")


def read_dict(path: Path | None) -> dict[str, Any]:
    """The JSON object in ``path``; empty when there is none or it cannot be read (with a warning)."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(data, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    return data


def write_atomic(path: Path | None, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so that a reader never sees half a file (None: nothing)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)
