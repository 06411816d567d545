"""A memory probe and an NVML that a test sets by hand (no GPU in CI; RAM figures that do not move)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from proxy.nvml import GpuMemory

GiB = 1 << 30


@dataclass
class FakeProbe:
    """``proxy.memory.MemoryProbe`` with figures the test sets: what is available does not change by itself."""

    total: int = 64 * GiB
    available: int = 64 * GiB
    gpu_list: list[GpuMemory] = field(default_factory=list)
    rss_of: dict[int, int] = field(default_factory=dict)
    vram_of: dict[int, dict[int, int]] = field(default_factory=dict)
    reads: int = 0

    def ram_total(self) -> int:
        return self.total

    def ram_available(self) -> int:
        self.reads += 1
        return self.available

    def gpus(self) -> list[GpuMemory]:
        return list(self.gpu_list)

    def rss(self, pid: int) -> int | None:
        return self.rss_of.get(pid)

    def vram(self, pid: int) -> dict[int, int]:
        return dict(self.vram_of.get(pid, {}))


class FakePynvml:
    """The parts of ``pynvml`` that ``proxy.nvml.Nvml`` calls, over a list of (total, free, {pid: used})."""

    def __init__(self, devices: Iterable[tuple[int, int, dict[int, int | None]]]) -> None:
        self.devices = [SimpleNamespace(total=t, free=f, procs=p) for t, f, p in devices]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:  # noqa: N802 (NVML's names)
        return self.devices[index]

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:  # noqa: N802
        return SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetName(self, handle: Any) -> str:  # noqa: N802
        return "Fake GPU"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> list[Any]:  # noqa: N802
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.procs.items()]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: Any) -> list[Any]:  # noqa: N802
        return []
