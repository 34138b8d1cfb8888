"""The face-identity metric with dlib's real weights (face-recognition-models, read from the installed package):
the same person within dlib's threshold across a flip and a rescale, a different person outside it, images without
a face counted, the real-vs-real baseline without self-pairs, a model folder that lacks a file named."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from conftest import face_photos
from dreambooth_pl.metrics.embedders import EmbedderWeightsError
from dreambooth_pl.metrics.face import (DLIB_FILES, SAME_PERSON, FaceIdentity, dlib_model_dir, face_scores,
                                        load_face)


@pytest.fixture(scope="module")
def faces():
    return load_face("dlib")


@pytest.fixture(scope="module")
def photos():
    p = face_photos()
    ast = p["astronaut"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return {"astronaut": ast, "flipped": ImageOps.mirror(ast), "small": ast.resize((307, 307), Image.BICUBIC),
            "hopper": p["hopper"], "noise": noise}


def test_same_person_within_threshold_and_a_different_one_outside(faces, photos):
    emb = dict(zip(photos, faces.embed(list(photos.values()))))
    assert emb["noise"] is None and all(emb[k] is not None and emb[k].shape == (128,) for k in photos if k != "noise")
    sim = lambda a, b: float(faces.similarity(emb[a][None], emb[b][None])[0, 0])  # noqa: E731
    # measured: 0.81 (mirror), 0.84 (0.6x), 0.30 (Grace Hopper); dlib's threshold: distance 0.6, face_sim 0.4
    assert sim("astronaut", "flipped") > SAME_PERSON + 0.2 and sim("astronaut", "small") > SAME_PERSON + 0.2
    assert sim("astronaut", "hopper") < SAME_PERSON - 0.05 and sim("flipped", "hopper") < SAME_PERSON
    assert sim("astronaut", "astronaut") == pytest.approx(1.0, abs=1e-12)
    # a tensor of the same pixels embeds as the PIL image does (uint8 and [0, 1] floats)
    u8 = torch.from_numpy(np.array(photos["small"])).permute(2, 0, 1)
    for t in (u8, u8.float() / 255):
        np.testing.assert_allclose(faces.embed([t])[0], emb["small"], atol=1e-6)


def test_metric_counts_matches_and_images_without_a_face(faces, photos):
    metric = FaceIdentity(faces, [photos["astronaut"], photos["small"]])
    metric.update([photos["flipped"], photos["hopper"]])
    metric.update([photos["noise"], photos["noise"]])  # no face: counted, never an error
    out = metric.compute()
    emb = faces.embed([photos["astronaut"], photos["small"], photos["flipped"], photos["hopper"]])
    ref = np.stack(emb[:2])
    expected = np.mean([faces.similarity(e[None], ref).mean() for e in emb[2:]])
    assert float(out["face_sim"]) == pytest.approx(expected, abs=1e-6)
    assert float(out["face_match"]) == 0.25 and int(out["face_none"]) == 2  # the flip matches; of 4 samples
    assert face_scores([photos["noise"]], [photos["astronaut"]], faces) == {"face_match": 0.0, "face_none": 1}
    assert face_scores([photos["flipped"]], [photos["noise"]], faces) == {}  # a subject without a face: no score
    assert face_scores([photos["flipped"]], [photos["astronaut"]], None) == {}  # face metric off


def test_real_baseline_leaves_out_each_photo_with_itself(faces, photos):
    real = [photos["astronaut"], photos["flipped"], photos["noise"], photos["small"]]
    out = face_scores(real, real, faces, reference_index=torch.arange(4))
    emb = [e for e in faces.embed(real) if e is not None]
    sims = faces.similarity(np.stack(emb), np.stack(emb))
    assert out["face_sim"] == pytest.approx(float(sims[~np.eye(3, dtype=bool)].mean()), abs=1e-6)
    assert out["face_match"] == 0.75 and out["face_none"] == 1


def test_model_folder_is_checked(tmp_path):
    installed = dlib_model_dir("dlib")
    shutil.copy(installed / DLIB_FILES[1], tmp_path / DLIB_FILES[1])
    with pytest.raises(EmbedderWeightsError, match=f"lacks {DLIB_FILES[0]}"):
        dlib_model_dir(str(tmp_path))
    shutil.copy(installed / DLIB_FILES[0], tmp_path / DLIB_FILES[0])
    assert dlib_model_dir(str(tmp_path)) == tmp_path  # the two files alone are enough (a GPU machine's copy)
