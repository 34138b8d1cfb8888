"""Subject metrics: self-pairs, uneven batches vs a plain-torch reference, CLIP-T on the generated images, DDP sums."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dreambooth_pl.metrics import CLIPIScore, CLIPTScore, DINODiversity, DINOScore, load_dino, remove_identifier


def _images(n, seed, h=48, w=64):
    """Smooth random images: random low-frequency colour fields, so random-weight ViTs see distinct inputs."""
    g = torch.Generator().manual_seed(seed)
    return (F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(h, w), mode="bilinear") * 255).to(torch.uint8)


def _plain(model_embed, pixels):
    return F.normalize(model_embed(pixels).float(), dim=-1)


def test_identical_images_score_one(clip, dino):
    img = _images(1, 0)
    for metric in (CLIPIScore(clip, reference=img), DINOScore(dino, reference=img)):
        metric.update(img.expand(3, -1, -1, -1))
        assert metric.compute().item() == pytest.approx(1.0, abs=1e-5)


def test_real_baseline_excludes_self_pairs(dino):
    real = _images(4, 1)
    emb = dino.embed_images(real)
    sims = emb @ emb.T
    off_diagonal = sims[~torch.eye(4, dtype=torch.bool)].mean()
    metric = DINOScore(dino, reference=real)
    metric.update(real[:3], reference_index=torch.arange(3))
    metric.update(real[3:], reference_index=torch.tensor([3]))
    torch.testing.assert_close(metric.compute(), off_diagonal, atol=1e-6, rtol=0)
    with_self = DINOScore(dino, reference=real)
    with_self.update(real)
    assert with_self.compute() > metric.compute()  # self-pairs (cosine 1) would inflate the baseline
    torch.testing.assert_close(with_self.compute(), sims.mean(), atol=1e-6, rtol=0)


def test_uneven_batches_equal_one_shot_plain_torch(clip, dino):
    real, gen = _images(3, 2), _images(6, 3)
    for metric, embed in ((CLIPIScore(clip, reference=real), lambda e, x: e.model.encode_image(x)),
                          (DINOScore(dino, reference=real), lambda e, x: e.model(x))):
        e = metric.embedder
        for lo, hi in ((0, 1), (1, 4), (4, 6)):
            metric.update(gen[lo:hi])
        with torch.no_grad():  # one shot, straight through the library model and its own preprocessing
            ref = _plain(lambda x: embed(e, x), e.pixels(real))
            out = _plain(lambda x: embed(e, x), e.pixels(gen))
        torch.testing.assert_close(metric.compute(), (out @ ref.T).mean(), atol=1e-5, rtol=0)


def test_remove_identifier():
    assert remove_identifier("a rraj person", "rraj") == "a person"
    assert remove_identifier("rraj, a sks dog on the beach", "sks") == "rraj, a dog on the beach"
    assert remove_identifier("a sksdog and sks", "sks") == "a sksdog and"  # whole words only
    assert remove_identifier("a photo of dog", None) == "a photo of dog"


def test_clip_t_scores_generated_images_and_strips_the_token(clip):
    gen, unrelated = _images(2, 4), _images(2, 5)
    prompts = ["a rraj person on the beach", "a rraj person in the snow"]
    metric = CLIPTScore(clip, token="rraj")
    metric.update(gen, prompts)
    score = metric.compute()
    with torch.no_grad():
        img = _plain(clip.model.encode_image, clip.pixels(gen))
        txt = _plain(clip.model.encode_text, clip.tokenizer(["a person on the beach", "a person in the snow"]))
    torch.testing.assert_close(score, (img * txt).sum(-1).mean(), atol=1e-5, rtol=0)
    swapped = CLIPTScore(clip, token="rraj")
    swapped.update(unrelated, prompts)
    assert abs(swapped.compute() - score) > 1e-4  # the score follows the images it is given
    with_token = CLIPTScore(clip, token=None)
    with_token.update(gen, prompts)
    assert abs(with_token.compute() - score) > 1e-5
    with pytest.raises(ValueError, match="one prompt per image"):
        metric.update(gen, prompts[:1])


def test_clip_t_prompt_option_keeps_the_identifier_when_asked(clip):
    """``as_generated`` scores the prompt exactly as generated (identifier included), as with no token at all."""
    gen, prompts = _images(2, 4), ["a rraj person on the beach", "a rraj person in the snow"]
    scores = {}
    for name, kw in {"kept": dict(token="rraj", prompt="as_generated"), "no_token": dict(token=None),
                     "dropped": dict(token="rraj")}.items():
        m = CLIPTScore(clip, **kw)
        m.update(gen, prompts)
        scores[name] = m.compute()
    assert scores["kept"] == scores["no_token"] and abs(scores["kept"] - scores["dropped"]) > 1e-5
    with pytest.raises(ValueError, match="without_identifier or as_generated"):
        CLIPTScore(clip, token="rraj", prompt="literal")


def test_diversity_is_zero_for_copies_and_matches_pairwise(dino):
    copies = DINODiversity(dino)
    copies.update(_images(1, 6).expand(3, -1, -1, -1))
    assert copies.compute().item() == pytest.approx(0.0, abs=1e-5)
    a, b = _images(3, 7), _images(2, 8)
    metric = DINODiversity(dino)
    metric.update(a)
    metric.update(b)

    def div(x):
        e = dino.embed_images(x)
        return 1 - (e @ e.T)[~torch.eye(len(x), dtype=torch.bool)].mean()

    torch.testing.assert_close(metric.compute(), (div(a) + div(b)) / 2, atol=1e-5, rtol=0)


def test_zero_to_255_floats_are_rejected_by_metrics(dino):
    metric = DINOScore(dino, reference=_images(1, 0))
    with pytest.raises(ValueError, match="0-255"):
        metric.update(_images(2, 1).float())


def _ddp_worker(rank, world, weights, images_path, out_path, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    data = torch.load(images_path)
    metric = DINOScore(load_dino(weights), reference=data["real"])
    shard = data["gen"][rank::world]  # uneven shards: 3 and 2 images
    metric.update(shard[:1])
    metric.update(shard[1:])
    value = metric.compute()  # all-reduces the sum/count states
    if rank == 0:
        torch.save(value, out_path)
    torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_single_process(dino, tmp_path):
    weights, images = str(tmp_path / "dino.pth"), str(tmp_path / "images.pt")
    torch.save(dino.model.state_dict(), weights)
    data = {"real": _images(3, 9), "gen": _images(5, 10)}
    torch.save(data, images)
    single = DINOScore(dino, reference=data["real"])
    single.update(data["gen"])
    port = 29500 + int(np.random.default_rng().integers(0, 2000))
    torch.multiprocessing.spawn(_ddp_worker, args=(2, weights, images, str(tmp_path / "v.pt"), port), nprocs=2)
    torch.testing.assert_close(torch.load(tmp_path / "v.pt"), single.compute(), atol=1e-6, rtol=0)
