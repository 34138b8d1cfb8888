"""Tables and plots of an ablation: results.csv, results.md (with the image grid of every cell), PNG plots.

Rows are flat dicts, one per (run, sampler): ``run``, ``status``, the varied override keys, ``scheduler``,
``sample_steps``, the metrics ``evaluate_suite`` returned (``clip_i``, ``clip_t``, ``dino``, ...), ``eval_dir``.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional, Sequence

from ..io import write_bytes

METRIC_ORDER = ("clip_i", "clip_t", "dino", "face_sim", "face_match", "face_none", "div_dino", "pres", "pixel_dist",
                "drift_pixel", "drift_dino")
META = ("run", "status", "error", "scheduler", "sample_steps", "eval_dir", "eval_error", "grid", "step", "lora")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
CELL_GRID = "cell_grid.jpg"


def metric_keys(rows: Sequence[dict], varied: Sequence[str]) -> list[str]:
    """Numeric columns that are metrics (not overrides or bookkeeping), the DreamBooth trio first."""
    keys = {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in META and k not in varied and k != "seconds"}
    return [k for k in METRIC_ORDER if k in keys] + sorted(keys - set(METRIC_ORDER))


def columns(rows: Sequence[dict], varied: Sequence[str]) -> list[str]:
    metrics = metric_keys(rows, varied)
    lead = ["run", "status", *varied, "step", "scheduler", "sample_steps", *metrics]
    present = {k for r in rows for k in r}
    cols = [k for k in dict.fromkeys(lead) if k in present or k in ("run", "status", *varied)]
    return cols + sorted(present - set(cols))


def cell_grid(eval_dir: Optional[str], max_images: int = 16, thumb: int = 128) -> Optional[Path]:
    """The evaluation's image grid: a ``*grid*`` image it wrote, else a contact sheet of its images (cached)."""
    if not eval_dir or not Path(eval_dir).is_dir():
        return None
    root = Path(eval_dir) / "samples" if (Path(eval_dir) / "samples").is_dir() else Path(eval_dir)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.name != CELL_GRID)
    made = [p for p in images if "grid" in p.name.lower()]
    if made:
        return made[0]
    if not images:
        return None
    out = Path(eval_dir) / CELL_GRID
    if out.is_file() and out.stat().st_mtime >= max(p.stat().st_mtime for p in images):
        return out
    from PIL import Image

    images = images[:max_images]
    cols = min(4, len(images))
    sheet = Image.new("RGB", (cols * thumb, math.ceil(len(images) / cols) * thumb), "white")
    for i, p in enumerate(images):
        with Image.open(p) as im:
            sheet.paste(im.convert("RGB").resize((thumb, thumb)), ((i % cols) * thumb, (i // cols) * thumb))
    buf = io.BytesIO()
    sheet.save(buf, format="JPEG", quality=85)
    return write_bytes(out, buf.getvalue())


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"  # significant digits: a grid's learning rate 5e-05 printed as 0.0001 with .4f
    return str(v).replace("|", "\\|").replace("\n", " ")


def write_csv(rows: Sequence[dict], path: Path, cols: Sequence[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return write_bytes(path, buf.getvalue().encode())


def write_markdown(rows: Sequence[dict], path: Path, cols: Sequence[str], plots: Sequence[Path], title: str) -> Path:
    """A table with one line per row and the cell's image grid embedded (click for full size), then the plots."""
    shown = [c for c in cols if c not in ("eval_dir", "grid", "lora")]
    lines = [f"# {title}", "", "| " + " | ".join(shown + ["images"]) + " |", "|" + "---|" * (len(shown) + 1)]
    for r in rows:
        img = ""
        if r.get("grid"):
            rel = os.path.relpath(r["grid"], path.parent)
            img = f'<a href="{rel}"><img src="{rel}" width="160"></a>'
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in shown) + f" | {img} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({os.path.relpath(p, path.parent)})" for p in plots]
    return write_bytes(path, ("\n".join(lines) + "\n").encode())


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_axis(rows: Sequence[dict], axis: str, others: Sequence[str], metrics: Sequence[str], path: Path) -> Path:
    """Metric vs ``axis``: lines when it is numeric (steps, photos, rank), grouped bars otherwise (prior on/off
    side by side); one series per combination of the ``others`` axes; one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(_is_number(r[axis]) for r in rows)
    groups: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={r.get(k)}" for k in others) or "all"
        for m in metrics:
            if _is_number(r.get(m)):
                groups[(label, m)][r[axis]].append(float(r[m]))
    labels = list(dict.fromkeys(label for label, _ in groups))
    values = sorted({r[axis] for r in rows}, key=lambda v: (str(type(v)), v))
    height = 3.6 if numeric else 3.6 + 0.25 * len(others)  # room for the stacked tick labels of the bar groups
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), height), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        width = 0.8 / max(1, len(values))
        for li, label in enumerate(labels):
            pts = groups.get((label, m), {})
            if numeric:
                xs = sorted(pts)
                ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=label)
            else:
                for vi, v in enumerate(values):
                    if v in pts:
                        ax.bar(li + (vi - (len(values) - 1) / 2) * width, sum(pts[v]) / len(pts[v]), width,
                               color=f"C{vi}", label=f"{axis.rsplit('.', 1)[-1]}={v}" if li == 0 else None)
        if not numeric:
            ax.set_xticks(range(len(labels)), [lb.replace(", ", "\n") for lb in labels], rotation=90, fontsize=6)
        ax.set_xlabel(axis if numeric else "")
        ax.set_title(m)
        ax.grid(alpha=0.3)
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, names, loc="upper center", ncol=min(4, len(names)), fontsize=7,
                   bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def write_plots(rows: Sequence[dict], out: Path, varied: Sequence[str], metrics: Sequence[str]) -> list[Path]:
    """One PNG per axis that takes at least two values among the evaluated rows."""
    rows = [r for r in rows if any(_is_number(r.get(m)) for m in metrics)]
    axes = [k for k in (*varied, "step", "scheduler", "sample_steps")
            if len({json.dumps(r.get(k), default=str) for r in rows}) > 1]
    paths = []
    for axis in axes:
        usable = [r for r in rows if r.get(axis) is not None]
        name = re.sub(r"[^A-Za-z0-9_]+", "_", axis)
        paths.append(plot_axis(usable, axis, [k for k in axes if k != axis], metrics, out / f"plot_{name}.png"))
    return paths


def write_report(rows: list[dict], out: Path, varied: Sequence[str], title: str = "Ablation",
                 stem: str = "results") -> dict[str, Path]:
    """Write ``{stem}.csv``, ``{stem}.md`` and the plots into ``out``; rows get a ``grid`` image path."""
    for r in rows:
        grid = cell_grid(r.get("eval_dir"))
        r["grid"] = str(grid) if grid else None
    cols = columns(rows, varied)
    # the real-photos baseline and image counts are the same in every cell: tabulated, not plotted
    plotted = [m for m in metric_keys(rows, varied) if not m.startswith("real_") and m != "n_images"]
    plots = write_plots(rows, out, varied, plotted)
    return {"csv": write_csv(rows, out / f"{stem}.csv", cols),
            "md": write_markdown(rows, out / f"{stem}.md", cols, plots, title), "plots": plots}
