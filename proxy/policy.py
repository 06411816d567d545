"""Pure eviction policy: which idle models make room. No state, no I/O, no time of its own."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A loaded model that might be unloaded, with what unloading it gives back."""

    name: str
    keep_alive: float  # seconds; math.inf for "forever"
    last_used: float  # monotonic
    busy: bool  # requests in flight or waiting: never chosen
    ram: int = 0  # bytes it gives back
    vram: int = 0  # bytes it gives back on the GPU that is short (0 when it runs elsewhere)
    pinned: bool = False  # keep_alive < 0 (forever) and eviction of such models not configured: never chosen
    remaining: float | None = None  # seconds left of its keep_alive (<= 0: expired); None: its keep_alive

    @property
    def order(self) -> tuple[float, float, str]:
        """Who goes first: expired or shortest remaining keep_alive, then least recently used."""
        left = self.keep_alive if self.remaining is None else self.remaining
        return (left, self.last_used, self.name)

    @property
    def size(self) -> int:
        return self.ram + self.vram


@dataclass(frozen=True)
class Deficit:
    """What is missing for a model to start: bytes of RAM, of VRAM on its GPU, and model slots."""

    ram: int = 0
    vram: int = 0
    slots: int = 0

    def covered_by(self, chosen: Iterable[Candidate]) -> bool:
        picked = list(chosen)
        return (
            sum(c.ram for c in picked) >= self.ram
            and sum(c.vram for c in picked) >= self.vram
            and len(picked) >= self.slots
        )

    @property
    def nothing(self) -> bool:
        return self.ram <= 0 and self.vram <= 0 and self.slots <= 0


def choose_victims(candidates: Iterable[Candidate], deficit: Deficit) -> list[str] | None:
    """The idle models to unload so that ``deficit`` is covered, losing the least.

    Never a busy or pinned model. Walk the others in ``Candidate.order``; when the next one would cover
    what is still missing on its own, take the smallest idle model that does (never a big model when a
    smaller one frees enough) and stop; otherwise take it and go on. Then drop any taken model that
    turned out not to be needed, latest in the order first. ``[]`` when nothing is missing; None when
    even all the idle, unpinned models together cannot cover it (the request waits or is refused).
    """
    if deficit.nothing:
        return []
    pool = sorted((c for c in candidates if not c.busy and not c.pinned), key=lambda c: c.order)
    if not deficit.covered_by(pool):
        return None
    taken: list[Candidate] = []
    rest: Sequence[Candidate] = pool
    while rest and not deficit.covered_by(taken):
        missing = _missing(deficit, taken)
        alone = [c for c in rest if missing.covered_by([c])]
        if alone and len(taken) + 1 >= deficit.slots:
            # short of memory: the smallest that frees enough; short of a slot only: size is beside the point
            short_of_memory = missing.ram > 0 or missing.vram > 0
            best = min(alone, key=lambda c: (c.size, c.order)) if short_of_memory else alone[0]
            taken.append(best)
            break
        taken.append(rest[0])
        rest = rest[1:]
    for c in sorted(taken, key=lambda c: c.order, reverse=True):
        without = [t for t in taken if t is not c]
        if deficit.covered_by(without):
            taken = without
    return [c.name for c in taken]


def _missing(deficit: Deficit, taken: Sequence[Candidate]) -> Deficit:
    return Deficit(
        ram=deficit.ram - sum(c.ram for c in taken),
        vram=deficit.vram - sum(c.vram for c in taken),
        slots=deficit.slots - len(taken),
    )


def choose_victim(candidates: Iterable[Candidate]) -> str | None:
    """The one idle model to unload when a model slot is all that is missing (``max_loaded_models``)."""
    chosen = choose_victims(candidates, Deficit(slots=1))
    return chosen[0] if chosen else None


def backoff(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before retrying a model whose start failed ``failures`` times in a row."""
    if failures <= 0:
        return 0.0
    return float(min(cap, base * 2 ** (failures - 1)))
