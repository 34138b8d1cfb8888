"""Image intake: every odd phone/web file is converted or refused with its name and the fix, all at once."""
from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_pl.data.images import (MAX_PIXELS, ImageIntakeError, caption_for, check_images, inspect_image,
                                       list_images, load_rgb)


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG whose header claims ``w x h`` (the shape of a decompression bomb) without its pixel data."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _rgb(w=64, h=48, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_modes_convert_to_rgb(tmp_path):
    """CMYK, grey, 16-bit grey, palette and RGBA all load as RGB; alpha is composited on white."""
    _rgb().convert("CMYK").save(tmp_path / "cmyk.jpg")
    _rgb().convert("L").save(tmp_path / "grey.png")
    Image.fromarray(np.full((48, 64), 65535 // 2, dtype=np.uint16)).save(tmp_path / "grey16.png")
    _rgb().convert("P").save(tmp_path / "palette.png")
    rgba = Image.new("RGBA", (64, 48), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "rgba.png")
    for name in ("cmyk.jpg", "grey.png", "grey16.png", "palette.png", "rgba.png"):
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (64, 48), name
    assert load_rgb(tmp_path / "rgba.png").getpixel((0, 0)) == (255, 255, 255)
    assert abs(load_rgb(tmp_path / "grey16.png").getpixel((0, 0))[0] - 127) <= 1  # top 8 bits, not clipped to 255
    assert "converted CMYK to RGB" in inspect_image(tmp_path / "cmyk.jpg").notes[0]
    assert inspect_image(tmp_path / "rgba.png").notes == ["converted RGBA to RGB with transparency composited on white"]


def test_exif_orientation_applied(tmp_path):
    img = _rgb(64, 48)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (48, 64)
    rep = inspect_image(tmp_path / "rot.jpg")
    assert rep.size == (48, 64) and any("EXIF orientation 6" in n for n in rep.notes)


def test_animated_uses_first_frame_with_warning(tmp_path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    with pytest.warns(UserWarning, match=r"anim\.gif: animated \(2 frames\): using the first frame"):
        check_images([tmp_path / "anim.gif", tmp_path / "anim.webp"])
    assert load_rgb(tmp_path / "anim.webp").getpixel((5, 5))[0] > 200  # red first frame


def test_mpo_camera_photos_are_named_as_such_not_animated(tmp_path):
    """DreamBooth's own candle photos are MPO: a JPEG plus an embedded preview, which is no animation."""
    frames = [_rgb(64, 48), _rgb(32, 24)]
    frames[0].save(tmp_path / "cam.jpg", format="MPO", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "cam.jpg").format == "MPO"
    with pytest.warns(UserWarning, match=r"cam\.jpg: MPO camera photo with 1 embedded preview") as rec:
        check_images([tmp_path / "cam.jpg"])
    assert "animated" not in str(rec[0].message) and load_rgb(tmp_path / "cam.jpg").size == (64, 48)


def test_small_images_upscaled_with_warning_and_refused_below_floor(tmp_path):
    _rgb(100, 80).save(tmp_path / "small.png")
    _rgb(30, 20).save(tmp_path / "tiny.png")
    with pytest.warns(UserWarning, match=r"small\.png: upscaled: shortest side 80 px < resolution 128"):
        assert check_images([tmp_path / "small.png"], resolution=128) == [tmp_path / "small.png"]
    with pytest.raises(ImageIntakeError, match=r"tiny\.png: too small: 30x20.*floor of 32 px"):
        check_images([tmp_path / "tiny.png"], resolution=128)


def test_decompression_bomb_refused_naming_pixel_count(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)  # 400 MP claimed by a ~100-byte file
    _png_header_only(tmp_path / "big.png", 13000, 13000)  # 169 MP: under the limit, so decoding is attempted
    assert 20000 * 20000 > MAX_PIXELS > 13000 * 13000
    with pytest.raises(ImageIntakeError) as err:
        check_images([tmp_path / "bomb.png", tmp_path / "big.png"])
    msg = str(err.value)
    assert "bomb.png: refused as a possible decompression bomb: 400000000 pixels exceeds the" in msg
    assert "big.png: truncated or corrupt" in msg  # its missing pixel data, not its size, is the problem
    with pytest.raises(ImageIntakeError, match="decompression bomb"):
        load_rgb(tmp_path / "bomb.png")


def _bad_files(folder: Path) -> dict[str, str]:
    """Zero-byte, truncated, corrupt, text-as-jpg and HEIC files, with the words their error must contain."""
    folder.mkdir(exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    _rgb(256, 256).save(folder / "full.jpg", quality=95)
    data = (folder / "full.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (folder / "full.jpg").unlink()
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    (folder / "notes.jpg").write_text("this is a text file, not a photo")
    (folder / "iphone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"\x00" * 64)
    (folder / "renamed.jpg").write_bytes(b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00" + b"\x00" * 64)
    return {"empty.jpg": "empty file (0 bytes)", "truncated.jpg": "truncated or corrupt",
            "corrupt.png": "", "notes.jpg": "not an image Pillow can read",
            "iphone.heic": "HEIC/HEIF is not a format Pillow reads here: convert it to JPEG or PNG",
            "renamed.jpg": "HEIC/HEIF is not a format"}


def test_bad_files_all_listed_at_once_in_strict_mode(tmp_path):
    expected = _bad_files(tmp_path / "imgs")
    _rgb().save(tmp_path / "imgs" / "good.png")
    paths = list_images(tmp_path / "imgs", "instance")
    assert len(paths) == 7  # the .heic is listed so the check can name it
    with pytest.raises(ImageIntakeError) as err:
        check_images(paths, "instance")
    msg = str(err.value)
    assert msg.startswith("6 of 7 instance image(s) cannot be used") and "strict_images: false" in msg
    for name, words in expected.items():
        line = next(ln for ln in msg.splitlines() if ln.strip().startswith(str(tmp_path / "imgs" / name)))
        assert words in line, (name, line)
    with pytest.raises(ImageIntakeError, match=r"truncated\.jpg: truncated or corrupt"):
        load_rgb(tmp_path / "imgs" / "truncated.jpg")


def test_bad_files_skipped_with_warning_when_not_strict(tmp_path):
    _bad_files(tmp_path / "imgs")
    _rgb().save(tmp_path / "imgs" / "good.png")
    with pytest.warns(UserWarning, match=r"skipped 6 unusable class image\(s\)"):
        kept = check_images(list_images(tmp_path / "imgs"), "class", strict=False)
    assert kept == [tmp_path / "imgs" / "good.png"]
    (tmp_path / "imgs" / "good.png").unlink()
    with pytest.raises(ImageIntakeError, match="6 of 6"):  # nothing usable left is an error even when lenient
        check_images(list_images(tmp_path / "imgs"), "class", strict=False)


def test_listing_errors_and_side_files(tmp_path):
    with pytest.raises(ImageIntakeError, match="does not exist"):
        list_images(tmp_path / "nope", "class")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("a photo of sks dog on a beach")
    (tmp_path / "a.exe").write_bytes(b"MZ")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert list_images(tmp_path) == [tmp_path / "a.png"]
    assert any("a.exe" in str(w.message) for w in rec)
    assert caption_for(tmp_path / "a.png") == "a photo of sks dog on a beach"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("credits")
    with pytest.raises(ImageIntakeError, match="holds no images"):
        list_images(tmp_path / "empty")


def test_a_folder_is_checked_on_threads_in_order_and_the_warnings_filter_survives(tmp_path, monkeypatch):
    """check_images decodes on worker threads (a 197-image class folder took 9.7 s one by one): the reports keep
    the folder's order, the notes and errors are the one-by-one run's, Pillow's bomb warning stays silenced while
    the threads decode, and the process's warnings filters are as before afterwards (``catch_warnings`` entered once,
    not on each thread)."""
    import threading

    import dreambooth_pl.data.images as images

    folder = tmp_path / "imgs"
    expected = _bad_files(folder)
    for i in range(12):
        _rgb(64 + i, 48, seed=i).save(folder / f"ok{i:02d}.png")
    paths = list_images(folder)
    threads, inspect = set(), images._inspect
    # the first two decodes wait for each other: a pool that ran everything on one thread fails here, and a fast
    # machine whose first thread finished every file before the second started cannot pass by luck or fail by it
    meet, first_two = threading.Barrier(2, timeout=30), iter(range(2))
    lock = threading.Lock()

    def spy(path, resolution):
        threads.add(threading.get_ident())
        with lock:
            wait = next(first_two, None) is not None
        if wait:
            meet.wait()
        warnings.warn("decoding", Image.DecompressionBombWarning)  # silenced by the caller's one filter
        return inspect(path, resolution)

    monkeypatch.setattr(images, "_inspect", spy)
    decode_all = images.decode_all
    # four threads even on a one-CPU runner (DECODE_WORKERS follows the CPU count)
    monkeypatch.setattr(images, "decode_all", lambda fn, ps: decode_all(fn, ps, workers=4))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filters = list(warnings.filters)  # the caller's own "always": what must survive the check
        kept = check_images(paths, "class", strict=False)
        assert warnings.filters == filters
    assert len(threads) > 1
    assert not [w for w in seen if w.category is Image.DecompressionBombWarning]
    assert kept == [p for p in paths if p.name.startswith("ok")]  # the folder's order
    monkeypatch.setattr(images, "_inspect", inspect)
    with pytest.raises(ImageIntakeError) as threaded:
        check_images(paths, "class")
    monkeypatch.setattr(images, "decode_all", lambda fn, ps: decode_all(fn, ps, workers=1))  # one by one
    with pytest.raises(ImageIntakeError) as serial:
        check_images(paths, "class")
    assert all(name in str(serial.value) for name in expected)
    assert str(threaded.value) == str(serial.value)
