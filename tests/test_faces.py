"""Face-aware crops and loss masks: the Haar cascade finds a drawn face, the crop centres on it, masks follow the
crop and flip, and photos without a face fall back to a centre crop with a note."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth_pl.data.datasets import ImageSet, PairedStream
from dreambooth_pl.data.faces import detect_face, face_ellipse
from dreambooth_pl.data.images import list_images
from conftest import write_images


def draw_face(size=(320, 240), centre=(230, 110), s=60, bg=200) -> Image.Image:
    """A flat cartoon face (skin oval, brows, eyes, nose, mouth) that the frontal-face cascade detects."""
    img = Image.new("RGB", size, (bg, bg, bg))
    d = ImageDraw.Draw(img)
    cx, cy = centre
    d.ellipse([cx - 0.8 * s, cy - s, cx + 0.8 * s, cy + s], fill=(210, 170, 150))
    for dx in (-0.35 * s, 0.35 * s):
        d.line([cx + dx - 0.18 * s, cy - 0.38 * s, cx + dx + 0.18 * s, cy - 0.38 * s], fill=(40, 40, 40),
               width=max(2, s // 15))
        d.ellipse([cx + dx - 0.15 * s, cy - 0.28 * s, cx + dx + 0.15 * s, cy - 0.12 * s], fill=(30, 30, 30))
    d.line([cx, cy - 0.1 * s, cx, cy + 0.25 * s], fill=(160, 120, 110), width=max(2, s // 20))
    d.ellipse([cx - 0.3 * s, cy + 0.42 * s, cx + 0.3 * s, cy + 0.58 * s], fill=(120, 60, 60))
    return img


@pytest.fixture
def face_dir(tmp_path):
    folder = tmp_path / "instance"
    folder.mkdir()
    draw_face().save(folder / "face.png")
    write_images(folder, 1, size=(320, 240), seed=9)  # 0000.png: noise, no face
    return folder


def test_the_cascade_finds_the_drawn_face():
    box = detect_face(draw_face())
    assert box is not None
    x, y, w, h = box
    assert abs(x + w / 2 - 230) < 12 and abs(y + h / 2 - 110) < 12 and 80 < w < 160
    assert detect_face(Image.fromarray(np.full((240, 320, 3), 128, np.uint8))) is None


def test_face_crop_lands_on_the_face_and_a_photo_without_one_is_centre_cropped(face_dir, caplog):
    from dreambooth_pl.data.datamodule import detect_faces

    paths = list_images(face_dir)
    with caplog.at_level(logging.INFO):
        faces = detect_faces(paths, True)
    assert "no face found in 1 of 2 instance photo(s): 0000.png; centre crop" in caplog.text
    stream = PairedStream(ImageSet(tuple(paths), "a photo of sks person"), None, 120, batch_size=2, seed=0,
                          faces=faces, face_crop=True, mask="off")
    batch = stream.batch(0)
    by_name = {paths[stream.pair_indices(p)[0]].name: row for row, p in enumerate(range(2))}
    face_row, noise_row = by_name["face.png"], by_name["0000.png"]
    # 320x240 -> 160x120: the face centre (230, 110) maps to (115, 55); a 120 crop centred there is clamped at 40
    assert batch["crop_top_left"][face_row].tolist() == [0, 40]
    assert batch["crop_top_left"][noise_row].tolist() == [0, 20]  # centre crop
    crop = ((batch["pixel_values"][face_row].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    found = detect_face(Image.fromarray(crop).resize((240, 240)))
    assert found is not None and abs(found[0] + found[2] / 2 - 150) < 20  # the face, right of centre in the crop


def test_mask_file_and_face_ellipse_weight_the_instance_examples(face_dir):
    from dreambooth_pl.data.datamodule import detect_faces

    mask = Image.new("L", (320, 240), 0)
    ImageDraw.Draw(mask).rectangle([160, 0, 319, 239], fill=255)  # right half
    mask.save(face_dir / "0000.mask.png")
    paths = list_images(face_dir)
    assert [p.name for p in paths] == ["0000.png", "face.png"]  # the mask file is not a training image
    faces = detect_faces(paths, False)
    prior = ImageSet(tuple(write_images(face_dir.parent / "cls", 2, seed=1)), "a photo of person")
    stream = PairedStream(ImageSet(tuple(paths), "p"), prior, 120, batch_size=2, seed=0, center_crop=True,
                          faces=faces, mask="face", mask_floor=0.2)
    batch = stream.batch(0)
    rows = {paths[stream.pair_indices(p)[0]].name: r for r, p in enumerate(range(2))}
    m = batch["loss_mask"]
    assert m.shape == (4, 1, 120, 120) and torch.equal(m[2:], torch.ones(2, 1, 120, 120))  # priors unweighted
    file_mask = m[rows["0000.png"], 0]  # centre crop of 160 wide from left 20: mask edge at x = 80 - 20 = 60
    assert torch.allclose(file_mask[:, :59], torch.tensor(0.2)) and torch.allclose(file_mask[:, 61:], torch.tensor(1.0))
    from torchvision.transforms import functional as TF

    ellipse = TF.resize(face_ellipse(faces[paths[1]], (320, 240)), [120, 160]).crop((20, 0, 140, 120))
    want = 0.2 + 0.8 * torch.from_numpy(np.asarray(ellipse, dtype=np.float32) / 255)
    torch.testing.assert_close(m[rows["face.png"], 0], want, atol=1e-6, rtol=0)
    assert (want > 0.99).float().mean() > 0.2 and (want < 0.21).float().mean() > 0.2  # an ellipse, not all or none
    flipped = PairedStream(ImageSet(tuple(paths), "p"), None, 120, batch_size=2, seed=0, center_crop=True,
                           flip_p=1.0, faces=faces, mask="files", mask_floor=0.2).batch(0)["loss_mask"]
    assert torch.equal(flipped[rows["0000.png"], 0], file_mask.flip(-1))
    assert torch.equal(flipped[rows["face.png"], 0], torch.ones(120, 120))  # mask: files draws no ellipse


def test_fit_with_face_crop_and_face_mask(tiny_base, face_dir, tmp_path):
    from conftest import fit_args

    from dreambooth_pl.cli import DreamBoothCLI

    args = fit_args(tiny_base, str(face_dir), None, str(tmp_path), steps=1,
                    **{"data.crops.around": "face", "data.masks.source": "face", "data.resolution": 64})
    cli = DreamBoothCLI(args=args)
    faces = cli.datamodule.faces
    assert faces[face_dir / "face.png"] is not None and faces[face_dir / "0000.png"] is None
    batch = cli.datamodule.train_dataloader().dataset.batch(0)
    assert batch["loss_mask"].shape == (1, 1, 64, 64) and batch["loss_mask"].min() == pytest.approx(0.1)
    with pytest.raises(ValueError, match="model.perf.cache: off"):
        cli.datamodule.cache = object()  # what cache_inputs keeps with model.perf.cache on
        cli.datamodule.train_dataloader()
