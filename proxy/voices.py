"""Which voices a speech model has, read from its files without loading it, and what a request's
voice name means: ``default``, one of the model's speakers, or an OpenAI voice name mapped by the
model's YAML (to its default voice unless it says otherwise).

The files read here were resolved at config load (``with_paths`` in ``proxy.backends``)."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.backends import PiperOptions, XttsOptions
from proxy.config import OPENAI_VOICES, ModelConfig
from proxy.errors import BadRequest


def speakers(cfg: ModelConfig) -> list[str]:
    """The model's own voice names (a single-speaker voice has just ``default``)."""
    opts = cfg.model_options
    if isinstance(opts, PiperOptions):  # a multi-speaker voice lists them in its config file
        try:
            data = json.loads(Path(opts.config_file).read_text(encoding="utf-8")) if opts.config_file else {}
        except (OSError, ValueError):
            data = {}
        names = list((data.get("speaker_id_map") or {}).keys())
        return names or ["default"]
    if isinstance(opts, XttsOptions):
        return list(opts.speakers) or ["default"]
    return ["default"]


def voices_dir(cfg: ModelConfig) -> Path | None:
    """Where a cloning model's reference voices are (clients name them in speaker_wav)."""
    opts = cfg.model_options
    if not cfg.backend_can("clone") or not isinstance(opts, XttsOptions) or not opts.voices_dir:
        return None
    return Path(opts.voices_dir)


def voice_files(cfg: ModelConfig) -> list[str]:
    folder = voices_dir(cfg)
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"))


def languages(cfg: ModelConfig) -> list[str]:
    """The languages an XTTS model's config.json lists (empty when it does not say)."""
    if not isinstance(cfg.model_options, XttsOptions) or cfg.model_path is None:
        return []
    try:
        data = json.loads((cfg.model_path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [str(lang) for lang in data.get("languages") or []]


def default_voice(cfg: ModelConfig) -> str:
    configured = cfg.options.get("default_voice")
    return str(configured) if configured else speakers(cfg)[0]


def listed(cfg: ModelConfig) -> list[str]:
    """Every name a client may send: default, the speakers, and OpenAI's voice names."""
    return ["default", *[s for s in speakers(cfg) if s != "default"], *OPENAI_VOICES]


def resolve(cfg: ModelConfig, requested: str | None) -> str:
    """The speaker a voice name means; BadRequest listing the voices there are."""
    own = speakers(cfg)
    if requested in (None, "", "default"):
        return default_voice(cfg)
    assert requested is not None
    if requested in own:
        return requested
    mapping = dict(cfg.options.get("openai_voices") or {})
    if requested in OPENAI_VOICES:
        target = mapping.get(requested) or default_voice(cfg)
        return target
    raise BadRequest(
        f"unknown voice '{requested}' for model '{cfg.name}'; voices: {', '.join(listed(cfg))}", param="voice"
    )
