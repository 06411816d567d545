"""What the model lists say about a configured model: size, digest, details, capabilities."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from proxy.config import ModelConfig

_QUANT = re.compile(r"(?i)(?:^|[.\-_])((?:I?Q\d+(?:_[A-Z0-9]+)*)|F16|F32|BF16)(?:[.\-_]|$)")
_PARAMS = re.compile(r"(?i)(?:^|[.\-_])(\d+(?:\.\d+)?[MBK])(?:[.\-_]|$)")


@dataclass(frozen=True)
class Entry:
    size: int
    modified_at: float
    digest: str
    details: dict[str, Any]


def entry(cfg: ModelConfig) -> Entry:
    """Read fresh each time: a stat() is cheap, and the file may change under us."""
    size = 0
    modified = 0.0
    stem = cfg.name
    if cfg.model_path is not None:
        try:
            st = cfg.model_path.stat()
            size, modified = st.st_size, st.st_mtime
        except OSError:
            pass
        stem = cfg.model_path.name
    quant = _QUANT.search(stem)
    params = _PARAMS.search(stem) or _PARAMS.search(cfg.name.replace(":", "-"))
    family = cfg.details.family or cfg.facts.family
    details = {
        "parent_model": "",
        "format": cfg.details.format or cfg.facts.format,
        "family": family,
        "families": [family],
        "parameter_size": cfg.details.parameter_size or (params.group(1).upper() if params else ""),
        "quantization_level": cfg.details.quantization_level or (quant.group(1).upper() if quant else ""),
    }
    # An identity, not a content hash: hashing a multi-GB file on every listing would be absurd.
    ident = f"{cfg.name}|{cfg.model_path}|{size}|{modified}"
    return Entry(size, modified, hashlib.sha256(ident.encode()).hexdigest(), details)


def tag_name(name: str) -> str:
    """Ollama's ``name:tag`` form (Open WebUI needs the tag)."""
    return name if ":" in name else f"{name}:latest"
