"""trainer.images: decode any image to RGB uint8, the three resize modes, and the decode-check scan.

The scan's cache of verdicts is checked by counting the files a scan reads
(``decode_checks()``), on real files changed the ways files change.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import IMAGE_KINDS, class_pixels, truncate_file, uri, write_image
from PIL import Image

from trainer import scan_cache
from trainer.images import RESIZE_MODES, Progress, decode_checks, decode_rgb, file_identities, load, resize, scan

REPO = Path(__file__).resolve().parents[2]


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


# --- the scan's cache of verdicts (by location, size and mtime) ----------------------

def _dataset(root, n: int) -> list[str]:
    return [str(write_image(root / f"img_{i:03d}.jpg", "rgb", size=(48, 32), seed=i, cls=i % 4)) for i in range(n)]


def _scan_counting(locations, cache_dir) -> tuple[list[int], dict[str, str], int]:
    """scan(), and how many files it read and decode-checked."""
    before = decode_checks()
    sizes, bad = scan(locations, workers=2, cache_dir=str(cache_dir))
    return sizes, bad, decode_checks() - before


def test_a_second_scan_of_unchanged_files_reads_none(tmp_path):
    locations = _dataset(tmp_path / "img", 20)
    broken = locations[7]
    truncate_file(broken)
    cache = tmp_path / "cache"
    sizes, bad, read = _scan_counting(locations, cache)
    assert read == 20 and set(bad) == {broken}
    assert sizes == [os.path.getsize(p) for p in locations]
    # the same answer, broken file included, without reading a single file
    assert _scan_counting(locations, cache) == (sizes, bad, 0)
    # without cache_dir: as before, every file read again
    assert scan(locations, workers=2) == (sizes, bad)


def test_the_verdict_follows_size_and_mtime_only(tmp_path):
    """What the cache trusts, shown: bytes replaced with garbage of the same size and mtime keep their verdict."""
    locations = _dataset(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    assert scan(locations, cache_dir=str(cache))[1] == {}
    path = Path(locations[1])
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert _scan_counting(locations, cache)[1:] == ({}, 0)      # not read: same identity
    assert set(scan(locations)[1]) == {str(path)}                # a full check sees it
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    _, bad, read = _scan_counting(locations, cache)  # a new mtime: read, and seen
    assert set(bad) == {str(path)} and read == 1


def test_a_changed_file_is_checked_again(tmp_path):
    locations = _dataset(tmp_path / "img", 10)
    cache = tmp_path / "cache"
    first, bad, _ = _scan_counting(locations, cache)
    assert bad == {}
    time.sleep(0.01)  # a new mtime even on a coarse clock

    # rewritten with other content and size: read again, its new size reported
    write_image(locations[2], "rgb", size=(96, 64), seed=99, cls=3)
    # cut short (a broken re-download): read again and reported
    truncate_file(locations[5])
    sizes, bad, read = _scan_counting(locations, cache)
    assert read == 2
    assert set(bad) == {locations[5]}
    assert sizes[2] == os.path.getsize(locations[2]) != first[2]
    assert sizes[5] == os.path.getsize(locations[5]) < first[5]
    assert [s for i, s in enumerate(sizes) if i not in (2, 5)] == [s for i, s in enumerate(first) if i not in (2, 5)]
    assert _scan_counting(locations, cache)[1:] == (bad, 0)

    # repaired: read once more, and good again
    write_image(locations[5], "rgb", size=(48, 32), seed=5, cls=1)
    assert _scan_counting(locations, cache)[1:] == ({}, 1)


def test_a_missing_file_is_not_remembered(tmp_path):
    locations = _dataset(tmp_path / "img", 3)
    later = str(tmp_path / "img" / "later.jpg")
    cache = tmp_path / "cache"
    _, bad, read = _scan_counting(locations + [later], cache)
    assert read == 4 and set(bad) == {later} and bad[later].startswith("cannot read")
    write_image(later, "rgb", size=(48, 32))
    assert _scan_counting(locations + [later], cache)[1:] == ({}, 1)


def test_a_cache_file_sqlite_cannot_read_is_started_afresh(tmp_path):
    locations = _dataset(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / scan_cache.FILE_NAME).write_bytes(b"not a database, e.g. a torn copy" * 100)
    assert _scan_counting(locations, cache)[1:] == ({}, 4)
    assert _scan_counting(locations, cache)[1:] == ({}, 0)


def test_two_processes_scanning_at_once_agree_and_fill_one_cache(tmp_path):
    locations = [str(write_image(tmp_path / "img" / f"{i:04d}.png", "rgb", size=(24, 16), seed=i)) for i in range(1200)]
    truncate_file(locations[700])
    cache, go = tmp_path / "cache", tmp_path / "go"
    # Both processes import, wait for `go`, then scan together (three commits of verdicts each).
    script = ("import json, os, sys, time; from trainer.images import scan\n"
              "while not os.path.exists(sys.argv[3]): time.sleep(0.005)\n"
              "print(json.dumps(scan(json.load(open(sys.argv[1])), workers=2, cache_dir=sys.argv[2])))")
    (tmp_path / "locations.json").write_text(json.dumps(locations))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "locations.json"), str(cache), str(go)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    a, b = (json.loads(out) for out in outputs)
    assert a == b and set(a[1]) == {locations[700]}
    assert _scan_counting(locations, cache) == (a[0], a[1], 0)


def test_processes_opening_a_new_cache_together_all_get_it(tmp_path):
    """Switching a new sqlite file to WAL can say "database is locked" at once, without waiting.

    Before the retry in ``CheckCache._open``, about 1 opener in 12 failed this way (4 at a time).
    """
    script = ("import os, sys, time; from trainer.scan_cache import CheckCache\n"
              "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
              "CheckCache(sys.argv[1], 1).record([(f'{os.getpid()}-{i}', (1, 2), None) for i in range(50)])")
    for round_ in range(8):
        cache, go = tmp_path / f"cache{round_}", tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(cache), str(go)], cwd=REPO,
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]
        time.sleep(0.3)  # let them import and wait for `go`
        go.touch()
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
        assert [proc.returncode for proc in procs] == [0] * 4, errors
        rows = scan_cache.CheckCache(str(cache), 1).db.execute("SELECT COUNT(*) FROM checks").fetchone()[0]
        assert rows == 200


def test_a_scan_in_a_bucket_lists_each_folder_and_remembers(s3, tmp_path):
    """Identities come from one listing per folder (no read per object); a re-uploaded object is read again.

    ``s3`` (conftest) is a client for moto's real S3 server in its own process; it skips the test
    where boto3 or moto is not installed.
    """
    s3.create_bucket(Bucket="scan")
    ok = cv2.imencode(".jpg", class_pixels(1, (40, 30)))[1].tobytes()
    for i in range(6):
        s3.put_object(Bucket="scan", Key=f"data/{'a' if i < 3 else 'b'}/{i}.jpg", Body=ok)
    locations = [uri(s3.endpoint, "scan", f"data/{'a' if i < 3 else 'b'}/{i}.jpg") for i in range(6)]
    locations.append(uri(s3.endpoint, "scan", "data/a/missing.jpg"))
    identities = file_identities(locations)
    assert [ident[0] for ident in identities[:6]] == [len(ok)] * 6 and identities[6] is None
    cache = tmp_path / "cache"
    sizes, bad, read = _scan_counting(locations, cache)
    assert read == 7 and set(bad) == {locations[6]} and sizes[:6] == [len(ok)] * 6
    assert _scan_counting(locations, cache)[1:] == (bad, 1)      # only the missing one is tried again
    s3.put_object(Bucket="scan", Key="data/b/4.jpg", Body=ok[: len(ok) // 2])
    _, bad, read = _scan_counting(locations, cache)
    assert read == 2 and set(bad) == {locations[4], locations[6]}


def test_progress_prints_every_tenth_of_a_long_job_and_nothing_for_a_short_one(capsys):
    long = Progress("checking images", 5000, every_s=3600)
    for done in range(250, 5001, 250):
        long.update(done)
    short = Progress("checking images", 1999)
    for done in range(1, 2000):
        short.update(done)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("checking images: 500/5,000 (10%)")
    assert lines[-1].startswith("checking images: 5,000/5,000 (100%)") and "done in" in lines[-1]


def test_small_scans_are_quiet(tmp_path, capsys):
    scan(_dataset(tmp_path / "img", 5), cache_dir=str(tmp_path / "cache"))
    assert capsys.readouterr() == ("", "")
