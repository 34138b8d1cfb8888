"""``python -m dreambooth_pl merge A.safetensors:1.0 B.safetensors:0.8 --method M --out C.safetensors``.

Methods follow peft's ``LoraModel.add_weighted_adapter`` (same recipes, same ``peft.utils.merge_utils`` maths),
applied module by module to adapter files, so no base model is loaded except for ``fuse``:

- ``weighted`` / ``cat``: exact, rank = sum of ranks; the file equals diffusers ``set_adapters(names, weights)``.
- ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``): combine the full updates ``w_i s_i B_i A_i``,
  then truncate with an SVD to ``--rank`` (default: the largest input rank; the sum of ranks is exact).
- ``linear``, ``ties`` (Yadav et al. 2023), ``dare_linear``, ``dare_ties`` (Yu et al. 2024): on A and B separately,
  weights split as sqrt on each side (peft); inputs must share the rank at every common module.
- ``fuse``: bake the weighted sum into the base (diffusers ``fuse_lora``) and save the merged pipeline folder.

Which kinds each method takes (a clear refusal otherwise): ``weighted``, ``cat``, ``linear``, ``ties``, ``dare_*``
combine LoRA factors, so LoRA only; ``svd`` sums full updates, so LoRA, LoKr and LoHa, mixed, into a LoRA;
``ties_svd`` and ``dare_*_svd`` compare entries of updates, so inputs of one kind; a DoRA update depends on the base
weight it adapts, so DoRA is merged by ``fuse`` only, which takes every kind (peft's own merge into the base).

Modules adapted by only some inputs are merged from those inputs alone (the union of targets). Inputs that adapt the
same module with different sizes come from different bases: an error names both files and the module.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from ..adapter import maths
from ..adapter.base import base_skeleton, check_base
from ..adapter.files import read_adapter, write_adapter
from ..adapter.kinds import KINDS, AdapterTypeError, Layout
from ..adapter.value import Adapter, AdapterFormatError, uniform_alpha
from ..io import atomic_dir, check_output_file, check_replaceable
from ..io.magnitude import check_magnitude

Method = Literal["weighted", "cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "fuse"]
_SVD = {"svd": "linear", "ties_svd": "ties", "dare_linear_svd": "dare_linear", "dare_ties_svd": "dare_ties"}
_AB = ("linear", "ties", "dare_linear", "dare_ties")


def parse_spec(spec: str) -> tuple[str, float]:
    """``"path.safetensors:0.8"`` -> ``("path.safetensors", 0.8)``; no ``:weight`` means 1.0."""
    path, sep, weight = spec.rpartition(":")
    if not sep or not path:
        return spec, 1.0
    try:
        return path, float(weight)
    except ValueError:
        raise ValueError(f"LoRA spec {spec!r}: the part after the last ':' must be a weight, "
                         "e.g. style.safetensors:0.8") from None


def _combine(tensors: list[torch.Tensor], weights: list[float], how: str, density: float,
             majority_sign_method: str) -> torch.Tensor:
    """One of peft's task-arithmetic combinations of same-shaped tensors."""
    from peft.utils import merge_utils as mu

    w = torch.tensor(weights, dtype=torch.float32)
    if how == "linear":
        return mu.task_arithmetic(tensors, w)
    if how == "ties":
        return mu.ties(tensors, w, density, majority_sign_method)
    if how == "dare_linear":
        return mu.dare_linear(tensors, w, density)
    return mu.dare_ties(tensors, w, density, majority_sign_method)


def _shapes(adapter: Adapter, module: str) -> tuple[int, ...]:
    if adapter.kind == "lora":
        return (adapter.up(module).shape[0], *adapter.down(module).shape[1:])
    return tuple(maths.io_shape(adapter.params(module)))


def check_kinds(adapters: Sequence[Adapter], method: str, names: Sequence[str]) -> None:
    """Refuse a method whose maths is undefined for the inputs' kinds, naming the file and the methods that fit."""
    titles = [KINDS[a.kind].title for a in adapters]
    for adapter, title, name in zip(adapters, titles, names):
        if adapter.kind == "dora" and method != "fuse":
            raise AdapterTypeError(f"{name} is a DoRA: its update depends on the base weight it adapts (a magnitude "
                                   f"rescales each output row), so --method {method} has no base-free maths; "
                                   "merge it with --method fuse --base B.")
        if adapter.kind != "lora" and method in ("weighted", "cat", *_AB):
            raise AdapterTypeError(f"{name} is a {title}: --method {method} combines LoRA factors (A, B); use "
                                   "--method svd (its full update, truncated to --rank) or fuse.")
    if method in _SVD and method != "svd" and len(set(titles)) > 1:
        raise AdapterTypeError(f"--method {method} compares the entries of updates of different kinds "
                               f"({', '.join(sorted(set(titles)))}): give inputs of one kind, or use svd or fuse.")


def merge_loras(loras: Sequence[Adapter], weights: Sequence[float], method: Method = "cat",
                rank: Optional[int] = None, density: float = 0.5,
                majority_sign_method: Literal["total", "frequency"] = "total",
                names: Sequence[str] | None = None) -> Adapter:
    """Merge adapters into one LoRA :class:`Adapter` (every module gets alpha = its new rank, i.e. scale 1).

    Args:
        loras: the adapters.
        weights: one weight per adapter (negative subtracts).
        method: see the module docstring (``fuse`` is not a file merge: use :func:`fuse`).
        rank: target rank of the SVD methods (None: the largest input rank at that module).
        density: fraction of entries kept by ties/dare.
        majority_sign_method: ties sign election, ``total`` or ``frequency``.
        names: file names for error messages.
    """
    if method == "fuse":
        raise ValueError("method fuse bakes adapters into a base model: call fuse(), not merge_loras().")
    if len(loras) != len(weights) or not loras:
        raise ValueError(f"need one weight per LoRA, got {len(loras)} LoRAs and {len(weights)} weights.")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    names = list(names or [f"LoRA #{i}" for i in range(len(loras))])
    check_kinds(loras, method, names)
    modules = list(dict.fromkeys(m for lora in loras for m in lora.modules()))
    out_w: dict[str, torch.Tensor] = {}
    out_a: dict[str, torch.Tensor] = {}
    for m in modules:
        have = [(lora, w, n) for lora, w, n in zip(loras, weights, names) if m in lora.alphas]
        if len({_shapes(lora, m) for lora, _, _ in have}) > 1:
            desc = ", ".join(f"{n}: {_shapes(lora, m)}" for lora, _, n in have)
            raise AdapterFormatError(f"module {m!r} has different sizes in the inputs ({desc}): the LoRAs were trained "
                                  "on different base models and cannot be merged.")
        if method in ("cat", "weighted"):  # exact, rank = sum of ranks
            a, b = _cat_factors(have, m)
        elif method in _SVD:
            a, b = _svd_merge(have, m, _SVD[method], rank, density, majority_sign_method)
        elif method in _AB:
            ranks = {lora.rank(m) for lora, _, _ in have}
            if len(ranks) > 1:
                raise ValueError(f"module {m!r}: method {method} merges A and B separately and needs equal ranks, "
                                 f"got {sorted(ranks)}; use --method {method}_svd, svd or cat.")
            ws = [w * lora.scale(m) for lora, w, _ in have]  # sign on A only, so B's sqrt stays real (peft)
            wa = [abs(x) ** 0.5 * (1 if x >= 0 else -1) for x in ws]
            wb = [abs(x) ** 0.5 for x in ws]
            a = _combine([lora.down(m).float() for lora, _, _ in have], wa, method, density, majority_sign_method)
            b = _combine([lora.up(m).float() for lora, _, _ in have], wb, method, density, majority_sign_method)
        else:
            raise ValueError(f"unknown merge method {method!r}")
        out_w[f"{m}.lora_A.weight"], out_w[f"{m}.lora_B.weight"] = a.contiguous(), b.contiguous()
        out_a[m] = torch.tensor(float(a.shape[0]))
    return Adapter(out_w, out_a)


def _cat_factors(have, m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``cat``: A_i scaled by ``w_i alpha_i / r_i`` stacked, B_i side by side; ``B A = sum w_i s_i B_i A_i``."""
    a = torch.cat([lora.down(m).float() * w * lora.scale(m) for lora, w, _ in have], 0)
    b = torch.cat([lora.up(m).float() for lora, _, _ in have], 1)
    return a, b


def _svd_merge(have, m: str, how: str, rank: Optional[int], density: float, majority_sign_method: str):
    """Best rank-k factors (Eckart-Young) of the combined update, as kohya's svd_merge_lora and peft do.

    A plain weighted sum stays low-rank, so its SVD comes from QR of the concatenated factors and the SVD of a
    small R x R core (R = sum of ranks): exact, O((out + in) R^2) per module instead of a full SVD of out x in.
    ties/dare prune the full updates element-wise, which needs the full matrices.
    """
    k = rank or max(lora.rank(m) for lora, _, _ in have)
    shape = _shapes(have[0][0], m)
    if how == "linear" and all(lora.kind == "lora" for lora, _, _ in have):
        a_cat, b_cat = _cat_factors(have, m)
        qb, rb = torch.linalg.qr(b_cat.flatten(1).double())
        qa, ra = torch.linalg.qr(a_cat.flatten(1).double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        u, vh = qb @ u, vh @ qa.T
    else:
        deltas = [lora.delta(m) for lora, _, _ in have]
        delta = _combine(deltas, [w for _, w, _ in have], how, density, majority_sign_method)
        u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    k = min(k, s.shape[0])
    b, a = (u[:, :k] * s[:k]).float(), vh[:k].float()
    if len(shape) == 4:  # conv: A carries the kernel, B is 1x1
        a, b = a.reshape(k, *shape[1:]), b.reshape(shape[0], k, 1, 1)
    return a, b


def fuse(loras: Sequence[tuple[Adapter, float]], base: str, out: str, overwrite: bool = False,
         inputs: Sequence[str] = ()) -> str:
    """Bake the adapters at their weights into a copy of ``base`` (peft layers, diffusers ``set_adapters`` +
    ``fuse_lora``: every kind, DoRA included) and save it.

    Args:
        loras: (adapter, weight) pairs.
        base: SDXL pipeline folder or hub id.
        out: output pipeline folder (written to a temporary sibling, then renamed).
        overwrite: replace an existing ``out`` (never ``.``, ``/``, home or a folder holding the inputs).
        inputs: the LoRA files (with ``base``, never inside a folder that is replaced).
    """
    from diffusers import StableDiffusionXLPipeline

    from ..adapter.apply import apply_adapter
    from ..sdxl import resolve_base

    pipe = StableDiffusionXLPipeline.from_pretrained(resolve_base(base))
    models, names = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")}, []
    for i, (adapter, _) in enumerate(loras):
        check_base(adapter, models, f"adapter #{i}")
        apply_adapter(models, adapter, f"lora{i}")
        names.append(f"lora{i}")
    pipe.set_adapters(names, [w for _, w in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()  # fused weights stay; the adapter modules go
    with atomic_dir(out, overwrite, "--out", [base, *inputs], owner={"kind": "fused-pipeline"}) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def merge(loras: list[str], out: str, method: Method = "cat", rank: Optional[int] = None, density: float = 0.5,
          majority_sign_method: Literal["total", "frequency"] = "total", base: Optional[str] = None,
          format: Layout = "diffusers", seed: int = 0, overwrite: bool = False,
          force: bool = False) -> str:
    """Merge adapter files (``A.safetensors:1.0 B.safetensors:0.8``) into one file, or into the base with ``fuse``.

    Args:
        loras: ``path[:weight]`` per adapter, diffusers or kohya layout (weight defaults to 1.0).
        out: output ``.safetensors`` (a pipeline folder for ``fuse``).
        method: weighted, cat, svd, linear, ties, dare_linear, dare_ties, ties_svd, dare_linear_svd,
            dare_ties_svd or fuse (see docs/merging.md).
        rank: target rank of the svd methods (None: the largest input rank).
        density: fraction of entries ties/dare keep.
        majority_sign_method: ties sign election (total or frequency).
        base: base pipeline; required for fuse, else optional to check the LoRAs fit it.
        format: layout of the output file (diffusers or kohya).
        seed: seed of dare's random drop.
        overwrite: with fuse, replace an existing --out folder (never ``.``, ``/``, home or one holding inputs).
        force: merge LoRA files past the magnitude bound (a change of more than 10x a layer's weight).
    """
    specs = [parse_spec(s) for s in loras]
    if method == "fuse":  # before any model loads: an output folder that may not be replaced is refused now
        check_replaceable(out, overwrite, "--out", [p for p in (base, *(p for p, _ in specs)) if p])
    else:
        check_output_file(out, "--out", [p for p, _ in specs])
    models = base_skeleton(base) if base else None
    adapters = [read_adapter(p, models["unet"].config if models else None) for p, _ in specs]
    for adapter, (p, w) in zip(adapters, specs):  # a finite but absurd file would merge into 1e30 weights
        check_magnitude(adapter.weights, adapter.alphas, p, None, w, force)  # base_skeleton has no weights: absolute bound
    for lora, (p, _) in zip(adapters, specs):
        if models:
            check_base(lora, models, p)
    if method == "fuse":
        if not base:
            raise ValueError("--method fuse needs --base (the pipeline the adapters are baked into).")
        if out.endswith(".safetensors"):
            raise ValueError(f"--method fuse writes a whole pipeline folder; give --out a folder, not {out!r}.")
        return fuse(list(zip(adapters, [w for _, w in specs])), base, out, overwrite, [p for p, _ in specs])
    with torch.random.fork_rng():  # dare drops at random: seeded, without touching the caller's RNG
        torch.manual_seed(seed)
        merged = merge_loras(adapters, [w for _, w in specs], method, rank, density, majority_sign_method,
                             [p for p, _ in specs])
    return str(write_adapter(uniform_alpha(merged) if format == "kohya" else merged, out, format))
