"""Safe loading: a hostile pickle offered as a LoRA or checkpoint is refused, with the reason, and never runs."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dreambooth_pl.io import (CheckpointError, UnsafeFileError, check_safetensors, file_kind, load_checkpoint,
                              load_safetensors, parse_json, read_json)


class Payload:
    """Unpickling this creates a folder: proof that loading ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "pwned"
    files = {}
    for name in ("lora.safetensors", "lora.bin"):  # torch.save zip, once disguised by its name
        torch.save({"unet.to_q.lora_A.weight": torch.zeros(2, 2), "x": Payload(marker)}, tmp_path / name)
        files[name] = tmp_path / name
    (tmp_path / "lora.pt").write_bytes(pickle.dumps(Payload(marker), protocol=2))
    files["lora.pt"] = tmp_path / "lora.pt"
    return files, marker


def test_pickles_refused_as_lora_without_running(hostile):
    files, marker = hostile
    assert file_kind(files["lora.safetensors"]) == "torch-zip" and file_kind(files["lora.pt"]) == "pickle"
    with pytest.raises(UnsafeFileError, match=r"torch\.save zip with a pickle inside.*despite its \.safetensors name"):
        load_safetensors(files["lora.safetensors"])
    with pytest.raises(UnsafeFileError, match=r"lora\.bin.*pickle inside.*unpickling runs whatever code"):
        check_safetensors(files["lora.bin"])
    with pytest.raises(UnsafeFileError, match=r"lora\.pt.*a Python pickle"):
        check_safetensors(files["lora.pt"], "VAE")
    assert not marker.exists()


def test_hostile_checkpoint_refused_with_weights_only(hostile, tmp_path):
    files, marker = hostile
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as err:
        load_checkpoint(files["lora.bin"])
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, tmp_path / "good.ckpt")
    assert load_checkpoint(tmp_path / "good.ckpt")["global_step"] == 3


def test_safetensors_loaded_and_damaged_ones_named(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(4.0)}, good, metadata={"format": "pt"})
    tensors, meta = load_safetensors(good)
    assert torch.equal(tensors["a"], torch.arange(4.0)) and meta == {"format": "pt"}
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with pytest.raises(UnsafeFileError, match=r"cut\.safetensors.*damaged safetensors file"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UnsafeFileError, match="it is empty"):
        check_safetensors(tmp_path / "empty.safetensors")
    (tmp_path / "text.safetensors").write_text("<html>404 not found</html>")
    with pytest.raises(UnsafeFileError, match="not a safetensors header"):
        check_safetensors(tmp_path / "text.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_safetensors(tmp_path / "missing.safetensors")


def test_fit_resumes_only_with_weights_only(tiny_base, subject_dirs, tmp_path):
    """``fit --ckpt_path`` loads with weights_only=True: a hostile .ckpt is refused before any of it runs."""
    from conftest import fit_args

    from dreambooth_pl.cli import DreamBoothCLI

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "global_step": 1, "x": Payload(marker)}, tmp_path / "hostile.ckpt")
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path / "logs"), ckpt_path=tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match=r"refusing checkpoint .*hostile\.ckpt.*holds objects") as err:
        DreamBoothCLI(args=args)
    assert "weights_only=False" not in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("content, reason", [(b"", "is empty"), (b"garbage bytes, not a checkpoint", "not a PyTorch"),
                                             ("truncated", "truncated or damaged")])
def test_damaged_checkpoints_named_with_the_fix(tmp_path, content, reason):
    path = tmp_path / "last.ckpt"
    if content == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, path)
        path.write_bytes(path.read_bytes()[:3000])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "resume from another checkpoint" in msg and "weights_only=False" not in msg


def test_json_that_is_invalid_or_too_deep_names_its_source():
    with pytest.raises(ValueError, match=r"lora\.safetensors.*invalid JSON"):
        parse_json("{not json", "lora.safetensors")
    with pytest.raises(ValueError, match=r"lora\.safetensors.*nested too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "lora.safetensors")


def test_project_json_files_are_read_checked_and_named(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"images": {}, "prompt": "a dog"}')
    assert read_json(path, "class-image manifest", ("images",)) == {"images": {}, "prompt": "a dog"}
    for text, why in (('{"images": ', "invalid JSON"), ('["images"]', "not a JSON object with images"),
                      ('{"prompt": "x"}', "not a JSON object with images")):
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"class-image manifest .*manifest\.json.*{why}"):
            read_json(path, "class-image manifest", ("images",))
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="manifest.json.*cannot be read.*delete it"):
        read_json(path, "class-image manifest")
