"""Image, speech and transcription requests checked and shaped in-process (proxy/dialects/images.py,
speech.py, transcripts.py): what is refused with which message and param, and the canonical request
each dialect becomes. The same routes through a live proxy are in test_images.py, test_speech.py and
test_transcription.py."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from proxy.backends import DiffusersOptions, PiperOptions, XttsOptions
from proxy.config import ModelConfig
from proxy.dialects import images, speech, transcripts
from proxy.errors import BadRequest
from tests.test_shaping import model

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(16)).decode()


def refused(call: Any, *args: Any) -> tuple[str, str | None]:
    with pytest.raises(BadRequest) as info:
        call(*args)
    return info.value.message, info.value.param


# -- images -----------------------------------------------------------------------------------------

SD = model(
    backend="diffusers",
    capabilities=("image",),
    model_options=DiffusersOptions(steps=20, guidance_scale=6.0, width=512, height=768, max_size=1024),
)


def canonical(**kw: Any) -> dict[str, Any]:
    out = dict(
        prompt="a cat",
        negative_prompt="",
        steps=20,
        guidance_scale=6.0,
        width=512,
        height=768,
        seed=7,
        n=1,
        scheduler=None,
    )
    out.update(kw)
    return out


def test_each_image_dialect_becomes_the_canonical_request_with_the_models_defaults() -> None:
    assert images.from_inference({"prompt": "a cat", "seed": 7}, SD, img2img=False) == canonical()
    assert images.from_a1111({"prompt": "a cat", "seed": 7}, SD, img2img=False) == canonical()
    assert images.from_openai({"prompt": "a cat", "seed": 7}, SD) == canonical()
    plain = model(backend="diffusers", capabilities=("image",))  # no model: section: diffusers' defaults
    assert images.from_inference({"prompt": "a cat", "seed": 7}, plain, img2img=False) == canonical(
        steps=30, guidance_scale=7.5, height=512
    )
    assert images.from_openai({"prompt": "a cat", "seed": 7}, plain) == canonical(
        steps=30, guidance_scale=7.5, height=512
    )


def test_inference_dialect_fields() -> None:
    body = {
        "prompt": "a cat",
        "negative_prompt": "blur",
        "num_inference_steps": 150,
        "guidance_scale": 0,
        "width": 1024,
        "height": 256,
        "seed": 2**32 - 1,
        "num_images": 4,
        "init_image": PNG,
        "strength": 1,
        "scheduler": "Euler A",
    }
    expected = canonical(
        negative_prompt="blur",
        steps=150,
        guidance_scale=0.0,
        width=1024,
        height=256,
        seed=2**32 - 1,
        n=4,
        scheduler="euler a",
        init_image=PNG,
        strength=1.0,
    )
    out = images.from_inference(body, SD, img2img=True)
    assert out == expected and isinstance(out["guidance_scale"], float) and isinstance(out["strength"], float)
    assert images.from_inference({**body, "strength": None}, SD, img2img=True)["strength"] == 0.75
    assert "init_image" not in images.from_inference(body, SD, img2img=False)  # txt2img ignores it
    assert images.parameters(expected) == {k: v for k, v in expected.items() if k != "init_image"}


def test_a1111_dialect_fields() -> None:
    body = {
        "prompt": "a cat",
        "steps": 2,
        "cfg_scale": 30,
        "batch_size": 2,
        "n_iter": 2,
        "seed": 0,
        "init_images": [PNG, "ignored"],
        "denoising_strength": 0.5,
        "sampler_index": "DDIM",
    }
    assert images.from_a1111(body, SD, img2img=True) == {
        **canonical(steps=2, guidance_scale=30.0, n=4, seed=0, scheduler="ddim", init_image=PNG, strength=0.5),
        "size_from_init": True,  # no width/height: the init image's size (issue 14)
        "max_size": 1024,
    }
    assert images.from_a1111({**body, "sampler_name": "lms"}, SD, img2img=False)["scheduler"] == "lms"
    assert images.from_a1111({**body, "sampler_name": ""}, SD, img2img=False)["scheduler"] == "ddim"
    assert images.from_a1111({**body, "denoising_strength": None}, SD, img2img=True)["strength"] == 0.75


def test_openai_dialect_fields() -> None:
    assert images.from_openai({"prompt": "a cat", "size": "1024x256", "n": 3, "seed": 7}, SD) == canonical(
        width=1024, height=256, n=3
    )
    assert images.from_openai({"prompt": "a cat", "response_format": "b64_json", "seed": 7}, SD) == canonical()
    size = ('\'size\' must be "WIDTHxHEIGHT", e.g. "512x512"', "size")
    for bad in ("big", "512", "axb", "512x", "x512", "-512x512", 512):
        assert refused(images.from_openai, {"prompt": "p", "size": bad}, SD) == size, bad
    assert refused(images.from_openai, {"prompt": "p", "response_format": "url"}, SD) == (
        "'response_format' must be \"b64_json\": images are not hosted here",
        "response_format",
    )
    assert refused(images.from_openai, {"prompt": "p", "size": "516x512"}, SD) == (
        "'width' must be a multiple of 8 between 256 and 1024, got 516",
        "width",
    )
    assert refused(images.from_openai, {"prompt": "p", "size": "512x2048"}, SD) == (
        "'height' must be between 256 and 1024, got 2048",
        "height",
    )
    assert refused(images.from_openai, {"prompt": "p", "n": 5}, SD) == ("'n' must be between 1 and 4, got 5", "n")


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({"prompt": None}, "'prompt' must be a non-empty string", "prompt"),
        ({"prompt": "  "}, "'prompt' must be a non-empty string", "prompt"),
        ({"prompt": 5}, "'prompt' must be a non-empty string", "prompt"),
        ({"prompt": "x" * 1001}, "'prompt' is 1001 characters; the limit is 1000", "prompt"),
        ({"negative_prompt": 5}, "'negative_prompt' must be a non-empty string", "negative_prompt"),
        ({"negative_prompt": "x" * 1001}, "'negative_prompt' is 1001 characters; the limit is 1000", "negative_prompt"),
        ({"num_inference_steps": 0}, "'num_inference_steps' must be between 1 and 150, got 0", "num_inference_steps"),
        (
            {"num_inference_steps": 151},
            "'num_inference_steps' must be between 1 and 150, got 151",
            "num_inference_steps",
        ),
        ({"num_inference_steps": 20.0}, "'num_inference_steps' must be an integer", "num_inference_steps"),
        ({"num_inference_steps": True}, "'num_inference_steps' must be an integer", "num_inference_steps"),
        ({"guidance_scale": "7"}, "'guidance_scale' must be a number", "guidance_scale"),
        ({"guidance_scale": False}, "'guidance_scale' must be a number", "guidance_scale"),
        ({"guidance_scale": 30.5}, "'guidance_scale' must be between 0 and 30, got 30.5", "guidance_scale"),
        ({"guidance_scale": -0.5}, "'guidance_scale' must be between 0 and 30, got -0.5", "guidance_scale"),
        ({"width": 248}, "'width' must be between 256 and 1024, got 248", "width"),
        ({"height": 1032}, "'height' must be between 256 and 1024, got 1032", "height"),
        ({"width": 516}, "'width' must be a multiple of 8 between 256 and 1024, got 516", "width"),
        ({"seed": 2**32}, "'seed' must be an integer from 0 to 2**32-1 (or -1 for random)", "seed"),
        ({"seed": -2}, "'seed' must be an integer from 0 to 2**32-1 (or -1 for random)", "seed"),
        ({"seed": True}, "'seed' must be an integer from 0 to 2**32-1 (or -1 for random)", "seed"),
        ({"seed": "5"}, "'seed' must be an integer from 0 to 2**32-1 (or -1 for random)", "seed"),
        ({"num_images": 5}, "'num_images' must be between 1 and 4, got 5", "num_images"),
        ({"num_images": 0}, "'num_images' must be between 1 and 4, got 0", "num_images"),
        ({"strength": 1.5}, "'strength' must be between 0 and 1, got 1.5", "strength"),
        (
            {"scheduler": "bogus"},
            "'scheduler' must be one of euler, euler a, euler_a, ddim, pndm, lms, dpm++ 2m, dpm++_2m, unipc, "
            "got 'bogus'",
            "scheduler",
        ),
        (
            {"scheduler": 5},
            "'scheduler' must be one of euler, euler a, euler_a, ddim, pndm, lms, dpm++ 2m, dpm++_2m, unipc, got 5",
            "scheduler",
        ),
    ],
)
def test_bad_image_fields_get_a_clear_message_and_param(body: dict[str, Any], message: str, param: str) -> None:
    body = {"prompt": "a cat", **body}
    assert refused(images.from_inference, body, SD, False) == (message, param)


def test_the_largest_size_is_the_models_own() -> None:
    small = model(backend="diffusers", capabilities=("image",), model_options=DiffusersOptions(max_size=768))
    assert images.from_inference({"prompt": "p", "width": 768}, small, img2img=False)["width"] == 768
    assert refused(images.from_inference, {"prompt": "p", "width": 776}, small, False) == (
        "'width' must be between 256 and 768, got 776",
        "width",
    )


def test_a_random_seed_is_a_32_bit_seed() -> None:
    seeds = {images.from_inference({"prompt": "p", "seed": s}, SD, img2img=False)["seed"] for s in [None, -1] * 40}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)


@pytest.mark.parametrize(
    "raw",
    [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"RIFF\0\0\0\0WEBPVP8 "],
)
def test_init_images_in_every_accepted_format(raw: bytes) -> None:
    data = base64.b64encode(raw + bytes(8)).decode()
    body = {"prompt": "p", "init_image": data}
    assert images.from_inference(body, SD, img2img=True)["init_image"] == data
    url = "data:image/png;base64," + data  # a data URL is accepted and passed on as sent
    assert images.from_inference({**body, "init_image": url}, SD, img2img=True)["init_image"] == url


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "'init_image' must be a base64 image"),
        ("", "'init_image' must be a base64 image"),
        (5, "'init_image' must be a base64 image"),
        ("not base64!", "'init_image' is not valid base64"),
        (
            base64.b64encode(b"plain text, not an image").decode(),
            "'init_image' is not a PNG, JPEG, WebP, GIF or BMP image",
        ),
        (base64.b64encode(b"RIFF\0\0\0\0WAVEfmt ").decode(), "'init_image' is not a PNG, JPEG, WebP, GIF or BMP image"),
        (base64.b64encode(b"WEBP\0\0\0\0RIFFfmt ").decode(), "'init_image' is not a PNG, JPEG, WebP, GIF or BMP image"),
    ],
)
def test_bad_init_images(value: Any, message: str) -> None:
    assert refused(images.from_inference, {"prompt": "p", "init_image": value}, SD, True) == (message, "init_image")


def test_a1111_batches_and_init_images() -> None:
    assert refused(images.from_a1111, {"prompt": "p", "batch_size": 3, "n_iter": 2}, SD, False) == (
        "'batch_size' x 'n_iter' must be at most 4",
        "batch_size",
    )
    assert refused(images.from_a1111, {"prompt": "p", "n_iter": 5}, SD, False) == (
        "'n_iter' must be between 1 and 4, got 5",
        "n_iter",
    )
    must = ("'init_images' must be a non-empty array of base64 images", "init_images")
    assert refused(images.from_a1111, {"prompt": "p"}, SD, True) == must
    assert refused(images.from_a1111, {"prompt": "p", "init_images": []}, SD, True) == must
    assert refused(images.from_a1111, {"prompt": "p", "init_images": PNG}, SD, True) == must
    assert refused(images.from_a1111, {"prompt": "p", "init_images": ["eA=="]}, SD, True) == (
        "'init_images' is not a PNG, JPEG, WebP, GIF or BMP image",
        "init_images",
    )
    assert refused(images.from_a1111, {"prompt": "p", "sampler_name": "bogus"}, SD, False)[1] == "sampler_name"


def test_a1111_response() -> None:
    request = {"prompt": "a cat", "init_images": [PNG], "steps": 20}
    result = {"images": [{"seed": 7, "base64": "AAA"}, {"seed": 8, "base64": "BBB"}]}
    out = images.a1111_response(request, canonical(scheduler="ddim"), result)
    assert out["images"] == ["AAA", "BBB"] and out["parameters"] == {"prompt": "a cat", "steps": 20}
    assert json.loads(out["info"]) == {
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 7,
        "all_seeds": [7, 8],
        "width": 512,
        "height": 768,
        "sampler_name": "ddim",
        "cfg_scale": 6.0,
        "steps": 20,
        "batch_size": 2,
    }
    assert json.loads(images.a1111_response({}, canonical(), result)["info"])["sampler_name"] == ""


# -- speech ------------------------------------------------------------------------------------------

PIPER = model(name="voice", backend="piper", capabilities=("speech",), model_options=PiperOptions())


def xtts(tmp_path: Path, languages: list[str] | None = None) -> ModelConfig:
    (tmp_path / "voices").mkdir()
    (tmp_path / "voices" / "ana.wav").write_bytes(b"RIFF")
    (tmp_path / "voices" / "notes.txt").write_text("not a voice")
    (tmp_path / "config.json").write_text(json.dumps({"languages": languages} if languages else {}))
    opts = XttsOptions(speakers=["Ana Florence", "Bob"], voices_dir=str(tmp_path / "voices"))
    return model(name="clone", backend="xtts", capabilities=("speech",), model_options=opts, model_path=tmp_path)


def test_speech_request_defaults_and_fields() -> None:
    assert speech.check({"input": "Hello."}, PIPER, "input", "response_format", "mp3") == {
        "model": "voice",
        "input": "Hello.",
        "voice": "default",
        "response_format": "mp3",
        "speed": 1.0,
    }
    body = {"text": "x" * 4096, "format": "flac", "speed": 0.25, "voice": "alloy", "language": "xx"}
    assert speech.check(body, PIPER, "text", "format", "wav") == {
        "model": "voice",
        "input": "x" * 4096,
        "voice": "default",
        "response_format": "flac",
        "speed": 0.25,
        "language": "xx",  # a model that lists no languages: passed on as asked
    }
    assert speech.check({"input": "x", "speed": 4}, PIPER, "input", "response_format", "wav")["speed"] == 4.0


@pytest.mark.parametrize(
    ("body", "message", "param"),
    [
        ({}, "'input' must be a non-empty string", "input"),
        ({"input": " \n"}, "'input' must be a non-empty string", "input"),
        ({"input": 5}, "'input' must be a non-empty string", "input"),
        ({"input": "x" * 4097}, "'input' is 4097 characters; the limit is 4096", "input"),
        (
            {"input": "x", "response_format": "ogg"},
            "'response_format' must be one of wav, pcm, mp3, opus, flac, aac, got 'ogg'",
            "response_format",
        ),
        ({"input": "x", "response_format": 5}, "'response_format' must be a string, got int", "response_format"),
        ({"input": "x", "speed": 0.24}, "'speed' must be between 0.25 and 4, got 0.24", "speed"),
        ({"input": "x", "speed": 4.01}, "'speed' must be between 0.25 and 4, got 4.01", "speed"),
        ({"input": "x", "speed": "fast"}, "'speed' must be a number, got str", "speed"),
        ({"input": "x", "voice": 5}, "'voice' must be a string, got int", "voice"),
        ({"input": "x", "language": 5}, "'language' must be a string, got int", "language"),
        (
            {"input": "x", "speaker_wav": "ana.wav"},
            "model 'voice' cannot clone voices (speaker_wav is for XTTS models)",
            "speaker_wav",
        ),
    ],
)
def test_bad_speech_fields(body: dict[str, Any], message: str, param: str) -> None:
    assert refused(speech.check, body, PIPER, "input", "response_format", "mp3") == (message, param)


def test_cloning_languages_and_voices_of_an_xtts_model(tmp_path: Path) -> None:
    cfg = xtts(tmp_path, ["en", "de"])
    audio = base64.b64encode(bytes(64)).decode()
    out = speech.check(
        {"input": "Hallo.", "voice": "Bob", "language": "de", "speaker_wav": "ana.wav"}, cfg, "input", "f", "wav"
    )
    assert out == {
        "model": "clone",
        "input": "Hallo.",
        "voice": "Bob",
        "response_format": "wav",
        "speed": 1.0,
        "language": "de",
        "speaker_wav": "ana.wav",
    }
    assert speech.check({"input": "x", "speaker_wav": audio}, cfg, "input", "f", "wav")["speaker_wav"] == audio
    assert refused(speech.check, {"input": "x", "language": "fr"}, cfg, "input", "f", "wav") == (
        "'language' must be one of en, de, got 'fr'",
        "language",
    )
    assert refused(speech.check, {"input": "x", "speaker_wav": "bob.wav"}, cfg, "input", "f", "wav") == (
        "'speaker_wav' is neither a voice file of this model (ana.wav) nor base64 audio",
        "speaker_wav",
    )
    short = base64.b64encode(bytes(63)).decode()
    assert refused(speech.check, {"input": "x", "speaker_wav": short}, cfg, "input", "f", "wav") == (
        "'speaker_wav' is too short to be audio",
        "speaker_wav",
    )


def test_an_xtts_model_without_voice_files_says_none(tmp_path: Path) -> None:
    cfg = model(
        name="clone",
        backend="xtts",
        capabilities=("speech",),
        model_options=XttsOptions(voices_dir=str(tmp_path / "missing")),
        model_path=tmp_path,
    )
    assert refused(speech.check, {"input": "x", "speaker_wav": "a.wav"}, cfg, "input", "f", "wav") == (
        "'speaker_wav' is neither a voice file of this model (none) nor base64 audio",
        "speaker_wav",
    )


def test_a_streamed_wav_gets_its_real_sizes() -> None:
    header = b"RIFF" + b"\xff" * 4 + b"WAVEfmt " + bytes(20) + b"data" + b"\xff" * 4
    assert len(header) == 44
    whole = speech.sized_wav(header + bytes(10))
    assert whole == b"RIFF" + struct.pack("<I", 46) + header[8:40] + struct.pack("<I", 10) + bytes(10)
    assert speech.sized_wav(header) == b"RIFF" + struct.pack("<I", 36) + header[8:40] + struct.pack("<I", 0)
    for other in (header[:43], b"RIFX" + header[4:] + bytes(2), header[:36] + b"LIST" + header[40:]):
        assert speech.sized_wav(other) == other  # not a streamed WAV: left as it is


# -- transcription -------------------------------------------------------------------------------------


def test_transcription_requests() -> None:
    assert transcripts.check_request({}, [], 1) == "json"
    for fmt in transcripts.FORMATS:
        assert transcripts.check_request({"response_format": fmt}, [], 1) == fmt
    fields = {"response_format": "verbose_json", "temperature": "1"}
    assert transcripts.check_request(fields, ["segment", "word"], 10) == "verbose_json"
    assert transcripts.check_request({"temperature": "0", "response_format": ""}, [], 10) == "json"
    cases = [
        ({}, [], 0, ("'file' is empty", "file")),
        ({}, [], None, ("'file' is empty", "file")),
        (
            {"response_format": "xml"},
            [],
            1,
            ("'response_format' must be one of json, text, srt, vtt, verbose_json, got 'xml'", "response_format"),
        ),
        ({"temperature": "hot"}, [], 1, ("'temperature' must be a number", "temperature")),
        ({"temperature": "1.01"}, [], 1, ("'temperature' must be between 0 and 1", "temperature")),
        ({"temperature": "-0.1"}, [], 1, ("'temperature' must be between 0 and 1", "temperature")),
        (
            {},
            ["segment", "char"],
            1,
            ("'timestamp_granularities[]' must be segment or word, got 'char'", "timestamp_granularities"),
        ),
    ]
    for fields, granularities, size, expected in cases:
        assert refused(transcripts.check_request, fields, granularities, size) == expected


def test_transcript_formats_without_segments_and_with_words() -> None:
    transcript = {"text": "Hi.", "language": "en", "duration": 1.5, "words": [{"word": "Hi", "start": 0, "end": 1}]}
    assert transcripts.render(transcript, "verbose_json", "transcribe") == {
        "task": "transcribe",
        "language": "en",
        "duration": 1.5,
        "text": "Hi.",
        "segments": [],
        "words": [{"word": "Hi", "start": 0, "end": 1}],
    }
    assert "words" not in transcripts.render({"text": "Hi."}, "verbose_json", "translate")
    assert transcripts.render(transcript, "srt", "transcribe") == ""
    assert transcripts.render(transcript, "vtt", "transcribe") == "WEBVTT\n\n"
    assert transcripts.render(transcript, "json", "transcribe") == {"text": "Hi."}
    segments = [{"start": -0.0004, "end": 59.9996, "text": "a"}, {"start": 60.0, "end": 3600.001, "text": " b "}]
    assert transcripts.srt(segments) == ("1\n00:00:00,000 --> 00:01:00,000\na\n\n2\n00:01:00,000 --> 01:00:00,001\nb\n")
    assert (
        transcripts.vtt(segments) == "WEBVTT\n\n00:00:00.000 --> 00:01:00.000\na\n\n00:01:00.000 --> 01:00:00.001\nb\n"
    )
