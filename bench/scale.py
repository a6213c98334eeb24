"""Benchmark: start-up at scale on datasets made here, 20,000 and 100,000 small JPEGs by default.

For each dataset size N, on a class-per-folder tree of N JPEGs (``--src-px``
wide, 4:3, quality 90, made from scikit-image's bundled photos as in
input_pipeline.py, each file a shifted, flipped, re-lit variant of one of 256
crops), the start-up of a search, step by step:

- the data: its bytes on disk (what a bucket holds);
- listing: ``searchspace.tasks.imagefolder.load`` (the folder listed, the DataFrame made);
- index: ``searchspace.data.build_index`` (labels and stratified folds, vectorised pandas), the index's memory
  and its folds.parquet bytes;
- first scan and second scan: ``trainer.images.scan`` with a fresh scan cache, then again with nothing changed;
- node cache build: ``trainer.cache.cached_images`` at ``--px`` (images/s, peak RSS, the cache's bytes).

The scans and the build run as scale_cache.py's steps (``scale_cache.run_step``):
each in a Python process of its own, timed inside it, its peak RSS from
``os.wait4``. Listing and index run likewise. Then the growth of each
figure from the smallest size to the largest.

Two other measurements join the report when asked for (off by default, so the
data part runs alone): ``--trials 100,300,1000`` calls bench/driver_cost.py's
``run`` (the driver's cost per trial), ``--selection 1000x100000x10`` calls
bench/selection_scale.py's ``run`` (ensemble selection time and peak memory).

    python bench/scale.py                                  # 20,000 and 100,000 images (~6 min on 2 cores)
    python bench/scale.py --images 500,2000                # smoke
    python bench/scale.py --trials 100,300,1000 --selection 1000x100000x10
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import scale_cache  # noqa: E402
from scale_cache import BASES, run_step  # noqa: E402

SCRIPT = "scale"
DATA_VERSION = 1


# --- data ----------------------------------------------------------------------

def _path(folder: str, i: int, classes: int) -> str:
    return os.path.join(folder, f"class_{i % classes:02d}", f"{i:06d}.jpg")


def _write_range(args: tuple[str, int, int, int, int, int]) -> None:
    """Write files [lo, hi) of the set; each file's content depends only on (seed, its index)."""
    folder, lo, hi, seed, px, classes = args
    from input_pipeline import QUALITY, one_photo, source_photos
    photos = list(source_photos().values())
    w, h = px, px * 3 // 4
    bases = [cv2.resize(one_photo(photos[b % len(photos)], np.random.default_rng((seed, b))), (w, h),
                        interpolation=cv2.INTER_AREA) for b in range(BASES)]
    for i in range(lo, hi):
        rng = np.random.default_rng((seed, BASES + i))
        img = np.roll(bases[int(rng.integers(BASES))], (int(rng.integers(-h // 12, h // 12 + 1)),
                                                        int(rng.integers(-w // 10, w // 10 + 1))), (0, 1))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = cv2.convertScaleAbs(img, alpha=rng.uniform(0.85, 1.15), beta=rng.uniform(-15, 15))
        if not cv2.imwrite(_path(folder, i, classes), img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY]):
            raise SystemExit(f"cannot write {_path(folder, i, classes)}")


def make_jpegs(workdir: str, n: int, px: int, classes: int, seed: int, procs: int) -> str:
    """A class-per-folder tree of n JPEGs, <workdir>/jpeg-<n>; kept for the next run while its settings match.

    Each size is a folder of its own, so the loader lists exactly n files; file
    i has the same content in every size's folder.
    """
    folder = os.path.join(workdir, f"jpeg-{n}")
    manifest = folder + ".json"  # beside the tree, which holds only images
    want = {"seed": seed, "version": DATA_VERSION, "px": px, "classes": classes, "bases": BASES, "count": n}
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f) == want:
                return folder
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(manifest)
    for c in range(classes):
        os.makedirs(os.path.join(folder, f"class_{c:02d}"))
    t0 = time.perf_counter()
    step = -(-n // procs)
    ranges = [(folder, lo, min(n, lo + step), seed, px, classes) for lo in range(0, n, step)]
    from multiprocessing import get_context
    with get_context("fork").Pool(len(ranges)) as pool:
        pool.map(_write_range, ranges)
    with open(manifest, "w") as f:
        json.dump(want, f)
    print(f"wrote {n:,} JPEGs in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


# --- listing and index (in a process of its own) -----------------------------------

def index_child(a) -> None:
    """Listing and index of --data: a JSON line of times and sizes; the index's paths into --list."""
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
    with open(a.list, "w") as f:
        json.dump(index["path"].tolist(), f)
    print(json.dumps({"list_s": t1 - t0, "index_s": t2 - t1, "index_mb": index.memory_usage(deep=True).sum() / 1e6,
                      "folds_parquet_mb": buf.tell() / 1e6, "classes": len(classes), "images": len(index),
                      "imports_mib": imports_mib}))


def index_step(a, data: str, paths_file: str) -> dict:
    """index_child in a fresh Python process: its JSON line plus its peak RSS in MiB.

    As in scale_cache.run_step, a step of its own so that its peak RSS is its
    own: a child's ru_maxrss starts at its parent's RSS, so this process
    keeps its imports light.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "index", "--data", data, "--list", paths_file,
           "--folds", str(a.folds), "--seed", str(a.seed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"index step failed: {' '.join(cmd)}")
    return {**json.loads(out.strip().splitlines()[-1]), "rss_mib": usage.ru_maxrss / 1024}


# --- the other helpers' measurements, when asked for --------------------------------

def _require(name: str) -> None:
    """Stop now, before the long part, if bench/<name>.py is missing (found without importing it)."""
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"bench/{name}.py is not there (yet); run without the flag that needs it")


def _as_markdown(result) -> str:
    """A helper's result as report text: a string as it is, rows (dicts) as a table, a dict as two columns."""
    if isinstance(result, str):
        return result
    if isinstance(result, dict):
        return _common.md_table(["measure", "value"], [[k, v] for k, v in result.items()])
    rows = list(result)
    if rows and all(isinstance(r, dict) for r in rows):
        headers = list(dict.fromkeys(k for r in rows for k in r))
        return _common.md_table(headers, [[r.get(k, "") for k in headers] for r in rows])
    return f"```\n{json.dumps(result, indent=1, default=str)}\n```"


# --- main ----------------------------------------------------------------------

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
    ap.add_argument("--workdir", default="/tmp/bench_scale", help="JPEGs and caches go here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-caches", action="store_true", help="empty the OS page cache before every step (root)")
    ap.add_argument("--trials", default="", help="also bench/driver_cost.py at these trial counts, e.g. 100,300,1000")
    ap.add_argument("--selection", default="", help="also bench/selection_scale.py, CANDIDATESxSAMPLESxCLASSES")
    ap.add_argument("--child", choices=["index"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return index_child(a)

    # The other scripts are imported only after the data part: an import here would
    # raise the floor of every child's peak RSS (a child starts at its parent's).
    for flag, name in ((a.trials, "driver_cost"), (a.selection, "selection_scale")):
        if flag:
            _require(name)
    counts = sorted(int(x) for x in a.images.split(","))
    load_before = os.getloadavg()
    os.makedirs(a.workdir, exist_ok=True)
    datas = {n: make_jpegs(a.workdir, n, a.src_px, a.classes, a.seed, os.cpu_count() or 1) for n in counts}
    rows, results = [], {}
    for n in counts:
        print(f"--- {n:,} images", flush=True)
        paths_file = os.path.join(a.workdir, f"paths-{n}.json")
        r = {"index": index_step(a, datas[n], paths_file)}
        with open(paths_file) as f:
            paths = json.load(f)
        if len(paths) != n:
            raise SystemExit(f"{datas[n]}: {len(paths):,} images listed, {n:,} written")
        r["data_gb"] = sum(os.path.getsize(p) for p in paths) / 1e9
        caches = os.path.join(a.workdir, f"caches-{n}")
        shutil.rmtree(caches, ignore_errors=True)
        r["first"] = run_step(a, "scan", paths_file, os.path.join(caches, "scan"))
        # The second start is short, so the machine's load moves it most: the median of three.
        seconds = sorted((run_step(a, "scan", paths_file, os.path.join(caches, "scan")) for _ in range(3)),
                         key=lambda x: x["seconds"])
        r["second"], r["second_range"] = seconds[1], (seconds[0]["seconds"], seconds[-1]["seconds"])
        r["build"] = run_step(a, "build", paths_file, os.path.join(caches, "build"))
        r["cache_gb"] = scale_cache._folder_bytes(os.path.join(caches, "build")) / 1e9
        r["verdicts_mb"] = os.path.getsize(os.path.join(caches, "scan", "image_checks.sqlite")) / 1e6
        print("  " + json.dumps(r), flush=True)
        results[n] = r
        rows.append([f"{n:,}", f"{r['data_gb']:.3f}", f"{r['data_gb'] * 1e9 / n / 1024:.1f}",
                     f"{r['index']['list_s']:.2f}", f"{r['index']['index_s']:.2f}", f"{r['index']['index_mb']:.1f}",
                     f"{r['index']['rss_mib']:.0f} ({r['index']['imports_mib']:.0f})",
                     f"{r['first']['seconds']:.1f}",
                     f"{r['second']['seconds']:.2f} ({r['second_range'][0]:.2f}-{r['second_range'][1]:.2f})",
                     f"{r['first']['seconds'] / r['second']['seconds']:.0f}x", r["second"]["read"],
                     f"{max(r[s]['rss_mib'] for s in ('first', 'second')):.0f}", f"{r['verdicts_mb']:.1f}",
                     f"{n / r['build']['seconds']:.0f}", f"{r['build']['rss_mib']:.0f}",
                     f"{r['cache_gb']:.3f}"])
        shutil.rmtree(caches, ignore_errors=True)

    body = _common.md_table(
        ["images", "JPEGs GB", "KiB/JPEG", "listing s", "index + folds s", "index MB",
         "listing + index peak RSS MiB (imports alone)", "first scan s", "second scan s (median of 3)",
         "first/second", "files read, second", "scan peak RSS MiB", "verdicts MB", f"build {a.px} px img/s",
         "build peak RSS MiB", "cache GB"], rows)
    lo, hi = counts[0], counts[-1]
    if hi > lo:
        measures = [
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
            ("cache GB", lambda n, r: r["cache_gb"], "{:.3f}"),
        ]
        table = [[name] + [fmt.format(f(n, results[n])) for n in counts]
                 + [f"{f(hi, results[hi]) / f(lo, results[lo]):.2f}x"] for name, f, fmt in measures]
        body += (f"\n\nGrowth from {lo:,} to {hi:,} images ({hi / lo:.0f}x the images):\n\n"
                 + _common.md_table(["measure"] + [f"{n:,}" for n in counts] + ["growth"], table))
    per_image = results[hi]["cache_gb"] * 1e9 / hi
    notes = [
        (f"JPEGs: {a.src_px}x{a.src_px * 3 // 4}, quality 90, {BASES} crops of scikit-image's bundled photos, "
         f"{a.classes} class folders; " + ("the OS page cache emptied before every step" if a.drop_caches
                                           else "all in the OS page cache (warm)")),
        (f"scan: {a.scan_workers} threads; build: {a.build_workers} threads, {a.px} px {a.mode}; scans and build "
         "each in a fresh process, timed inside it (imports excluded), peak RSS = its ru_maxrss; listing + index "
         "likewise (searchspace.tasks.imagefolder.load, then build_index with "
         f"{a.folds} stratified folds)"),
        (f"node cache: {per_image:,.0f} bytes per image at {a.px} px ({a.px}x{a.px}x3 = {a.px * a.px * 3:,}): "
         "size x size x 3 bytes, whatever the JPEG's size"),
        (f"load average (1, 5 min) {load_before[0]:.1f}, {load_before[1]:.1f} before, "
         f"{os.getloadavg()[0]:.1f}, {os.getloadavg()[1]:.1f} after, on {os.cpu_count()} cores (other processes "
         "share them: absolute times are noisy, ratios less so)"),
    ]

    # --- the driver's cost per trial and the selection at scale (other scripts, on request) ---
    if a.trials:
        mod = importlib.import_module("driver_cost")
        rows = mod.run([int(t) for t in a.trials.split(",")], os.path.join(a.workdir, "driver_cost"))
        body += (f"\n\nThe driver's cost per trial at {a.trials} trials (bench/driver_cost.py):\n\n"
                 + (mod.tables(rows) if hasattr(mod, "tables") else _as_markdown(rows)))
    if a.selection:
        mod = importlib.import_module("selection_scale")
        candidates, samples, classes = (int(x) for x in a.selection.lower().split("x"))
        result = mod.run(candidates, samples, classes, root=a.workdir)
        body += (f"\n\nEnsemble selection at {candidates:,} candidates x {samples:,} samples x {classes} classes "
                 "(bench/selection_scale.py):\n\n"
                 + (mod.table([result]) if hasattr(mod, "table") else _as_markdown(result)))
        notes += mod.notes([result]) if hasattr(mod, "notes") else []
    _common.report(SCRIPT, "Start-up at scale: the data, the index, the image check and the node cache", body, notes)


if __name__ == "__main__":
    main()
