"""data/latent_store.py: latents kept on disk between runs read back equal to a fresh encode, keyed by what decides
them, with bad entries encoded again."""
from __future__ import annotations

import shutil

import pytest
import torch

from dreambooth_pl.data.cache import Encoders
from dreambooth_pl.data.datamodule import DreamBoothDataModule
from dreambooth_pl.data.datasets import ImageSet
from dreambooth_pl.data.encode import encode_set
from dreambooth_pl.data.latent_store import LatentStore, latent_key
from dreambooth_pl.data.settings import CropSettings, PhotoSettings, PriorSettings
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.settings import LoraSettings


@pytest.fixture(scope="module")
def vae(tiny_base):
    module = DreamBoothLoRA(base_model=tiny_base, lora=LoraSettings(init=False))
    module.configure_model()
    return module


def _data(root, tiny_base, store, flip=0.0):
    from conftest import make_subject_dirs

    if not (root / "instance").exists():
        make_subject_dirs(root, 3)
    dm = DreamBoothDataModule(PhotoSettings(str(root / "instance"), "a photo of sks dog"),
                              PriorSettings(True, str(root / "class"), "a photo of dog", 3),
                              CropSettings(center=True, flip=flip), resolution=32, seed=3, base_model=tiny_base,
                              latent_cache=str(store))
    dm.setup("fit")
    return dm


def _counting(module, monkeypatch) -> list:
    calls = []
    encode = module.vae.encode
    monkeypatch.setattr(module.vae, "encode", lambda x: (calls.append(x.shape[0]), encode(x))[1])
    return calls


def test_a_second_run_reads_every_latent_instead_of_encoding(vae, tiny_base, tmp_path, monkeypatch):
    """Two data modules on the same images and store: the second encodes nothing, its latents equal the first's
    bit for bit (so a resumed run stays exact), and the phases count what was read and encoded."""
    module, enc = vae, lambda: Encoders(vae.vae, (vae.text_encoder, vae.text_encoder_2), vae.tokenizers)
    calls = _counting(module, monkeypatch)
    first = _data(tmp_path, tiny_base, tmp_path / "latents")
    first.cache_inputs(enc(), "latents", offload=False)
    assert len(calls) == 5 and first.timings["n_latents_encoded"] == 5 and first.timings["n_latents_read"] == 0
    again = _data(tmp_path, tiny_base, tmp_path / "latents")
    again.cache_inputs(enc(), "latents", offload=False)
    assert len(calls) == 5 and again.timings["n_latents_read"] == 5 and again.timings["n_latents_encoded"] == 0
    for a, b in ((first.cache.instance, again.cache.instance), (first.cache.prior, again.cache.prior)):
        assert torch.equal(a.original_size, b.original_size) and set(a.entries) == set(b.entries)
        for key, e in a.entries.items():
            got = b.entries[key]
            assert torch.equal(got.mean, e.mean) and torch.equal(got.std, e.std)
            assert torch.equal(got.crop_top_left, e.crop_top_left)


def test_entries_follow_the_bytes_the_orientations_and_the_key(vae, tiny_base, tmp_path):
    """A renamed copy of an image hits its entry; a plain entry cannot serve a run that flips (it is encoded again,
    mirrored, and then serves plain runs by its first row); a broken file is encoded again; another VAE dtype or
    encode mode keys another folder."""
    from conftest import make_subject_dirs

    make_subject_dirs(tmp_path, 2)
    paths = sorted((tmp_path / "instance").iterdir())[:2]
    copy = tmp_path / "renamed.png"
    shutil.copy(paths[0], copy)
    store = LatentStore(str(tmp_path / "latents"), latent_key(str(tmp_path), vae.vae, False))
    sizes = [[(32, 32)]] * 2
    plain = encode_set(vae.vae, ImageSet(tuple(paths), "p"), sizes, mirrored=False, store=store)
    assert (store.hits, store.misses) == (0, 2)
    renamed = encode_set(vae.vae, ImageSet((copy, paths[1]), "p"), sizes, mirrored=False, store=store)
    assert (store.hits, store.misses) == (2, 2) and torch.equal(renamed.entries[(0, (32, 32))].mean,
                                                                plain.entries[(0, (32, 32))].mean)
    flipped = encode_set(vae.vae, ImageSet(tuple(paths), "p"), sizes, mirrored=True, store=store)
    assert store.misses == 4 and flipped.entries[(0, (32, 32))].mean.shape[0] == 2
    again = encode_set(vae.vae, ImageSet(tuple(paths), "p"), sizes, mirrored=False, store=store)
    assert store.hits == 4 and torch.equal(again.entries[(1, (32, 32))].mean, flipped.entries[(1, (32, 32))].mean[:1])
    entry = next(store.folder.glob(f"{store.content_id(paths[0])}-32x32.safetensors"))
    entry.write_bytes(entry.read_bytes()[:40])  # truncated, as by a full disk
    encode_set(vae.vae, ImageSet(tuple(paths), "p"), sizes, mirrored=False, store=store)
    assert store.misses == 5
    def folder(one_per_call):
        return LatentStore(str(tmp_path), latent_key(str(tmp_path), vae.vae, one_per_call)).folder.name

    keys = {folder(False), folder(True)}
    try:
        keys.add(folder(vae.vae.to(torch.bfloat16) is None))  # the same module in bf16, plain encode
    finally:
        vae.vae.to(torch.float32)
    assert len(keys) == 3


def test_a_store_needs_the_base_to_key_its_vae(tmp_path):
    """Refused when the data module is built, before any model loads."""
    with pytest.raises(ValueError, match="data.latent_cache needs data.base_model"):
        DreamBoothDataModule(PhotoSettings(str(tmp_path), "a photo of sks dog"), PriorSettings(enabled=False),
                             latent_cache=str(tmp_path / "latents"))
