"""Build a tiny random-weight Stable Diffusion pipeline with diffusers' and transformers' own classes.

``python tests/sd_build.py OUT_DIR`` writes OUT_DIR/pipeline (what ``save_pretrained`` writes, about
5 MB) that loads through the real loading code; 256x256 in well under a second on a CPU. The VAE has
four blocks so it shrinks 8x like the real one; the tokenizer's vocab.json and merges.txt are
written here (the byte alphabet, a few merges, the two special tokens).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = _bytes_to_unicode()
    merges = ["h e", "l l", "t h", "a t", "i n"]
    vocab_list = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def build(out: Path) -> Path:
    torch.manual_seed(0)
    tok = tokenizer(out / "tokenizer-src")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        sample_size=256,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    target = out / "pipeline"
    pipe.save_pretrained(target)
    return target


# -- the single-file export ------------------------------------------------------------------------
# diffusers ships only the converters from the original (LDM) layout to its own; this is the way back,
# after diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, for any number of blocks.


def _unet_map(unet: UNet2DConditionModel) -> list[tuple[str, str]]:
    """(original prefix, diffusers prefix) pairs for a UNet of this config."""
    cfg = unet.config
    layers = cfg.layers_per_block
    blocks = len(cfg.block_out_channels)
    pairs = []
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(layers):
            pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"input_blocks.{(layers + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            pairs.append((f"input_blocks.{(layers + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, kind in enumerate(cfg.up_block_types):
        for j in range(layers + 1):
            pairs.append((f"output_blocks.{(layers + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"output_blocks.{(layers + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < blocks - 1:
            slot = 2 if kind.startswith("CrossAttn") else 1
            pairs.append((f"output_blocks.{(layers + 1) * i + layers}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    pairs += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return pairs


_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for original, ours in pairs:
        if key.startswith(ours):
            return original + key[len(ours) :]
    return key


def _unet_state(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    out = {}
    pairs = _unet_map(unet)
    for key, value in unet.state_dict().items():
        name = _rename(key, _UNET_TOP)
        if "resnets" in key:
            for original, ours in _RESNET:
                name = name.replace(ours, original)
        out["model.diffusion_model." + _rename(name, pairs)] = value
    return out


def _vae_state(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    cfg = vae.config
    blocks = len(cfg.block_out_channels)
    layers = cfg.layers_per_block
    pairs = [("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")]
    for part in ("encoder", "decoder"):
        pairs.append((f"{part}.mid.attn_1.", f"{part}.mid_block.attentions.0."))
        pairs += [(f"{part}.mid.block_{i + 1}.", f"{part}.mid_block.resnets.{i}.") for i in range(2)]
    for i in range(blocks):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        pairs += [
            (f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            for j in range(layers + 1)
        ]
        if i < blocks - 1:
            pairs.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            pairs.append((f"decoder.up.{blocks - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in vae.state_dict().items():
        name = _rename(key, pairs).replace("conv_shortcut", "nin_shortcut")
        if ".attn_1." in name:
            head, _, tail = name.partition(".attn_1.")
            tail = _rename(tail, attn)
            name = f"{head}.attn_1.{tail}"
            if value.ndim == 2:  # the original attention uses 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def export_single_file(pipeline_dir: Path, target: Path) -> Path:
    """The pipeline as one .safetensors in the original Stable Diffusion layout."""
    from safetensors.torch import save_file

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, local_files_only=True)
    state = {**_unet_state(pipe.unet), **_vae_state(pipe.vae)}
    for key, value in pipe.text_encoder.state_dict().items():  # transformers 5 drops the text_model. prefix
        key = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + key] = value
    save_file({k: v.contiguous() for k, v in state.items()}, str(target))
    return target


if __name__ == "__main__":
    folder = build(Path(sys.argv[1]))
    print(export_single_file(folder, Path(sys.argv[1]) / "tiny-sd.safetensors"))
