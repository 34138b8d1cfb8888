"""Token-embedding files of pivotal tuning: written as diffusers' advanced SDXL script writes them, read back into a
diffusers pipeline's two text encoders, and the prompt rewrite that goes with them.

The file holds ``clip_l`` ``[N, 768]`` (text_encoder) and ``clip_g`` ``[N, 1280]`` (text_encoder_2), the layout
A1111, ComfyUI and sd-scripts use for SDXL embeddings, so the same file goes into their ``embeddings`` folder (there
the file name is the trigger word). Ours also records the identifier and token names in the safetensors header;
a file without them (an A1111/ComfyUI embedding) is triggered by its file name, as those tools do.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .pivotal import rewrite

SUFFIX = "_emb.safetensors"
METADATA_KEY = "dreambooth_pl.pivotal"  # {"identifier": ..., "tokens": [...]}
KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L/14), text_encoder_2 (OpenCLIP ViT-bigG/14)
ROWS_KEY = "token_embedding.rows"  # pivotal.TokenRows' parameter, as named in a fit checkpoint


class TokenFileError(ValueError):
    """An embedding file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class TokenEmbeddings:
    """One embedding file: its rows for both encoders, the word it replaces in prompts and the tokens it adds.

    Args:
        path: the file.
        clip_l: ``[N, d1]`` rows for text_encoder.
        clip_g: ``[N, d2]`` rows for text_encoder_2.
        identifier: the prompt word the tokens stand for.
        tokens: the N token names added to both tokenizers.
    """

    path: str
    clip_l: torch.Tensor
    clip_g: torch.Tensor
    identifier: str
    tokens: tuple[str, ...]

    def rewrite(self, prompt: str) -> str:
        return rewrite(prompt, self.identifier, self.tokens)


def embeddings_path(folder: str | os.PathLike) -> Path:
    """``folder/<folder name>_emb.safetensors``: the advanced script's name for its ``output_dir``."""
    folder = Path(folder)
    return folder / f"{folder.resolve().name}{SUFFIX}"


def write_embeddings(path: str | os.PathLike, tensors: dict[str, torch.Tensor], identifier: str,
                     tokens: Sequence[str]) -> Path:
    """Write ``clip_l``/``clip_g`` rows atomically, with the identifier and tokens in the header.

    Args:
        path: output ``.safetensors`` file.
        tensors: ``{"clip_l": [N, d1], "clip_g": [N, d2]}``.
        identifier: the prompt word the tokens replace.
        tokens: the token names, in row order.
    """
    from safetensors.torch import save

    from .io import atomic_write

    meta = {"format": "pt", METADATA_KEY: json.dumps({"identifier": identifier, "tokens": list(tokens)})}
    data = save({k: tensors[k].detach().cpu().contiguous() for k in KEYS}, metadata=meta)
    return atomic_write(Path(path), lambda f: f.write(data))


def read_embeddings(path: str | os.PathLike) -> TokenEmbeddings:
    """Read an embedding file (ours, the advanced script's, or an A1111/ComfyUI SDXL embedding).

    Args:
        path: a ``.safetensors`` file with ``clip_l`` and ``clip_g``.
    Files without our header are triggered by their file name (A1111's rule), minus a trailing ``_emb``: the
    tokens are ``<name_0>, <name_1>, ...``.
    """
    from .io import load_safetensors, parse_json

    tensors, header = load_safetensors(path, "embedding")
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise TokenFileError(f"embedding file {str(path)!r} has no {' or '.join(missing)} tensor (it has "
                             f"{sorted(tensors)[:4]}): give an SDXL embedding with clip_l and clip_g rows, as fit "
                             "writes beside the LoRA (*_emb.safetensors).")
    clip_l, clip_g = (tensors[k] if tensors[k].dim() == 2 else tensors[k].reshape(1, -1) for k in KEYS)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise TokenFileError(f"embedding file {str(path)!r}: clip_l has {clip_l.shape[0]} rows but clip_g "
                             f"{clip_g.shape[0]}; each token needs one row in both.")
    if METADATA_KEY in header:
        meta = parse_json(header[METADATA_KEY], f"{path} header")
        identifier, tokens = meta["identifier"], tuple(meta["tokens"])
    else:
        identifier = Path(path).name[: -len(".safetensors")].removesuffix("_emb")
        tokens = tuple(f"<{identifier}_{i}>" for i in range(clip_l.shape[0]))
    if len(tokens) != clip_l.shape[0]:
        raise TokenFileError(f"embedding file {str(path)!r} names {len(tokens)} tokens for {clip_l.shape[0]} rows.")
    return TokenEmbeddings(str(path), clip_l, clip_g, identifier, tokens)


def from_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"clip_l", "clip_g"}`` rows of pivotal tuning in a fit checkpoint's ``state_dict`` (empty without)."""
    names = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    return {names[k.split(".", 1)[0]]: v for k, v in state.items() if k.endswith(ROWS_KEY)}


def beside(lora: str | os.PathLike) -> list[str]:
    """The ``*_emb.safetensors`` files in a LoRA file's folder (or in a run folder): what fit exported with it."""
    folder = Path(lora) if Path(lora).is_dir() else Path(lora).parent
    return sorted(str(p) for p in folder.glob(f"*{SUFFIX}"))


def load_into(pipe, paths: Sequence[str]) -> list[TokenEmbeddings]:
    """Add each file's tokens to both tokenizers and its rows to both text encoders of a diffusers SDXL pipeline
    (``load_textual_inversion`` per encoder, as the script's model card does).

    Args:
        pipe: a ``StableDiffusionXLPipeline``.
        paths: embedding files.
    """
    files = [read_embeddings(p) for p in paths]
    owner: dict[str, str] = {}
    for f in files:
        clash = next((t for t in f.tokens if t in owner or t in pipe.tokenizer.get_vocab()), None)
        if clash:
            raise TokenFileError(f"embedding file {f.path!r} adds token {clash!r}, which "
                                 f"{owner.get(clash, 'the tokenizer')!r} already holds: runs trained with the same "
                                 "token names (<s0><s1>) cannot be loaded together; load one, or rename its tokens.")
        owner.update(dict.fromkeys(f.tokens, f.path))
        for rows, encoder, tokenizer in ((f.clip_l, pipe.text_encoder, pipe.tokenizer),
                                         (f.clip_g, pipe.text_encoder_2, pipe.tokenizer_2)):
            width = encoder.get_input_embeddings().weight.shape[1]
            if rows.shape[1] != width:
                raise TokenFileError(f"embedding file {f.path!r} has rows of width {rows.shape[1]} for a text encoder "
                                     f"of width {width}: it was trained on another base.")
            pipe.load_textual_inversion(rows, token=list(f.tokens), text_encoder=encoder, tokenizer=tokenizer)
    return files


def prompt_rewriter(paths: Sequence[str]) -> Callable[[str], str]:
    """``prompt -> prompt`` with each file's identifier replaced by its tokens (identity without files)."""
    files = [read_embeddings(p) for p in paths]

    def rewrite_all(prompt: str) -> str:
        for f in files:
            prompt = f.rewrite(prompt)
        return prompt
    return rewrite_all
