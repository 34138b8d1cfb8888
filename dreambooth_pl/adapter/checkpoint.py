"""The adapter a DreamBoothLoRA Lightning checkpoint holds, of any kind, as an :class:`~.value.Adapter`."""
from __future__ import annotations

import re

import torch

from ..io import load_checkpoint
from ..moved_keys import nest_hparams
from ..token_files import ROWS_KEY
from .kinds import KINDS
from .value import COMPONENTS, Adapter, AdapterFormatError, check_keys, check_values, on_disk_name

_PARAM = "|".join(sorted({re.escape(p.split(".")[0]) for k in KINDS.values() for p in k.params}, key=len,
                         reverse=True))
_ADAPTER_KEY = re.compile(rf"^(?P<module>.+)\.(?P<param>{_PARAM})\.(?P<adapter>[^.]+)(?P<weight>\.weight)?$")


def check_adapter_keys(expected: set[str], got: set[str]) -> None:
    """Refuse a checkpoint whose adapter keys differ from the model's, naming the first difference and the fix."""
    if expected != got:
        extra, missing = sorted(got - expected), sorted(expected - got)
        first = f"unexpected key {extra[0]!r} " if extra else f"missing key {missing[0]!r} "
        raise ValueError(f"checkpoint does not match this model's adapters: {first}({len(extra)} unexpected, "
                         f"{len(missing)} missing). Resume with the config the checkpoint was trained with (its "
                         "run's config.yaml).")


def exported_state(ckpt: dict, ema: dict) -> dict:
    """The weights a checkpoint's run exports: its EMA (``ema.decay`` with ``ema.export``) or its state_dict.

    Args:
        ckpt: the loaded checkpoint.
        ema: its ``ema`` hyper-parameters (settings.EmaSettings as a dict).
    """
    if ema.get("decay") is not None and ema.get("export", True) and "ema" in ckpt:
        return ckpt["ema"]["shadow"]
    return ckpt["state_dict"]


def read_checkpoint(path: str, adapter_name: str = "default") -> Adapter:
    """The adapters of a DreamBoothLoRA checkpoint (its EMA weights when the run exported those); alpha from its
    ``lora.alpha`` (None: the rank).

    Args:
        path: ``.ckpt`` written by the ``checkpoint`` callback (or ``last.ckpt``).
        adapter_name: the peft adapter name inside the checkpoint.
    """
    ckpt = load_checkpoint(path)
    if "state_dict" not in ckpt:
        raise AdapterFormatError(f"{path}: no 'state_dict' entry, not a Lightning checkpoint.")
    hp = nest_hparams(ckpt.get("hyper_parameters") or {})  # grouped, or flat from before settings.py
    settings, ema = hp.get("lora", {}), hp.get("ema", {})
    kind = settings.get("adapter", "lora")
    if kind not in KINDS:
        raise AdapterFormatError(f"{path}: trained with model.lora.adapter={kind!r}, which this version does not "
                                 f"know ({', '.join(KINDS)}).")
    weights, state = {}, exported_state(ckpt, ema)  # the run exports its EMA weights: so does this
    params = {p.split(".")[0]: p for p in KINDS[kind].params}
    for key, value in state.items():
        if key.endswith(ROWS_KEY):  # model.pivotal's token rows: the export verb writes them beside the adapter
            continue
        m = _ADAPTER_KEY.match(key)
        comp = key.split(".", 1)[0]
        if not m or comp not in COMPONENTS or m["adapter"] != adapter_name or m["param"] not in params:
            raise AdapterFormatError(f"{path}: state_dict key {key!r} is not a {KINDS[kind].title} weight of adapter "
                                     f"{adapter_name!r} on {'/'.join(COMPONENTS)}; was it written by this project?")
        module = on_disk_name(comp, m["module"].split(".", 1)[1])
        weights[f"{comp}.{module}.{params[m['param']]}"] = value
    if not weights:
        raise AdapterFormatError(f"{path}: the checkpoint holds no adapter weights.")
    adapter = check_keys(Adapter(weights, {}, kind), path)
    rank, alpha = settings.get("rank"), settings.get("alpha") or settings.get("rank")
    if alpha is not None:  # the module trains one config per component: one alpha everywhere
        for m in adapter.modules():
            p = adapter.params(m)
            if kind == "lokr" and "lokr_w1" in p and "lokr_w2" in p:  # as from_models: fold alpha / r into w1
                adapter.weights[f"{m}.lokr_w1"] = p["lokr_w1"] * (float(alpha) / rank)
                adapter.alphas[m] = torch.tensor(float(adapter.rank(m)))
            else:
                adapter.alphas[m] = torch.tensor(float(alpha))
    return check_values(adapter, path)
