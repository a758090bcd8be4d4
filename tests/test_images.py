import cv2
import numpy as np
import pytest

from efsolo.data.images import ImageReadError, read_image, resize_short_side


def test_grayscale_rgba_and_16bit_are_converted(tmp_path):
    gray = np.full((5, 6), 100, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 2], rgba[..., 3] = 10, 200, 128  # BGRA: blue 10, red 200
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    deep = np.full((5, 6, 3), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "d.png"), deep)
    for name in ("g", "a", "d"):
        img = read_image(tmp_path / f"{name}.png")
        assert img.shape == (5, 6, 3) and img.dtype == np.uint8
    assert (read_image(tmp_path / "g.png") == 100).all()
    assert tuple(read_image(tmp_path / "a.png")[0, 0]) == (200, 0, 10)
    assert (read_image(tmp_path / "d.png") == 255).all()


def test_corrupt_empty_and_missing_files_raise_one_line(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    for name, msg in (("bad.jpg", "not a readable image"), ("empty.png", "empty file"), ("nope.png", "no such file")):
        with pytest.raises(ImageReadError, match=msg) as err:
            read_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_resize_short_side():
    assert resize_short_side(480, 640, 800, 1333) == (800, 1067)
    assert resize_short_side(100, 1000, 800, 1333) == (133, 1333)
