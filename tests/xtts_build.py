"""Build a tiny random-weight XTTS v2 checkpoint folder with coqui-tts' own classes.

Run under the XTTS venv: ``.venv-xtts/bin/python tests/xtts_build.py OUT_DIR``. Writes config.json,
model.pth, vocab.json, speakers_xtts.pth (two named speakers) and voices/ref.wav, which load through
``Xtts.load_checkpoint`` like the real model. Random weights never emit the stop token, so
``gpt_max_audio_tokens`` caps the length.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from TTS.tts.configs.xtts_config import XttsConfig
from TTS.tts.models.xtts import Xtts

LANGUAGES = ["en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi"]
CORPUS = [
    "hello world this is a tiny voice that says what it is told to say",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
]


def build(out: Path) -> None:
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    special = ["[STOP]", "[UNK]", "[SPACE]", "[START]", *[f"[{lang}]" for lang in LANGUAGES]]
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(special_tokens=special, vocab_size=120))
    tokenizer.save(str(out / "vocab.json"))

    config = XttsConfig()
    args = config.model_args
    args.gpt_layers, args.gpt_n_model_channels, args.gpt_n_heads = 1, 64, 2
    args.decoder_input_dim = 64
    args.gpt_max_audio_tokens = 15
    args.gpt_max_text_tokens = 200
    args.tokenizer_file = str(out / "vocab.json")
    config.languages = LANGUAGES
    config.save_json(str(out / "config.json"))

    model = Xtts.init_from_config(config)
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer

    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(out / "vocab.json"))
    model.init_models()
    torch.save({"model": model.state_dict()}, out / "model.pth")

    rate = 22050
    t = np.arange(rate * 2) / rate
    voice = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    (out / "voices").mkdir(exist_ok=True)
    soundfile.write(out / "voices" / "ref.wav", voice, rate)
    audio = torch.from_numpy(voice).unsqueeze(0)
    model.eval()
    with torch.inference_mode():
        speakers = {}
        for i, name in enumerate(["Ana Florence", "Claribel Dervla"]):
            clip = audio * (1.0 + 0.2 * i)
            speakers[name] = {
                "gpt_cond_latent": model.get_gpt_cond_latents(clip, rate),
                "speaker_embedding": model.get_speaker_embedding(clip, rate),
            }
    torch.save(speakers, out / "speakers_xtts.pth")


if __name__ == "__main__":
    build(Path(sys.argv[1]))
