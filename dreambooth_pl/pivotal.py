"""Pivotal tuning: new identifier tokens in both SDXL tokenizers whose embeddings train together with the LoRA.

This is ``--train_text_encoder_ti`` of diffusers' ``train_dreambooth_lora_sdxl_advanced.py`` (its
``TokenEmbeddingsHandler``: textual inversion, Gal et al. 2022, trained with the LoRA; "pivotal tuning" after Roich
et al. 2022):

- ``num_tokens`` tokens ``<s0> <s1> ...`` are added to both tokenizers as special tokens and both embedding tables
  are resized; each new row starts as ``randn * std(table)`` (the table's std after the resize), drawn in the
  script's order from a generator seeded with ``model.seed``;
- the identifier in every training prompt becomes ``<s0><s1>...``;
- after every optimizer step the new rows are rescaled by ``(std / std(new rows)) ** 0.1`` (the script's
  ``retract_embeddings``).

One difference, for memory: the script trains both whole tables (49,410 rows, 0.4 GB in fp32, 0.8 GB of Adam
moments) and copies the frozen rows back after each step; here only the new rows are a parameter
(:class:`TokenRows`), so the other rows are never written at all (bit for bit, by construction) and checkpoints
hold ``num_tokens`` rows per encoder. Gradient clipping therefore sees only the new rows' gradients, where the
script's norm also counts the frozen rows' (which it then discards).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

TOKEN = "<s{}>"  # the script's names: concept i's tokens are "<s{i}><s{i+1}>..."


@dataclass(frozen=True)
class PivotalSettings:
    """``model.pivotal``: new identifier tokens trained in both text encoders (None: off).

    Args:
        identifier: the word of the prompts that the new tokens replace (the script's ``--token_abstraction``),
            e.g. ``rraj`` in ``a photo of rraj person``.
        num_tokens: new tokens per identifier (``--num_new_tokens_per_abstraction``, 2).
        learning_rate: learning rate of the new embedding rows, their own optimizer group (the script uses
            ``--text_encoder_lr``; 3e-4 is replicate/cog-sdxl's ``ti_lr`` for AdamW; with Prodigy give 1.0).
        weight_decay: decoupled weight decay of the new rows (the script's default, ``--adam_weight_decay``).
        train_fraction: the rows train for the first ``int(train_fraction * max_steps)`` steps, then their
            learning rate is 0 (``--train_text_encoder_ti_frac``, 0.5: the "pivot"; the script counts epochs).
    """

    identifier: str
    num_tokens: int = 2
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    train_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.identifier or any(c.isspace() for c in self.identifier):
            raise ValueError(f"model.pivotal.identifier must be one word of data.photos.prompt (e.g. rraj), got "
                             f"{self.identifier!r}")
        checks = (("num_tokens", self.num_tokens >= 1, ">= 1"), ("learning_rate", self.learning_rate > 0, "> 0"),
                  ("weight_decay", self.weight_decay >= 0, ">= 0"),
                  ("train_fraction", 0 < self.train_fraction <= 1, "in (0, 1]"))
        for key, ok, want in checks:
            if not ok:
                raise ValueError(f"model.pivotal.{key} must be {want}, got {getattr(self, key)!r}")

    @property
    def tokens(self) -> list[str]:
        return [TOKEN.format(i) for i in range(self.num_tokens)]


def check_pivotal(pivotal: Optional[PivotalSettings], train_text_encoder: bool, cache: str, cuda_graph: bool) -> None:
    """Refuse what cannot run beside pivotal tuning, naming the key to change (before any model loads).

    Args:
        pivotal: the settings (None: off, nothing to check).
        train_text_encoder: ``model.lora.train_text_encoder``.
        cache: ``model.perf.cache``.
        cuda_graph: ``model.perf.cuda_graph``.
    """
    if pivotal is None:
        return
    if train_text_encoder:
        raise ValueError("model.pivotal trains new token embeddings of the text encoders; model.lora.train_text_encoder"
                         " also adapts those encoders (diffusers' advanced script refuses the pair too). Set one of "
                         "them off.")
    if cache == "all":
        raise ValueError("model.perf.cache=all pre-encodes the prompts once, but model.pivotal trains the identifier's "
                         "embeddings, so its prompts change every step. Use model.perf.cache=latents (the VAE latents "
                         "are still cached and the VAE leaves the GPU; the text encoders stay).")
    if cuda_graph:
        raise ValueError("model.perf.cuda_graph replays a fixed UNet call whose inputs need no gradient, but "
                         "model.pivotal needs the gradient of the prompt embeddings. Set model.perf.cuda_graph: false.")


def rewrite(prompt: str, identifier: str, tokens: Sequence[str]) -> str:
    """``prompt`` with the word ``identifier`` replaced by the tokens, joined (``rraj`` -> ``<s0><s1>``); whole
    words only, where the script replaces substrings (``sks`` inside ``tasks`` stays)."""
    return re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "".join(tokens), prompt)


def token_table(encoder: torch.nn.Module) -> torch.nn.Module:
    """The token embedding of a CLIP text model (``CLIPTextModel`` or ``...WithProjection``)."""
    return (encoder.text_model if hasattr(encoder, "text_model") else encoder).embeddings.token_embedding


class TokenRows(torch.nn.Module):
    """A token embedding whose rows from ``first`` on are a trainable fp32 parameter; the rest is the frozen table.

    Args:
        table: the resized, frozen ``nn.Embedding`` (any dtype).
        first: id of the first new token (the new ids are ``first .. first + len(rows) - 1``, the table's last rows).
        rows: initial values of the new rows.
    """

    def __init__(self, table: torch.nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.table, self.first = table, first
        self.rows = torch.nn.Parameter(rows.detach().float().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # in the table's dtype, as the encoder's other inputs: a half encoder fed fp32 fails in CPU autocast's norms
        old = self.table(ids)
        new = self.rows[(ids - self.first).clamp(min=0)].to(old.dtype)
        return torch.where((ids >= self.first)[..., None], new, old)

    def merged(self) -> torch.Tensor:
        """The whole table as the encoder sees it (a copy): frozen rows, then the trained ones."""
        out = self.table.weight.detach().float().clone()
        out[self.first:] = self.rows.detach()
        return out


class PivotalTokens:
    """The new tokens of one run in both tokenizers and text encoders: insertion, prompts, renormalisation, export.

    Args:
        settings: ``model.pivotal``.
        tokenizers: SDXL's two tokenizers (tokens are added to them).
        encoders: the two text encoders, still in fp32 (their tables are resized and the new rows initialised).
        seed: seed of the initial rows (``model.seed``); the global RNG is left as it was.
    """

    def __init__(self, settings: PivotalSettings, tokenizers: Sequence, encoders: Sequence[torch.nn.Module],
                 seed: int):
        self.settings, self.tokens = settings, settings.tokens
        self.encoders = tuple(encoders)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            inserted = [insert_tokens(t, e, self.tokens) for t, e in zip(tokenizers, encoders)]
        self.first = [ids[0] for ids, _ in inserted]
        self.std = [std for _, std in inserted]
        self._initial = [token_table(e).weight[ids].float().clone() for e, (ids, _) in zip(encoders, inserted)]
        self.layers: list[TokenRows] = []

    def attach(self) -> None:
        """Put a :class:`TokenRows` in each encoder (after the encoders are cast to the run's dtype)."""
        for enc, first, rows in zip(self.encoders, self.first, self._initial):
            layer = TokenRows(token_table(enc), first, rows)
            (enc.text_model if hasattr(enc, "text_model") else enc).embeddings.token_embedding = layer
            self.layers.append(layer)
        self._initial = []

    def parameters(self) -> list[torch.nn.Parameter]:
        return [layer.rows for layer in self.layers]

    def param_group(self) -> dict:
        """The optimizer group of the new rows, with their own learning rate and weight decay."""
        return {"params": self.parameters(), "lr": self.settings.learning_rate,
                "weight_decay": self.settings.weight_decay}

    def rewrite(self, prompt: str) -> str:
        return rewrite(prompt, self.settings.identifier, self.tokens)

    def uses_tokens(self, prompt: str) -> bool:
        """Whether a rewritten prompt holds a new token (its embedding then depends on the trained rows)."""
        return any(t in prompt for t in self.tokens)

    @torch.no_grad()
    def renormalise(self) -> None:
        """The script's ``retract_embeddings`` on the new rows: ``rows * (std / rows.std()) ** 0.1`` (the frozen
        rows it copies back are never written here)."""
        for i, layer in enumerate(self.layers):
            if self.std[i].device != layer.rows.device:  # moved once: a copy per step would be a host sync
                self.std[i] = self.std[i].to(layer.rows.device)
            off_ratio = self.std[i] / layer.rows.std()
            layer.rows.mul_(off_ratio ** 0.1)

    def pivot(self, optimizer, step: int, total_steps: float) -> None:
        """From step ``int(train_fraction * total_steps)`` on, the new rows' learning rate is 0 (the script's pivot;
        set before each optimizer step, as the LR scheduler rewrites it after)."""
        if self.settings.train_fraction >= 1 or step < int(self.settings.train_fraction * total_steps):
            return
        mine = {id(p) for p in self.parameters()}
        for group in optimizer.param_groups:
            if any(id(p) in mine for p in group["params"]):
                group["lr"] = 0.0

    def tensors(self) -> dict[str, torch.Tensor]:
        """The new rows as the script saves them: ``clip_l`` (text_encoder) and ``clip_g`` (text_encoder_2)."""
        return {name: layer.rows.detach().float().cpu().contiguous()
                for name, layer in zip(("clip_l", "clip_g"), self.layers)}


def insert_tokens(tokenizer, encoder: torch.nn.Module, tokens: list[str]) -> tuple[list[int], torch.Tensor]:
    """Add ``tokens`` and initialise their rows as ``TokenEmbeddingsHandler.initialize_new_tokens`` does.

    Args:
        tokenizer: one of SDXL's tokenizers.
        encoder: its text encoder (fp32).
        tokens: the new tokens.
    Returns:
        their ids and the table's std (taken after the resize, before the new rows are set).
    """
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(tokens)
    weight = token_table(encoder).weight
    if ids != list(range(weight.shape[0] - len(tokens), weight.shape[0])):
        raise ValueError(f"model.pivotal: the tokens {tokens} got ids {ids}, not the last rows of the embedding table "
                         f"({weight.shape[0]} rows): the base's tokenizer already holds some of them. Use a base "
                         "without added tokens.")
    std = weight.data.std()
    weight.data[ids] = torch.randn(len(ids), encoder.config.hidden_size).to(weight) * std
    return ids, std


def check_identifier(settings: PivotalSettings, trainer) -> None:
    """Refuse an identifier that the data module's instance prompt lacks (nothing would train the new tokens)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    photos = getattr(dm, "photos", None)  # the DreamBoothDataModule's data.photos; another data module has none
    prompt = getattr(photos, "prompt", None)
    if prompt is not None and rewrite(prompt, settings.identifier, settings.tokens) == prompt:
        raise ValueError(f"model.pivotal.identifier {settings.identifier!r} is not a word of data.photos.prompt "
                         f"{prompt!r}: set it to the prompt's identifier (e.g. rraj in 'a photo of rraj person').")


def total_steps(trainer) -> float:
    """The run's optimizer steps (``max_steps``, else Lightning's estimate), which ``train_fraction`` divides."""
    total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
    if total == float("inf"):
        raise ValueError("model.pivotal.train_fraction < 1 needs a finite run: set trainer.max_steps.")
    return total


def pivotal_encode(pivotal: PivotalTokens, prompts: list[str], frozen, live) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and pooled embeddings of rewritten ``prompts``: those holding a new token through ``live`` (with
    gradients to the new rows), the others (the class prompt) through ``frozen`` (cached by the module).

    Args:
        pivotal: the run's new tokens.
        prompts: prompts with the identifier already replaced.
        frozen, live: ``prompts -> (embeds [B, 77, d], pooled [B, d2])``.
    """
    rows = {}
    for fn, group in ((live, [p for p in dict.fromkeys(prompts) if pivotal.uses_tokens(p)]),
                      (frozen, [p for p in dict.fromkeys(prompts) if not pivotal.uses_tokens(p)])):
        if group:
            emb, pooled = fn(group)
            rows.update({p: (emb[i], pooled[i]) for i, p in enumerate(group)})
    return torch.stack([rows[p][0] for p in prompts]), torch.stack([rows[p][1] for p in prompts])


def export_embeddings(module, folder: str) -> Optional[str]:
    """Write a :class:`~dreambooth_pl.module.DreamBoothLoRA`'s new rows as the script does,
    ``<folder name>_emb.safetensors`` in ``folder`` (beside the LoRA); the EMA rows when ``ema.export``. None when
    the run has no ``model.pivotal``."""
    from contextlib import nullcontext

    from .token_files import embeddings_path, write_embeddings

    if getattr(module, "pivotal", None) is None:
        return None
    with module.averaged_weights() if module.hparams.ema.export else nullcontext():
        tensors = module.pivotal.tensors()
    return str(write_embeddings(embeddings_path(folder), tensors, module.hparams.pivotal.identifier,
                                module.pivotal.tokens))
