"""PairedStream: DreamBooth pairing proportions, batch layout, resumable and rank/worker-split determinism."""
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dreambooth_pl.data.datasets import ImageSet, PairedStream
from conftest import write_images


def _names(n: int, prefix: str) -> tuple[Path, ...]:
    return tuple(Path(f"{prefix}{i}.png") for i in range(n))  # pair_indices never opens the files


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    inst = write_images(root / "inst", 3, size=(48, 40), seed=1)
    cls = write_images(root / "cls", 5, size=(40, 56), seed=2)
    (root / "inst" / "0001.txt").write_text("a photo of sks dog on a beach\n")
    return ImageSet(tuple(inst), "a photo of sks dog"), ImageSet(tuple(cls), "a photo of dog")


@pytest.mark.parametrize("n_inst, n_cls", [(3, 7), (1, 200), (6, 197), (5, 2)])
def test_every_class_image_once_per_epoch_while_instances_cycle(n_inst, n_cls):
    stream = PairedStream(ImageSet(_names(n_inst, "i"), "x"), ImageSet(_names(n_cls, "c"), "y"), 16, seed=3)
    n = max(n_inst, n_cls)
    assert stream.epoch_len == n
    for epoch in range(2):
        pairs = [stream.pair_indices(epoch * n + p) for p in range(n)]
        inst, cls = Counter(i for i, _ in pairs), Counter(c for _, c in pairs)
        if n_cls >= n_inst:
            assert sorted(cls) == list(range(n_cls)) and set(cls.values()) == {1}
        assert sorted(inst) == list(range(n_inst))  # every instance image appears every epoch
        assert max(inst.values()) - min(inst.values()) <= 1  # ... in equal shares
        assert max(cls.values()) - min(cls.values()) <= 1
    first, second = ([stream.pair_indices(e * n + p) for p in range(n)] for e in (0, 1))
    if n > 2:
        assert first != second  # reshuffled each epoch


def test_without_priors_there_is_no_class_side(image_sets):
    inst, _ = image_sets
    stream = PairedStream(inst, None, 32, batch_size=2, seed=0)
    assert stream.epoch_len == 3
    assert all(stream.pair_indices(p)[1] is None for p in range(9))
    batch = stream.batch(0)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert not batch["is_prior"].any()


def test_batch_layout_instance_rows_then_their_prior_partners(image_sets):
    inst, cls = image_sets
    stream = PairedStream(inst, cls, 32, batch_size=2, seed=0)
    batches = [stream.batch(b) for b in range(3)]
    for b, batch in enumerate(batches):
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["is_prior"].tolist() == [False, False, True, True]
        assert all(p.startswith("a photo of sks dog") for p in batch["prompt"][:2])
        assert batch["prompt"][2:] == ["a photo of dog"] * 2
        pairs = [stream.pair_indices(2 * b + j) for j in range(2)]
        sizes = [(40, 48)] * 2 + [(56, 40)] * 2  # (h, w) of instance / class images
        assert batch["original_size"].tolist() == [list(s) for s in sizes]
        for j, (i, _) in enumerate(pairs):
            expected = "a photo of sks dog on a beach" if i == 1 else "a photo of sks dog"
            assert batch["prompt"][j] == expected  # photo.txt beside photo.png overrides the prompt
        assert -1.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_resumed_stream_repeats_the_uninterrupted_batches(image_sets):
    inst, cls = image_sets
    kw = dict(resolution=24, batch_size=1, flip_p=0.5, seed=7)
    fresh = iter(PairedStream(inst, cls, **kw))
    full = [next(fresh) for _ in range(7)]
    resumed = iter(PairedStream(inst, cls, start_batch=4, **kw))
    assert all(_same(next(resumed), full[b]) for b in range(4, 7))
    assert not _same(full[0], full[5])
    other_seed = PairedStream(inst, cls, **dict(kw, seed=8)).batch(0)
    assert not _same(other_seed, full[0])


def test_ranks_split_the_stream_and_workers_keep_its_order(image_sets):
    inst, cls = image_sets
    kw = dict(resolution=16, batch_size=1, seed=0)
    single = PairedStream(inst, cls, **kw)
    r0, r1 = (PairedStream(inst, cls, rank=r, world_size=2, **kw) for r in (0, 1))
    for b in range(3):  # global batch 2b goes to rank 0, 2b + 1 to rank 1
        assert _same(r0.batch(b), single.batch(2 * b)) and _same(r1.batch(b), single.batch(2 * b + 1))
    loader = DataLoader(PairedStream(inst, cls, start_batch=2, **kw), batch_size=None, num_workers=2)
    got = []
    for batch in loader:
        got.append(batch)
        if len(got) == 4:
            break
    assert all(_same(got[j], single.batch(2 + j)) for j in range(4))


def test_caption_dropout_drops_the_seeded_examples_and_nothing_else(image_sets):
    """Over a seeded stream the empty prompts are exactly the examples whose documented draw falls under p (an
    exact count, pinned), near p's share, on instance and class examples alike; pixels, crops and pairing are
    those of the stream without dropout."""
    from dreambooth_pl.data.datasets import CAPTION_SALT
    from dreambooth_pl.noise import mix_seed as _mix

    inst, cls = image_sets
    kw = dict(batch_size=2, flip_p=0.5, seed=5)
    dropped, plain = PairedStream(inst, cls, 16, caption_dropout=0.25, **kw), PairedStream(inst, cls, 16, **kw)
    empty, expected = [], []
    for b in range(100):  # 400 examples: positions 2b, 2b + 1, each with its class partner
        got, ref = dropped.batch(b), plain.batch(b)
        assert torch.equal(got["pixel_values"], ref["pixel_values"]) and torch.equal(got["is_prior"], ref["is_prior"])
        for j, (p, q) in enumerate(zip(got["prompt"], ref["prompt"])):
            assert p in ("", q)
            empty.append(p == "")
            position, role = 2 * b + j % 2, j // 2
            u = torch.rand((), generator=torch.Generator().manual_seed(_mix(5, position, role, CAPTION_SALT)))
            expected.append(bool(u < 0.25))
    assert empty == expected
    assert sum(empty) == 107  # the seeded run's exact count (400 * 0.25 = 100 expected, sd 8.7)
    assert sum(empty[0::4] + empty[1::4]) > 30 and sum(empty[2::4] + empty[3::4]) > 30  # instance and class
    assert not any(p == "" for b in range(100) for p in PairedStream(inst, cls, 16, **kw).batch(b)["prompt"])
