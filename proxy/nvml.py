"""NVIDIA GPUs through NVML: what each GPU has free, and how much VRAM given processes use.

The one module that calls NVML (``nvidia-ml-py``, a pure ctypes binding: no numpy, no CUDA runtime in
the proxy). Everything else asks a ``Gpus`` (``Nvml`` here, or a test's fake). Without the NVIDIA
driver (no ``libnvidia-ml.so``) or without GPUs, ``Nvml.open()`` returns ``NoGpus``: VRAM needs are
then zero and only RAM counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("proxy.nvml")


@dataclass(frozen=True)
class GpuMemory:
    index: int
    name: str
    total: int  # bytes
    free: int  # bytes, as the driver reports it now


class Gpus(Protocol):
    def memory(self) -> list[GpuMemory]:
        """Every GPU's memory now, by index (empty with no GPU)."""

    def used_by(self, pids: Iterable[int]) -> dict[int, int]:
        """VRAM these processes use, per GPU index (GPUs where they use none are left out)."""


class NoGpus:
    """No NVIDIA GPU (or no driver): nothing to place on, nothing to measure."""

    def memory(self) -> list[GpuMemory]:
        return []

    def used_by(self, pids: Iterable[int]) -> dict[int, int]:
        return {}


class Nvml:
    """The real NVML. Calls are short driver queries (microseconds), made from the event loop."""

    def __init__(self, pynvml: Any, count: int) -> None:
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self._lock = threading.Lock()

    @classmethod
    def open(cls) -> Gpus:
        """NVML when the driver answers and there is at least one GPU; ``NoGpus`` otherwise."""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = int(pynvml.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU to use
            log.debug("no NVML: %s", exc)
            return NoGpus()
        if count == 0:
            return NoGpus()
        return cls(pynvml, count)

    def memory(self) -> list[GpuMemory]:
        out = []
        with self._lock:
            for index, handle in enumerate(self._handles):
                info = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                name = self._nvml.nvmlDeviceGetName(handle)
                out.append(GpuMemory(index, str(name), int(info.total), int(info.free)))
        return out

    def used_by(self, pids: Iterable[int]) -> dict[int, int]:
        wanted = set(pids)
        used: dict[int, int] = {}
        with self._lock:
            for index, handle in enumerate(self._handles):
                procs = [
                    *self._nvml.nvmlDeviceGetComputeRunningProcesses(handle),
                    *self._nvml.nvmlDeviceGetGraphicsRunningProcesses(handle),
                ]
                # usedGpuMemory is None where the driver does not say (some vGPU / WSL setups)
                total = sum(int(p.usedGpuMemory or 0) for p in procs if p.pid in wanted)
                if total:
                    used[index] = total
        return used
