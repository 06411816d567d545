"""The event bus, request notes and per-model logs as units (the live paths are in tests/test_ops*.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from proxy.events import EventBus, LoadStarted, RequestEnded, RequestNote, StateChanged
from proxy.modellogs import BACKUPS, LogBook, ModelLog, file_name


def state(n: int) -> StateChanged:
    return StateChanged(model="m", old="stopped", new="starting", reason=str(n))


async def test_a_slow_subscriber_loses_the_oldest_events_and_blocks_no_one() -> None:
    bus = EventBus()
    slow = bus.subscribe(size=3)
    fast = bus.subscribe(size=100)
    for n in range(10):
        bus.publish(state(n))  # synchronous: returns although nobody has read anything
    assert slow.dropped == 7
    assert [e.reason for e in await slow.get()] == ["7", "8", "9"]  # type: ignore[attr-defined]
    assert fast.dropped == 0
    assert [e.reason for e in await fast.get()] == [str(n) for n in range(10)]  # type: ignore[attr-defined]


async def test_a_subscriber_waits_for_the_next_event_and_leaves_cleanly() -> None:
    bus = EventBus()
    feed = bus.subscribe()
    waiting = asyncio.ensure_future(feed.get())
    await asyncio.sleep(0)
    assert not waiting.done()
    bus.publish(LoadStarted(model="m"))
    assert [e.kind for e in await waiting] == ["load_start"]
    feed.close()
    assert bus.subscribers == 0
    bus.publish(LoadStarted(model="m"))  # nobody left to queue it for


def test_listeners_see_every_event_and_one_that_fails_does_not_stop_the_others() -> None:
    bus = EventBus()
    seen: list[str] = []

    def broken(event: object) -> None:
        raise RuntimeError("a reader's bug")

    bus.listen(broken)
    bus.listen(lambda e: seen.append(e.kind))
    for n in range(3):
        bus.publish(state(n))
    assert seen == ["state"] * 3


def test_request_notes_publish_start_once_and_end_once_with_ttft_and_tokens() -> None:
    bus = EventBus()
    events: list[object] = []
    bus.listen(events.append)
    now = [100.0]

    class Route:
        path = "/v1/chat/completions"

    scope = {"method": "POST", "route": Route()}
    note = RequestNote(bus, scope, clock=lambda: now[0])
    note.for_model("m")
    note.for_model("m")
    now[0] = 100.5
    note.first_chunk()
    now[0] = 101.0
    note.first_chunk()  # only the first counts
    note.add_tokens(3)
    note.add_tokens(4)
    now[0] = 102.0
    note.end(200)
    note.end(500)
    kinds = [e.kind for e in events]  # type: ignore[attr-defined]
    assert kinds == ["request_start", "request_end"]
    end = events[1]
    assert isinstance(end, RequestEnded)
    assert (end.model, end.route, end.status, end.tokens) == ("m", "/v1/chat/completions", 200, 7)
    assert end.ttft == pytest.approx(0.5) and end.seconds == pytest.approx(2.0)
    assert bus.recent() == [end]


def test_the_ring_of_recent_requests_is_bounded_and_skips_unnamed_successes() -> None:
    bus = EventBus(recent=2)
    for n in range(3):
        bus.publish(
            RequestEnded(id=n, model="m", route="/r", method="GET", status=200, seconds=0, tokens=None, ttft=None)
        )
    bus.publish(
        RequestEnded(id=9, model="", route="/v1/models", method="GET", status=200, seconds=0, tokens=None, ttft=None)
    )
    assert [e.id for e in bus.recent()] == [1, 2]


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", "..", "/abs", "smollm2:135m", ""])
def test_a_model_name_never_makes_a_log_path_outside_the_log_dir(tmp_path: Path, name: str) -> None:
    book = LogBook(tmp_path / "logs", 1000)
    book.model(name).append("hello")
    book.close()
    path = book.model(name).path
    assert path is not None and path.parent == tmp_path / "logs" and path.is_file()
    assert "/" not in file_name(name) and not file_name(name).startswith(".")


def test_every_line_is_in_the_ring_and_the_file_and_the_file_rotates(tmp_path: Path) -> None:
    log = ModelLog("m", tmp_path / "m.log", max_bytes=200, lines=1000)
    lines = [f"line {n:03d} " + "x" * 20 for n in range(100)]
    for line in lines:
        log.append(line)
    log.close()
    assert log.tail(1000) == lines
    files = sorted(tmp_path.glob("m.log*"))
    assert len(files) == BACKUPS + 1  # rotated, 3 old files kept
    on_disk = [line for f in files for line in f.read_text().splitlines()]
    assert set(on_disk) <= set(lines) and lines[-1] in on_disk
    assert all(f.stat().st_size <= 200 for f in files)


def test_a_workers_tail_holds_only_its_own_lines(tmp_path: Path) -> None:
    log = ModelLog("m", None, 0, lines=5)
    log.append("old worker")
    since = log.count
    assert log.tail(10, since=since) == []
    for n in range(7):
        log.append(f"new {n}")
    assert log.tail(10, since=since) == [f"new {n}" for n in range(2, 7)]  # the ring holds 5
    assert log.tail(2, since=since) == ["new 5", "new 6"]


async def test_followers_get_new_lines_and_leave_no_trace() -> None:
    log = ModelLog("m", None, 0)
    feed = log.follow(size=2)
    for n in range(3):
        log.append(str(n))
    assert await feed.get() == ["1", "2"] and feed.dropped == 1
    feed.close()
    assert log.followers == 0
