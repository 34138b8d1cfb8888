"""Embedders: the input convention at the boundary, each model's own preprocessing, local weights, offline errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_pl.metrics.embedders import EmbedderWeightsError, load_clip, load_dino, to_unit_float


def _uint8(n=2, h=40, w=56, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8))


def test_uint8_is_scaled_and_0_255_floats_are_rejected():
    x = _uint8()
    assert torch.equal(torch.stack(to_unit_float(x)), x.float() / 255)
    with pytest.raises(ValueError, match=r"0-255 range.*x / 255"):
        to_unit_float(x.float())
    with pytest.raises(ValueError, match=r"\[-1, 1\].*\(x \+ 1\) / 2"):
        to_unit_float(x.float() / 127.5 - 1)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        to_unit_float(torch.rand(2, 40, 56, 3))


def test_pil_uint8_and_unit_float_inputs_embed_identically(clip, dino):
    x = _uint8()
    pil = [Image.fromarray(t.permute(1, 2, 0).numpy()) for t in x]
    for embedder in (clip, dino):
        a, b = embedder.embed_images(x), embedder.embed_images(pil)
        torch.testing.assert_close(a, b)
        if embedder is dino:
            torch.testing.assert_close(a, embedder.embed_images(x.float() / 255))
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    assert clip.embed_images(x).shape == (2, 512) and dino.embed_images(x).shape == (2, 384)
    assert clip.embed_text(["a dog", "a cat"]).shape == (2, 512)


def test_an_image_embedded_before_is_not_run_again(dino, monkeypatch):
    """Keyed by the model's input: one evaluation embeds the same real photos in four metrics."""
    from dreambooth_pl.metrics import embedders

    x = _uint8(3, seed=11)
    ran = []
    encode = type(dino)._encode_pixels
    monkeypatch.setattr(type(dino), "_encode_pixels", lambda self, px: ran.append(len(px)) or encode(self, px))
    dino.__dict__.pop("_memo", None)
    a = dino.embed_images(torch.stack([x[0], x[1], x[0]]))
    assert ran == [2] and torch.equal(a[0], a[2])
    b = dino.embed_images(x[1:])  # x[1] seen, x[2] new
    assert ran == [2, 1] and torch.equal(b[0], a[1])
    assert dino.embed_images(255 - x[:1]).shape == (1, 384) and ran == [2, 1, 1]  # other pixels: run
    monkeypatch.setattr(embedders, "MEMO_SIZE", 0)  # no memo: the model on the three at once
    torch.testing.assert_close(dino.embed_images(x), torch.stack([a[0], a[1], b[1]]), atol=1e-6, rtol=0)
    assert ran[-1] == 3
    monkeypatch.setattr(embedders, "MEMO_SIZE", 4096)
    state = {k: v.clone() for k, v in dino.model.state_dict().items()}
    try:  # other weights, loaded in place: what was embedded before is embedded again
        dino.model.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()})
        moved = dino.embed_images(x[:1])
        assert ran[-1] == 1 and (moved[0] - a[0]).abs().max() > 1e-3
    finally:
        dino.model.load_state_dict(state)


def test_each_embedder_uses_its_own_preprocessing_config(clip, dino):
    def normalize(embedder):
        return next(t for t in embedder.preprocess.transforms if type(t).__name__ == "Normalize")

    torch.testing.assert_close(torch.as_tensor(normalize(clip).mean).float(),
                               torch.tensor([0.48145466, 0.4578275, 0.40821073]))  # OpenAI CLIP statistics
    torch.testing.assert_close(torch.as_tensor(normalize(dino).mean).float(), torch.tensor([0.485, 0.456, 0.406]))
    for embedder in (clip, dino):  # any aspect ratio comes out as the model's 224 x 224 input
        assert embedder.pixels(_uint8(1, 97, 300)).shape == (1, 3, 224, 224)


def test_local_weight_file_loads(dino, tmp_path):
    # timm's pretrained_cfg_overlay(file=...) path; DINO only, a 600 MB CLIP file would cost the suite ~20 s
    x = _uint8()
    torch.save(dino.model.state_dict(), tmp_path / "dino.pth")
    torch.testing.assert_close(load_dino(str(tmp_path / "dino.pth")).embed_images(x), dino.embed_images(x))


def test_missing_weights_fail_fast_naming_weights_and_fix(tmp_path, monkeypatch):
    with pytest.raises(EmbedderWeightsError, match=r"does not exist.*dino_weights=PATH"):
        load_dino(str(tmp_path / "nope.pth"))
    with pytest.raises(EmbedderWeightsError, match=r"does not exist.*clip_weights=PATH"):
        load_clip(str(tmp_path / "nope.pt"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no cached copy on a test machine
    with pytest.raises(EmbedderWeightsError, match=r"vit_small_patch16_224\.dino weights 'dino'.*local copy"):
        load_dino("dino")
    with pytest.raises(EmbedderWeightsError, match=r"ViT-B-32 weights 'openai'.*open_clip_pytorch_model\.bin"):
        load_clip("openai")


def _photos(sizes=((300, 200), (97, 130), (40, 56))):
    """RGB PIL images of varied sizes and aspect ratios; the small one is upscaled by the transforms."""
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def test_pil_embeddings_equal_the_library_pil_transform_reference(clip, dino):
    """CLIP: OpenAI CLIP's own eval transform (PIL bicubic short side 224, centre crop, OpenAI mean/std, as
    open_clip.image_transform builds it); DINO: DINO's eval_linear.py transform (PIL bicubic short side 256, centre
    crop 224, ImageNet mean/std). Each embedding equals model(reference transform(image)) within 1e-6."""
    import open_clip
    from torchvision import transforms as T

    photos = _photos()
    clip_ref = open_clip.image_transform(224, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                         std=open_clip.OPENAI_DATASET_STD)
    dino_ref = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                          T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():
        want_clip = torch.nn.functional.normalize(clip.model.encode_image(torch.stack([clip_ref(p) for p in photos])))
        want_dino = torch.nn.functional.normalize(dino.model(torch.stack([dino_ref(p) for p in photos])))
    assert (clip.embed_images(photos) - want_clip).abs().max() <= 1e-6
    assert (dino.embed_images(photos) - want_dino).abs().max() <= 1e-6
    timm_248 = T.Compose([T.Resize(248, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                              T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    with torch.no_grad():  # timm's default crop_pct (resize 248) is a different input: the test can tell
        other = torch.nn.functional.normalize(dino.model(torch.stack([timm_248(p) for p in photos])))
    assert (other - want_dino).abs().max() > 1e-3


def test_tensors_embed_as_their_8_bit_pil_images(clip, dino):
    """uint8 tensors convert losslessly; [0, 1] floats are rounded to 8-bit levels, as a saved PNG would be."""
    photos = _photos()[:2]
    u8 = [torch.from_numpy(np.asarray(p)).permute(2, 0, 1) for p in photos]
    for e in (clip, dino):
        torch.testing.assert_close(e.embed_images(u8), e.embed_images(photos), rtol=0, atol=0)
        torch.testing.assert_close(e.embed_images([t.float() / 255 for t in u8]), e.embed_images(photos), rtol=0,
                                   atol=0)
