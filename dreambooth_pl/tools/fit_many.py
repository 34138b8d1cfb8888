"""``fit-many SUBJECTS.yaml``: one LoRA per subject on top of one fit config, on Ray, with shared class priors.

A subjects file names the fit config(s), the output folder and the subjects (photos folder, identifier, class,
optional per-subject overrides); ``configs/subjects/example.yaml`` is one. Each subject is one fit job
(tools/jobs.py) in ``OUT/runs/NAME``. The class priors of one (base, VAE, class prompt, sampler settings,
resolution, count) are drawn once, by one upstream task, into ``OUT/priors/<class>-<hash>``, and every subject of
that class trains on them: no two tasks write the same prior folder. ``OUT/results.csv`` and ``results.md`` list
every subject with its status, error and log, and LoRA.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..io import write_text
from ..runs import RunDir, fit_command
from .jobs import FitJob, Task, read_status, run_jobs


@dataclass
class Subject:
    """One subject to teach.

    Args:
        name: its run folder's name (``OUT/runs/NAME``).
        photos: folder of its photos (``data.photos.dir``).
        identifier: the rare token that names it, e.g. ``rraj``.
        class_name: its class, e.g. ``person``.
        overrides: ``key: value`` fit settings for this subject only.
    """

    name: str
    photos: str
    identifier: str
    class_name: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class SubjectList:
    """A subjects file.

    Args:
        base_config: fit config file(s) every subject starts from.
        out: output folder.
        subjects: the subjects.
        overrides: ``key: value`` fit settings for every subject.
        instance_prompt: template of ``data.photos.prompt`` (``{identifier}``, ``{class_name}``).
        class_prompt: template of ``data.priors.prompt`` (``{class_name}``).
    """

    base_config: list[str]
    out: str
    subjects: list[Subject]
    overrides: dict[str, Any] = field(default_factory=dict)
    instance_prompt: str = "a photo of {identifier} {class_name}"
    class_prompt: str = "a photo of {class_name}"


def load_subjects(path: str) -> SubjectList:
    """Parse and type-check a subjects file; errors name the file and the key."""
    from .typed_yaml import load_typed

    def listed(raw: dict) -> None:
        if isinstance(raw.get("base_config"), str):
            raw["base_config"] = [raw["base_config"]]

    spec = load_typed(path, SubjectList, "fit-many", "subjects file", "configs/subjects/example.yaml", listed)
    names = [s.name for s in spec.subjects]
    twice = sorted({n for n in names if names.count(n) > 1})
    if not spec.subjects or twice or any(not re.fullmatch(r"[\w.=-]+", n) for n in names):
        raise SystemExit(f"fit-many: {path!r} needs subjects with unique names of letters, digits, '_', '-', '.' "
                         f"(repeated: {twice}).")
    from ..moved_keys import MovedKeyError, check_moved_keys

    try:  # every subject's fit would stop on it: say so once, naming this file
        check_moved_keys({**spec.overrides, **{k: v for s in spec.subjects for k, v in s.overrides.items()}},
                         f"subjects file {path!r}")
    except MovedKeyError as e:
        raise SystemExit(f"fit-many: {e}") from None
    return spec


def nested(dotted: dict[str, Any]) -> dict:
    """``{"model.lora.rank": 8}`` as ``{"model": {"lora": {"rank": 8}}}`` (a fit config fragment)."""
    out: dict = {}
    for key, value in dotted.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def prior_key(cfg: dict) -> Optional[dict]:
    """What a subject's class priors depend on (None without prior preservation): equal keys share one folder."""
    data, model = cfg.get("data") or {}, cfg.get("model") or {}
    priors = data.get("priors") or {}
    if not priors.get("enabled"):
        return None
    settings = dict(priors.get("generation") or {})
    if settings.get("resolution") is None:
        settings["resolution"] = data.get("resolution")  # as the DataModule draws them
    return {"base": model.get("base_model"), "vae": model.get("vae_model"), "prompt": priors.get("prompt"),
            "num": priors.get("num_images"), "settings": settings}


def prior_folder(out: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    slug = re.sub(r"[^\w]+", "-", str(key["prompt"])).strip("-")[:40] or "class"
    return out / "priors" / f"{slug}-{digest}"


def draw_priors(key: dict, folder: str) -> str:
    """Ray task body: draw the class priors of ``key`` into ``folder`` (resumable; the only writer of it)."""
    from ..data.class_images import ClassImageSettings, as_class_image_settings, draw_class_images

    fields = {f.name for f in dataclasses.fields(ClassImageSettings)}
    settings = as_class_image_settings({k: v for k, v in key["settings"].items() if k in fields})
    report = draw_class_images(key["base"], key["prompt"], folder, key["num"], settings, "float16", None,
                               key["vae"], progress=False)
    print(f"[fit-many] class priors {folder}: {report}", flush=True)
    return folder


def subject_jobs(spec: SubjectList) -> tuple[list[FitJob], dict[str, Task], dict[str, str]]:
    """The subjects' fit jobs, one prior task per distinct prior key, and which task each subject waits for."""
    from ..cli import read_fit_config

    out = Path(spec.out)
    jobs, priors, needs = [], {}, {}
    for s in spec.subjects:
        values = {"class_name": s.class_name, "identifier": s.identifier}
        dotted = {**spec.overrides, "data.photos.dir": s.photos,
                  "data.photos.prompt": spec.instance_prompt.format(**values),
                  "data.priors.prompt": spec.class_prompt.format(**values), **s.overrides}
        config = out / "subjects" / f"{s.name}.yaml"
        write_text(config, json.dumps(nested(dotted), indent=1))  # JSON is YAML: a config fragment
        key = prior_key(read_fit_config(*spec.base_config, str(config)))
        if key is not None and "data.priors.dir" not in s.overrides:  # a subject's own class_dir is its own
            folder = prior_folder(out, key)
            priors.setdefault(folder.name, Task(f"priors {folder.name}", draw_priors, (key, str(folder))))
            needs[s.name] = folder.name
            dotted.update({"data.priors.dir": str(folder), "data.priors.generate": False})
            write_text(config, json.dumps(nested(dotted), indent=1))
        run = RunDir(out / "runs" / s.name)
        jobs.append(FitJob(s.name, run, fit_command([*spec.base_config, str(config)], None, run),
                           out / "logs" / f"{s.name}.log",
                           info={"identifier": s.identifier, "class_name": s.class_name,
                                 "priors": dotted.get("data.priors.dir")}))
    return jobs, priors, needs


def fit_many(subjects: str, address: Optional[str] = None, workers: Optional[int] = None,
             retries: int = 2) -> str:
    """Train one LoRA per subject of a subjects file on Ray; write ``OUT/results.csv`` and ``results.md``.

    Args:
        subjects: the subjects file, e.g. ``configs/subjects/example.yaml``.
        address: Ray cluster (``auto``, ``ray://host:10001``); None: a local Ray started and stopped here.
        workers: subjects at once on a machine without GPUs (None: 1); with GPUs one subject per GPU.
        retries: how often a subject whose fit process died is retried, resuming from its ``last.ckpt``.
    """
    from .ablation_report import write_report

    spec = load_subjects(subjects)
    jobs, priors, needs = subject_jobs(spec)
    run_jobs(jobs, address, workers, retries, priors, needs, title=f"fit-many {Path(subjects).stem}")
    rows = []
    for job in jobs:
        state = read_status(job.run)
        rows.append({"run": job.name, "status": state.get("status", "not run"), "error": state.get("error"),
                     "class_name": job.info["class_name"], "identifier": job.info["identifier"],
                     "lora": state.get("lora"), "priors": job.info["priors"], "seconds": state.get("seconds"),
                     "log": str(job.log)})
    paths = write_report(rows, Path(spec.out), [], title=f"fit-many {Path(subjects).stem}")
    failed = [r["run"] for r in rows if r["status"] != "done"]
    return (f"{len(rows)} subject(s), {len(priors)} class-prior folder(s), {len(failed)} not done {failed}; "
            f"report: {paths['md']}")
