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
    assert len(calls) == 5 and first.timings["n_images_encoded"] == 5 and first.timings["n_images_from_store"] == 0
    again = _data(tmp_path, tiny_base, tmp_path / "latents")
    again.cache_inputs(enc(), "latents", offload=False)
    assert len(calls) == 5 and again.timings["n_images_from_store"] == 5 and again.timings["n_images_encoded"] == 0
    for a, b in ((first.cache.instance, again.cache.instance), (first.cache.prior, again.cache.prior)):
        assert torch.equal(a.original_size, b.original_size) and set(a.entries) == set(b.entries)
        for key, e in a.entries.items():
            got = b.entries[key]
            assert torch.equal(got.mean, e.mean) and torch.equal(got.std, e.std)
            assert torch.equal(got.crop_top_left, e.crop_top_left)


def test_entries_follow_the_bytes_the_orientations_and_the_key(vae, tiny_base, tmp_path, monkeypatch):
    """A renamed copy of an image hits its entry; plain and plain + mirrored are separate entries (the pair is one
    VAE batch, whose plain row rounds unlike a batch of one), each read back bit for bit; a truncated or foreign
    file is encoded again; another VAE dtype, encode mode or VAE config keys another folder."""
    from safetensors.torch import save_file

    from conftest import make_subject_dirs

    make_subject_dirs(tmp_path, 2)
    paths = sorted((tmp_path / "instance").iterdir())[:2]
    copy = tmp_path / "renamed.png"
    shutil.copy(paths[0], copy)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"scaling_factor": 0.13025}')
    store = LatentStore(str(tmp_path / "latents"), latent_key(str(tmp_path / "vae"), vae.vae, False))
    sizes, key = [[(32, 32)]] * 2, (0, (32, 32))

    def encode(images, mirrored, where=store):
        return encode_set(vae.vae, ImageSet(tuple(images), "p"), sizes, mirrored=mirrored, store=where)

    plain = encode(paths, False)
    assert (store.hits, store.misses) == (0, 2)
    renamed = encode((copy, paths[1]), False)
    assert (store.hits, store.misses) == (2, 2) and torch.equal(renamed.entries[key].mean, plain.entries[key].mean)
    flipped = encode(paths, True)
    assert store.misses == 4 and flipped.entries[key].mean.shape[0] == 2
    assert torch.equal(encode(paths, True).entries[key].mean, flipped.entries[key].mean)  # read back, bit for bit
    again = encode(paths, False)  # the plain entry, not the pair's first row
    assert store.hits == 6 and torch.equal(again.entries[key].mean, plain.entries[key].mean)
    entry = store._path(store.content_id(paths[0]), (32, 32), False)
    entry.write_bytes(entry.read_bytes()[:40])  # truncated, as by a full disk
    encode(paths, False)
    save_file({"weight": torch.zeros(2)}, str(entry))  # a valid safetensors file that is not an entry
    encode(paths, False)
    save_file({"mean": torch.zeros(1, 4, 2, 2), "std": torch.zeros(1, 4, 2, 2), "crop_top_left": torch.zeros(1, 2),
               "original_size": torch.zeros(2)}, str(entry))  # an entry of another size
    fresh = encode(paths, False).entries[key].mean  # encoded again: equal up to the CPU kernels' rounding
    assert torch.allclose(fresh, plain.entries[key].mean, rtol=1e-5, atol=1e-6) and store.misses == 7

    def folder(one_per_call):
        return LatentStore(str(tmp_path), latent_key(str(tmp_path / "vae"), vae.vae, one_per_call)).folder.name

    keys = {folder(False), folder(True)}
    try:
        vae.vae.to(torch.bfloat16)
        keys.add(folder(False))
    finally:
        vae.vae.to(torch.float32)
    (tmp_path / "vae" / "config.json").write_text('{"scaling_factor": 0.18215}')
    keys.add(folder(False))
    assert len(keys) == 4
    # the Triton GroupNorms (model.perf.fused_norms) key apart where they run, and only there
    from dreambooth_pl import fused_norms

    fused_norms.fuse_norms(vae.vae)
    try:
        assert folder(False) in keys  # on this CPU the patched norms run diffusers' ops
        monkeypatch.setattr(fused_norms, "uses_kernel", lambda device: True)
        assert latent_key(str(tmp_path / "vae"), vae.vae, False)["fused_norms"] is True
        keys.add(folder(False))
    finally:
        fused_norms.unfuse_norms(vae.vae)
    assert len(keys) == 5 and folder(False) in keys and "fused_norms" not in latent_key(str(tmp_path / "vae"),
                                                                                           vae.vae, False)


def test_an_nhwc_vae_keys_apart_and_keeps_contiguous_moments(vae, tmp_path):
    """``model.perf.channels_last`` with fused norms encodes in an NHWC VAE: its latents key another store folder
    (other convolution kernels round otherwise), equal the NCHW encode's up to that rounding, and are kept NCHW
    contiguous, as a store entry reads back (the noise drawn like them must not depend on where they came from)."""
    from conftest import make_subject_dirs
    from dreambooth_pl.fused_norms import is_nhwc, to_nhwc

    make_subject_dirs(tmp_path, 2)
    paths = tuple(sorted((tmp_path / "instance").iterdir())[:2])
    (tmp_path / "vae").mkdir()

    def encoded():
        key = latent_key(str(tmp_path / "vae"), vae.vae, False)
        got = encode_set(vae.vae, ImageSet(paths, "p"), [[(32, 32)]] * 2, mirrored=True,
                         store=LatentStore(str(tmp_path / "latents"), key))
        return key, got.entries[(0, (32, 32))]

    nchw_key, nchw = encoded()
    assert not is_nhwc(vae.vae) and "channels_last" not in nchw_key
    try:
        to_nhwc(vae.vae)
        assert is_nhwc(vae.vae)
        nhwc_key, nhwc = encoded()
    finally:
        to_nhwc(vae.vae, on=False)
    assert nhwc_key == {**nchw_key, "channels_last": True}
    assert nhwc.mean.is_contiguous() and nhwc.std.is_contiguous()
    assert torch.allclose(nhwc.mean, nchw.mean, rtol=1e-4, atol=1e-5)  # fp32 on the CPU: kernel rounding only


def test_an_unwritable_store_warns_once_and_the_run_keeps_its_latents(vae, tmp_path):
    from conftest import make_subject_dirs

    make_subject_dirs(tmp_path, 2)
    paths = tuple(sorted((tmp_path / "instance").iterdir())[:2])
    (tmp_path / "file").write_text("not a folder")
    store = LatentStore(str(tmp_path / "file"), latent_key(str(tmp_path), vae.vae, False))
    with pytest.warns(UserWarning, match="data.latent_cache: cannot write") as caught:
        got = encode_set(vae.vae, ImageSet(paths, "p"), [[(32, 32)]] * 2, mirrored=False, store=store)
    assert len(caught) == 1 and not store.write and len(got.entries) == 2


def test_a_fused_key_keeps_nothing_once_the_kernels_fell_back(tmp_path, monkeypatch):
    """Encoded by PyTorch's norms after a failed Triton launch, the latents are not what the fused key names: a
    later run with working kernels would read them as fused."""
    from dreambooth_pl import fused_norms

    args = ("a" * 32, (64, 64), (64, 64), torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8),
            torch.zeros(1, 2, dtype=torch.long))
    from dreambooth_pl import block_ops

    store = LatentStore(str(tmp_path / "fused"), {"fused_norms": True})
    store.save(*args)  # the kernels work: kept
    store.flush()
    assert len(list(store.folder.glob("**/*.safetensors"))) == 1
    for module in (fused_norms, block_ops):  # the norms' own failure, or the GEGLU's (which stops the norms)
        with monkeypatch.context() as m:
            m.setattr(module, "_kernel_failed", ["ptxas not found"])
            other = LatentStore(str(tmp_path / module.__name__), {"fused_norms": True})
            other.save(*args)
            other.flush()
            assert not list(other.folder.glob("**/*.safetensors"))
    plain = LatentStore(str(tmp_path / "plain"), {"vae": "v"})  # a key without the kernels keeps its entries
    plain.save(*args)
    plain.flush()
    assert len(list(plain.folder.glob("**/*.safetensors"))) == 1


def test_a_store_needs_the_base_to_key_its_vae(tmp_path):
    """Refused when the data module is built, before any model loads."""
    with pytest.raises(ValueError, match="data.latent_cache needs data.base_model"):
        DreamBoothDataModule(PhotoSettings(str(tmp_path), "a photo of sks dog"), PriorSettings(enabled=False),
                             latent_cache=str(tmp_path / "latents"))


def test_auto_keeps_latents_on_a_gpu_only_and_needs_no_base(tiny_base, subject_dirs, vae, monkeypatch):
    """``data.latent_cache: auto`` (the default) is the shared folder where the cache encodes on a GPU and off on a
    CPU (the fits of this suite); an explicit folder is kept anywhere; a data module without a base (no VAE to key
    the latents by) runs without a store instead of refusing, as it still does for an explicit folder."""
    from dreambooth_pl.data import latent_store
    from dreambooth_pl.data.latent_store import LATENT_CACHE, latent_root

    assert latent_root("auto", torch.device("cuda", 0)) == LATENT_CACHE
    assert latent_root("auto", torch.device("cpu")) is None and latent_root(None, torch.device("cuda")) is None
    assert latent_root("/tmp/x", torch.device("cpu")) == "/tmp/x"
    inst, cls = subject_dirs
    photos, priors = PhotoSettings(inst, "a photo of sks dog"), PriorSettings(True, cls, "a photo of dog", 2)
    assert DreamBoothDataModule(photos, priors).hparams.latent_cache == "auto"
    with pytest.raises(ValueError, match="data.latent_cache needs data.base_model"):
        DreamBoothDataModule(photos, priors, latent_cache="/tmp/somewhere")
    dm = DreamBoothDataModule(photos, priors, resolution=32, base_model=tiny_base)
    dm.setup("fit")
    assert dm._latent_store(Encoders(vae.vae, (), ())) is None  # auto, encoding on the CPU
    monkeypatch.setattr(latent_store, "latent_root",
                        lambda value, device: "/tmp/gpu-like" if value == "auto" else value)
    assert dm._latent_store(Encoders(vae.vae, (), ())).folder.parent.as_posix() == "/tmp/gpu-like"


def test_a_cpu_store_is_keyed_by_its_kernels_and_threads(vae):
    """CPU reductions round by the kernel family (AVX-512 or AVX2) and how the threads split them, so a store
    written under other CPU settings is another folder, never read as bit-equal latents."""
    threads = torch.get_num_threads()
    try:
        key = latent_key(vae.hparams.base_model, vae.vae, False)
        torch.set_num_threads(threads + 1)
        other = latent_key(vae.hparams.base_model, vae.vae, False)
    finally:
        torch.set_num_threads(threads)
    assert key["device"].startswith("cpu ") and torch.backends.cpu.get_cpu_capability() in key["device"]
    assert key != other and {k for k in key if key[k] != other[k]} == {"device"}


def test_entries_are_written_in_the_background_without_fsync_and_a_full_disk_warns_once(vae, tmp_path,
                                                                                          monkeypatch):
    """The cache's loop hands each entry to the store's writer thread (no fsync: a torn entry reads as invalid and
    is encoded again); when the disk fills mid-set, one warning names the store after the set, the run keeps its
    latents, and the entries written before stay readable."""
    import errno
    import threading

    from conftest import make_subject_dirs
    from dreambooth_pl.io import files

    make_subject_dirs(tmp_path, 3)
    paths = tuple(sorted((tmp_path / "class").iterdir()))
    (tmp_path / "vae").mkdir()  # what the key fingerprints: not the folder the store fills
    store = LatentStore(str(tmp_path / "store"), latent_key(str(tmp_path / "vae"), vae.vae, False))
    entries, real = [], files.atomic_write

    def fills_up(path, write, hint="", durable=True):
        if path.suffix == ".safetensors":  # an entry (key.json is the folder's, written once, durably)
            if len(entries) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
            entries.append((durable, threading.current_thread().name))
        return real(path, write, hint, durable)

    monkeypatch.setattr(files, "atomic_write", fills_up)
    with pytest.warns(UserWarning, match="data.latent_cache: cannot write .*No space left") as caught:
        got = encode_set(vae.vae, ImageSet(paths, "p"), [[(32, 32)]] * len(paths), mirrored=False, store=store)
    assert len(caught) == 1 and not store.write and len(got.entries) == len(paths) == 3
    assert [d for d, _ in entries] == [False, False] and all(t.startswith("latent-store") for _, t in entries)
    again = LatentStore(str(tmp_path / "store"), latent_key(str(tmp_path / "vae"), vae.vae, False))
    read = encode_set(vae.vae, ImageSet(paths, "p"), [[(32, 32)]] * len(paths), mirrored=False, store=again)
    assert again.hits == 2 and again.misses == 1
    for key, e in got.entries.items():
        assert torch.allclose(read.entries[key].mean, e.mean, rtol=1e-5, atol=1e-6)
