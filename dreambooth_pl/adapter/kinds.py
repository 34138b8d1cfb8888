"""The adapter kinds, one spec entry each: LoRA (Hu et al. 2021, arXiv 2106.09685), DoRA (Liu et al. 2024, arXiv
2402.09353), LoKr (Kronecker product, Yeh et al. 2024 "LyCORIS", arXiv 2309.14859) and LoHa (Hadamard product,
Hyeon-Woo et al. 2022, FedPara).

An entry holds the kind's peft parameters (what trains, what files hold), their names in the kohya/LyCORIS layout,
the layouts that can hold it, the kohya header its readers dispatch on, and its update maths (maths.py). A new kind is
one entry here plus its peft config in :func:`peft_config` and its tests. ``model.lora.adapter`` picks the kind; the
other ``model.lora`` keys (rank, alpha, targets, init) apply to every kind.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence

import torch

from . import maths

AdapterType = Literal["lora", "dora", "lokr", "loha"]
Layout = Literal["diffusers", "kohya"]
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass(frozen=True)
class Kind:
    """One adapter kind.

    Args:
        name: the ``model.lora.adapter`` value.
        title: its name in messages.
        params: peft parameter names of one adapted layer (state-dict leaves without the adapter name).
        kohya: peft name -> kohya/LyCORIS name where they differ.
        layouts: the file layouts that hold it, the default first (diffusers' ``load_lora_weights`` reads LoRA and
            DoRA only).
        header: the kohya-layout safetensors header A1111, ComfyUI and sd-scripts dispatch on.
        rank: the rank r of one layer's params (peft scales its update by alpha / r).
        delta: the layer's weight update at scale 1 (maths.py); None where it depends on the base weight (DoRA).
    """

    name: str
    title: str
    params: tuple[str, ...]
    kohya: dict[str, str]
    layouts: tuple[str, ...]
    header: dict[str, str]
    rank: Callable[[dict], int]
    delta: Optional[Callable[[dict, float], torch.Tensor]]

    def markers(self) -> tuple[str, ...]:
        """Substrings of the kind's trainable peft parameter names (``lora_A`` of ``...lora_A.default.weight``)."""
        return tuple(dict.fromkeys(p.split(".")[0] for p in self.params))


_LORA_KOHYA = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_LYCORIS = "lycoris.kohya"
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("lora", "LoRA", ("lora_A.weight", "lora_B.weight"), _LORA_KOHYA, ("diffusers", "kohya"),
         {"ss_network_module": "networks.lora"}, maths.lora_rank, maths.lora_delta),
    Kind("dora", "DoRA", ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
         {**_LORA_KOHYA, "lora_magnitude_vector": "dora_scale"}, ("diffusers", "kohya"),
         {"ss_network_module": _LYCORIS, "ss_network_args": json.dumps({"algo": "lora", "dora_wd": "True"})},
         maths.lora_rank, None),
    Kind("lokr", "LoKr", ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"), {}, ("kohya",),
         {"ss_network_module": _LYCORIS, "ss_network_args": json.dumps({"algo": "lokr"})},
         maths.lokr_rank, maths.lokr_delta),
    Kind("loha", "LoHa", ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), {}, ("kohya",),
         {"ss_network_module": _LYCORIS, "ss_network_args": json.dumps({"algo": "loha"})},
         maths.loha_rank, maths.loha_delta))}


class AdapterTypeError(ValueError):
    """A format, merge method or setting that cannot represent an adapter kind; the message names both."""


def kind_of(keys) -> str:
    """The kind whose parameters ``keys`` (peft or kohya/LyCORIS names) hold; LoRA when no other kind's marker is
    present. Raises :class:`AdapterTypeError` for keys of two kinds (LoKr and LoHa in one file)."""
    found = {"dora" if "magnitude_vector" in k or "dora_scale" in k else "lokr" if "lokr_" in k
             else "loha" if "hada_" in k else "lora" for k in keys}
    extra = sorted(found - {"lora"})
    if len(extra) > 1:
        raise AdapterTypeError(f"keys of {' and '.join(KINDS[k].title for k in extra)} in one file: one adapter "
                               "file holds one kind; export each separately.")
    return extra[0] if extra else "lora"


def check_settings(kind: str, dropout: float, rank: int = 1) -> None:
    """Refuse an unknown kind, a rank <= 0, or a setting the kind lacks, before any model loads."""
    if kind not in KINDS:
        names = list(KINDS)
        raise AdapterTypeError(f"model.lora.adapter must be {', '.join(names[:-1])} or {names[-1]}, got {kind!r}")
    if rank <= 0:
        raise AdapterTypeError(f"model.lora.rank must be > 0, got {rank}")
    if dropout and kind in ("lokr", "loha"):
        raise AdapterTypeError(f"model.lora.dropout={dropout} is an input dropout of LoRA/DoRA; "
                               f"model.lora.adapter={kind} has none: set model.lora.dropout: 0.")


def check_layout(kind: str, layout: str, what: str = "export") -> None:
    """Refuse writing adapter kind ``kind`` in a file ``layout`` that cannot hold it, naming the alternative."""
    if layout not in KINDS[kind].layouts:
        title = KINDS[kind].title
        raise AdapterTypeError(f"{what}: the {layout} layout cannot represent {title} adapters "
                               f"(diffusers' load_lora_weights reads LoRA and DoRA only); write {title} in the "
                               "kohya/LyCORIS layout (format: kohya) that A1111, ComfyUI and Forge load.")


def peft_config(kind: str, rank: int, alpha: float | None = None, dropout: float = 0.0,
                target_modules: Sequence[str] = UNET_TARGETS, init: bool | str = "gaussian",
                rank_pattern: dict | None = None, alpha_pattern: dict | None = None, decompose_both: bool = False):
    """The peft config of adapter kind ``kind``.

    Args:
        kind: ``lora``, ``dora`` (LoRA plus a learned per-output-row magnitude), ``lokr`` or ``loha``.
        rank: rank r (> 0); for LoKr the rank of the decomposed Kronecker factor.
        alpha: scale numerator, the update is scaled by ``alpha / r`` (None: r, scale 1).
        dropout: LoRA/DoRA input dropout; LoKr/LoHa have none (refused when > 0).
        target_modules: module-name suffixes to adapt.
        init: LoRA/DoRA: peft's ``init_lora_weights`` (``"gaussian"``, A normal with std 1/r and B = 0, is what
            diffusers' ``train_dreambooth_lora_sdxl.py`` uses; ``False`` starts B non-zero, for tests); LoKr/LoHa:
            ``init_weights`` (a LoRA-only string gives True: the update starts at 0).
        rank_pattern, alpha_pattern: per-module rank and alpha (module name -> value), for files read back.
        decompose_both: LoKr: decompose the first Kronecker factor too (files with ``lokr_w1_a``).
    """
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    check_settings(kind, dropout, rank)
    common = dict(r=rank, target_modules=list(target_modules), rank_pattern=rank_pattern or {},
                  alpha_pattern=alpha_pattern or {})
    alpha = alpha if alpha is not None else rank
    if kind in ("lora", "dora"):
        return LoraConfig(lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=init, use_dora=kind == "dora",
                          **common)
    init = init if isinstance(init, bool) else True
    if kind == "lokr":
        return LoKrConfig(alpha=alpha, init_weights=init, decompose_both=decompose_both, **common)
    return LoHaConfig(alpha=alpha, init_weights=init, **common)


def add_adapter(model: torch.nn.Module, kind: str, config, adapter_name: str = "default",
                train: bool = True) -> list[torch.nn.Parameter]:
    """Inject ``config`` into ``model`` (diffusers UNet or transformers CLIP); returns the adapter's parameters.

    Args:
        model: the model.
        kind: the kind ``config`` configures.
        config: from :func:`peft_config`.
        adapter_name: peft adapter name.
        train: make the parameters trainable, in fp32 even when the frozen base is fp16/bf16; False leaves them in
            the base's dtype (sampling).
    """
    model.add_adapter(config, adapter_name=adapter_name)
    markers = KINDS[kind].markers()
    params = [p for n, p in model.named_parameters() if any(k in n for k in markers) and f".{adapter_name}." in f"{n}."]
    if not params:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules {config.target_modules}")
    if train:
        for p in params:
            p.requires_grad_(True)
            p.data = p.data.float()
    return params
