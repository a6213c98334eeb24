"""trainer.cache: decode and resize every image once per (dataset, size, mode), shared by every trial on a node.

builds.jsonl gets one line per build; these tests count its lines to see
that nothing was decoded twice, within a process, across processes, and
across the trials of a real search. A build killed half-way is a real
process that dies with os._exit in the middle of a chunk.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import write_image

from core import storage
from core.errors import BadInput
from trainer.cache import SPARE_BYTES, cached_images, check_free_space, fingerprint
from trainer.images import load

REPO = Path(__file__).resolve().parents[2]


def _images(root: Path, n: int, size=(40, 24)) -> list[str]:
    return [str(write_image(root / f"img_{i:03d}.jpg", "rgb", size, seed=i, cls=i % 4)) for i in range(n)]


def _builds(cache_dir: Path) -> list[dict]:
    path = cache_dir / "builds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_first_call_builds_second_call_reuses(tmp_path):
    locations = _images(tmp_path / "img", 7)
    cache = tmp_path / "cache"
    first = cached_images(locations, "key1", 16, "crop", str(cache))
    assert first.shape == (7, 16, 16, 3) and first.dtype == np.uint8
    builds = _builds(cache)
    assert len(builds) == 1
    assert builds[0]["decoded"] == 7 and builds[0]["mode"] == "crop" and builds[0]["shape"] == [7, 16, 16, 3]
    assert builds[0]["pid"] == os.getpid()

    second = cached_images(locations, "key1", 16, "crop", str(cache))
    assert len(_builds(cache)) == 1  # nothing decoded again
    assert np.array_equal(np.asarray(first), np.asarray(second))


def test_rows_are_the_decoded_resized_images_in_order(tmp_path):
    locations = _images(tmp_path / "img", 5)
    for mode in ("squish", "crop", "letterbox"):
        arr = cached_images(locations, "k", 12, mode, str(tmp_path / "cache"))
        for i, loc in enumerate(locations):
            assert np.array_equal(arr[i], load(loc, 12, mode)), (mode, i)


def test_the_cache_is_read_only(tmp_path):
    arr = cached_images(_images(tmp_path / "img", 2), "k", 8, "squish", str(tmp_path / "cache"))
    with pytest.raises(ValueError):
        arr[0, 0, 0, 0] = 1


def test_each_size_and_mode_is_its_own_entry(tmp_path):
    locations = _images(tmp_path / "img", 4)
    cache = tmp_path / "cache"
    for size, mode in [(16, "crop"), (16, "letterbox"), (24, "crop"), (16, "crop"), (24, "crop")]:
        assert cached_images(locations, "k", size, mode, str(cache)).shape == (4, size, size, 3)
    entries = Counter((b["shape"][1], b["mode"]) for b in _builds(cache))
    assert entries == {(16, "crop"): 1, (16, "letterbox"): 1, (24, "crop"): 1}


def test_an_unfinished_entry_is_rebuilt(tmp_path):
    locations = _images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    cached_images(locations, "k", 8, "crop", str(cache))
    os.remove(cache / "k" / "8-crop" / "meta.json")  # as if the builder died before finishing
    arr = cached_images(locations, "k", 8, "crop", str(cache))
    assert len(_builds(cache)) == 2
    assert np.array_equal(arr[2], load(locations[2], 8, "crop"))


def test_fingerprint_changes_with_names_order_and_sizes():
    base = fingerprint(["a.jpg", "b.jpg"], [10, 20])
    assert base == fingerprint(["a.jpg", "b.jpg"], [10, 20])
    assert base != fingerprint(["b.jpg", "a.jpg"], [20, 10])
    assert base != fingerprint(["a.jpg", "b.jpg"], [10, 21])
    assert base != fingerprint(["a.jpg", "c.jpg"], [10, 20])


def test_two_processes_at_once_decode_each_image_once(tmp_path, ray_session):
    """Two Ray tasks (two worker processes) ask for the same entry at the same moment."""
    ray = ray_session
    n = 120
    locations = _images(tmp_path / "img", n, size=(64, 48))
    cache = str(tmp_path / "cache")

    @ray.remote(num_cpus=0)
    class Gate:
        def __init__(self):
            self.arrived = 0

        def arrive(self) -> int:
            self.arrived += 1
            return self.arrived

        def count(self) -> int:
            return self.arrived

    @ray.remote(num_cpus=1)
    def trial(gate, locations, cache):
        import os
        import time

        import numpy as np

        from trainer.cache import cached_images

        ray.get(gate.arrive.remote())
        while ray.get(gate.count.remote()) < 2:  # start both builds together
            time.sleep(0.005)
        return os.getpid(), np.array(cached_images(locations, "shared", 20, "letterbox", cache))

    gate = Gate.remote()
    (pid_a, a), (pid_b, b) = ray.get([trial.remote(gate, locations, cache) for _ in range(2)])
    assert pid_a != pid_b  # really two processes
    builds = _builds(Path(cache))
    assert len(builds) == 1, builds
    assert builds[0]["decoded"] == n
    assert builds[0]["pid"] in (pid_a, pid_b)
    assert a.shape == (n, 20, 20, 3)
    assert np.array_equal(a, b)
    assert np.array_equal(a[n - 1], load(locations[n - 1], 20, "letterbox"))


@pytest.mark.slow
def test_a_search_decodes_each_image_once_per_size_and_mode(tiny_experiment):
    """After a real search (and its cross-fit), every cache entry was built exactly once, decoding all its images."""
    meta = storage.read_json(str(tiny_experiment.experiment / "experiment.json"))
    ctx = meta["context"]
    builds = _builds(tiny_experiment.cache_dir)
    assert builds, "the search built no cache entry"
    per_entry = Counter(b["entry"] for b in builds)
    assert all(count == 1 for count in per_entry.values()), per_entry
    expected = {ctx["data_key"]: tiny_experiment.images, ctx["test_key"]: tiny_experiment.test_images}
    train_entries = set()
    for b in builds:
        key = Path(b["entry"]).parent.name
        assert key in expected, b["entry"]
        assert b["decoded"] == expected[key]
        assert Path(b["entry"]).name == f"{b['shape'][1]}-{b['mode']}"
        if key == ctx["data_key"]:
            train_entries.add((b["shape"][1], b["mode"]))
    # every (size, mode) a trial used has its one training entry
    trials = storage.read_parquet(str(tiny_experiment.experiment / "trials.parquet")).to_pandas()
    used = set(zip(trials["image_size"].astype(int), trials["resize_mode"]))
    assert used <= train_entries


# --- at scale: killed builds, a full disk -------------------------------------------

# A build in its own process that dies (os._exit: no clean-up, no atexit) when it
# starts decoding image number `die_at`. One chunk = 40 images, progress synced
# after each chunk (CHECKPOINT_S = 0). Image 131 is in chunk 3, decoded while
# chunk 2 is written: 80 or 120 images are on record when it dies.
_KILLED_BUILD = """
import json, os, sys
from trainer import cache, images
locations, cache_dir, die_at = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
cache.CHUNK_BYTES, cache.CHECKPOINT_S = 40 * 16 * 16 * 3, 0.0
real_load, calls = images.load, []
def load(*args):
    calls.append(1)
    if len(calls) >= die_at:
        os._exit(9)
    return real_load(*args)
images.load = load
cache.cached_images(locations, "k", 16, "squish", cache_dir, workers=2)
"""


def test_a_build_killed_half_way_resumes_and_equals_a_clean_build(tmp_path):
    locations = _images(tmp_path / "img", 300)
    cache = tmp_path / "cache"
    (tmp_path / "locations.json").write_text(json.dumps(locations))
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(tmp_path / "locations.json"), str(cache), "131"],
                          check=False, cwd=REPO, timeout=120)
    assert proc.returncode == 9
    entry = cache / "k" / "16-squish"
    # what a killed build leaves: the partial file and its progress, nothing a reader would take;
    # the record's own .tmp too when the kill came while the main thread was writing it (seen in CI)
    assert set(os.listdir(entry)) - {"progress.json.tmp"} == {"images.u8.tmp", "progress.json"}
    done = json.loads((entry / "progress.json").read_text())["done"]
    assert done in (80, 120)
    assert _builds(cache) == []

    arr = cached_images(locations, "k", 16, "squish", str(cache))  # its lock died with it
    [build] = _builds(cache)
    assert (build["resumed_from"], build["decoded"]) == (done, 300 - done)
    assert sorted(os.listdir(entry)) == ["images.u8", "meta.json"]
    clean = cached_images(locations, "k", 16, "squish", str(tmp_path / "clean"))
    assert np.array_equal(np.asarray(arr), np.asarray(clean))


def test_a_record_half_written_when_the_build_died_is_cleared_by_the_rerun(tmp_path):
    locations = _images(tmp_path / "img", 6)
    entry = tmp_path / "cache" / "k" / "8-crop"
    entry.mkdir(parents=True)
    (entry / "progress.json.tmp").write_text('{"shape": [6, 8, ')   # killed mid-write, never renamed
    arr = cached_images(locations, "k", 8, "crop", str(tmp_path / "cache"))
    assert sorted(os.listdir(entry)) == ["images.u8", "meta.json"]
    assert np.asarray(arr).shape == (6, 8, 8, 3)


def test_leftovers_that_do_not_match_are_thrown_away(tmp_path):
    locations = _images(tmp_path / "img", 6)
    cache = tmp_path / "cache"
    entry = cache / "k" / "8-crop"
    entry.mkdir(parents=True)
    # a partial file of another shape, with a record claiming most of it is done
    (entry / "images.u8.tmp").write_bytes(b"\xff" * 1000)
    (entry / "progress.json").write_text(json.dumps({"shape": [6, 8, 8, 3], "mode": "crop", "done": 4}))
    arr = cached_images(locations, "k", 8, "crop", str(cache))
    assert _builds(cache)[0]["resumed_from"] == 0
    assert all(np.array_equal(arr[i], load(loc, 8, "crop")) for i, loc in enumerate(locations))


def test_a_torn_meta_json_means_rebuild_not_a_crash(tmp_path):
    locations = _images(tmp_path / "img", 3)
    cache = tmp_path / "cache"
    cached_images(locations, "k", 8, "squish", str(cache))
    (cache / "k" / "8-squish" / "meta.json").write_text('{"shape": [3, 8')
    arr = cached_images(locations, "k", 8, "squish", str(cache))
    assert len(_builds(cache)) == 2 and arr.shape == (3, 8, 8, 3)


def test_a_disk_without_room_stops_with_what_to_do(tmp_path):
    check_free_space(str(tmp_path), 1000)  # fits: no error
    needed = 10**15  # a petabyte
    with pytest.raises(BadInput) as e:
        check_free_space(str(tmp_path / "not" / "made" / "yet"), needed, "100,000 images at 224 px (squish)")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'not' / 'made' / 'yet'}: no room for 100,000 images at 224 px (squish)")
    assert f"{needed:,} bytes" in msg and "is free" in msg and f"{SPARE_BYTES / 1e9:.2f} GB spare" in msg
    assert "bigger disk" in msg and "--cache-dir" in msg and "fewer image sizes" in msg
    assert "\n" not in msg


def test_a_build_that_cannot_fit_stops_before_writing(tmp_path):
    """An entry bigger than the disk: BadInput before a byte is written, nothing left behind."""
    huge = 200_000  # 200k images at 4096 px: ~10 TB
    locations = [str(tmp_path / f"{i}.jpg") for i in range(huge)]  # never read
    cache = tmp_path / "cache"
    with pytest.raises(BadInput, match="no room for 200,000 images at 4096 px"):
        cached_images(locations, "k", 4096, "squish", str(cache))
    assert os.listdir(cache / "k" / "4096-squish") == []
    assert _builds(cache) == []
