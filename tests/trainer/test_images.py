"""trainer.images: decode any image to RGB uint8, the three resize modes, and the decode-check scan."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image
from conftest import IMAGE_KINDS, class_pixels, truncate_file, write_image

from trainer.images import RESIZE_MODES, decode_rgb, load, resize, scan


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_kind_decodes_to_hxwx3_uint8_rgb(tmp_path, kind):
    path = write_image(tmp_path / f"{kind}.png", kind, size=(20, 10), cls=0)
    img = decode_rgb(path.read_bytes(), str(path))
    assert img.shape == (10, 20, 3)
    assert img.dtype == np.uint8
    expected = class_pixels(0, (20, 10))
    if kind == "gray":
        # all three channels equal, and the gray value of the original
        assert (img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all()
        gray = cv2.cvtColor(expected, cv2.COLOR_RGB2GRAY)
        assert np.abs(img[..., 0].astype(int) - gray).max() <= 1
    elif kind == "palette":
        # 16 colours: close to the original, and still red-dominant (class 0 is red)
        assert np.abs(img.astype(int) - expected).mean() < 20
        assert img[..., 0].mean() > img[..., 1].mean() + 50
    else:
        # rgb (lossless PNG), rgba (alpha dropped), 16bit (value * 257, scaled back)
        assert np.array_equal(img, expected)


def test_channel_order_is_rgb(tmp_path):
    pure_red_bgr = np.zeros((4, 4, 3), np.uint8)
    pure_red_bgr[..., 2] = 255  # OpenCV writes BGR
    path = tmp_path / "red.png"
    cv2.imwrite(str(path), pure_red_bgr)
    img = decode_rgb(path.read_bytes())
    assert img[0, 0].tolist() == [255, 0, 0]


def test_16bit_is_scaled_not_clipped(tmp_path):
    bgr = np.zeros((3, 5, 3), np.uint16)
    bgr[..., 0], bgr[..., 1], bgr[..., 2] = 257, 32768, 65535  # B, G, R
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), bgr)
    img = decode_rgb(path.read_bytes())
    assert img.dtype == np.uint8
    r, g, b = img[0, 0].tolist()
    assert r == 255          # 65535 -> 255
    assert g in (127, 128)   # 32768 -> ~127 (clipping would give 255)
    assert b == 1            # 257 -> 1 (clipping would give 255)


def test_16bit_grayscale_is_scaled(tmp_path):
    path = tmp_path / "g16.png"
    assert cv2.imwrite(str(path), np.full((4, 4), 32768, np.uint16))
    img = decode_rgb(path.read_bytes())
    assert img.shape == (4, 4, 3) and img.dtype == np.uint8
    assert set(np.unique(img).tolist()) <= {127, 128}


def test_not_an_image_raises_naming_it():
    with pytest.raises(ValueError, match="broken.jpg"):
        decode_rgb(b"this is not an image", "broken.jpg")


# --- resize ------------------------------------------------------------------

def _wide() -> np.ndarray:
    """40 wide x 20 high: left quarter red, middle half green, right quarter blue."""
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :10] = (255, 0, 0)
    img[:, 10:30] = (0, 255, 0)
    img[:, 30:] = (0, 0, 255)
    return img


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("shape", [(20, 40), (40, 20), (7, 7), (3, 50)])
def test_every_mode_gives_size_by_size(mode, shape):
    img = np.full(shape + (3,), 200, np.uint8)
    out = resize(img, 16, mode)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_squish_keeps_everything_and_ignores_aspect():
    out = resize(_wide(), 16, "squish")
    # all three bands survive, each still in its horizontal position
    assert out[8, 1].tolist() == [255, 0, 0]
    assert out[8, 8].tolist() == [0, 255, 0]
    assert out[8, 14].tolist() == [0, 0, 255]


def test_crop_keeps_the_centre():
    out = resize(_wide(), 16, "crop")
    # scale 16/20 -> 32 x 16, then the centre 16 columns: the green half only
    assert (out == np.array([0, 255, 0], np.uint8)).all()


def test_letterbox_pads_the_short_side_with_zeros():
    out = resize(_wide(), 16, "letterbox")
    # scale 16/40 -> 16 wide x 8 high, centred vertically: 4 rows of zeros above and below
    assert (out[:4] == 0).all() and (out[12:] == 0).all()
    assert out[4:12].min(axis=2).max() == 0  # pure colours, no grey padding inside
    assert out[8, 1].tolist() == [255, 0, 0] and out[8, 14].tolist() == [0, 0, 255]
    assert (out[4:12].max(axis=2) > 0).all()  # the image fills the middle rows


def test_letterbox_of_a_tall_image_pads_left_and_right():
    out = resize(np.full((40, 20, 3), 90, np.uint8), 16, "letterbox")
    assert (out[:, :4] == 0).all() and (out[:, 12:] == 0).all()
    assert (out[:, 4:12] == 90).all()


def test_unknown_mode_raises():
    with pytest.raises(ValueError, match="stretch"):
        resize(_wide(), 16, "stretch")


def test_load_reads_a_file_and_resizes(tmp_path):
    path = write_image(tmp_path / "a.jpg", "rgb", size=(48, 32), cls=1)
    out = load(str(path), 24, "crop")
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8
    # class 1 is green-dominant
    assert out[..., 1].mean() > out[..., 0].mean() + 50


# --- scan ----------------------------------------------------------------------

def test_scan_passes_good_files_of_every_kind(tmp_path):
    paths = [str(write_image(tmp_path / f"{k}.png", k, size=(30, 20), seed=i)) for i, k in enumerate(IMAGE_KINDS)]
    paths.append(str(write_image(tmp_path / "photo.jpg", "rgb", size=(64, 48))))
    sizes, bad = scan(paths)
    assert bad == {}
    assert sizes == [len(open(p, "rb").read()) for p in paths]


def test_scan_flags_truncated_and_fake_images_and_only_them(tmp_path):
    good = str(write_image(tmp_path / "good.jpg", "rgb", size=(96, 64), seed=1))
    truncated = str(truncate_file(write_image(tmp_path / "truncated.jpg", "rgb", size=(96, 64), seed=2)))
    cut_png = str(truncate_file(write_image(tmp_path / "cut.png", "rgb", size=(96, 64), seed=3)))
    fake = tmp_path / "notes.jpg"
    fake.write_text("not an image at all\n")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    missing = str(tmp_path / "missing.jpg")
    locations = [good, truncated, cut_png, str(fake), str(empty), missing]
    sizes, bad = scan(locations, workers=2)
    assert set(bad) == {truncated, cut_png, str(fake), str(empty), missing}
    assert good not in bad
    assert all(why and "\n" not in why for why in bad.values())
    assert len(sizes) == len(locations)
    assert sizes[0] == len(open(good, "rb").read())


def test_scan_catches_a_jpeg_missing_only_its_last_bytes(tmp_path):
    path = write_image(tmp_path / "big.jpg", "rgb", size=(320, 240), seed=5)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.9)])
    _, bad = scan([str(path)])
    assert str(path) in bad


@pytest.mark.parametrize("fmt", ["TGA", "ICO", "PCX"])
def test_every_file_the_scan_passes_decodes_for_training(tmp_path, fmt):
    path = tmp_path / "photo.png"
    Image.fromarray(class_pixels(1, (32, 32))).save(path, fmt)
    _, bad = scan([str(path)])
    if str(path) not in bad:
        assert decode_rgb(path.read_bytes(), str(path)).shape == (32, 32, 3)
