"""``python -m dreambooth_pl merge-eval``: how much subject survives as a style LoRA is mixed in.

For each style weight w (subject weight fixed) the subject + style adapters are mixed by diffusers
``set_adapters`` (what ``merge --method cat`` writes to a file) and the same prompts and seeds are sampled. Subject
fidelity is DINO and CLIP-I against the subject's photos; style adherence is CLIP-T against a style description
and, when style reference images are given, CLIP-I against them (DreamBooth metrics, Ruiz et al. 2023, sec. 4.1).
Writes ``merge_eval.json``, ``merge_eval.md``, ``merge_eval.png`` (the curves) and ``grid.png`` (rows: weights).
Images and scores are kept (``images/<settings hash>/``, the JSON), so a rerun with more weights samples and
scores only the new ones.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Literal, Optional

from PIL import Image

from ..io import atomic_write, check_output_dir, read_json, save_image, write_json, write_text
from ..sampling import SAMPLER, SamplerSettings


def _curves(rows: list[dict], path: Path, title: str) -> None:
    """Subject fidelity (solid) and style adherence (dashed) against the style weight."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["style_weight"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, ls in (("dino", "subject DINO", "-"), ("clip_i", "subject CLIP-I", "-"),
                           ("style_clip_t", "style CLIP-T", "--"), ("style_clip_i", "style CLIP-I", "--")):
        if all(r.get(key) is not None for r in rows):
            ax.plot(x, [r[key] for r in rows], ls, marker="o", label=label)
    ax.set_xlabel("style LoRA weight")
    ax.set_ylabel("cosine similarity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)


def _grid(images: list[list[Image.Image]], labels: list[str], path: Path) -> None:
    """One row per style weight, labelled on the left."""
    import torch
    from PIL import ImageDraw
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid

    rows = [to_pil_image(make_grid(torch.stack([pil_to_tensor(i) for i in row]), nrow=len(row), padding=2))
            for row in images]
    strip = 90
    canvas = Image.new("RGB", (strip + rows[0].width, sum(r.height for r in rows)), "white")
    y = 0
    for row, label in zip(rows, labels):
        canvas.paste(row, (strip, y))
        ImageDraw.Draw(canvas).text((4, y + row.height // 2 - 6), label, fill="black")
        y += row.height
    save_image(path, canvas)


def _table(rows: list[dict]) -> str:
    cols = ["style_weight", "dino", "clip_i", "style_clip_t", "style_clip_i"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def merge_eval(subject: str, style: str, base: str, instance_dir: str, out: str, prompt: str,
               style_text: str, style_dir: Optional[str] = None, token: Optional[str] = None,
               style_weights: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0], subject_weight: float = 1.0,
               images_per_weight: int = 4, seed: int = 0, sampler: SamplerSettings = SAMPLER,
               resolution: Optional[int] = None,
               dtype: Literal["float16", "bfloat16", "float32"] = "float16", device: Optional[str] = None,
               clip_weights: Optional[str] = "openai", dino_weights: Optional[str] = "dino") -> dict:
    """Sweep the style LoRA's weight; score subject fidelity and style adherence; write table, plot and grid.

    Args:
        subject: subject LoRA file (diffusers or kohya layout).
        style: style LoRA file.
        base: SDXL pipeline folder or hub id both were trained on.
        instance_dir: the subject's photos (DINO / CLIP-I references).
        out: output folder.
        prompt: generation prompt, with the subject's identifier and the style's trigger word
            (e.g. ``pixel art, a photo of sks dog wearing sunglasses``).
        style_text: what the style looks like, for CLIP-T (e.g. ``pixel art``).
        style_dir: optional style reference images (CLIP-I of the style).
        token: identifier removed from prompts before CLIP scoring (None: none).
        style_weights: the sweep (0 = subject alone).
        subject_weight: fixed subject LoRA weight.
        images_per_weight: images per sweep point; seeds ``seed .. seed + n - 1`` at every weight.
        seed: first seed.
        sampler: scheduler (``dreambooth_pl.sampling.SCHEDULERS``), steps, guidance and negative prompt
            (``--sampler.steps 30``; sampling.SamplerSettings).
        resolution: image side in pixels (None: the base's native size).
        dtype: UNet / text-encoder dtype.
        device: cuda, cpu, ... (None: CUDA when available).
        clip_weights: CLIP ViT-B/32 weights (``openai``, a local file, or None for random weights in tests).
        dino_weights: DINO ViT-S/16 weights (``dino``, a local file, or None).
    """
    from ..data.images import load_rgb
    from ..sampling import generate, load_pipeline

    root = check_output_dir(out, "merge-eval", ours=("images", "merge_eval.*", "*.png"))
    seeds = [seed + i for i in range(images_per_weight)]
    # an unset negative prompt stays out of the key: images drawn before it existed keep their folder
    drawn_with = {k: v for k, v in dataclasses.asdict(sampler).items() if v is not None}
    gen_cfg = dict(subject=str(subject), style=str(style), base=str(base), prompt=prompt, subject_weight=subject_weight,
                   seeds=seeds, **drawn_with, resolution=resolution, dtype=dtype)
    score_cfg = dict(gen_cfg, instance_dir=str(instance_dir), style_dir=style_dir and str(style_dir),
                     style_text=style_text, token=token, clip_weights=clip_weights, dino_weights=dino_weights)
    # images and scores are reused only under the same settings: a changed prompt or model gets a new folder
    image_dir = root / "images" / hashlib.sha1(json.dumps(gen_cfg, sort_keys=True).encode()).hexdigest()[:10]
    image_dir.mkdir(parents=True, exist_ok=True)
    previous = read_json(root / "merge_eval.json", "merge-eval results") if (root / "merge_eval.json").exists() else {}
    scored = {r["style_weight"]: r for r in previous.get("rows", [])} if previous.get("config") == score_cfg else {}
    pipe = None
    grids = []
    for w in style_weights:
        paths = [image_dir / f"style{w:g}_seed{s}.png" for s in seeds]
        if not all(p.exists() for p in paths):  # resumable: only missing sweep points are sampled
            if pipe is None:
                pipe = load_pipeline(base, [(subject, subject_weight), (style, 1.0)], sampler.scheduler, dtype, device)
            pipe.set_adapters(["lora0", "lora1"], [subject_weight, w])
            images = generate(pipe, [prompt] * len(seeds), seeds, sampler.steps, sampler.guidance,
                              sampler.negative_prompt, height=resolution, width=resolution)
            for img, p in zip(images, paths):
                save_image(p, img)
            scored.pop(float(w), None)
        grids.append([load_rgb(p) for p in paths])
    del pipe
    metrics = None
    rows = []
    for w, images in zip(style_weights, grids):
        if float(w) in scored:
            rows.append(scored[float(w)])
            continue
        if metrics is None:  # metric models load only when something is left to score
            metrics = _metrics(instance_dir, style_dir, token, clip_weights, dino_weights)
        row = {"style_weight": float(w)}
        for name, metric in metrics.items():
            metric.reset()
            if name == "style_clip_t":
                metric.update(images, [style_text] * len(images))
            else:
                metric.update(images)
            row[name] = float(metric.compute())
        rows.append(row)
    result = {"config": score_cfg, "rows": rows}
    write_json(root / "merge_eval.json", result)
    md = (f"# Subject + style merge sweep\n\nSubject `{subject}` (weight {subject_weight:g}), style `{style}`; "
          f"prompt: `{prompt}`; style text: `{style_text}`; seeds {seeds}.\n\n{_table(rows)}\n\n"
          "![curves](merge_eval.png)\n\n![grid](grid.png)\n")
    write_text(root / "merge_eval.md", md)
    _curves(rows, root / "merge_eval.png", f"subject vs style, subject weight {subject_weight:g}")
    _grid(grids, [f"style {w:g}" for w in style_weights], root / "grid.png")
    return result


def _metrics(instance_dir: str, style_dir: Optional[str], token: Optional[str], clip_weights: Optional[str],
             dino_weights: Optional[str]) -> dict:
    """The evaluation helper's metrics, references embedded once: subject DINO / CLIP-I, style CLIP-T / CLIP-I."""
    from ..data.images import list_images, load_rgb
    from ..metrics import CLIPIScore, CLIPTScore, DINOScore, load_clip, load_dino

    clip, dino = load_clip(clip_weights), load_dino(dino_weights)
    subject_refs = [load_rgb(p) for p in list_images(instance_dir, "instance")]
    metrics = {"dino": DINOScore(dino, subject_refs), "clip_i": CLIPIScore(clip, subject_refs),
               "style_clip_t": CLIPTScore(clip, token)}
    if style_dir:
        metrics["style_clip_i"] = CLIPIScore(clip, [load_rgb(p) for p in list_images(style_dir, "style reference")])
    return metrics
