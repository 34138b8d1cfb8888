"""``evaluate``, ``evaluate-suite``, ``compare-runs``: DreamBooth subject metrics (Ruiz et al. 2023) as JSON + Markdown.

Every score is computed on generated images loaded back from their PNGs (the images the table is about), against
the subject's real photos; the "real images" row compares the real photos with each other, leaving out the pairs of
an image with itself. CLIP-T scores each prompt with the identifier token removed ("a sks dog" -> "a dog") unless
``clip_t_prompt=as_generated`` (docs/evaluation.md says why either).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Literal, Optional, Sequence

ClipTPrompt = Literal["without_identifier", "as_generated"]

from ..io import check_output_dir, ensure_writable, read_json, read_png_metadata, write_json, write_png, write_text
from ..sampling import SAMPLER, SamplerSettings

RESULTS_JSON, RESULTS_MD = "results.json", "results.md"
# Published numbers (DreamBooth paper, Table 1), shown beside ours for scale; not computed here.
PAPER_ROWS = {"paper: real images": {"dino": 0.774, "clip_i": 0.885},
              "paper: DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}}
COLUMNS = ("dino", "clip_i", "clip_t", "face_sim", "face_match", "face_none", "pres", "div_dino", "n_images")
FACE_COLUMNS = ("face_sim", "face_match", "face_none")  # metrics/face.py; absent for subjects without a face


class EvaluationError(ValueError):
    """Bad evaluation input (folders, prompts, samples of other settings); the message names it and the fix."""


@functools.lru_cache(maxsize=1)  # ablations evaluate run after run in one process: load CLIP and DINO once
def _embedders(clip_weights: Optional[str], dino_weights: Optional[str], device: Optional[str]):
    """CLIP and DINO; random weights (None, tests only) are drawn from seed 0 (as conftest's random_embedders),
    whatever the caller's RNG state: the first call's draw, which the cache keeps, is then the same in any order."""
    import torch

    from ..metrics import load_clip, load_dino

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]):
        if clip_weights is None or dino_weights is None:
            torch.manual_seed(0)
        return load_clip(clip_weights, device), load_dino(dino_weights, device)


def _face(face_weights: Optional[str]):
    """The face embedder (``metrics.face.load_face``, loaded once), or None when ``face_weights`` is None."""
    from ..metrics.face import load_face

    return load_face(face_weights) if face_weights else None


def score_subject(images: list, prompts: list[str], real: list, token: Optional[str], clip, dino,
                  class_images: Optional[list] = None,
                  clip_t_prompt: ClipTPrompt = "without_identifier", face=None) -> dict[str, float]:
    """CLIP-I, CLIP-T, DINO, DIV-DINO (within each prompt) and PRES (class-prompt samples vs real) of one set.

    Args:
        images: generated images (PIL or tensors; see ``metrics.embedders.to_unit_float``).
        prompts: the prompt of each image.
        real: the subject's real photos.
        token: identifier removed from prompts for CLIP-T.
        clip, dino: embedders from ``metrics.load_clip`` / ``metrics.load_dino``.
        class_images: samples of the class prompt alone, for PRES (None: no PRES).
        clip_t_prompt: CLIP-T's prompt: ``without_identifier`` or ``as_generated`` (see ``metrics.CLIPTScore``).
        face: a face embedder (``metrics.face.load_face``) for face_sim, face_match, face_none (None: skipped).
    """
    from ..metrics import CLIPIScore, CLIPTScore, DINODiversity, DINOScore
    from ..metrics.face import face_scores

    if len(images) != len(prompts):
        raise EvaluationError(f"got {len(images)} images but {len(prompts)} prompts: give one prompt per image.")
    clip_i, dino_s = CLIPIScore(clip, real), DINOScore(dino, real)
    clip_t, div = CLIPTScore(clip, token, prompt=clip_t_prompt), DINODiversity(dino)
    clip_i.update(images)
    dino_s.update(images)
    clip_t.update(images, prompts)
    scores = {"clip_i": clip_i.compute(), "clip_t": clip_t.compute(), "dino": dino_s.compute()}
    groups = [[im for im, p in zip(images, prompts) if p == q] for q in dict.fromkeys(prompts)]
    for group in (g for g in groups if len(g) > 1):
        div.update(group)
    if div.count:
        scores["div_dino"] = div.compute()
    if class_images:
        pres = DINOScore(dino, real)
        pres.update(class_images)
        scores["pres"] = pres.compute()
    return {k: float(v) for k, v in scores.items()} | face_scores(images, real, face) | {"n_images": len(images)}


def real_baseline(real: list, clip, dino, face=None) -> dict[str, float]:
    """The paper's "real images" row: real vs real, without the pairs of an image with itself (face: see
    :func:`score_subject`)."""
    import torch

    from ..metrics import CLIPIScore, DINOScore
    from ..metrics.face import face_scores

    if len(real) < 2:
        raise EvaluationError("the real-images baseline needs at least 2 real photos of the subject.")
    out = {}
    for name, metric in (("clip_i", CLIPIScore(clip, real)), ("dino", DINOScore(dino, real))):
        metric.update(real, reference_index=torch.arange(len(real)))
        out[name] = float(metric.compute())
    return out | face_scores(real, real, face, torch.arange(len(real))) | {"n_images": len(real)}


def markdown_table(rows: dict[str, dict], columns: Sequence[str] = COLUMNS, key: str = "images") -> str:
    """A Markdown table with one row per entry of ``rows`` and the given metric columns (blank when absent)."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    fmt = lambda v: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [f"| {key} | " + " | ".join(cols) + " |", "|" + "---|" * (key.count("|") + 1 + len(cols))]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for name, r in rows.items()]
    return "\n".join(lines) + "\n"


def _write_results(out: Path, results: dict, title: str) -> str:
    """Write ``results`` as JSON and as a Markdown table; returns the table's text."""
    write_json(out / RESULTS_JSON, results)
    text = f"# {title}\n\n{markdown_table(results['rows'])}\n(paper rows: DreamBooth, Table 1, for scale only)\n"
    write_text(out / RESULTS_MD, text)
    return text


def _load_generated(folder: str, prompts_file: Optional[str]) -> tuple[list, list[str]]:
    """Images of ``folder`` with their prompts: from ``manifest.json`` (the sample verb's), else from each PNG's
    recorded settings (sample / evaluate-suite PNGs), else from a prompts file."""
    from ..data.images import list_images, load_rgb
    from ..prompts import read_prompt_file

    path = Path(folder)
    manifest = path / "manifest.json"
    if manifest.is_file():
        records = read_json(manifest, "sample manifest", ("images",))["images"]
        return [load_rgb(path / r["file"]) for r in records], [r["prompt"] for r in records]
    files = [f for f in list_images(path, "generated") if f.name != "contact_sheet.png"]
    if not prompts_file:
        try:
            recorded = [read_png_metadata(f)["prompt"] for f in files]
            return [load_rgb(f) for f in files], recorded
        except (ValueError, KeyError, OSError):  # not PNGs of this project: the prompts must come from a file
            pass
        raise EvaluationError(f"generated dir {folder!r} has no manifest.json: pass --prompts FILE (one prompt per "
                              "line, in file-name order, or one per group of images_per_prompt files).")
    prompts = read_prompt_file(prompts_file)
    if len(files) % len(prompts):
        raise EvaluationError(f"generated dir {folder!r} holds {len(files)} images, not a multiple of the "
                              f"{len(prompts)} prompts in {prompts_file!r}.")
    per = len(files) // len(prompts)
    return [load_rgb(f) for f in files], [p for p in prompts for _ in range(per)]


def evaluate(generated: list[str], real: str, out: str = "outputs/eval", prompts: Optional[str] = None,
             token: Optional[str] = None, clip_weights: Optional[str] = "openai", dino_weights: Optional[str] = "dino",
             device: Optional[str] = None, clip_t_prompt: ClipTPrompt = "without_identifier",
             face_weights: Optional[str] = "dlib") -> str:
    """Score folders of generated images against the subject's real photos; writes results.json and results.md.

    Args:
        generated: folders of generated images: the sample verb's (manifest.json), evaluate-suite's ``samples``
            (prompts recorded in the PNGs), or any images with ``prompts``.
        real: folder of the subject's real photos.
        out: output folder.
        prompts: text file of prompts (one per line) for folders without a manifest.
        token: identifier removed from prompts for CLIP-T (e.g. ``sks``).
        clip_weights: ``openai`` or a local ViT-B-32 checkpoint file (None: random weights, tests only).
        dino_weights: ``dino`` or a local ViT-S/16 DINO file (None: random weights, tests only).
        device: cuda, cpu (None: CUDA when available).
        clip_t_prompt: ``without_identifier`` (drop ``token`` before CLIP-T) or ``as_generated``.
        face_weights: face identity (face_sim, face_match, face_none; metrics/face.py): ``dlib`` (the installed
            face-recognition-models) or a folder with dlib's two model files (None: skipped).
    """
    from ..data.images import list_images, load_rgb

    folder = check_output_dir(out, "evaluate", ours=("results.*",))
    real_images = [load_rgb(p) for p in list_images(real, "real")]
    sets = {g: _load_generated(g, prompts) for g in generated}
    face = _face(face_weights)  # a wrong face_weights folder is named before CLIP and DINO load
    clip, dino = _embedders(clip_weights, dino_weights, device)
    rows = {g: score_subject(images, ps, real_images, token, clip, dino, clip_t_prompt=clip_t_prompt, face=face)
            for g, (images, ps) in sets.items()}
    rows["real images"] = real_baseline(real_images, clip, dino, face)
    settings = dict(real=real, token=token, clip_t_prompt=clip_t_prompt, clip_weights=clip_weights,
                    dino_weights=dino_weights, face_weights=face_weights)
    return _write_results(folder, {"settings": settings, "rows": rows | PAPER_ROWS}, "Evaluation")


def _suite_samples(folder: Path, jobs: list[tuple[str, int]], settings: dict, pipe_args: dict) -> list:
    """The PNG of every (prompt, seed) in ``folder``, generating only the missing ones (resumable)."""
    from tqdm.auto import tqdm

    files = [folder / f"{k:04d}_s{seed}.png" for k, (_, seed) in enumerate(jobs)]
    for f, (prompt, seed) in zip(files, jobs):
        if f.is_file():
            meta = read_png_metadata(f)
            if {k: meta.get(k) for k in settings} != settings or meta.get("prompt") != prompt:
                raise EvaluationError(f"{str(f)!r} was generated with other settings or prompt than this run: "
                                      "choose a new --out, or delete that folder to regenerate.")
    todo = [k for k, f in enumerate(files) if not f.is_file()]
    if todo:
        from ..sampling import generate, load_pipeline
        from ..token_files import prompt_rewriter

        rewrite = prompt_rewriter(pipe_args.get("embeddings", ()))  # pivotal tuning: identifier -> new tokens
        pipe = load_pipeline(**pipe_args)
        with tqdm(total=len(todo), desc=f"samples -> {folder}") as bar:
            for start in range(0, len(todo), 4):
                chunk = todo[start:start + 4]
                images = generate(pipe, [rewrite(jobs[k][0]) for k in chunk], [jobs[k][1] for k in chunk],
                                  settings["steps"], settings["guidance"], settings["negative_prompt"],
                                  settings["resolution"], settings["resolution"], batch_size=4)
                for k, img in zip(chunk, images):  # written one by one: a kill keeps every finished sample
                    # the sample verb's metadata too, so ``sample --from_png`` redraws any of these images
                    meta = dict(settings, vae=None, loras=[[f, w] for f, w in pipe_args["loras"]],
                                dtype=pipe_args["dtype"], height=img.height, width=img.width)
                    write_png(files[k], img, dict(meta, prompt=jobs[k][0], seed=jobs[k][1]))
                bar.update(len(chunk))
    return files


def evaluate_suite(lora: str, base: str, instance_dir: str, token: str, class_name: str, out: str,
                   suite: str = "dreambench_object", num_prompts: Optional[int] = None, images_per_prompt: int = 4,
                   sampler: SamplerSettings = SAMPLER, resolution: Optional[int] = None,
                   clip_weights: Optional[str] = "openai", dino_weights: Optional[str] = "dino", seed: int = 0,
                   pres_images: int = 8, dtype: Optional[str] = None, device: Optional[str] = None,
                   clip_t_prompt: ClipTPrompt = "without_identifier", class_prompt: Optional[str] = None,
                   drift: bool = False, face_weights: Optional[str] = "dlib",
                   embeddings: Optional[list[str]] = None) -> dict:
    """The paper's protocol for one LoRA: generate a prompt suite (resumable), score it, add the real-images row.

    Args:
        lora: the trained LoRA file (diffusers or kohya format).
        base: SDXL pipeline folder or hub id it was trained on.
        instance_dir: the subject's real photos.
        token: identifier token (fills ``{token}``; removed for CLIP-T).
        class_name: class noun (fills ``{class}``; PRES prompt "a <class_name>").
        out: output folder (samples in ``out/samples``, ``out/samples_class``; results.json, results.md).
        suite: prompt suite (paper: dreambench_object or dreambench_live, 25 prompts each).
        num_prompts: first N prompts of the suite (None: all).
        images_per_prompt: images per prompt (paper: 4).
        sampler: scheduler (``sampling.SCHEDULERS``), steps, guidance and negative prompt (``--sampler.steps 30``;
            sampling.SamplerSettings).
        resolution: square side in pixels (None: the base's native size).
        clip_weights: ``openai`` or a local CLIP ViT-B-32 file (None: random, tests only).
        dino_weights: ``dino`` or a local DINO ViT-S/16 file (None: random, tests only).
        seed: image k of the suite uses seed ``seed + k``; the PRES samples continue after them.
        pres_images: samples of "a <class_name>" for PRES (0: skip PRES).
        dtype: float16 / bfloat16 / float32 (None: float16 on CUDA, float32 on CPU).
        device: cuda, cpu (None: CUDA when available).
        clip_t_prompt: ``without_identifier`` (drop ``token`` before CLIP-T) or ``as_generated``.
        class_prompt: prompt of the PRES samples (None: "a <class_name>").
        drift: also draw the PRES prompts and seeds with the base alone and report language drift
            (``metrics.pixel.drift_scores``); ``pixel_dist`` (nearest real photo) is always reported.
        face_weights: face identity (face_sim, face_match, face_none; metrics/face.py): ``dlib`` (the installed
            face-recognition-models) or a folder with dlib's two model files (None: skipped).
        embeddings: pivotal tuning's token-embedding files, loaded into both text encoders (each replaces its
            identifier in the prompts with its tokens; token_files.py). None: the ``*_emb.safetensors`` beside
            ``lora``; [] for none.
    """
    import torch

    from ..data.images import list_images, load_rgb
    from ..metrics.pixel import drift_scores, nearest_pixel_distance
    from ..prompts import get_suite

    if not Path(lora).is_file():
        raise EvaluationError(f"LoRA file {lora!r} does not exist: give the .safetensors that fit exported.")
    if images_per_prompt < 1 or (num_prompts is not None and num_prompts < 1) or pres_images < 0:
        raise EvaluationError("images_per_prompt and num_prompts must be >= 1 and pres_images >= 0.")
    real_images = [load_rgb(p) for p in list_images(instance_dir, "instance")]
    face = _face(face_weights)  # a wrong face_weights folder is named before any sample is drawn
    prompts = get_suite(suite, token, class_name)[:num_prompts]
    jobs = [(p, seed + i * images_per_prompt + j) for i, p in enumerate(prompts) for j in range(images_per_prompt)]
    class_jobs = [(class_prompt or f"a {class_name}", seed + len(jobs) + j) for j in range(pres_images)]
    folder = check_output_dir(out, "evaluate-suite", ours=("results.*", "samples*"))
    from ..token_files import beside

    embeddings = [str(Path(e).resolve()) for e in (beside(lora) if embeddings is None else embeddings)]
    settings = dict(lora=str(Path(lora).resolve()), base=base, **dataclasses.asdict(sampler),
                    resolution=resolution, **({"embeddings": embeddings} if embeddings else {}))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    pipe_args = dict(base=base, loras=[(lora, 1.0)], scheduler=sampler.scheduler, device=device,
                     dtype=dtype or ("float16" if cuda else "float32"), embeddings=embeddings)
    files = _suite_samples(ensure_writable(folder / "samples"), jobs, settings, pipe_args)
    class_files = _suite_samples(ensure_writable(folder / "samples_class"), class_jobs, settings, pipe_args)
    clip, dino = _embedders(clip_weights, dino_weights, device)
    images, class_images = [load_rgb(f) for f in files], [load_rgb(f) for f in class_files]
    row = score_subject(images, [p for p, _ in jobs], real_images, token, clip, dino, class_images or None,
                        clip_t_prompt, face) | {"pixel_dist": nearest_pixel_distance(images, real_images)}
    if drift and class_jobs:
        base_settings = {k: v for k, v in settings.items() if k != "embeddings"} | {"lora": None}
        base_files = _suite_samples(ensure_writable(folder / "samples_class_base"), class_jobs, base_settings,
                                    dict(pipe_args, loras=[], embeddings=[]))
        row |= drift_scores(class_images, [load_rgb(f) for f in base_files], dino)
    baseline = real_baseline(real_images, clip, dino, face)
    results = {"settings": dict(settings, suite=suite, num_prompts=len(prompts), images_per_prompt=images_per_prompt,
                                token=token, clip_t_prompt=clip_t_prompt, class_name=class_name,
                                class_prompt=class_jobs[0][0] if class_jobs else None, drift=drift,
                                instance_dir=instance_dir, seed=seed, clip_weights=clip_weights,
                                dino_weights=dino_weights, face_weights=face_weights),
               "rows": {Path(lora).name: row, "real images": baseline} | PAPER_ROWS}
    _write_results(folder, results, f"DreamBench evaluation of {Path(lora).name}")
    return row | {f"real_{k}": v for k, v in baseline.items() if k != "n_images"}


def _run_prior(lora: str) -> Optional[bool]:
    """``data.priors.enabled`` of the fit run that wrote ``lora`` (its config.yaml), if found."""
    from ..runs import RunDir

    run = RunDir.holding(lora)
    if run is None:
        return None
    from ..moved_keys import nest_hparams

    data = nest_hparams(run.config().get("data") or {}, "data")  # a run from before the data groups too
    return (data.get("priors") or {}).get("enabled")


def compare_runs(evals: list[str], out: Optional[str] = None) -> str:
    """The original project's table (scheduler x steps x prior -> CLIP-I, CLIP-T, DINO, face) of evaluate-suite runs.

    Args:
        evals: ``out`` folders of evaluate-suite runs (each holds results.json).
        out: where to write compare.md and compare.json (None: print only).
    """
    rows = []
    for e in evals:
        path = Path(e) / RESULTS_JSON
        if not path.is_file():
            raise EvaluationError(f"{str(path)!r} does not exist: pass folders that evaluate-suite wrote.")
        res = read_json(path, "evaluate-suite results", ("settings", "rows"))
        s = res["settings"]
        scores = res["rows"][Path(s["lora"]).name]
        prior = _run_prior(s["lora"])
        rows.append({"scheduler": s["scheduler"], "steps": s["steps"], "prior": "?" if prior is None else prior,
                     "lora": s["lora"], **{k: scores.get(k) for k in ("clip_i", "clip_t", "dino")},
                     **{k: scores[k] for k in FACE_COLUMNS if k in scores}})  # a subject without a face has none
    rows.sort(key=lambda r: (r["scheduler"], r["steps"], str(r["prior"])))
    table = markdown_table({f"{r['scheduler']} | {r['steps']} | {r['prior']}": r for r in rows},
                           ("clip_i", "clip_t", "dino", *FACE_COLUMNS), key="scheduler | steps | prior")
    if out:
        folder = check_output_dir(out, "compare-runs", ours=("compare.*",))
        write_json(folder / "compare.json", rows)
        write_text(folder / "compare.md", table)
    return table
