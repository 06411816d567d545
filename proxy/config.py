"""config.yml + configs/*.yaml -> frozen, typed settings.

Every file is validated strictly (unknown keys and wrong types are errors); a problem raises
``ConfigError`` naming the file, the key and what is wrong, and start-up stops there.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml

from proxy.errors import BadRequest, ConfigError
from proxy.keepalive import parse_keep_alive

Duration = str | int | float
Backend = Literal["llama_cpp", "external", "diffusers", "piper", "xtts", "whisper"]
Kind = Literal["llm", "embedding", "image", "speech", "transcription"]

# What each backend is, and what it can do unless its config says otherwise.
BACKEND_KIND: dict[str, str] = {
    "llama_cpp": "llm",
    "external": "llm",
    "diffusers": "image",
    "piper": "speech",
    "xtts": "speech",
    "whisper": "transcription",
}
DEFAULT_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "llm": ("completion", "tools"),
    "embedding": ("embedding",),
    "image": ("image",),
    "speech": ("speech",),
    "transcription": ("transcription",),
}


class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = 11434
    cors_origins: list[str] = []


class DefaultsSection(_Strict):
    keep_alive: Duration = "5m"
    load_timeout: Duration = "120s"
    unload_grace: Duration = "10s"


class LimitsSection(_Strict):
    max_loaded_models: int = 3
    max_queue: int = 512
    max_body_bytes: int = 32 * 1024 * 1024
    # a worker with requests in flight that uses no CPU for this long is stuck: it is killed and its
    # requests get an error ("0" turns the watchdog off)
    stall_timeout: Duration = "60s"


class ConfigFile(_Strict):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    models_dir: str = "models"
    configs_dir: str = "configs"
    api_tokens: str = "api_tokens.yml"
    defaults: DefaultsSection = msgspec.field(default_factory=DefaultsSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    log_level: str = "info"


class ModelFileOptions(_Strict):
    """Where a backend's weights are: ``path`` (under models/ or absolute) or ``package`` + ``file``.

    Every backend's options struct derives from this one; what is left after the file goes to the
    worker as its options.
    """

    path: str | None = None
    package: str | None = None
    file: str | None = None


class LlamaCppOptions(ModelFileOptions):
    """``model:`` of a llama_cpp model; anything beyond the file goes to ``llama_cpp.Llama``."""

    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None
    seed: int | None = None
    flash_attn: bool = False


class WhisperOptions(ModelFileOptions):
    """``model:`` of a whisper model: a CTranslate2 folder (or one split over several packages)."""

    part_packages: list[str] = []  # packages whose data folder holds more model.bin.partN files
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "auto"  # auto: int8 on CPU, float16 on CUDA
    cpu_threads: int = 0
    beam_size: int = 5
    vad_filter: bool = False
    language: str | None = None


OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


class PiperOptions(ModelFileOptions):
    """``model:`` of a piper voice: the ``.onnx`` file (its ``.onnx.json`` beside it, or ``config_file``)."""

    config_file: str | None = None
    default_voice: str | None = None  # a speaker of a multi-speaker voice; else the voice itself
    openai_voices: dict[str, str] = {}  # alloy, echo, ... -> one of our voices (default: the default voice)
    speed: float = 1.0
    sample_rate: int | None = None  # resample the voice's output to this rate
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    use_cuda: bool = False


class XttsOptions(ModelFileOptions):
    """``model:`` of an XTTS v2 model: its checkpoint folder (config.json, model.pth, vocab.json, speakers)."""

    speakers: list[str] = []  # the named speakers of its speakers file that clients may ask for
    default_voice: str | None = None  # one of the speakers (default: the first)
    openai_voices: dict[str, str] = {}
    voices_dir: str | None = None  # reference wavs clients may name in speaker_wav (default: <folder>/voices)
    language: str = "en"
    speed: float = 1.0
    temperature: float = 0.7
    stream_chunk_size: int = 20
    sample_rate: int | None = None  # resample the model's output (24000 Hz) to this rate
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch threads; pinned for repeatable output


class DiffusersOptions(ModelFileOptions):
    """``model:`` of a diffusers model: a diffusers folder, or a .safetensors / .ckpt single file."""

    config: str | None = None  # for a single file: a local diffusers folder with the pipeline's configs
    steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    scheduler: str | None = None  # euler, euler_a, ddim, pndm, lms, dpm++_2m, unipc (default: the model's)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    threads: int | None = None  # torch threads: the same seed gives the same bytes only with the same count
    max_size: int = 1024


# backend -> the struct its ``model:`` section must match (backends not listed take no ``model:``)
BACKEND_OPTIONS: dict[str, type[ModelFileOptions]] = {
    "llama_cpp": LlamaCppOptions,
    "whisper": WhisperOptions,
    "piper": PiperOptions,
    "xtts": XttsOptions,
    "diffusers": DiffusersOptions,
}


class TemplateSection(_Strict):
    system: str | None = None
    system_time: bool = False


class DetailsSection(_Strict):
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None
    format: str | None = None


class ModelFile(_Strict):
    name: str
    aliases: list[str] = []
    backend: Backend = "llama_cpp"
    model: dict[str, Any] = {}
    cmd: list[str] | str | None = None
    url: str | None = None
    health_path: str = "/health"
    python: str | None = None
    env: dict[str, str] = {}
    sampling: dict[str, Any] = {}
    template: TemplateSection = msgspec.field(default_factory=TemplateSection)
    keep_alive: Duration | None = None
    pin_keep_alive: bool = False
    parallel: int = 1
    load_timeout: Duration | None = None
    capabilities: list[str] | None = None
    kind: Kind | None = None
    vision: bool = False
    details: DetailsSection = msgspec.field(default_factory=DetailsSection)


@dataclass(frozen=True)
class ModelConfig:
    """One model, resolved: durations in seconds, files as absolute paths."""

    name: str
    aliases: tuple[str, ...]
    backend: str
    source: str
    options: Mapping[str, Any]
    model_path: Path | None
    cmd: tuple[str, ...] | None
    url: str | None
    health_path: str
    python: str | None
    env: Mapping[str, str]
    sampling: Mapping[str, Any]
    system: str | None
    system_time: bool
    keep_alive: float | None
    pin_keep_alive: bool
    parallel: int
    load_timeout: float
    unload_grace: float
    capabilities: tuple[str, ...]
    vision: bool
    details: DetailsSection
    kind: str = "llm"
    cache_dir: Path | None = None  # where a worker may keep what it derives from the weights


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    cors_origins: tuple[str, ...]
    models_dir: Path
    configs_dir: Path
    api_tokens: Path
    keep_alive: float
    load_timeout: float
    unload_grace: float
    max_loaded_models: int
    max_queue: int
    max_body_bytes: int
    log_level: str
    models: tuple[ModelConfig, ...] = field(default=())
    source: str = "config.yml"
    stall_timeout: float = 60.0  # 0 or inf: no stall watchdog


def _read_yaml(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "", "file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "", f"not valid YAML: {exc}") from exc
    return {} if data is None else data


_PATH_IN_ERROR = re.compile(r" - at `\$\.?([^`]*)`$")
_UNKNOWN = re.compile(r"Object contains unknown field `([^`]*)`")


def _convert(data: Any, cls: type[Any], file: str, prefix: str = "") -> Any:
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH_IN_ERROR.search(text)
        key = prefix + (m.group(1) if m else "")
        problem = text[: m.start()] if m else text
        unknown = _UNKNOWN.match(problem)
        if unknown:
            key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
            problem = "unknown key"
        raise ConfigError(file, key or "(top level)", problem) from exc


def _seconds(value: Duration | None, file: str, key: str) -> float | None:
    try:
        return parse_keep_alive(value, key)
    except BadRequest as exc:
        raise ConfigError(file, key, exc.message) from exc


def _positive(value: int, file: str, key: str) -> int:
    if value < 1:
        raise ConfigError(file, key, f"must be at least 1, got {value}")
    return value


def resolve_model_file(opts: ModelFileOptions, models_dir: Path, file: str) -> Path:
    """A model file relative to models/, absolute, or inside an installed package."""
    if opts.package:
        if not opts.file:
            raise ConfigError(file, "model.file", "needed with model.package")
        spec = importlib.util.find_spec(opts.package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(file, "model.package", f"package '{opts.package}' is not installed")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / opts.file
            if candidate.exists():  # a file, or a folder for backends that load one
                return candidate
        raise ConfigError(file, "model.file", f"'{opts.file}' not found in package '{opts.package}'")
    if not opts.path:
        raise ConfigError(file, "model.path", "a model file is needed (model.path, or model.package + file)")
    path = Path(opts.path).expanduser()
    return path if path.is_absolute() else models_dir / path


def _model(raw: ModelFile, file: str, settings_defaults: dict[str, float], models_dir: Path) -> ModelConfig:
    options: dict[str, Any] = dict(raw.model)
    model_path: Path | None = None
    cmd: tuple[str, ...] | None = None
    options_cls = BACKEND_OPTIONS.get(raw.backend)
    if options_cls is not None:
        opts = _convert(raw.model, options_cls, file, "model.")
        model_path = resolve_model_file(opts, models_dir, file)
        options = {k: v for k, v in msgspec.structs.asdict(opts).items() if k not in ("path", "package", "file")}
        if isinstance(options.get("config"), str):  # a single file's diffusers config folder, like path:
            options["config"] = str(models_dir / Path(options["config"]).expanduser())
    if raw.backend == "external":
        if (raw.cmd is None) == (raw.url is None):
            raise ConfigError(file, "cmd", "an external model needs exactly one of cmd (to start) or url")
        if raw.cmd is not None:
            cmd = tuple(raw.cmd.split()) if isinstance(raw.cmd, str) else tuple(raw.cmd)
            if not cmd:
                raise ConfigError(file, "cmd", "must not be empty")
    kind = raw.kind or BACKEND_KIND[raw.backend]
    if raw.capabilities is not None:
        capabilities = tuple(raw.capabilities)
    elif raw.kind is None and raw.backend in ("llama_cpp", "external"):
        capabilities = DEFAULT_CAPABILITIES["llm"]
    else:
        capabilities = DEFAULT_CAPABILITIES[kind]
    if kind == "llm" and capabilities == ("embedding",):
        kind = "embedding"
    keep_alive = _seconds(raw.keep_alive, file, "keep_alive")
    load_timeout = _seconds(raw.load_timeout, file, "load_timeout")
    if load_timeout is not None and math.isinf(load_timeout):
        raise ConfigError(file, "load_timeout", "must be a positive duration")
    return ModelConfig(
        name=raw.name,
        aliases=tuple(raw.aliases),
        backend=raw.backend,
        source=file,
        options=options,
        model_path=model_path,
        cmd=cmd,
        url=raw.url.rstrip("/") if raw.url else None,
        health_path=raw.health_path,
        python=raw.python,
        env=dict(raw.env),
        sampling=dict(raw.sampling),
        system=raw.template.system,
        system_time=raw.template.system_time,
        keep_alive=keep_alive,
        pin_keep_alive=raw.pin_keep_alive,
        parallel=_positive(raw.parallel, file, "parallel"),
        load_timeout=load_timeout if load_timeout is not None else settings_defaults["load_timeout"],
        unload_grace=settings_defaults["unload_grace"],
        capabilities=capabilities,
        vision=raw.vision,
        details=raw.details,
        kind=kind,
        cache_dir=models_dir / ".cache",
    )


def load_settings(path: str | os.PathLike[str] = "config.yml", **overrides: Any) -> Settings:
    """Read config.yml and every configs/*.yaml next to it; overrides win (host, port)."""
    cfg_path = Path(path)
    file = str(cfg_path)
    raw = _convert(_read_yaml(cfg_path), ConfigFile, file)
    base = cfg_path.resolve().parent

    def rel(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else base / q

    defaults = {
        "keep_alive": _seconds(raw.defaults.keep_alive, file, "defaults.keep_alive"),
        "load_timeout": _seconds(raw.defaults.load_timeout, file, "defaults.load_timeout"),
        "unload_grace": _seconds(raw.defaults.unload_grace, file, "defaults.unload_grace"),
    }
    for key in ("load_timeout", "unload_grace"):
        value = defaults[key]
        if value is None or math.isinf(value):
            raise ConfigError(file, f"defaults.{key}", "must be a positive duration")
    models_dir = rel(raw.models_dir)
    configs_dir = rel(raw.configs_dir)
    models: list[ModelConfig] = []
    seen: dict[str, str] = {}
    if configs_dir.is_dir():
        for model_file in sorted([*configs_dir.glob("*.yaml"), *configs_dir.glob("*.yml")]):
            mfile = str(model_file)
            data = _read_yaml(model_file)
            model = _model(_convert(data, ModelFile, mfile), mfile, defaults, models_dir)  # type: ignore[arg-type]
            for name in (model.name, *model.aliases):
                if name in seen:
                    raise ConfigError(mfile, "name", f"'{name}' is already used by {seen[name]}")
                seen[name] = mfile
            models.append(model)
    host = overrides.get("host") or raw.server.host
    port = overrides.get("port") or raw.server.port
    return Settings(
        host=host,
        port=int(port),
        cors_origins=tuple(raw.server.cors_origins),
        models_dir=models_dir,
        configs_dir=configs_dir,
        api_tokens=rel(raw.api_tokens),
        keep_alive=defaults["keep_alive"] if defaults["keep_alive"] is not None else 300.0,
        load_timeout=defaults["load_timeout"] or 120.0,
        unload_grace=defaults["unload_grace"] or 10.0,
        max_loaded_models=_positive(raw.limits.max_loaded_models, file, "limits.max_loaded_models"),
        max_queue=max(0, raw.limits.max_queue),
        max_body_bytes=_positive(raw.limits.max_body_bytes, file, "limits.max_body_bytes"),
        log_level=raw.log_level,
        models=tuple(models),
        source=file,
        stall_timeout=_seconds(raw.limits.stall_timeout, file, "limits.stall_timeout") or 0.0,
    )
