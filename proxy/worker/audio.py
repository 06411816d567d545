"""Encode 16-bit mono PCM chunks into an audio format as they come, for streaming.

wav (a header with open-ended sizes, then the samples), raw pcm, and through PyAV mp3, opus (in
Ogg), flac and aac (ADTS): each yields bytes as soon as the encoder has them.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

# format -> (container, codec, sample rate (None: the voice's), bit rate)
_AV = {
    "mp3": ("mp3", "mp3", None, 64000),
    "opus": ("ogg", "libopus", 48000, 32000),
    "flac": ("flac", "flac", None, None),
    "aac": ("adts", "aac", None, 64000),
}
_OPEN_ENDED = 0xFFFFFFFF


def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM WAV header; sizes left open-ended when the length is not known yet."""
    data = _OPEN_ENDED - 36 if data_bytes is None else data_bytes
    riff = _OPEN_ENDED if data_bytes is None else 36 + data_bytes
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        riff,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        data,
    )


class _Sink:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data: Any) -> int:
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out


def _av_stream(chunks: Iterator[bytes], sample_rate: int, fmt: str) -> Iterator[bytes]:
    import av
    import numpy as np

    container_format, codec, rate, bit_rate = _AV[fmt]
    sink = _Sink()
    with av.open(sink, "w", format=container_format) as out:
        stream: Any = out.add_stream(codec, rate=rate or sample_rate)
        stream.layout = "mono"
        if bit_rate:
            stream.bit_rate = bit_rate
        for chunk in chunks:
            samples = np.frombuffer(chunk, dtype=np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = sample_rate
            for packet in stream.encode(frame):
                out.mux(packet)
            data = sink.take()
            if data:
                yield data
        for packet in stream.encode(None):
            out.mux(packet)
    tail = sink.take()
    if tail:
        yield tail


def resample(chunks: Iterator[bytes], source: int, target: int) -> Iterator[bytes]:
    """int16 mono PCM chunks at ``source`` Hz as int16 mono PCM at ``target`` Hz (PyAV's resampler)."""
    import av
    import numpy as np

    resampler = av.AudioResampler(format="s16", layout="mono", rate=target)
    for chunk in [*chunks, None]:
        frame = None
        if chunk is not None:
            frame = av.AudioFrame.from_ndarray(
                np.frombuffer(chunk, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = source
        out = b"".join(bytes(f.to_ndarray().astype("<i2").tobytes()) for f in resampler.resample(frame))
        if out:
            yield out


def encode(chunks: Iterator[bytes], sample_rate: int, fmt: str, target_rate: int | None = None) -> Iterator[bytes]:
    """The encoded stream of ``chunks`` (int16 mono PCM at ``sample_rate``) in ``fmt``, at ``target_rate``."""
    if target_rate and target_rate != sample_rate:
        chunks, sample_rate = resample(chunks, sample_rate, target_rate), target_rate
    if fmt == "pcm":
        yield from chunks
    elif fmt == "wav":
        yield wav_header(sample_rate)
        yield from chunks
    elif fmt in _AV:
        yield from _av_stream(chunks, sample_rate, fmt)
    else:
        raise ValueError(f"unknown audio format {fmt!r}")
