"""data/masks.py: mask files are inspected with their photos before any model loads, under the strict rule."""
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_pl.data.images import ImageIntakeError, find_instance_images
from conftest import fit_args, write_images


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A tiny PNG whose header says ``side`` x ``side`` (400 MP): what a decompression bomb looks like to open()."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # chunk type + 13 bytes of IHDR data
    ihdr[4:12] = struct.pack(">II", side, side)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "inst"
    write_images(folder, 3, size=(80, 64))
    return folder


def _find(folder, strict=True, floor=0.1):
    return find_instance_images(str(folder), None, 32, strict, "files", floor)


def test_bad_masks_are_listed_with_the_photos(photos):
    Image.new("L", (80, 64), 255).save(photos / "0000.mask.png")  # a good one
    _bomb_png(photos / "0001.mask.png")
    Image.new("L", (64, 80), 255).save(photos / "0002.mask.png")  # portrait mask for a landscape photo
    with pytest.raises(ImageIntakeError) as err:
        _find(photos)
    msg = str(err.value)
    assert "2 of 3 instance image(s) cannot be used" in msg
    assert "0001.mask.png has 400,000,000 pixels, refused as a possible decompression bomb" in msg
    assert "0002.mask.png is 64x80 but the photo is 80x64" in msg
    with pytest.warns(UserWarning, match="skipped 2 unusable instance image"):
        assert [p.name for p in _find(photos, strict=False)] == ["0000.png"]


def test_an_all_black_mask_with_floor_0_teaches_nothing(photos):
    Image.new("L", (80, 64), 0).save(photos / "0000.mask.png")
    assert len(_find(photos, floor=0.1)) == 3  # black is weight 0.1 there: still a signal
    with pytest.raises(ImageIntakeError, match="0000.mask.png is all black and data.masks.floor is 0"):
        _find(photos, floor=0.0)


def test_an_orphan_mask_is_named(photos):
    Image.new("L", (80, 64), 255).save(photos / "99.mask.png")
    with pytest.raises(ImageIntakeError, match=r"1 mask file\(s\) have no photo.*\n.*99.mask.png: no photo named 99"):
        _find(photos)
    with pytest.warns(UserWarning, match="ignoring 1 mask file"):
        assert len(_find(photos, strict=False)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # data.masks.source: off reads no mask at all
        assert len(find_instance_images(str(photos), None, 32, True, "off")) == 3


@pytest.mark.parametrize("case", ["bomb", "orphan"])
def test_mask_problems_are_named_before_the_model_loads(case, subject_dirs, tmp_path, no_model_load):
    from dreambooth_pl.cli import DreamBoothCLI

    inst = Path(subject_dirs[0])
    photo = sorted(inst.glob("*.jpg"))[0]
    if case == "bomb":
        _bomb_png(photo.with_name(photo.stem + ".mask.png"))
    else:
        Image.new("L", (8, 8), 255).save(inst / "99.mask.png")
    with pytest.raises(ImageIntakeError, match="decompression bomb" if case == "bomb" else "99.mask.png"):
        DreamBoothCLI(args=fit_args("unused", *subject_dirs, str(tmp_path / "logs")))
