"""config.yml + configs/*.yaml -> frozen, typed settings.

Every file is validated strictly (unknown keys and wrong types are errors); a problem raises
``ConfigError`` naming the file, the key and what is wrong, and start-up stops there.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import yaml

from proxy.backends import (
    BACKENDS,
    RUNTIME_OPTIONS,
    Backend,
    BackendInfo,
    Capability,
    Kind,
    LlamaCppOptions,
    ModelFileOptions,
    OptionFileError,
    under,
)
from proxy.cluster.config import ClusterSection, ClusterSettings, cluster_settings
from proxy.errors import BadRequest, ConfigError
from proxy.keepalive import parse_keep_alive
from proxy.memory import Need, parse_bytes

Duration = str | int | float

# What a model is and advertises unless its config says otherwise (its backend's kind: proxy.backends).
DEFAULT_CAPABILITIES: dict[Kind, tuple[str, ...]] = {
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
    # Host header names answered besides localhost, 127.0.0.1, [::1] and ``host`` ("*": any)
    allowed_hosts: list[str] = []
    # /metrics without a key (true), or with any valid key (false)
    metrics_public: bool = True
    # where each model's worker output goes (<log_dir>/<model>.log); relative to config.yml; null: no files
    log_dir: str | None = "logs"
    # while a model loads, a streamed /v1/* answer sends an SSE comment (": loading NAME 40%") this often
    loading_comment_interval: Duration = "1.5s"
    # /v1/audio/voices and /v1/audio/models answer without a key (Open WebUI asks for them with none)
    public_audio_listings: bool = True
    # a request's headers must arrive within this from the connection's start (or the next request's first
    # byte), and its body may not pause longer than this; else the connection is closed ("0": no limit)
    header_timeout: Duration = "10s"
    # open connections at most; past it a new connection closes the oldest one that is waiting for its
    # headers or idle between requests, else it is answered 503 and closed (0: no cap)
    max_connections: int = 1000
    # a streamed /v1/chat/completions or /v1/completions of a local worker: the worker writes its tokens to the
    # client's connection itself (the proxy is off the token path: proxy.handoff); false: relayed by the proxy
    stream_handoff: bool = True


class DefaultsSection(_Strict):
    keep_alive: Duration = "5m"
    load_timeout: Duration = "120s"
    unload_grace: Duration = "10s"


Size = int | str  # bytes, or "16GiB", "512MB"


class MemoryLimitsSection(_Strict):
    # hard budgets the admitted models together may not exceed (vram: per GPU); none: what the box has
    ram: Size | None = None
    vram: Size | None = None
    # kept free for everything else: subtracted from available RAM and from each GPU's free VRAM
    reserve_ram: Size = "512MiB"
    reserve_vram: Size = "256MiB"
    # after an unload, how long to wait at most for the memory to be back before starting the next model
    recovery_timeout: Duration = "10s"
    # may models with keep_alive < 0 ("forever") be unloaded to make room? (default: never)
    evict_pinned: bool = False


class FetchLimitsSection(_Strict):
    # image and audio URLs the proxy fetches (proxy/fetch.py): hosts (names, addresses or networks such as
    # 10.0.0.0/8) allowed although they resolve to a loopback, private, link-local or other non-public address
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    max_bytes: Size = "20MiB"  # a longer answer is refused while it streams
    timeout: Duration = "30s"  # the whole fetch, redirects included


class LimitsSection(_Strict):
    memory: MemoryLimitsSection = msgspec.field(default_factory=MemoryLimitsSection)
    fetch: FetchLimitsSection = msgspec.field(default_factory=FetchLimitsSection)
    max_loaded_models: int | None = None  # an extra cap on the count; none: memory alone decides
    max_queue: int = 512
    # requests one key (or, with no keys, one client address) may have in flight at once, waiting ones
    # included; more get 429 with Retry-After. none: half of max_queue; 0: no limit
    max_concurrent_per_key: int | None = None
    # when requests wait for models that cannot all be loaded, the loaded model serves its waiting requests
    # first; no request waits longer than this behind other models' requests before its switch comes
    max_wait_for_switch: Duration = "30s"
    # keep one spare worker per backend (and interpreter) started, imports done, waiting for its model:
    # a load (a switch) then skips the interpreter's start and the backend's imports (proxy/spares.py)
    warm_spare: bool = True
    max_body_bytes: int = 32 * 1024 * 1024
    # a worker with requests in flight that uses no CPU for this long is stuck: it is killed and its
    # requests get an error ("0" turns the watchdog off)
    stall_timeout: Duration = "60s"
    # a request that gets no bytes from its worker for this long (counted from the last byte, or from the
    # request's send for the first: a prompt's prefill and a whole answer that is not streamed count) ends
    # with an error, and the worker is killed and restarted on the next request ("0" turns it off)
    worker_idle_timeout: Duration = "300s"
    # a JSON body's own limit (max_body_bytes still bounds uploads such as transcriptions)
    max_json_bytes: int = 8 * 1024 * 1024
    # a large JSON body may hold at most this many objects, arrays, strings and numbers
    max_json_values: int = 500_000
    # the longest keep_alive a user key may ask for; negative and 0 need an admin key
    max_user_keep_alive: Duration = "1h"
    # repetition counts in a JSON schema (maxLength, minItems, {m,n}, ...) above this are refused: llama.cpp
    # builds one grammar rule per repetition and crashes on large ones
    max_schema_repeat: int = 500
    # all the JSON schemas of one request together (response_format, tools), as compact JSON, in bytes
    max_schema_bytes: int = 64 * 1024
    # values in one enum (and branches of one anyOf / oneOf) of a schema: each is a grammar alternative
    # every token is checked against (a 30,000-value enum made each token take 4.4 s)
    max_schema_enum: int = 256
    # inputs in one embeddings request (OpenAI's own limit)
    max_embedding_inputs: int = 2048
    # tokens in one embeddings request, all inputs together, estimated as their UTF-8 bytes / 4
    max_embedding_tokens: int = 300_000
    # an audio upload longer than this (read from its header, or counted while decoding) is a 413
    max_audio_seconds: float = 3600.0
    # an init_image with more pixels than this (read from its header, before decoding) is a 413
    max_image_pixels: int = 4096 * 4096
    # a model's log file is rotated past this size (3 old files are kept)
    log_file_bytes: Size = "10MiB"
    # llama.cpp prompt states saved at unload under models/.cache/prompts/, every model together (least
    # recently used go first); none: 10 GiB, or a tenth of the disk models/ is on if that is less
    prompt_cache_disk: Size | None = None


class JobsSection(_Strict):
    # finished jobs (COMPLETED, FAILED, CANCELLED) are kept this long for /status, then deleted
    ttl: Duration = "24h"
    # jobs waiting or running at once, over every model; more get 503 with Retry-After
    max_queued: int = 1000
    # jobs one key may have waiting or running at once; more get 429 with Retry-After
    max_queued_per_key: int = 100
    # input bytes one key's jobs waiting or running may hold in all: 429 with Retry-After beyond it (413 for
    # a job whose input alone is larger)
    max_bytes_per_key: Size = "64MiB"


class AuthSection(_Strict):
    # HS256 secret for JWT bearer tokens (at least 32 bytes); none: the SECRET_KEY environment variable, if set
    jwt_secret: str | None = None


class ConfigFile(_Strict):
    server: ServerSection = msgspec.field(default_factory=ServerSection)
    models_dir: str = "models"
    configs_dir: str = "configs"
    api_tokens: str | None = "api_tokens.yml"  # null: no keys, open on purpose
    defaults: DefaultsSection = msgspec.field(default_factory=DefaultsSection)
    limits: LimitsSection = msgspec.field(default_factory=LimitsSection)
    auth: AuthSection = msgspec.field(default_factory=AuthSection)
    log_level: str = "info"
    data_dir: str = "data"  # what the proxy keeps across restarts (the jobs database), beside config.yml
    jobs: JobsSection = msgspec.field(default_factory=JobsSection)
    cluster: ClusterSection | None = None  # several proxies, one endpoint (proxy/cluster/); none: this host alone


OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


class TemplateSection(_Strict):
    system: str | None = None
    system_time: bool = False


class DetailsSection(_Strict):
    family: str | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None
    format: str | None = None


class MemorySection(_Strict):
    ram: Size | None = None
    vram: Size | None = None


class PromptCacheSection(_Strict):
    # the prompt states a loaded model keeps in RAM (least recently used go first); none: 1 GiB, or a
    # sixteenth of the box's RAM if that is less
    ram: Size | None = None


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
    parallel: int | None = None  # default: its backend's (proxy.backends: 4 for external, else 1)
    load_timeout: Duration | None = None
    capabilities: list[str] | None = None
    kind: Kind | None = None
    vision: bool = False
    details: DetailsSection = msgspec.field(default_factory=DetailsSection)
    memory: MemorySection | None = None  # what it needs, overriding the estimate
    gpus: list[int] | None = None  # the GPUs (NVML indices) it may run on; default: any
    # llama_cpp: it may be spread over several of those GPUs (a tensor split) when no one of them can hold it
    span_gpus: bool = False
    priority: int = 0  # between requests for different models that wait as long, the higher goes first
    # in a cluster (config.yml cluster:), how many nodes may load it at once (the load lease's slots)
    replicas: int = 1
    # streamed /v1/* answers get their headers and SSE comments while it loads (false: nothing until loaded)
    loading_feedback: bool = True
    # runner options an Ollama request's ``options`` may change by reloading the model (proxy.runtime_options)
    runtime_options: list[str] = []
    # llama_cpp: the prompt cache (proxy/worker/prompt_cache.py); false: off
    prompt_cache: bool | PromptCacheSection = True


@dataclass(frozen=True)
class MemoryLimits:
    """limits.memory, in bytes and seconds."""

    ram: int | None = None
    vram: int | None = None
    reserve_ram: int = 512 * 1024 * 1024
    reserve_vram: int = 256 * 1024 * 1024
    recovery_timeout: float = 10.0
    evict_pinned: bool = False


@dataclass(frozen=True)
class FetchLimits:
    """limits.fetch: what the proxy's URL fetcher (proxy/fetch.py) allows."""

    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 20 * 1024 * 1024
    timeout: float = 30.0


@dataclass(frozen=True)
class ModelConfig:
    """One model, resolved: durations in seconds, files as absolute paths."""

    name: str
    aliases: tuple[str, ...]
    backend: Backend
    source: str
    options: Mapping[str, Any]  # what its worker gets, as JSON: model_options less the model file
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
    # its ``model:`` section, typed, the files it names resolved (None: its backend has no options struct)
    model_options: ModelFileOptions | None = None
    memory: Need | None = None  # memory: in its YAML (source "config")
    gpus: tuple[int, ...] | None = None
    span_gpus: bool = False  # may be spread over several GPUs (llama.cpp's tensor split)
    # the limits its worker enforces on what it decodes (max_audio_seconds, max_image_pixels)
    worker_limits: Mapping[str, float] = field(default_factory=dict)
    priority: int = 0
    replicas: int = 1  # nodes of a cluster that may hold it at once (proxy/cluster/)
    loading_feedback: bool = True  # SSE comments while it loads (proxy.loading)
    runtime_options: tuple[str, ...] = ()  # what a request may reload it with (proxy.runtime_options)
    idle_timeout: float = 300.0  # limits.worker_idle_timeout (0: off)
    # llama_cpp's prompt cache as its worker gets it (ram, disk, dir, save_seconds); None: off
    prompt_cache: Mapping[str, Any] | None = None

    @property
    def facts(self) -> BackendInfo:
        """Its backend's facts (proxy.backends)."""
        return BACKENDS[self.backend]

    def backend_can(self, capability: Capability) -> bool:
        """Whether its backend's worker serves this (``capabilities`` is what the model advertises)."""
        return capability in self.facts.capabilities

    @property
    def listed_capabilities(self) -> list[str]:
        """What model lists (Ollama's, a cluster's registry) say it can do: its own capabilities,
        ``embedding`` where its worker makes embeddings for it (a chat model on llama.cpp serves /api/embed
        too), ``vision`` where configured."""
        caps = list(self.capabilities)
        if "completion" in caps and self.backend_can("embed") and "embedding" not in caps:
            caps.append("embedding")
        if self.vision and "vision" not in caps:
            caps.append("vision")
        return caps


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    cors_origins: tuple[str, ...]
    models_dir: Path
    configs_dir: Path
    api_tokens: Path | None
    keep_alive: float
    load_timeout: float
    unload_grace: float
    max_loaded_models: int | None  # None: no cap on the count
    max_queue: int
    max_body_bytes: int
    log_level: str
    models: tuple[ModelConfig, ...] = field(default=())
    source: str = "config.yml"
    stall_timeout: float = 60.0  # 0 or inf: no stall watchdog
    allowed_hosts: tuple[str, ...] = ()
    max_json_bytes: int = 8 * 1024 * 1024
    max_json_values: int = 500_000
    max_user_keep_alive: float = 3600.0
    max_schema_repeat: int = 500
    max_schema_bytes: int = 64 * 1024
    max_schema_enum: int = 256
    max_embedding_inputs: int = 2048
    max_embedding_tokens: int = 300_000
    memory: MemoryLimits = field(default_factory=MemoryLimits)
    fetch: FetchLimits = field(default_factory=FetchLimits)
    max_audio_seconds: float = 3600.0
    max_image_pixels: int = 4096 * 4096
    max_wait_for_switch: float = 30.0  # seconds a request waits at most behind other models' requests
    loading_comment_interval: float = 1.5  # seconds between SSE comments while a model loads
    warm_spare: bool = True  # a spare worker per backend, imports done, for the next load (proxy/spares.py)
    data_dir: Path | None = None  # None: nothing kept across restarts (jobs live in memory)
    jobs_ttl: float = 86400.0
    jobs_max_queued: int = 1000
    jobs_max_queued_per_key: int = 100
    jobs_max_bytes_per_key: int = 64 * 1024 * 1024
    metrics_public: bool = True  # /metrics without a key
    log_dir: Path | None = None  # each model's worker output as <log_dir>/<model>.log; None: no files
    log_file_bytes: int = 10 * 1024 * 1024  # rotated past this size
    public_audio_listings: bool = True  # the audio voices and models lists need no key
    worker_idle_timeout: float = 300.0  # 0: off
    jwt_secret: str | None = None  # auth.jwt_secret, else $SECRET_KEY; None: no JWTs
    header_timeout: float = 10.0  # seconds for a request's headers, and the longest pause in its body; 0: off
    max_connections: int = 1000  # open connections at most (proxy.connections); 0: no cap
    stream_handoff: bool = True  # workers write streamed chat tokens to the client themselves (proxy.handoff)
    max_concurrent_per_key: int = 256  # requests in flight per key (waiting ones included); 0: no limit
    cluster: ClusterSettings | None = None  # cluster: in config.yml (proxy/cluster/); None: this host alone
    prompt_cache_disk: int = 10 * 1024**3  # bytes of prompt states under models/.cache/prompts/, all models


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


def _finite(value: Duration, file: str, key: str) -> float:
    seconds = _seconds(value, file, key)
    if seconds is None or math.isinf(seconds) or seconds <= 0:
        raise ConfigError(file, key, "must be a positive duration")
    return seconds


def _off_or_seconds(value: Duration, file: str, key: str) -> float:
    """A time limit: seconds, with 0 (or a negative value) for none."""
    seconds = _seconds(value, file, key) or 0.0
    return 0.0 if math.isinf(seconds) else seconds


def _at_least_zero(value: int, file: str, key: str) -> int:
    if value < 0:
        raise ConfigError(file, key, "must be 0 (no limit) or more")
    return value


def _positive(value: int, file: str, key: str) -> int:
    if value < 1:
        raise ConfigError(file, key, f"must be at least 1, got {value}")
    return value


def _size(value: Size | None, file: str, key: str) -> int | None:
    if value is None:
        return None
    try:
        return parse_bytes(value)
    except ValueError as exc:
        raise ConfigError(file, key, str(exc)) from None


def default_prompt_cache_ram() -> int:
    """1 GiB, or a sixteenth of the box's RAM if that is less."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = 16 * 1024**3
    return min(1024**3, total // 16)


def default_prompt_cache_disk(models_dir: Path) -> int:
    """10 GiB, or a tenth of the disk that holds models/ if that is less."""
    where = models_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        total = shutil.disk_usage(where).total
    except OSError:
        total = 100 * 1024**3
    return min(10 * 1024**3, total // 10)


def _prompt_cache(raw: ModelFile, file: str, disk: int, unload_grace: float, models_dir: Path) -> dict[str, Any] | None:
    """A llama_cpp model's prompt cache, as its worker's spec carries it (None: off)."""
    if raw.backend != "llama_cpp" or raw.prompt_cache is False:
        return None
    ram = raw.prompt_cache.ram if isinstance(raw.prompt_cache, PromptCacheSection) else None
    size = _size(ram, file, "prompt_cache.ram")
    return {
        "ram": default_prompt_cache_ram() if size is None else size,
        "disk": disk,
        "dir": str(models_dir / ".cache" / "prompts"),
        # saving at unload may take half the grace a stop gives before SIGKILL
        "save_seconds": unload_grace / 2,
    }


def _memory(raw: MemoryLimitsSection, file: str) -> MemoryLimits:
    recovery = _seconds(raw.recovery_timeout, file, "limits.memory.recovery_timeout")
    return MemoryLimits(
        ram=_size(raw.ram, file, "limits.memory.ram"),
        vram=_size(raw.vram, file, "limits.memory.vram"),
        reserve_ram=_size(raw.reserve_ram, file, "limits.memory.reserve_ram") or 0,
        reserve_vram=_size(raw.reserve_vram, file, "limits.memory.reserve_vram") or 0,
        recovery_timeout=recovery if recovery is not None and not math.isinf(recovery) else 10.0,
        evict_pinned=raw.evict_pinned,
    )


def _fetch(raw: FetchLimitsSection, file: str) -> FetchLimits:
    timeout = _seconds(raw.timeout, file, "limits.fetch.timeout")
    if timeout is None or timeout <= 0 or math.isinf(timeout):
        raise ConfigError(file, "limits.fetch.timeout", "must be a positive duration")
    hosts = tuple(h.strip().lower().strip("[]") for h in raw.allowed_hosts)
    if any(not h for h in hosts):
        raise ConfigError(file, "limits.fetch.allowed_hosts", "holds an empty host")
    return FetchLimits(
        allowed_hosts=hosts,
        max_bytes=_positive(_size(raw.max_bytes, file, "limits.fetch.max_bytes") or 0, file, "limits.fetch.max_bytes"),
        timeout=timeout,
    )


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
    return under(models_dir, opts.path)


def _model(
    raw: ModelFile,
    file: str,
    settings_defaults: dict[str, float],
    models_dir: Path,
    worker_limits: Mapping[str, float] | None = None,
) -> ModelConfig:
    facts = BACKENDS[raw.backend]
    options: dict[str, Any] = dict(raw.model)
    opts: ModelFileOptions | None = None
    model_path: Path | None = None
    cmd: tuple[str, ...] | None = None
    if facts.options is not None:
        opts = _convert(raw.model, facts.options, file, "model.")
        model_path = resolve_model_file(opts, models_dir, file)
        try:
            opts = opts.with_paths(model_path, models_dir)
        except OptionFileError as exc:
            raise ConfigError(file, f"model.{exc.key}", exc.message) from None
        options = {k: v for k, v in msgspec.structs.asdict(opts).items() if k not in ("path", "package", "file")}
    if facts.entry is None:  # a server of its own
        if (raw.cmd is None) == (raw.url is None):
            raise ConfigError(file, "cmd", "an external model needs exactly one of cmd (to start) or url")
        if raw.cmd is not None:
            cmd = tuple(raw.cmd.split()) if isinstance(raw.cmd, str) else tuple(raw.cmd)
            if not cmd:
                raise ConfigError(file, "cmd", "must not be empty")
    kind: Kind = raw.kind or facts.kind
    capabilities = tuple(raw.capabilities) if raw.capabilities is not None else DEFAULT_CAPABILITIES[kind]
    if kind == "llm" and capabilities == ("embedding",):
        kind = "embedding"
    keep_alive = _seconds(raw.keep_alive, file, "keep_alive")
    load_timeout = _seconds(raw.load_timeout, file, "load_timeout")
    if load_timeout is not None and math.isinf(load_timeout):
        raise ConfigError(file, "load_timeout", "must be a positive duration")
    memory = None
    if raw.memory is not None:
        memory = Need(
            ram=_size(raw.memory.ram, file, "memory.ram") or 0,
            vram=_size(raw.memory.vram, file, "memory.vram") or 0,
            source="config",
        )
    if raw.gpus is not None and (not raw.gpus or any(g < 0 for g in raw.gpus)):
        raise ConfigError(file, "gpus", "must list GPU indices (0, 1, ...)")
    if raw.span_gpus and not facts.span_gpus:
        raise ConfigError(file, "span_gpus", "only llama_cpp models can be spread over GPUs (a tensor split)")
    for i, option in enumerate(raw.runtime_options):
        if option not in RUNTIME_OPTIONS:
            known = ", ".join(RUNTIME_OPTIONS)
            raise ConfigError(file, f"runtime_options[{i}]", f"'{option}' is not a runtime option (known: {known})")
        if option not in facts.runtime_options:
            raise ConfigError(file, "runtime_options", f"{option} is a runtime option of llama_cpp models only")
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
        parallel=_positive(raw.parallel if raw.parallel is not None else facts.parallel, file, "parallel"),
        load_timeout=load_timeout if load_timeout is not None else settings_defaults["load_timeout"],
        unload_grace=settings_defaults["unload_grace"],
        idle_timeout=settings_defaults.get("idle_timeout") or 0.0,
        capabilities=capabilities,
        vision=raw.vision or (isinstance(opts, LlamaCppOptions) and opts.mmproj is not None),
        details=raw.details,
        kind=kind,
        cache_dir=models_dir / ".cache",
        model_options=opts,
        memory=memory,
        gpus=tuple(raw.gpus) if raw.gpus is not None else None,
        span_gpus=raw.span_gpus,
        worker_limits=dict(worker_limits or {}),
        priority=raw.priority,
        replicas=_positive(raw.replicas, file, "replicas"),
        loading_feedback=raw.loading_feedback,
        runtime_options=tuple(dict.fromkeys(raw.runtime_options)),
        prompt_cache=_prompt_cache(
            raw, file, int(settings_defaults.get("prompt_cache_disk", 0)), settings_defaults["unload_grace"], models_dir
        ),
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
    idle = _seconds(raw.limits.worker_idle_timeout, file, "limits.worker_idle_timeout") or 0.0
    defaults["idle_timeout"] = 0.0 if math.isinf(idle) else idle
    for key in ("load_timeout", "unload_grace"):
        value = defaults[key]
        if value is None or math.isinf(value):
            raise ConfigError(file, f"defaults.{key}", "must be a positive duration")
    models_dir = rel(raw.models_dir)
    configs_dir = rel(raw.configs_dir)
    disk = _size(raw.limits.prompt_cache_disk, file, "limits.prompt_cache_disk")
    defaults["prompt_cache_disk"] = default_prompt_cache_disk(models_dir) if disk is None else disk
    if not (raw.limits.max_audio_seconds > 0 and math.isfinite(raw.limits.max_audio_seconds)):
        raise ConfigError(file, "limits.max_audio_seconds", "must be a positive number of seconds")
    worker_limits = {
        "max_audio_seconds": float(raw.limits.max_audio_seconds),
        "max_image_pixels": _positive(raw.limits.max_image_pixels, file, "limits.max_image_pixels"),
    }
    models: list[ModelConfig] = []
    seen: dict[str, str] = {}
    if configs_dir.is_dir():
        for model_file in sorted([*configs_dir.glob("*.yaml"), *configs_dir.glob("*.yml")]):
            mfile = str(model_file)
            data = _read_yaml(model_file)
            model = _model(_convert(data, ModelFile, mfile), mfile, defaults, models_dir, worker_limits)  # type: ignore[arg-type]
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
        api_tokens=rel(raw.api_tokens) if raw.api_tokens is not None else None,
        keep_alive=defaults["keep_alive"] if defaults["keep_alive"] is not None else 300.0,
        load_timeout=defaults["load_timeout"] or 120.0,
        unload_grace=defaults["unload_grace"] or 10.0,
        max_loaded_models=(
            _positive(raw.limits.max_loaded_models, file, "limits.max_loaded_models")
            if raw.limits.max_loaded_models is not None
            else None
        ),
        max_queue=max(0, raw.limits.max_queue),
        max_body_bytes=_positive(raw.limits.max_body_bytes, file, "limits.max_body_bytes"),
        log_level=raw.log_level,
        models=tuple(models),
        source=file,
        stall_timeout=_seconds(raw.limits.stall_timeout, file, "limits.stall_timeout") or 0.0,
        allowed_hosts=tuple(h.lower() for h in raw.server.allowed_hosts),
        max_json_bytes=_positive(raw.limits.max_json_bytes, file, "limits.max_json_bytes"),
        max_json_values=_positive(raw.limits.max_json_values, file, "limits.max_json_values"),
        max_user_keep_alive=_finite(raw.limits.max_user_keep_alive, file, "limits.max_user_keep_alive"),
        max_schema_repeat=_positive(raw.limits.max_schema_repeat, file, "limits.max_schema_repeat"),
        max_schema_bytes=_positive(raw.limits.max_schema_bytes, file, "limits.max_schema_bytes"),
        max_schema_enum=_positive(raw.limits.max_schema_enum, file, "limits.max_schema_enum"),
        max_embedding_inputs=_positive(raw.limits.max_embedding_inputs, file, "limits.max_embedding_inputs"),
        max_embedding_tokens=_positive(raw.limits.max_embedding_tokens, file, "limits.max_embedding_tokens"),
        memory=_memory(raw.limits.memory, file),
        fetch=_fetch(raw.limits.fetch, file),
        max_audio_seconds=worker_limits["max_audio_seconds"],
        max_image_pixels=int(worker_limits["max_image_pixels"]),
        max_wait_for_switch=_finite(raw.limits.max_wait_for_switch, file, "limits.max_wait_for_switch"),
        loading_comment_interval=_finite(raw.server.loading_comment_interval, file, "server.loading_comment_interval"),
        warm_spare=raw.limits.warm_spare,
        data_dir=rel(raw.data_dir),
        jobs_ttl=_finite(raw.jobs.ttl, file, "jobs.ttl"),
        jobs_max_queued=_positive(raw.jobs.max_queued, file, "jobs.max_queued"),
        jobs_max_queued_per_key=_positive(raw.jobs.max_queued_per_key, file, "jobs.max_queued_per_key"),
        jobs_max_bytes_per_key=_positive(
            _size(raw.jobs.max_bytes_per_key, file, key := "jobs.max_bytes_per_key") or 0, file, key
        ),
        metrics_public=raw.server.metrics_public,
        log_dir=rel(raw.server.log_dir) if raw.server.log_dir is not None else None,
        log_file_bytes=_positive(
            _size(raw.limits.log_file_bytes, file, key := "limits.log_file_bytes") or 0, file, key
        ),
        public_audio_listings=raw.server.public_audio_listings,
        worker_idle_timeout=defaults["idle_timeout"] or 0.0,
        jwt_secret=raw.auth.jwt_secret or os.environ.get("SECRET_KEY") or None,
        header_timeout=_off_or_seconds(raw.server.header_timeout, file, "server.header_timeout"),
        max_connections=_at_least_zero(raw.server.max_connections, file, "server.max_connections"),
        stream_handoff=raw.server.stream_handoff,
        max_concurrent_per_key=(
            max(0, raw.limits.max_queue) // 2
            if raw.limits.max_concurrent_per_key is None
            else _at_least_zero(raw.limits.max_concurrent_per_key, file, "limits.max_concurrent_per_key")
        ),
        cluster=cluster_settings(raw.cluster, file, host, int(port)) if raw.cluster is not None else None,
        prompt_cache_disk=int(defaults["prompt_cache_disk"] or 0),
    )


def model_from_options(settings: Settings, name: str, backend: Backend, model: dict[str, Any]) -> ModelConfig:
    """A model with every default but its backend and ``model:`` options (discovery: weights without a
    YAML). A ConfigError names the weights."""
    defaults = {
        "load_timeout": settings.load_timeout,
        "unload_grace": settings.unload_grace,
        "prompt_cache_disk": settings.prompt_cache_disk,
    }
    limits = {"max_audio_seconds": settings.max_audio_seconds, "max_image_pixels": float(settings.max_image_pixels)}
    raw = ModelFile(name=name, backend=backend, model=model)
    return _model(raw, f"discovered: {model.get('path')}", defaults, settings.models_dir, limits)
