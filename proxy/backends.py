"""Each backend's facts, in one place: its kind, what its worker serves, the options its ``model:``
section takes (with their defaults), its worker's entry point, and what the model lists call it.

The proxy side reads this module. A worker never imports it (it may run under another interpreter):
the supervisor writes the entry point and the options, as plain JSON, into the worker's spec.
Standard library and msgspec only: the proxy process imports nothing heavy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Self

import msgspec

Backend = Literal["llama_cpp", "external", "diffusers", "piper", "xtts", "whisper"]
Kind = Literal["llm", "embedding", "image", "speech", "transcription"]
# What a backend's worker serves; a model's own ``capabilities`` are what the model lists advertise.
Capability = Literal["chat", "completion", "embed", "image", "speech", "clone", "transcribe"]
RUNTIME_OPTIONS = ("num_ctx",)  # what a model's ``runtime_options`` may list (for the backends that take it)


def under(models_dir: Path, path: str) -> Path:
    """A file a model's config names: absolute, or relative to models/."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else models_dir / p


class ModelFileOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where a backend's weights are: ``path`` (under models/ or absolute) or ``package`` + ``file``.

    Every backend's options struct derives from this one; what is left after the file goes to the
    worker as its options.
    """

    path: str | None = None
    package: str | None = None
    file: str | None = None

    def with_paths(self, model_path: Path, models_dir: Path) -> Self:
        """These options with the other files they name resolved against models/ (or defaulted beside
        the model): once, at config load, so the proxy and the worker read the same files."""
        return self


class PackageFile(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A file inside an installed package's folder (as ``model.package`` + ``model.file``)."""

    package: str
    file: str


class OptionFileError(Exception):
    """A file a ``model:`` option names cannot be found: the option's key and why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


def in_package(package: str, file: str, key: str) -> Path:
    """``file`` in an installed package's folder (the first of its locations that has it)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OptionFileError(key, f"package '{package}' is not installed")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / file
        if candidate.exists():
            return candidate
    raise OptionFileError(key, f"'{file}' not found in package '{package}'")


class LlamaCppOptions(ModelFileOptions):
    """``model:`` of a llama_cpp model; anything beyond the file goes to ``llama_cpp.Llama``."""

    n_ctx: int = 4096
    n_gpu_layers: int = -1
    n_threads: int | None = None
    n_batch: int = 512
    chat_format: str | None = None
    seed: int | None = None
    flash_attn: bool = False
    # a vision model's image projector (llama.cpp's ``mmproj`` GGUF): under models/, absolute, or
    # {package, file}; resolved to an absolute path at config load
    mmproj: str | PackageFile | None = None
    # the llama_cpp.llama_chat_format class that reads images with it (default MTMDChatHandler)
    chat_handler: str | None = None

    def with_paths(self, model_path: Path, models_dir: Path) -> Self:
        if self.mmproj is None:
            if self.chat_handler is not None:
                raise OptionFileError("chat_handler", "needs model.mmproj (the image projector it loads)")
            return self
        if isinstance(self.mmproj, PackageFile):
            path = in_package(self.mmproj.package, self.mmproj.file, "mmproj")
        else:
            path = under(models_dir, self.mmproj)
            if not path.is_file():
                raise OptionFileError("mmproj", f"no such file: {path}")
        return msgspec.structs.replace(self, mmproj=str(path))


class WhisperOptions(ModelFileOptions):
    """``model:`` of a whisper model: a CTranslate2 folder (or one split over several packages)."""

    part_packages: list[str] = []  # packages whose data folder holds more model.bin.partN files
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = "auto"  # auto: int8 on CPU, float16 on CUDA
    cpu_threads: int = 0
    beam_size: int = 5
    vad_filter: bool = False
    language: str | None = None


class PiperOptions(ModelFileOptions):
    """``model:`` of a piper voice: the ``.onnx`` file (its ``.onnx.json`` beside it, or ``config_file``)."""

    config_file: str | None = None  # under models/ or absolute (default: <model>.json beside the model)
    default_voice: str | None = None  # a speaker of a multi-speaker voice; else the voice itself
    openai_voices: dict[str, str] = {}  # alloy, echo, ... -> one of our voices (default: the default voice)
    speed: float = 1.0
    sample_rate: int | None = None  # resample the voice's output to this rate
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    use_cuda: bool = False

    def with_paths(self, model_path: Path, models_dir: Path) -> Self:
        config = (
            under(models_dir, self.config_file) if self.config_file else model_path.with_name(model_path.name + ".json")
        )
        return msgspec.structs.replace(self, config_file=str(config))


class XttsOptions(ModelFileOptions):
    """``model:`` of an XTTS v2 model: its checkpoint folder (config.json, model.pth, vocab.json, speakers)."""

    speakers: list[str] = []  # the named speakers of its speakers file that clients may ask for
    default_voice: str | None = None  # one of the speakers (default: the first)
    openai_voices: dict[str, str] = {}
    # reference wavs clients may name in speaker_wav, under models/ or absolute (default: <folder>/voices)
    voices_dir: str | None = None
    language: str = "en"
    speed: float = 1.0
    temperature: float = 0.7
    stream_chunk_size: int = 20
    sample_rate: int | None = None  # resample the model's output (24000 Hz) to this rate
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None  # torch threads; pinned for repeatable output

    def with_paths(self, model_path: Path, models_dir: Path) -> Self:
        voices = under(models_dir, self.voices_dir) if self.voices_dir else model_path / "voices"
        return msgspec.structs.replace(self, voices_dir=str(voices))


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

    def with_paths(self, model_path: Path, models_dir: Path) -> Self:
        if not self.config:
            return self
        return msgspec.structs.replace(self, config=str(under(models_dir, self.config)))


@dataclass(frozen=True)
class BackendInfo:
    name: Backend
    kind: Kind  # what its models are unless their config says (an llm may be configured as an embedding model)
    capabilities: frozenset[Capability]  # what its worker serves
    # the struct its ``model:`` section must match; None: ``model:`` goes to the options as it is
    options: type[ModelFileOptions] | None
    # "module:Class" that ``python -m proxy.worker`` imports (only there); None: a server of its own,
    # started from ``cmd`` or reached at ``url``
    entry: str | None
    format: str  # details.format and details.family in the model lists, unless the model's details say
    family: str
    # Ollama's runner options its models may list in ``runtime_options`` (reloaded with), as its own
    # ``model:`` options (num_ctx -> n_ctx): proxy.runtime_options
    runtime_options: Mapping[str, str] = field(default_factory=dict)
    # requests its worker takes at once unless the YAML's ``parallel:`` says: a server of its own (vLLM,
    # llama-server) batches requests continuously
    parallel: int = 1
    span_gpus: bool = False  # its models may be spread over several GPUs (``span_gpus``: a tensor split)
    # how its memory need is estimated before a first load (proxy.memory, proxy.needs): from a GGUF's facts
    # (read in a subprocess), a diffusers pipeline's weights and image size, its files' size; none: a server
    # of its own, counted by its ``memory:`` or measured
    estimate: Literal["gguf", "diffusers", "files", "none"] = "files"


_LLM: frozenset[Capability] = frozenset({"chat", "completion", "embed"})

BACKENDS: dict[Backend, BackendInfo] = {
    b.name: b
    for b in (
        BackendInfo(
            name="llama_cpp",
            kind="llm",
            capabilities=_LLM,
            options=LlamaCppOptions,
            entry="proxy.worker.backends.llama_cpp:LlamaCppBackend",
            format="gguf",
            family="llama",
            runtime_options={"num_ctx": "n_ctx"},
            span_gpus=True,
            estimate="gguf",
        ),
        BackendInfo(
            name="external",
            kind="llm",
            capabilities=_LLM,
            options=None,
            entry=None,
            format="external",
            family="external",
            parallel=4,
            estimate="none",
        ),
        BackendInfo(
            name="diffusers",
            kind="image",
            capabilities=frozenset({"image"}),
            options=DiffusersOptions,
            entry="proxy.worker.backends.diffusers:DiffusersBackend",
            format="diffusers",
            family="diffusers",
            estimate="diffusers",
        ),
        BackendInfo(
            name="piper",
            kind="speech",
            capabilities=frozenset({"speech"}),
            options=PiperOptions,
            entry="proxy.worker.backends.piper:PiperBackend",
            format="piper",
            family="piper",
        ),
        BackendInfo(
            name="xtts",
            kind="speech",
            capabilities=frozenset({"speech", "clone"}),
            options=XttsOptions,
            entry="proxy.worker.backends.xtts:XttsBackend",
            format="xtts",
            family="xtts",
        ),
        BackendInfo(
            name="whisper",
            kind="transcription",
            capabilities=frozenset({"transcribe"}),
            options=WhisperOptions,
            entry="proxy.worker.backends.whisper:WhisperBackend",
            format="whisper",
            family="whisper",
        ),
    )
}
