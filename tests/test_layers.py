"""The package's import layers: no module imports (at the top or inside a function) from a layer above its own, so
there is no import loop and each room can be read without the rooms above it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "dreambooth_pl"

# lowest first; a name stands for a module or a whole subpackage (the longest name that matches wins)
LAYERS = [
    ["io", "console", "config_guard", "prefetch", "prompts", "noise", "loss", "geglu_kernel", "group_norm_kernel",
     "block_ops", "fused_norms", "ema", "optimizers", "triton_launch",
     "perf", "graphs", "fused_lora", "metrics", "checkpoint_io", "argv", "devices", "__init__", "sampler_settings",
     "zero_negative", "plain_attention", "base_handoff", "fp8_quant_kernel", "fp8_gemm", "fp8_block",
     "adapter.__init__", "adapter"],  # the adapter package itself holds only the LoRA file's name
    ["moved_keys", "sdxl", "adapter.maths", "pivotal", "token_files", "kernel_warmup"],
    ["adapter.kinds", "bases"],
    ["adapter.value"],
    ["adapter.base", "adapter.diffusers_layout", "adapter.kohya_layout"],
    ["adapter.files", "adapter.checkpoint", "adapter.apply"],
    ["sampling", "runs", "settings", "prior_defaults"],
    ["data", "memory_plan", "quant", "draw_speedups", "prior_sampler", "validation"],
    ["module", "model_setup", "callbacks"],
    ["cli"],
    ["tools"],
    ["__main__"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _name(path: Path) -> str:
    """``adapter.files`` for dreambooth_pl/adapter/files.py."""
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _level(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LEVEL:
            return LEVEL[".".join(parts[:n])]
    raise AssertionError(f"dreambooth_pl.{module} is in no layer of tests/test_layers.py: add it to LAYERS, above "
                         "every module it imports and below every module that imports it.")


def _imports(path: Path) -> set[str]:
    """The package modules ``path`` imports, as names relative to the package."""
    here = _name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else list(package)
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif (node.module or "").startswith("dreambooth_pl"):
                target = node.module.removeprefix("dreambooth_pl").lstrip(".")
            else:
                continue
            for alias in node.names:  # "from . import kinds" imports the module kinds
                sub = f"{target}.{alias.name}" if target else alias.name
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() or (ROOT / sub).is_dir()
                out.add(sub if is_module else target)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("dreambooth_pl").lstrip(".") for a in node.names
                    if a.name.startswith("dreambooth_pl")}
    return {m for m in out if m}


def test_no_module_imports_from_a_layer_above_it():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _name(path)
        for target in _imports(path):
            if _level(target) > _level(me):
                wrong.append(f"{me} (layer {_level(me)}) imports {target} (layer {_level(target)})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_table_names_only_modules_that_exist():
    for name in LEVEL:
        assert (ROOT / name.replace(".", "/")).with_suffix(".py").exists() or (ROOT / name).is_dir(), name
