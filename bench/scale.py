"""Benchmark: start-up at scale on JPEGs made here: the data, the index, the image check and the node cache.

Class-per-folder trees of ``--images`` small JPEGs (``--src-px`` wide, 4:3): listing and index, first and second
scan (``trainer.images.scan``), node-cache build (``trainer.cache.cached_images``) and the growth of each figure (the
driver's cost per trial and ``select`` at scale: bench/driver_cost.py, bench/selection_scale.py). Every step runs in
a Python process of its own, timed inside it (imports excluded), its peak RSS its own (``os.wait4``). Every file is
a shifted, flipped, re-lit variant of one of 256 crops of scikit-image's photos (input_pipeline.one_photo), quality
90. (The same check on 640x480 JPEGs, ``--check``, ran until 708b1f7: BENCHMARKS.md, "Retired studies".)

    python bench/scale.py                                  # 20,000 and 100,000 images (~6 min on 2 cores)
    python bench/scale.py --images 500,2000                # smoke
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cv2  # noqa: E402
import harness  # noqa: E402
import numpy as np  # noqa: E402

DATA_VERSION = 1
BASES = 256  # distinct random crops of the source photos


# --- data ----------------------------------------------------------------------

def _path(folder: str, i: int, classes: int) -> str:
    """class_<i % classes>/ for a listed dataset; with no classes, 10,000 files a folder."""
    return os.path.join(folder, f"class_{i % classes:02d}" if classes else f"{i // 10000:02d}", f"{i:06d}.jpg")


def _write_range(args: tuple) -> None:
    """Write files [lo, hi) of the set; each file's content depends only on (seed, its index)."""
    folder, lo, hi, seed, px, classes, (dy0, dy1, dx0, dx1) = args
    from input_pipeline import QUALITY, WIDTH, one_photo, source_photos
    photos = list(source_photos().values())
    w, h = px, px * 3 // 4
    bases = [one_photo(photos[b % len(photos)], np.random.default_rng((seed, b))) for b in range(BASES)]
    if px != WIDTH:
        bases = [cv2.resize(b, (w, h), interpolation=cv2.INTER_AREA) for b in bases]
    for i in range(lo, hi):
        rng = np.random.default_rng((seed, BASES + i))
        img = np.roll(bases[int(rng.integers(BASES))], (int(rng.integers(dy0, dy1)), int(rng.integers(dx0, dx1))),
                      (0, 1))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = cv2.convertScaleAbs(img, alpha=rng.uniform(0.85, 1.15), beta=rng.uniform(-15, 15))
        if not cv2.imwrite(_path(folder, i, classes), img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY]):
            raise SystemExit(f"cannot write {_path(folder, i, classes)}")


def make_jpegs(folder: str, n: int, px: int, classes: int, seed: int, shift: tuple) -> list[str]:
    """The first n files of the set in ``folder``, writing only those a previous run with the same settings did not
    (the manifest lies beside the tree, which holds only images)."""
    manifest = folder + ".json"
    want = {"seed": seed, "version": DATA_VERSION, "px": px, "classes": classes, "bases": BASES}
    have = 0
    if os.path.exists(manifest):
        m = json.load(open(manifest))
        have = m["count"] if {k: m.get(k) for k in want} == want else 0
    if have == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if n > have:
        for i in range(have, n):
            os.makedirs(os.path.dirname(_path(folder, i, classes)), exist_ok=True)
        t0, procs = time.perf_counter(), os.cpu_count() or 1
        step = -(-(n - have) // procs)
        ranges = [(folder, lo, min(n, lo + step), seed, px, classes, shift) for lo in range(have, n, step)]
        from multiprocessing import get_context
        with get_context("fork").Pool(len(ranges)) as pool:
            pool.map(_write_range, ranges)
        json.dump({**want, "count": n}, open(manifest, "w"))
        print(f"wrote JPEGs {have:,}..{n:,} in {time.perf_counter() - t0:.0f} s", flush=True)
    return [_path(folder, i, classes) for i in range(n)]


# --- one step in a process of its own ---------------------------------------------

def child(a) -> None:
    """One step, its JSON on the last stdout line: index (listing + index of --data), scan or build (of --list)."""
    if a.child == "index":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from searchspace.data import build_index
        from searchspace.tasks import imagefolder

        imports_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        dataset = imagefolder.load(a.data)
        t1 = time.perf_counter()
        index, classes = build_index(dataset.train.reset_index(drop=True), a.folds, a.seed)
        t2 = time.perf_counter()
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pandas(index, preserve_index=False), buf)
        json.dump(index["path"].tolist(), open(a.list, "w"))
        return print(json.dumps({"list_s": t1 - t0, "index_s": t2 - t1, "index_mb": index.memory_usage(
            deep=True).sum() / 1e6, "folds_parquet_mb": buf.tell() / 1e6, "classes": len(classes),
            "images": len(index), "imports_mib": imports_mib}))
    from trainer.cache import cached_images, fingerprint
    from trainer.images import decode_checks, scan

    paths = json.load(open(a.list))
    t0 = time.perf_counter()
    if a.child == "scan":
        _, bad = scan(paths, workers=a.scan_workers, cache_dir=a.cache_dir or None)
        out = {"bad": len(bad), "read": decode_checks()}
    else:
        key = fingerprint(paths, [os.path.getsize(p) for p in paths])
        cached_images(paths, key, a.px, a.mode, a.cache_dir, workers=a.build_workers)
        out = {}
    print(json.dumps({**out, "seconds": time.perf_counter() - t0}), flush=True)


def run_step(a, step: str, paths_file: str, cache_dir: str = "", data: str = "") -> dict:
    """Run one step with --child; its JSON line plus its peak RSS in MiB."""
    if a.drop_caches and step != "index":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    return harness.child_json([
        sys.executable, os.path.abspath(__file__), "--child", step, "--list", paths_file, "--cache-dir", cache_dir,
        "--data", data, "--px", str(a.px), "--mode", a.mode, "--scan-workers", str(a.scan_workers),
        "--build-workers", str(a.build_workers), "--folds", str(a.folds), "--seed", str(a.seed)])


def caches_of(a, n: int) -> tuple[str, str, str]:
    caches = os.path.join(a.workdir, f"caches-{n}")
    shutil.rmtree(caches, ignore_errors=True)
    return caches, os.path.join(caches, "scan"), os.path.join(caches, "build")


def finish_sizes(r: dict, caches: str) -> None:
    r["cache_gb"] = harness.folder_bytes(os.path.join(caches, "build")) / 1e9
    r["verdicts_mb"] = os.path.getsize(os.path.join(caches, "scan", "image_checks.sqlite")) / 1e6
    shutil.rmtree(caches, ignore_errors=True)


def load_note(before: tuple) -> str:
    return (f"load average (1, 5 min) {before[0]:.1f}, {before[1]:.1f} before, {os.getloadavg()[0]:.1f}, "
            f"{os.getloadavg()[1]:.1f} after, on {os.cpu_count()} cores (other processes share them: absolute "
            "times are noisy, ratios less so)")


# --- the start-up, step by step ---------------------------------------------------------

def startup(a, counts: list[int]) -> tuple[str, list[str]]:
    rows, results = [], {}
    shift = (-(a.src_px * 3 // 4) // 12, (a.src_px * 3 // 4) // 12 + 1, -a.src_px // 10, a.src_px // 10 + 1)
    datas = {n: os.path.join(a.workdir, f"jpeg-{n}") for n in counts}
    for n in counts:   # each size a folder of its own, so the loader lists exactly n files
        make_jpegs(datas[n], n, a.src_px, a.classes, a.seed, shift)
    for n in counts:
        print(f"--- {n:,} images", flush=True)
        paths_file = os.path.join(a.workdir, f"paths-{n}.json")
        r = {"index": run_step(a, "index", paths_file, data=datas[n])}
        paths = json.load(open(paths_file))
        if len(paths) != n:
            raise SystemExit(f"{datas[n]}: {len(paths):,} images listed, {n:,} written")
        r["data_gb"] = sum(os.path.getsize(p) for p in paths) / 1e9
        caches, scan_dir, build_dir = caches_of(a, n)
        r["first"] = run_step(a, "scan", paths_file, scan_dir)
        # The second start is short, so the machine's load moves it most: the median of three.
        seconds = sorted((run_step(a, "scan", paths_file, scan_dir) for _ in range(3)), key=lambda x: x["seconds"])
        r["second"], r["second_range"] = seconds[1], (seconds[0]["seconds"], seconds[-1]["seconds"])
        r["build"] = run_step(a, "build", paths_file, build_dir)
        finish_sizes(r, caches)
        print("  " + json.dumps(r), flush=True)
        results[n] = r
        rows.append([f"{n:,}", f"{r['data_gb']:.3f}", f"{r['data_gb'] * 1e9 / n / 1024:.1f}",
                     f"{r['index']['list_s']:.2f}", f"{r['index']['index_s']:.2f}", f"{r['index']['index_mb']:.1f}",
                     f"{r['index']['rss_mib']:.0f} ({r['index']['imports_mib']:.0f})", f"{r['first']['seconds']:.1f}",
                     f"{r['second']['seconds']:.2f} ({r['second_range'][0]:.2f}-{r['second_range'][1]:.2f})",
                     f"{r['first']['seconds'] / r['second']['seconds']:.0f}x", r["second"]["read"],
                     f"{max(r[s]['rss_mib'] for s in ('first', 'second')):.0f}", f"{r['verdicts_mb']:.1f}",
                     f"{n / r['build']['seconds']:.0f}", f"{r['build']['rss_mib']:.0f}", f"{r['cache_gb']:.3f}"])
    body = harness.md_table(
        ["images", "JPEGs GB", "KiB/JPEG", "listing s", "index + folds s", "index MB",
         "listing + index peak RSS MiB (imports alone)", "first scan s", "second scan s (median of 3)",
         "first/second", "files read, second", "scan peak RSS MiB", "verdicts MB", f"build {a.px} px img/s",
         "build peak RSS MiB", "cache GB"], rows)
    if counts[-1] > counts[0]:
        body += harness.growth(counts, results, [
            ("JPEGs GB", lambda n, r: r["data_gb"], "{:.3f}"),
            ("listing s", lambda n, r: r["index"]["list_s"], "{:.2f}"),
            ("index + folds s", lambda n, r: r["index"]["index_s"], "{:.2f}"),
            ("index MB", lambda n, r: r["index"]["index_mb"], "{:.1f}"),
            ("folds.parquet MB", lambda n, r: r["index"]["folds_parquet_mb"], "{:.2f}"),
            ("listing + index peak RSS MiB", lambda n, r: r["index"]["rss_mib"], "{:.0f}"),
            ("first scan s", lambda n, r: r["first"]["seconds"], "{:.1f}"),
            ("second scan s (median of 3)", lambda n, r: r["second"]["seconds"], "{:.2f}"),
            ("scan peak RSS MiB", lambda n, r: max(r[s]["rss_mib"] for s in ("first", "second")), "{:.0f}"),
            ("verdicts MB", lambda n, r: r["verdicts_mb"], "{:.1f}"),
            ("build img/s", lambda n, r: n / r["build"]["seconds"], "{:.0f}"),
            ("build peak RSS MiB", lambda n, r: r["build"]["rss_mib"], "{:.0f}"),
            ("cache GB", lambda n, r: r["cache_gb"], "{:.3f}")])
    per_image = results[counts[-1]]["cache_gb"] * 1e9 / counts[-1]
    worst = min(results[n]["first"]["seconds"] / results[n]["second"]["seconds"] for n in counts)
    notes = [
        (f"JPEGs: {a.src_px}x{a.src_px * 3 // 4}, quality 90, {BASES} crops of scikit-image's bundled photos, "
         f"{a.classes} class folders; " + ("the OS page cache emptied before every step" if a.drop_caches else
                                       "all in the OS page cache (warm)")),
        (f"scan: {a.scan_workers} threads; build: {a.build_workers} threads, {a.px} px {a.mode}; scans and build "
         "each in a fresh process, timed inside it (imports excluded), peak RSS = its ru_maxrss; listing + index "
         f"likewise (searchspace.tasks.imagefolder.load, then build_index with {a.folds} stratified folds)"),
        (f"node cache: {per_image:,.0f} bytes per image at {a.px} px ({a.px}x{a.px}x3 = {a.px * a.px * 3:,}): "
         "size x size x 3 bytes, whatever the JPEG's size"),
        f"target: second start >= 10x faster than the first: worst {worst:.0f}x: {harness.met(worst >= 10)}"]
    return body, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="20000,100000", help="dataset sizes, comma-separated (default 20000,100000)")
    ap.add_argument("--src-px", type=int, default=128, help="JPEG width; height 3/4 of it (default 128)")
    ap.add_argument("--px", type=int, default=64, help="node cache image size (default 64)")
    ap.add_argument("--mode", default="squish")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--scan-workers", type=int, default=8, help="scan threads (scan's default, as a search uses)")
    ap.add_argument("--build-workers", type=int, default=os.cpu_count(), help="cache build threads (default: cores)")
    ap.add_argument("--workdir", default="/tmp/bench_scale", help="JPEGs and caches go here (default /tmp/bench_scale)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-caches", action="store_true", help="empty the OS page cache before every step (root)")
    ap.add_argument("--child", choices=["index", "scan", "build"], help=argparse.SUPPRESS)
    for hidden in ("--data", "--list", "--cache-dir"):
        ap.add_argument(hidden, default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    a.workdir = os.path.abspath(a.workdir)
    counts = sorted(int(x) for x in a.images.split(","))
    load_before = os.getloadavg()
    os.makedirs(a.workdir, exist_ok=True)
    body, notes = startup(a, counts)
    notes.append(load_note(load_before))
    harness.report("scale", "Start-up at scale: the data, the index, the image check and the node cache", body, notes)


if __name__ == "__main__":
    main()
