"""A GGUF file's header read with the standard library: its key/values and its tensors' infos, never the weights.

GGUF (llama.cpp's ``docs/gguf.md``): magic ``GGUF``, version (2 or 3), tensor count, key/value count, the
typed key/values, the tensor infos (name, dims, type, offset), padding to ``general.alignment``, the data.
``gguf``'s own reader (llama.cpp's gguf-py) makes a numpy view of every part of every value, about a million
for a tokenizer's vocabulary: seconds of CPU for a small model. This reads the same header with ``struct``
and skips what nobody asks for (``skip``: a long ``tokenizer.*`` array is kept as its length), so a model's
facts take milliseconds. What it reads is what gguf-py reads (tests/test_gguf_header.py compares them).

A hostile or truncated file gets a ``GGUFError`` (a ``ValueError``), never a hang or a large allocation:
every count and length is checked against the bytes left in the file before it is used, the counts against
limits no real model comes near, and what is kept of the values against ``MAX_KEPT`` bytes in all.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_KV = 1 << 16  # real files have tens
MAX_TENSORS = 1 << 20  # the largest mixtures of experts have a few thousand
MAX_DIMS = 4  # GGML_MAX_DIMS: llama.cpp loads no tensor with more
MAX_NAME = 1 << 16  # a key or a tensor name, in bytes
MAX_DEPTH = 8  # arrays of arrays
MAX_KEPT = 64 << 20  # the values decoded, in bytes (a long tokenizer array is skipped, not kept)
MAX_DECODED_ARRAY = 1 << 16  # a longer array is kept as its length (Skipped)
MAX_ARRAY = 1 << 24  # elements: the largest vocabularies have about 256k tokens

# GGUF's value types: (struct code, size) of the scalars; 8 is a string, 9 an array
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1),  # uint8
    1: ("b", 1),  # int8
    2: ("H", 2),  # uint16
    3: ("h", 2),  # int16
    4: ("I", 4),  # uint32
    5: ("i", 4),  # int32
    6: ("f", 4),  # float32
    7: ("?", 1),  # bool
    10: ("Q", 8),  # uint64
    11: ("q", 8),  # int64
    12: ("d", 8),  # float64
}
STRING = 8
ARRAY = 9
UINT32 = 4

# ggml's tensor types: (elements per block, bytes per block), as gguf-py's GGML_QUANT_SIZES (QK_K = 256)
QUANT_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}


class GGUFError(ValueError):
    """The file is no GGUF this reader can read (truncated, a lying count, an unknown type)."""


class Unreadable:
    """A value gguf-py could not render either (a string that is not UTF-8, an array of arrays)."""

    def __repr__(self) -> str:
        return "<unreadable>"


UNREADABLE = Unreadable()


@dataclass(frozen=True)
class Skipped:
    """An array not decoded (``skip`` said so): its element type and length."""

    item_type: int
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int  # from the start of the data section

    @property
    def n_elements(self) -> int:
        return math.prod(self.dims)

    @property
    def n_bytes(self) -> int:
        block, size = QUANT_SIZES[self.type]
        return self.n_elements * size // block


@dataclass
class Header:
    version: int
    # each key's value: a scalar, a str, a list (an array), Skipped, or UNREADABLE
    fields: dict[str, Any] = field(default_factory=dict)
    types: dict[str, int] = field(default_factory=dict)  # each key's GGUF value type
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0

    def array_length(self, key: str) -> int | None:
        value = self.fields.get(key)
        if isinstance(value, Skipped):
            return value.length
        return len(value) if isinstance(value, list) else None


def skip_long_tokenizer_arrays(key: str, length: int) -> bool:
    """The default ``skip``: a ``tokenizer.*`` array longer than /api/show lists (its vocabulary, scores,
    merges) is kept as its length only."""
    return key.startswith("tokenizer.") and length > 64


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, big_endian: bool = False) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.order = ">" if big_endian else "<"
        self.kept = 0  # bytes of values decoded so far

    def keep(self, n: int, what: str) -> None:
        self.kept += n
        if self.kept > MAX_KEPT:
            raise GGUFError(f"{what}: the header's values pass {MAX_KEPT >> 20} MiB")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.size - self.pos:
            left = self.size - self.pos
            raise GGUFError(f"truncated or corrupt at byte {self.pos}: {what} needs {n} bytes, {left} left")

    def scalar(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("Q", 8, what))

    def raw_string(self, what: str, limit: int = MAX_KEPT) -> bytes:
        n = self.u64(what)
        self.need(n, what)
        if n > limit:
            raise GGUFError(f"{what}: a string of {n} bytes")
        self.keep(n, what)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return data

    def skip_string(self, what: str) -> None:
        n = self.u64(what)
        self.need(n, what)
        self.pos += n


def _text(data: bytes) -> str | Unreadable:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return UNREADABLE


def _value(cur: _Cursor, kind: int, key: str, skip: Callable[[str, int], bool], depth: int = 0) -> Any:
    if kind == STRING:
        return _text(cur.raw_string(key))
    scalar = _SCALARS.get(kind)
    if scalar is not None:
        return cur.scalar(*scalar, key)
    if kind != ARRAY:
        raise GGUFError(f"{key}: unknown value type {kind}")
    if depth >= MAX_DEPTH:
        raise GGUFError(f"{key}: arrays nested more than {MAX_DEPTH} deep")
    item = cur.u32(key)
    length = cur.u64(key)
    if length == 0:
        return []
    if length > MAX_ARRAY:
        raise GGUFError(f"{key}: an array of {length} items")
    skipped = skip(key, length) or length > MAX_DECODED_ARRAY
    scalar = _SCALARS.get(item)
    if scalar is not None:
        code, size = scalar
        cur.need(length * size, key)  # bounds the length by the file before anything is made of it
        if skipped:
            cur.pos += length * size
            return Skipped(item, length)
        cur.keep(length * size * 4, key)  # a Python number is bigger than its bytes
        values = list(struct.unpack_from(f"{cur.order}{length}{code}", cur.buf, cur.pos))
        cur.pos += length * size
        return values
    if item == STRING:
        cur.need(length * 8, key)  # each string has at least its 8-byte length
        if skipped:
            for _ in range(length):
                cur.skip_string(key)
            return Skipped(item, length)
        cur.keep(length * 64, key)
        texts = [_text(cur.raw_string(key)) for _ in range(length)]
        return UNREADABLE if any(isinstance(t, Unreadable) for t in texts) else texts
    if item == ARRAY:  # arrays of arrays: gguf-py flattens them; nothing here needs one, so walked, not kept
        cur.need(length * 12, key)  # each has at least its type and length
        for _ in range(length):
            _value(cur, ARRAY, key, lambda _k, _n: True, depth + 1)
        return UNREADABLE
    raise GGUFError(f"{key}: unknown array item type {item}")


def read_header(buf: mmap.mmap | bytes, skip: Callable[[str, int], bool] = skip_long_tokenizer_arrays) -> Header:
    """The header of the GGUF file whose bytes are ``buf`` (the whole file: its tensors' data must be in it)."""
    cur = _Cursor(buf)
    cur.need(4, "the magic")
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic)")
    cur.pos = 4
    version = cur.u32("the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        cur.order = ">"
        cur.pos = 4
        version = cur.u32("the version")
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (only {VERSIONS})")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key/value count")
    if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
        raise GGUFError(f"{n_kv} key/values and {n_tensors} tensors: more than any model has")
    # a key/value takes at least 13 bytes (key length, type, a one-byte value); a tensor info at least 24
    cur.need(n_kv * 13, f"{n_kv} key/values")
    header = Header(version)
    for _ in range(n_kv):
        raw_key = cur.raw_string("a key", MAX_NAME)
        key = _text(raw_key)
        if isinstance(key, Unreadable):
            raise GGUFError(f"a key that is not UTF-8 at byte {cur.pos}")
        if key in header.fields:
            raise GGUFError(f"duplicate key {key}")
        kind = cur.u32(key)
        header.types[key] = kind
        header.fields[key] = _value(cur, kind, key, skip)
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")
    names: set[str] = set()
    for _ in range(n_tensors):
        name = _text(cur.raw_string("a tensor name", MAX_NAME))
        if isinstance(name, Unreadable):
            raise GGUFError(f"a tensor name that is not UTF-8 at byte {cur.pos}")
        if name in names:
            raise GGUFError(f"duplicate tensor {name}")
        names.add(name)
        n_dims = cur.u32(name)
        if n_dims > MAX_DIMS:
            raise GGUFError(f"tensor {name}: {n_dims} dimensions")
        cur.need(n_dims * 8, name)
        dims = struct.unpack_from(f"{cur.order}{n_dims}Q", buf, cur.pos)
        cur.pos += n_dims * 8
        kind = cur.u32(name)
        if kind not in QUANT_SIZES:
            raise GGUFError(f"tensor {name}: unknown ggml type {kind}")
        header.tensors.append(TensorInfo(name, tuple(dims), kind, cur.u64(name)))
    alignment = DEFAULT_ALIGNMENT
    if "general.alignment" in header.fields:
        alignment = header.fields["general.alignment"]
        if header.types["general.alignment"] != UINT32 or alignment == 0 or alignment & (alignment - 1):
            raise GGUFError("general.alignment must be a uint32 power of two")
    header.data_offset = cur.pos + (-cur.pos % alignment)
    for t in header.tensors:  # the weights are where the header says, inside the file (gguf-py maps each)
        if header.data_offset + t.offset + t.n_bytes > cur.size:
            raise GGUFError(f"tensor {t.name} lies past the end of the file (truncated?)")
    return header


def read_file(path: str | Path, skip: Callable[[str, int], bool] = skip_long_tokenizer_arrays) -> Header:
    """The header of the GGUF file at ``path`` (memory-mapped: only the header's pages are read)."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size < 24:
            raise GGUFError(f"{size} bytes: too short for a GGUF header")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return read_header(buf, skip)
