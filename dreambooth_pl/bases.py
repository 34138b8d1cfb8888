"""Build random-weight SDXL pipelines in the exact layout of ``stabilityai/stable-diffusion-xl-base-1.0``.

Speed and memory do not depend on weight values, so a random full-size base (``sdxl``) stands in for the real
one on machines without hub access; ``tiny`` keeps the structure (three UNet levels, text_time conditioning,
two CLIP text encoders, an 8x VAE) at CPU-test size. Tokenizers carry the real CLIP BPE vocabulary, rebuilt
offline from the file open_clip_torch ships, so token ids match open_clip's exactly.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Literal

import torch

from .io import atomic_dir
from .sdxl import looks_like_hub_id

Preset = Literal["tiny", "sdxl"]

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (the fields that differ from diffusers' defaults).
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    attention_head_dim=[5, 10, 20], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)
TINY_UNET = dict(
    SDXL_UNET, sample_size=8, block_out_channels=[32, 64, 64], transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 4], cross_attention_dim=64, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=16, layers_per_block=1,
)
SDXL_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], scaling_factor=0.13025, force_upcast=True, norm_num_groups=32,
)
TINY_VAE = dict(SDXL_VAE, block_out_channels=[16, 16, 32, 32], layers_per_block=1, sample_size=64, norm_num_groups=8)
# CLIP ViT-L/14 text tower (text_encoder) and OpenCLIP ViT-bigG/14 text tower (text_encoder_2).
SDXL_TE1 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu")
SDXL_TE2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu")
TINY_TE1 = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
                projection_dim=32, hidden_act="quick_gelu")
TINY_TE2 = dict(TINY_TE1, hidden_act="gelu")
PRESETS = {"sdxl": (SDXL_UNET, SDXL_VAE, SDXL_TE1, SDXL_TE2), "tiny": (TINY_UNET, TINY_VAE, TINY_TE1, TINY_TE2)}
# The SDXL base ships an EulerDiscreteScheduler with this config; training uses the same betas through DDPM.
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, interpolation_type="linear",
                 use_karras_sigmas=False, clip_sample=False, sample_max_value=1.0, set_alpha_to_one=False,
                 skip_prk_steps=True)


def clip_bpe_files(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the CLIP BPE tokenizer from open_clip's bundled vocabulary.

    Args:
        out_dir: folder to write into.
    Follows ``open_clip.tokenizer.SimpleTokenizer``: 256 byte tokens, their ``</w>`` forms, 48,894 merges and
    the two special tokens, 49,408 ids in all — the layout of ``openai/clip-vit-large-patch14``'s tokenizer.
    """
    import open_clip.tokenizer as oct

    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1: 49152 - 256 - 2 + 1]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


def build_tokenizer(folder: Path, pad_token: str):
    """Save a ``CLIPTokenizer`` built from the offline BPE files into ``folder``."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        clip_bpe_files(tmp)
        tok = CLIPTokenizer(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"),
                            pad_token=pad_token, model_max_length=77)
        tok.save_pretrained(folder)
    return tok


def build_components(preset: Preset = "tiny", seed: int = 0) -> dict:
    """Randomly initialise every SDXL pipeline component of ``preset`` (seeded, on CPU, fp32)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if preset not in PRESETS:
        raise ValueError(f"unknown base preset {preset!r}; choose one of {sorted(PRESETS)}")
    unet_cfg, vae_cfg, te1_cfg, te2_cfg = PRESETS[preset]
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                  pad_token_id=49407, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**vae_cfg)
    torch.manual_seed(seed + 2)
    te1 = CLIPTextModel(CLIPTextConfig(**common, **te1_cfg))
    torch.manual_seed(seed + 3)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**common, **te2_cfg))
    with torch.device("cpu"):  # scheduler tables live on the CPU even when models are built on "meta"
        scheduler = EulerDiscreteScheduler.from_config(SCHEDULER)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=scheduler)


def make_base(preset: Preset = "tiny", out: str = "data/_cache/tiny-sdxl", seed: int = 0,
              dtype: Literal["float32", "float16"] = "float32", overwrite: bool = False) -> str:
    """Write a random-weight SDXL pipeline folder loadable by ``StableDiffusionXLPipeline.from_pretrained``.

    Args:
        preset: ``tiny`` (CPU tests, smoke runs) or ``sdxl`` (real architecture, 3.5B parameters).
        out: destination folder (not ``owner/name``, which reads as a hub id); written to a temporary sibling and
            renamed, so it is complete or absent. An existing pipeline folder is reused.
        seed: seed of the random initialisation.
        dtype: storage dtype (``float16`` halves the 14 GB of a full-size base).
        overwrite: replace an existing folder instead of reusing (or refusing) it.
    """
    return build_random_base(preset, out, seed, dtype, overwrite, "--out")


def build_random_base(preset: Preset, out: str, seed: int = 0, dtype: str = "float32", overwrite: bool = False,
                      option: str = "model.base_model") -> str:
    """:func:`make_base` for callers that name the option differently (``model.random_base`` builds on first use).

    Never deletes a folder it did not build: an existing non-empty folder without ``model_index.json`` is refused
    unless ``overwrite`` (and even then ``.``, ``/`` and home are), and a hub-id-shaped path is refused.
    """
    from diffusers import StableDiffusionXLPipeline

    dest = Path(out)
    if looks_like_hub_id(out):
        raise ValueError(f"{option} {out!r} reads as a Hugging Face hub id (owner/name), so a random base there "
                         "could later be taken for the real model: give a path such as "
                         f"data/_cache/{dest.name} or ./{out}.")
    if (dest / "model_index.json").exists() and not overwrite:
        return str(dest)
    holds_files = dest.is_dir() and any(dest.iterdir())
    if (holds_files and not overwrite) or (dest.exists() and not dest.is_dir()):
        raise ValueError(f"{option} {out!r} exists but is not a diffusers pipeline folder (no model_index.json), "
                         "and a random base is only built in a new folder: point it at an SDXL pipeline folder, "
                         "or at a new path for the random base.")
    parts = build_components(preset, seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok1 = build_tokenizer(Path(tmp) / "tok1", pad_token="<|endoftext|>")
        tok2 = build_tokenizer(Path(tmp) / "tok2", pad_token="!")
        pipe = StableDiffusionXLPipeline(tokenizer=tok1, tokenizer_2=tok2, **parts)
        if dtype == "float16":
            pipe.to(torch.float16)
        with atomic_dir(dest, overwrite, option, owner={"kind": "random-base", "preset": preset, "seed": seed,
                                                         "dtype": dtype}) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
    return str(dest)
