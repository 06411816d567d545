"""What a model needs in memory, and what the box has free.

A model's need (``Need``: RAM bytes, VRAM bytes on the one GPU it runs on) comes from, in order:

1. ``memory: {ram: 2GiB, vram: 6GiB}`` in its YAML (source ``config``);
2. the most its worker was measured using while loaded with the same files and options (``measured``:
   RSS of the worker's whole process tree, VRAM per process from NVML, after its load and each request;
   the peak over every load), remembered across restarts in ``models/.cache/memory.json``;
3. an estimate before its first load (``estimate``), per backend (``estimate``, below).

An ``external`` model started from a ``cmd`` is estimated only from its ``memory:``; without one its first
load is admitted unchecked (source ``unknown``, a warning at start-up), and from then on its measured RSS
counts. A model at a ``url`` uses none of this box's memory (source ``none``).

The GGUF facts a llama.cpp estimate needs are read by ``proxy.worker.gguf_meta`` in a subprocess (the
``gguf`` package needs numpy, which this process never imports), once per file (path, size, mtime),
and cached in the same JSON file. ``proxy.needs`` reads them and finds each model's need in this order; this
module is the data, the estimates, the cache file and the probe. Nothing here imports more than the standard
library and psutil.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from proxy.jsonfile import read_dict, write_atomic
from proxy.nvml import GpuMemory, Gpus

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

Source = Literal["estimate", "measured", "config", "unknown", "none"]

# -- per-backend figures, measured on this project's real models (bench/switch.py, part "memory") ----------
# RSS of a process that has imported proxy.worker.server and its backend's library, no model loaded
# (x86-64 Linux, CPython 3.11, CPU builds; bench/switch.py --memory measures them again):
PROCESS_BASE: dict[str, int] = {
    "llama_cpp": 50 * MiB,  # measured 50.4 MB
    "piper": 63 * MiB,  # 62.9 MB
    "whisper": 70 * MiB,  # 69.8 MB
    "diffusers": 327 * MiB,  # 327.1 MB (torch + diffusers)
    "xtts": 431 * MiB,  # 430.7 MB (torch + coqui TTS, in .venv-xtts)
    "external": 0,
}
# Loaded RSS beyond PROCESS_BASE per byte of the model's files, after one request, on the CPU. Measured
# with the worker tree's RSS (psutil) against the files' sizes:
#   piper  joe medium (63.2 MB .onnx):          209.3 MB RSS -> (209.3 - 62.9) / 63.2  = 2.32 (onnxruntime arenas)
#   whisper base (147.9 MB CTranslate2, int8):  261.0 MB RSS -> (261.0 - 69.8) / 147.9 = 1.29
#   xtts   the tests' tiny checkpoint (97.2 MB): 747.8 MB RSS -> (747.8 - 430.7) / 97.2 = 3.26; a tiny model,
#          so fixed costs (tokenizer, conditioning) weigh more than they would on the 1.8 GB XTTS v2
FILE_FACTOR: dict[str, float] = {
    "piper": 2.32,
    "whisper": 1.29,
    "xtts": 3.26,
}
# llama.cpp: a vision model's image encoder (mmproj) beyond its file: an allowance for its compute buffers
# (not measured on a real projector here; a model's measured peak replaces the estimate after its first load)
PROJECTOR_COMPUTE = 128 * MiB
# llama.cpp: bytes per element of the KV cache by ggml type id (f32 0, f16 1, q4_0 2, q8_0 8, ...)
_KV_TYPE_BYTES = {0: 4.0, 1: 2.0, 30: 2.0, 2: 18 / 32, 3: 20 / 32, 6: 22 / 32, 7: 24 / 32, 8: 34 / 32}
# diffusers: activations per output pixel at float32 (UNet, then the VAE decode), halved at 16-bit.
# The tests' tiny pipeline (3.6 MB of weights) at 256x256 took 156 MB beyond PROCESS_BASE after one image:
# 156 MB / 65536 pixels = 2,380 bytes per pixel
_DIFFUSERS_ACTIVATION_PER_PIXEL = 2_400
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """``16GiB``, ``512MB``, ``1.5GiB`` or a plain number of bytes. ValueError names what is wrong."""
    if isinstance(value, bool):
        raise ValueError("expected bytes or a size like 16GiB")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"must not be negative, got {value}")
        return int(value)
    m = _SIZE.match(value)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"'{value}' is not a size (bytes, or a number with B, KB, MB, GB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int | float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Need:
    ram: int = 0
    vram: int = 0  # on the one GPU the model runs on
    source: Source = "estimate"

    def describe(self) -> str:
        vram = f" + {format_bytes(self.vram)} VRAM" if self.vram else ""
        return f"{format_bytes(self.ram)} RAM{vram}"


# -- estimates ------------------------------------------------------------------------------------------------
def _files_size(paths: Iterable[Path]) -> int:
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


def _package_data(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def projector_need(options: Mapping[str, Any], gpu: bool) -> Need:
    """A vision model's image projector (``mmproj``): its file's size plus ``PROJECTOR_COMPUTE`` for the
    image encoder's buffers, on the GPU when llama.cpp puts the model's layers there."""
    mmproj = options.get("mmproj")
    if not mmproj:
        return Need()
    size = _files_size([Path(str(mmproj))]) + PROJECTOR_COMPUTE
    on_gpu = gpu and int(options.get("n_gpu_layers", -1) if options.get("n_gpu_layers") is not None else -1) != 0
    return Need(ram=0, vram=size) if on_gpu else Need(ram=size)


def estimate_llama_cpp(facts: Mapping[str, Any], options: Mapping[str, Any], gpu: bool, parallel: int = 1) -> Need:
    """From a GGUF's facts (``proxy.worker.gguf_meta``) and the model's options.

    Weights: the last ``n_gpu_layers`` layers on the GPU (the output head too when every layer is), the
    rest and the token embeddings in RAM. KV cache: n_ctx x layers x KV heads x (key + value head size)
    x bytes of the cache type, on the device of its layer; our worker keeps one llama.cpp context for
    all its ``parallel`` slots (they take turns), so ``parallel`` does not multiply it. Compute buffer:
    Ollama's allowance for llama graphs, on the GPU when any layer is there (plus a small host part).
    """
    n_layer = int(facts["n_layer"])
    layers: list[int] = list(facts["layer_bytes"])
    n_ctx = int(options.get("n_ctx") or 0) or int(facts.get("context_length") or 4096)
    n_batch = min(int(options.get("n_batch") or 512), n_ctx)
    requested = int(options.get("n_gpu_layers", -1) if options.get("n_gpu_layers") is not None else -1)
    on_gpu = 0 if not gpu else (n_layer + 1 if requested < 0 else min(requested, n_layer + 1))
    gpu_layers = set(range(n_layer - min(on_gpu, n_layer), n_layer))
    k_bytes = _KV_TYPE_BYTES.get(int(options.get("type_k") or 1), 2.0)
    v_bytes = _KV_TYPE_BYTES.get(int(options.get("type_v") or 1), 2.0)
    kv_heads: list[int] = list(facts["n_head_kv"]) or [0] * n_layer
    per_layer_kv = [
        n_ctx * kv_heads[i] * (facts["key_length"] * k_bytes + facts["value_length"] * v_bytes) for i in range(n_layer)
    ]
    n_embd, n_vocab, n_head = int(facts["n_embd"]), int(facts["n_vocab"]), int(facts["n_head"])
    compute = max(4 * n_batch * (1 + 4 * n_embd + n_ctx * (1 + n_head)), 4 * n_batch * (n_embd + n_vocab))
    if options.get("flash_attn"):
        compute = 4 * n_batch * (n_embd + n_vocab)
    output = int(facts.get("output_bytes") or 0)
    other = int(facts.get("other_bytes") or 0)
    vram = sum(layers[i] + per_layer_kv[i] for i in gpu_layers)
    ram = sum(layers[i] + per_layer_kv[i] for i in range(n_layer) if i not in gpu_layers)
    if on_gpu > n_layer:
        vram += output
        ram += other - output
    else:
        ram += other
    if on_gpu:
        vram += compute
        ram += 4 * n_batch * n_embd  # the host's share: the input batch and its embeddings
    else:
        ram += compute
    projector = projector_need(options, gpu)  # a vision model's mmproj
    ram, vram = ram + projector.ram, vram + projector.vram
    return Need(ram=int(ram) + PROCESS_BASE["llama_cpp"], vram=int(vram), source="estimate")


def _safetensors_elements(path: Path) -> tuple[int, int] | None:
    """(elements, bytes) of the tensors in a .safetensors file, from its JSON header alone."""
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > 100 * MiB:
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    elements = size = 0
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        begin, end = info["data_offsets"]
        size += end - begin
        elements += (end - begin) // _SAFETENSORS_DTYPES.get(info.get("dtype", "F32"), 4)
    return elements, size


def diffusers_weights(path: Path, run_bytes: int) -> int:
    """The weights' size once loaded at ``run_bytes`` per element: safetensors are counted by element,
    other weight files (.bin, .ckpt) are taken as float32. With several variants of one component
    (``*.fp16.safetensors`` beside ``*.safetensors``) the loader reads one: the larger is counted."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in _WEIGHT_SUFFIXES]
    per_folder: dict[Path, int] = {}
    for f in files:
        counted = _safetensors_elements(f) if f.suffix == ".safetensors" else None
        elements = counted[0] if counted else f.stat().st_size // 4
        per_folder[f.parent] = max(per_folder.get(f.parent, 0), elements * run_bytes)
    return sum(per_folder.values())


def estimate_diffusers(cfg_options: Mapping[str, Any], model_path: Path, gpu: bool) -> Need:
    device = cfg_options.get("device", "auto")
    on_gpu = gpu and device in ("auto", "cuda")
    dtype = cfg_options.get("dtype", "auto")
    if dtype == "auto":
        dtype = "float16" if on_gpu else "float32"
    run_bytes = _DTYPE_BYTES.get(str(dtype), 4)
    weights = diffusers_weights(model_path, run_bytes)
    pixels = int(cfg_options.get("width") or 512) * int(cfg_options.get("height") or 512)
    activations = pixels * _DIFFUSERS_ACTIVATION_PER_PIXEL * run_bytes // 4
    if on_gpu:
        return Need(ram=PROCESS_BASE["diffusers"], vram=weights + activations)
    return Need(ram=PROCESS_BASE["diffusers"] + weights + activations)


def model_files(backend: str, model_path: Path | None, options: Mapping[str, Any]) -> list[Path]:
    """The files a model loads (for the file-size estimates and the fingerprint of a measurement)."""
    if model_path is None:
        return []
    files = [model_path]
    if backend == "llama_cpp" and options.get("mmproj"):
        files.append(Path(str(options["mmproj"])))
    if backend == "whisper":
        for package in options.get("part_packages") or ():
            data = _package_data(str(package))
            if data is not None:
                files.append(data)
    return files


def estimate_by_files(backend: str, model_path: Path | None, options: Mapping[str, Any], gpu: bool) -> Need:
    """whisper, piper, xtts: PROCESS_BASE + the files' size x FILE_FACTOR (on the GPU when they use one)."""
    size = int(_files_size(model_files(backend, model_path, options)) * FILE_FACTOR.get(backend, 1.0))
    base = PROCESS_BASE.get(backend, 0)
    device = options.get("device", "auto")
    on_gpu = gpu and (bool(options.get("use_cuda")) if backend == "piper" else device in ("auto", "cuda"))
    if on_gpu:
        return Need(ram=base, vram=size)
    return Need(ram=base + size)


# -- the cache file -------------------------------------------------------------------------------------------
class MemoryStore:
    """``models/.cache/memory.json``: GGUF facts per file, measured needs per model. None: in memory only."""

    VERSION = 1

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._data: dict[str, Any] = {"version": self.VERSION, "gguf": {}, "measured": {}}
        data = read_dict(path)
        if data.get("version") == self.VERSION:
            self._data.update(data)

    def _save(self) -> None:
        write_atomic(self.path, self._data)

    def gguf(self, key: str) -> dict[str, Any] | None:
        value = self._data["gguf"].get(key)
        return value if isinstance(value, dict) else None

    def put_gguf(self, key: str, facts: dict[str, Any]) -> None:
        self._data["gguf"][key] = facts
        self._save()

    def measured(self, name: str, fingerprint: str) -> Need | None:
        entry = self._data["measured"].get(name)
        if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
            return None
        return Need(ram=int(entry["ram"]), vram=int(entry.get("vram", 0)), source="measured")

    def put_measured(self, name: str, fingerprint: str, need: Need) -> None:
        """The most this model was seen to use with these files and options, over every load: a load that
        served only short requests does not shrink what a long one showed it takes (a full KV cache)."""
        before = self.measured(name, fingerprint)
        ram, vram = (max(need.ram, before.ram), max(need.vram, before.vram)) if before else (need.ram, need.vram)
        self._data["measured"][name] = {"fingerprint": fingerprint, "ram": ram, "vram": vram}
        self._save()


def file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


# -- what is free ---------------------------------------------------------------------------------------------
class MemoryProbe(Protocol):
    """What the box has: the manager reads memory only through this (a test injects its own)."""

    def ram_total(self) -> int: ...

    def ram_available(self) -> int: ...

    def gpus(self) -> list[GpuMemory]: ...

    def rss(self, pid: int) -> int | None:
        """RSS of a process and all its descendants; None when it is gone."""

    def vram(self, pid: int) -> dict[int, int]:
        """VRAM a process and its descendants use, per GPU index."""


class SystemProbe:
    """psutil for RAM and process trees, NVML (``proxy.nvml``) for GPUs."""

    def __init__(self, gpus: Gpus) -> None:
        self._gpus = gpus

    def ram_total(self) -> int:
        import psutil

        return int(psutil.virtual_memory().total)

    def ram_available(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)

    def gpus(self) -> list[GpuMemory]:
        return self._gpus.memory()

    @staticmethod
    def _tree(pid: int) -> list[Any]:
        from proxy import proctree

        return proctree.processes(pid)

    def rss(self, pid: int) -> int | None:
        import psutil

        try:
            return int(sum(p.memory_info().rss for p in self._tree(pid)))
        except psutil.Error:
            return None

    def vram(self, pid: int) -> dict[int, int]:
        import psutil

        from proxy import proctree

        try:
            pids = proctree.tree(pid)
        except psutil.Error:
            return {}
        return self._gpus.used_by(pids)


def fingerprint(parts: Mapping[str, Any], files: Iterable[Path]) -> str:
    """What a measurement depends on: the files (path, size, mtime) and the options that size memory."""
    keys = []
    for f in files:
        with contextlib.suppress(OSError):
            keys.append(file_key(f))
    text = json.dumps({"parts": parts, "files": keys}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
