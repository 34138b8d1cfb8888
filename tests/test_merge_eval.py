"""merge-eval: the sweep really mixes the style in (weight 0 = subject alone), writes table, plot, grid, resumes."""
from __future__ import annotations

import json
import math

import numpy as np
import torch
from conftest import write_images
from PIL import Image
from test_merge import adapters  # noqa: F401  (a fixture: subject + style LoRA files on the tiny base)

from dreambooth_pl.sampling import SamplerSettings
from dreambooth_pl.tools.merge_eval import merge_eval

PROMPT = "pixel art, a photo of sks dog"


def test_sweep_scores_plots_and_resumes(tiny_base, adapters, tmp_path):  # noqa: F811
    from dreambooth_pl.sampling import generate, load_pipeline

    inst, style = tmp_path / "instance", tmp_path / "style_refs"
    write_images(inst, 1, size=(64, 64), seed=1)
    write_images(style, 1, size=(64, 64), seed=2)
    out = tmp_path / "eval"
    kw = dict(prompt=PROMPT, style_text="pixel art", style_dir=str(style), token="sks", images_per_weight=1,
              sampler=SamplerSettings(steps=2), resolution=64, dtype="float32", device="cpu", clip_weights=None,
              dino_weights=None)
    torch.manual_seed(0)  # clip/dino weights None: seeded random embedders
    result = merge_eval(adapters[0], adapters[1], tiny_base, str(inst), str(out), style_weights=[0.0, 1.0], **kw)
    rows = result["rows"]
    assert [r["style_weight"] for r in rows] == [0.0, 1.0]
    for r in rows:
        assert set(r) == {"style_weight", "dino", "clip_i", "style_clip_t", "style_clip_i"}
        assert all(math.isfinite(v) and -1 <= v <= 1 for v in r.values() if v != r["style_weight"])
    # weight 0 is the subject alone: the generation API with only the subject LoRA gives the same pixels
    alone = generate(load_pipeline(tiny_base, [(adapters[0], 1.0)], dtype="float32", device="cpu"),
                     [PROMPT], [0], steps=2, height=64, width=64)
    (image_dir,) = (out / "images").iterdir()  # one settings hash
    at = {w: [np.asarray(Image.open(image_dir / f"style{w}_seed0.png"), dtype=np.int16)]
          for w in ("0", "1")}
    assert max(np.abs(a - np.asarray(b, dtype=np.int16)).max() for a, b in zip(at["0"], alone)) <= 1
    assert max(np.abs(a - b).max() for a, b in zip(at["0"], at["1"])) > 8  # the style changes the images
    assert json.loads((out / "merge_eval.json").read_text())["rows"] == rows
    assert "| style_weight | dino | clip_i | style_clip_t | style_clip_i |" in (out / "merge_eval.md").read_text()
    assert Image.open(out / "merge_eval.png").size[0] > 300
    assert Image.open(out / "grid.png").height >= 2 * 64
    # a rerun with one more weight samples only that one; finished sweep points are reused
    before = {p.name: p.stat().st_mtime_ns for p in image_dir.iterdir()}
    again = merge_eval(adapters[0], adapters[1], tiny_base, str(inst), str(out), style_weights=[0.0, 0.5, 1.0],
                       **kw)
    assert {p.name: p.stat().st_mtime_ns for p in image_dir.iterdir() if p.name in before} == before
    assert len(list(image_dir.iterdir())) == 3
    assert again["rows"][0] == rows[0] and again["rows"][2] == rows[1]  # scores kept, not recomputed
    assert again["rows"][1]["style_weight"] == 0.5 and math.isfinite(again["rows"][1]["dino"])
