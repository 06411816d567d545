"""Properties over input spaces, with hypothesis: the keep_alive parser, the Ollama, Anthropic and
Responses stream translators (any chunking of the same answer gives the same result), the stop-sequence
scanner and the eviction policy."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.dialects.anthropic import MessageStream
from proxy.dialects.blocks import StopScanner
from proxy.dialects.ollama import StreamTranslator
from proxy.dialects.responses import ResponseStream
from proxy.keepalive import format_keep_alive, parse_keep_alive
from proxy.policy import Candidate, Deficit, choose_victim, choose_victims

settings.register_profile("suite", max_examples=200, deadline=None)
settings.load_profile("suite")

# -- keep_alive ------------------------------------------------------------------------------------

_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@given(st.integers(min_value=0, max_value=10**7) | st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_a_non_negative_number_is_that_many_seconds(seconds: float) -> None:
    assert parse_keep_alive(seconds) == seconds


@given(st.integers(max_value=-1) | st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False))
def test_any_negative_number_means_forever(seconds: float) -> None:
    assert parse_keep_alive(seconds) == math.inf


@given(
    st.lists(st.tuples(st.integers(min_value=0, max_value=500), st.sampled_from(list(_UNIT))), min_size=1, max_size=4)
)
def test_a_go_duration_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    expected = sum(n * _UNIT[unit] for n, unit in parts)
    parsed = parse_keep_alive(text)
    assert parsed is not None and math.isclose(parsed, expected, abs_tol=1e-9)
    assert parse_keep_alive("-" + text) == (math.inf if expected > 0 else 0.0)


@given(st.integers(min_value=0, max_value=10**6))
def test_formatting_then_parsing_gives_the_value_back(seconds: int) -> None:
    assert parse_keep_alive(format_keep_alive(float(seconds))) == seconds


# -- the Ollama stream translator -------------------------------------------------------------------


def _pieces(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts} | {0, len(text)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _translate(chunks: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    tr = StreamTranslator("m", False, 0)
    streamed = "".join(out["message"]["content"] for out in (tr.feed(c, 1) for c in chunks) if out is not None)
    return streamed, tr.final(2, whole=True)


@given(st.text(min_size=1, max_size=200), st.lists(st.integers(min_value=0, max_value=400), max_size=20))
def test_any_chunking_of_an_answer_translates_to_the_same_text(text: str, cuts: list[int]) -> None:
    chunks = [_chunk({"content": piece}) for piece in _pieces(text, cuts)] + [_chunk({}, "stop")]
    streamed, final = _translate(chunks)
    assert streamed == text and final["message"]["content"] == text
    assert final["done"] is True and final["done_reason"] == "stop"


_ARGS = st.dictionaries(st.text(min_size=1, max_size=8), st.integers() | st.text(max_size=8), max_size=3)


@given(
    st.lists(st.tuples(st.text(min_size=1, max_size=10), _ARGS), min_size=1, max_size=3),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    st.randoms(),
)
def test_any_chunking_and_interleaving_of_tool_calls_gives_the_same_calls(
    calls: list[tuple[str, dict[str, Any]]], cuts: list[int], rng: Any
) -> None:
    # each call: its name in one delta, then its arguments (JSON) in pieces; calls interleaved at random
    queues = []
    for index, (name, args) in enumerate(calls):
        deltas = [{"index": index, "function": {"name": name, "arguments": ""}}]
        deltas += [{"index": index, "function": {"arguments": p}} for p in _pieces(json.dumps(args), cuts)]
        queues.append(deltas)
    chunks = []
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        chunks.append(_chunk({"tool_calls": [queue.pop(0)]}))
    chunks.append(_chunk({}, "tool_calls"))
    _, final = _translate(chunks)
    assert final["message"]["tool_calls"] == [{"function": {"name": n, "arguments": a}} for n, a in calls]


# -- the Anthropic and Responses translators: text and interleaved tool calls --------------------------


def _answer_chunks(text: str, calls: list[tuple[str, dict[str, Any]]], cuts: list[int], rng: Any) -> list[Any]:
    """An answer's text in pieces, then its tool calls, each call's argument pieces interleaved at random."""
    chunks = [_chunk({"content": piece}) for piece in _pieces(text, cuts)] if text else []
    queues = []
    for index, (name, args) in enumerate(calls):
        deltas = [{"index": index, "id": f"c{index}", "function": {"name": name, "arguments": ""}}]
        deltas += [{"index": index, "function": {"arguments": p}} for p in _pieces(json.dumps(args), cuts)]
        queues.append(deltas)
    while any(queues):
        queue = rng.choice([q for q in queues if q])
        chunks.append(_chunk({"tool_calls": [queue.pop(0)]}))
    chunks.append(_chunk({}, "tool_calls" if calls else "stop"))
    return chunks


def _anthropic_replay(events: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rebuild the content as the anthropic SDK does (by index, one block open at a time)."""
    blocks: list[dict[str, Any]] = []
    open_index = None
    for name, data in events:
        if name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            open_index = data["index"]
            blocks.append({**data["content_block"], "json": ""})
        elif name == "content_block_delta":
            assert data["index"] == open_index
            delta = data["delta"]
            if delta["type"] == "text_delta":
                blocks[open_index]["text"] += delta["text"]
            else:
                blocks[open_index]["json"] += delta["partial_json"]
        elif name == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
    for block in blocks:
        raw = block.pop("json")
        if block["type"] == "tool_use":
            block["input"] = json.loads(raw) if raw else {}
    return blocks


@given(
    st.text(max_size=60),
    st.lists(st.tuples(st.text(min_size=1, max_size=10), _ARGS), max_size=3),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    st.randoms(),
)
def test_any_chunking_gives_the_same_anthropic_message_streamed_or_whole(
    text: str, calls: list[tuple[str, dict[str, Any]]], cuts: list[int], rng: Any
) -> None:
    tr = MessageStream("m", [])
    events = tr.start()
    for c in _answer_chunks(text, calls, cuts, rng):
        events += tr.feed(c)
    events += tr.finish()
    whole = tr.message()
    texts = [b["text"] for b in whole["content"] if b["type"] == "text"]
    tools = [(b["name"], b["input"], b["id"]) for b in whole["content"] if b["type"] == "tool_use"]
    assert "".join(texts) == text
    assert tools == [(n, args, f"c{i}") for i, (n, args) in enumerate(calls)]
    assert _anthropic_replay(events) == whole["content"]
    assert whole["stop_reason"] == ("tool_use" if calls else "end_turn")


@given(
    st.text(max_size=60),
    st.lists(st.tuples(st.text(min_size=1, max_size=10), _ARGS), max_size=3),
    st.lists(st.integers(min_value=0, max_value=200), max_size=10),
    st.randoms(),
)
def test_any_chunking_gives_the_same_response_items_streamed_or_whole(
    text: str, calls: list[tuple[str, dict[str, Any]]], cuts: list[int], rng: Any
) -> None:
    tr = ResponseStream("m", {}, 0)
    events = tr.start()
    for c in _answer_chunks(text, calls, cuts, rng):
        events += tr.feed(c)
    events += tr.finish()
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    final = events[-1][1]["response"]
    assert final["status"] == "completed" and final["output"] == tr.response()["output"]
    rebuilt: dict[int, str] = {}
    for name, data in events:
        if name in ("response.output_text.delta", "response.function_call_arguments.delta"):
            rebuilt[data["output_index"]] = rebuilt.get(data["output_index"], "") + data["delta"]
    for i, item in enumerate(final["output"]):
        if item["type"] == "message":
            assert rebuilt.get(i, "") == item["content"][0]["text"]
        else:
            assert rebuilt.get(i, "") == item["arguments"]
    said = "".join(item["content"][0]["text"] for item in final["output"] if item["type"] == "message")
    assert said == text
    made = [
        (i["name"], json.loads(i["arguments"]), i["call_id"]) for i in final["output"] if i["type"] == "function_call"
    ]
    assert made == [(n, args, f"c{i}") for i, (n, args) in enumerate(calls)]


@given(
    st.text(alphabet="abcE ND", max_size=60),
    st.lists(st.text(alphabet="abcEND", min_size=1, max_size=4), max_size=3),
    st.lists(st.integers(min_value=0, max_value=100), max_size=12),
)
def test_the_stop_scanner_cuts_at_the_first_stop_however_the_text_is_chunked(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    # the stop met first as the text is written: the first to end (the longest of those ending together)
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if text.find(s) >= 0]
    first = min(hits)[1:] if hits else None
    scanner = StopScanner(stops)
    sent, found = "", None
    for piece in _pieces(text, cuts) if text else []:
        out, found = scanner.feed(piece)
        sent += out
        if found:
            break
    if found is None:
        sent += scanner.flush()
    if first is None:
        assert (sent, found) == (text, None)
    else:
        assert sent == text[: first[0]] and found is not None and text.find(found) == first[0]


# -- eviction ----------------------------------------------------------------------------------------

_CANDIDATES = st.lists(
    st.builds(
        Candidate,
        name=st.text(min_size=1, max_size=5),
        keep_alive=st.sampled_from([0.0, 1.0, 60.0, 300.0, math.inf]),
        last_used=st.floats(min_value=0, max_value=1e6, allow_nan=False),
        busy=st.booleans(),
    ),
    max_size=8,
)


@given(_CANDIDATES)
def test_the_victim_is_never_busy_and_is_the_shortest_keep_alive_then_least_recently_used(
    candidates: list[Candidate],
) -> None:
    victim = choose_victim(candidates)
    idle = [c for c in candidates if not c.busy]
    if not idle:
        assert victim is None
        return
    chosen = [c for c in idle if c.name == victim]
    assert chosen, "the victim must be an idle candidate"
    best = min((c.keep_alive, c.last_used) for c in idle)
    assert min((c.keep_alive, c.last_used) for c in chosen) == best


_SIZED = st.lists(
    st.builds(
        Candidate,
        name=st.text(min_size=1, max_size=5),
        keep_alive=st.sampled_from([0.0, 60.0, 300.0, math.inf]),
        last_used=st.floats(min_value=0, max_value=1e6, allow_nan=False),
        busy=st.booleans(),
        ram=st.integers(0, 8 << 30),
        vram=st.integers(0, 8 << 30),
        pinned=st.booleans(),
    ),
    max_size=8,
    unique_by=lambda c: c.name,
)


@given(_SIZED, st.builds(Deficit, ram=st.integers(0, 24 << 30), vram=st.integers(0, 24 << 30), slots=st.integers(0, 2)))
def test_evicting_the_victims_always_makes_room_and_never_touches_a_busy_or_pinned_model(
    candidates: list[Candidate], deficit: Deficit
) -> None:
    """Never over budget: what is unloaded covers what is missing, or nothing is unloaded and the request
    waits (None exactly when the idle, unpinned models together cannot cover it); nothing needless goes."""
    chosen = choose_victims(candidates, deficit)
    evictable = [c for c in candidates if not c.busy and not c.pinned]
    if chosen is None:
        assert not deficit.covered_by(evictable)
        return
    by_name = {c.name: c for c in candidates}
    victims = [by_name[n] for n in chosen]
    assert len(set(chosen)) == len(chosen) and all(not v.busy and not v.pinned for v in victims)
    assert deficit.covered_by(victims)
    for v in victims:  # each victim was needed
        assert not deficit.covered_by([w for w in victims if w is not v])
