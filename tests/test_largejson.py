"""Large worker answers decoded, reshaped and encoded off the event loop, piece by piece (proxy/largejson.py):
the same values as the standard library's, in a thread above the threshold, on the loop below it. (On the real
path: tests/test_hostile_input.py embeds a few hundred inputs through both dialects.)"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from proxy import largejson
from proxy.errors import UpstreamError


def embeddings(n: int, dim: int) -> dict[str, Any]:
    data = [{"object": "embedding", "index": i, "embedding": [i + j / 7 for j in range(dim)]} for i in range(n)]
    return {"object": "list", "data": data, "model": "m", "usage": {"prompt_tokens": n, "total_tokens": n}}


TRICKY: dict[str, Any] = {
    "a": ['x"]},[{', "\\", '\\"', "é\u2028", {"b": [[], {}, [1, [2, [3]]]], "c": "}]"}],
    "empty": [],
    "n": None,
    "t": True,
    "f": -1.5e-7,
    "s": '[{"',
    "o": {"k": [1, 2, {"l": "]"}]},
}


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A threshold of 64 bytes, so that small documents take the large path."""
    monkeypatch.setattr(largejson, "LARGE_BYTES", 64)


@pytest.mark.usefixtures("small")
def test_pieces_decode_to_what_json_decodes() -> None:
    for value in (TRICKY, embeddings(5, 3), {"x": 1}, {}, [1, {"a": 2}], "text", 3):
        raw = json.dumps(value, ensure_ascii=False, indent=1).encode()
        assert largejson.decode(raw) == json.loads(raw), value
        assert json.loads(largejson.encode(value)) == value
    raw = json.dumps(embeddings(5, 3)).encode()
    assert largejson.decode(raw, only={"usage"}) == {"usage": {"prompt_tokens": 5, "total_tokens": 5}}
    broken_ones = (b'{"a": [1, 2', b'{"a": "x', b'{"a": 1} x', b'{"a": [1] 2}', b'{5: 1, "long enough": "to be large"}')
    for broken in broken_ones:
        with pytest.raises(ValueError):
            largejson.decode(broken + b" " * 64)
    with pytest.raises(UpstreamError) as info:
        largejson.answer(b"[1, 2, 3]" + b" " * 64)
    assert info.value.status == 502


def test_a_large_answer_is_decoded_and_reshaped_in_a_thread_a_small_one_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads: list[threading.Thread] = []
    decode = largejson.decode

    def watched(raw: bytes, only: Any = None) -> Any:
        threads.append(threading.current_thread())
        return decode(raw, only)

    monkeypatch.setattr(largejson, "decode", watched)

    def vectors(answer: dict[str, Any]) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return {"embeddings": [d["embedding"] for d in answer["data"]]}

    decoded: list[int] = []  # the size of each document or piece given to the C decoder
    loads = largejson._loads

    def counted(piece: bytes) -> Any:
        decoded.append(len(piece))
        return loads(piece)

    monkeypatch.setattr(largejson, "_loads", counted)
    big = embeddings(300, 576)
    raw = json.dumps(big).encode()
    assert len(raw) > largejson.LARGE_BYTES
    shaped = asyncio.run(largejson.reshape(raw, vectors))
    assert json.loads(shaped) == {"embeddings": [d["embedding"] for d in big["data"]]}
    assert asyncio.run(largejson.answer_of(raw)) == big
    assert asyncio.run(largejson.loads(raw, only=("usage",))) == {"usage": big["usage"]}
    assert len(threads) == 4 and threading.main_thread() not in threads
    assert max(decoded) < len(raw) / 100  # in pieces (a vector each), so the loop gets the GIL between them
    threads.clear()
    few = json.dumps(embeddings(2, 4)).encode()
    asyncio.run(largejson.reshape(few, vectors))
    asyncio.run(largejson.loads(few))
    assert threads == [threading.main_thread()] * 3
