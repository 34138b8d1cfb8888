"""``python -m dreambooth_pl VERB``: Trainer verbs go to LightningCLI, every other verb to a typed function."""
from __future__ import annotations

import importlib
import sys

TRAINER_VERBS = ("fit", "validate", "test", "predict")
# verb -> "module:function"; each function's typed signature and docstring are its command line (jsonargparse).
COMMANDS = {
    "make-base": "dreambooth_pl.bases:make_base",
    "make-procedural": "dreambooth_pl.tools.procedural:make_procedural",
    "benchmark": "dreambooth_pl.tools.benchmark:benchmark",
    "ablate": "dreambooth_pl.tools.ablate:ablate",
    "fit-many": "dreambooth_pl.tools.fit_many:fit_many",
    "ablate-checkpoints": "dreambooth_pl.tools.checkpoint_curve:ablate_checkpoints",
    "check-token": "dreambooth_pl.tools.check_token:check_token",
    "buckets": "dreambooth_pl.tools.buckets:buckets",
    "generate-class-images": "dreambooth_pl.tools.generate_class_images:generate_class_images",
    "sample": "dreambooth_pl.tools.sample:sample",
    "list-suites": "dreambooth_pl.tools.sample:suites",
    "export": "dreambooth_pl.tools.export:export",
    "merge": "dreambooth_pl.tools.merge:merge",
    "merge-eval": "dreambooth_pl.tools.merge_eval:merge_eval",
    "evaluate": "dreambooth_pl.tools.evaluate:evaluate",
    "evaluate-suite": "dreambooth_pl.tools.evaluate:evaluate_suite",
    "compare-runs": "dreambooth_pl.tools.evaluate:compare_runs",
}

# Ray drivers: their fits and evaluations run in child processes and workers, so the driver imports neither torch
# nor diffusers (about 3 s at each start, Ray's overhead on a grid: issue 25)
RAY_DRIVERS = {"ablate", "fit-many"}
# verbs whose required arguments are positional (``check-token rraj``); the others take --name value only.
POSITIONAL = {"check-token", "fit-many"}
# verbs whose leading arguments fill one list parameter (``merge A.safetensors:1.0 B.safetensors:0.8 --out C``);
# every list option also takes its values space-separated (``evaluate --generated A B``): argv.gather_lists.
LEADING_LIST = {"merge": "loras", "evaluate": "generated", "compare-runs": "evals", "buckets": "configs"}


def _usage() -> str:
    verbs = ", ".join(TRAINER_VERBS + tuple(COMMANDS))
    return f"usage: python -m dreambooth_pl VERB [--help]\nverbs: {verbs}"


def main(argv: list[str] | None = None) -> None:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to the verb it names."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    verb, rest = argv[0], argv[1:]
    # not for the Ray drivers (they load no model) nor the benchmark: its end-to-end arms time child processes from
    # their own start, which a prefetch in the parent would give a head start
    if verb not in RAY_DRIVERS and verb != "benchmark":
        from .prefetch import start

        start()  # the CUDA libraries into the page cache while the imports run (prefetch.py)
    from .console import quiet_third_party

    # before anything imports peft, which imports bitsandbytes, which logs at import; the Ray drivers load no model
    quiet_third_party(models=verb not in RAY_DRIVERS)
    if verb in TRAINER_VERBS:
        from .cli import DreamBoothCLI

        DreamBoothCLI(args=None if from_shell else [verb, *rest])
        return
    if verb not in COMMANDS:
        raise SystemExit(f"unknown verb {verb!r}\n{_usage()}")
    from jsonargparse import CLI

    from .argv import gather_lists
    from .config_guard import install
    from .moved_keys import check_moved_options

    check_moved_options(verb, rest)  # an old option: name the new one, not "unrecognized arguments"
    install()  # the allowlist on every import a value names, for every verb
    module, name = COMMANDS[verb].split(":")
    func = getattr(importlib.import_module(module), name)
    rest = gather_lists(func, rest, LEADING_LIST.get(verb))
    result = CLI(func, args=rest, as_positional=verb in POSITIONAL)
    if result is not None:
        print(result)


def _shell() -> None:
    """Run :func:`main`; input and config errors print as their message (which names the fix), not a traceback.

    ``ValueError`` and ``OSError`` are what our checks raise for bad input (unknown keys, bad values, missing or
    unreadable files, offline models); set ``DREAMBOOTH_PL_TRACEBACK=1`` to see the full traceback instead.
    """
    import os

    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        from .metrics.embedders import EmbedderWeightsError
        from .sdxl import BaseModelError

        expected = isinstance(e, (ValueError, OSError, BaseModelError, EmbedderWeightsError))
        if not expected or os.environ.get("DREAMBOOTH_PL_TRACEBACK"):
            raise
        raise SystemExit(f"error: {e}\n(set DREAMBOOTH_PL_TRACEBACK=1 for the traceback)") from None


if __name__ == "__main__":
    _shell()
