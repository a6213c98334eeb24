"""Benchmark: start-up at scale: the image check (first vs second start) and the node cache build, 2k to 100k images.

For each dataset size N (the first N files of one set of 640x480 quality-90
JPEGs made from scikit-image's bundled photos, as in input_pipeline.py):

- scan, no cache: ``trainer.images.scan(paths)``, every file read and decode-checked (how every start worked before);
- first scan: ``scan(paths, cache_dir=fresh)``: the same checks, verdicts recorded;
- second scan: the same call again, nothing changed (the issue's target: >= 10x faster than the first);
- rescan, 1% touched: every 100th file gets a new mtime; only those are read again;
- cache build: ``trainer.cache.cached_images`` into a fresh folder at ``--px`` (images/s and peak RSS).

Each step runs in a Python process of its own (this script with ``--child``):
its time is taken inside it (imports excluded), its peak RSS (ru_maxrss) from
``os.wait4``, so no step inherits another's memory. The JPEGs are written once
into ``--workdir`` and reused; a larger N extends the set. They are in the OS
page cache unless ``--drop-caches`` (root only) empties it before every step.

    python bench/scale_cache.py                                   # 2,000 and 20,000 images
    python bench/scale_cache.py --images 2000,20000,100000        # the full run (~10 GB of JPEGs)
    python bench/scale_cache.py --images 300,600                  # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository on sys.path)
import cv2  # noqa: E402
import numpy as np  # noqa: E402

SCRIPT = "scale_cache"
DATA_VERSION = 1
BASES = 256  # distinct random crops of the source photos; every file is a shifted, flipped, re-lit variant


# --- data ----------------------------------------------------------------------

def _write_range(args: tuple[str, int, int, int]) -> None:
    """Write files [lo, hi) of the set; each file's content depends only on (seed, its index)."""
    folder, lo, hi, seed = args
    from input_pipeline import QUALITY, one_photo, source_photos
    photos = list(source_photos().values())
    bases = [one_photo(photos[b % len(photos)], np.random.default_rng((seed, b))) for b in range(BASES)]
    for i in range(lo, hi):
        rng = np.random.default_rng((seed, BASES + i))
        img = np.roll(bases[int(rng.integers(BASES))], (int(rng.integers(-40, 40)), int(rng.integers(-60, 60))), (0, 1))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        img = cv2.convertScaleAbs(img, alpha=rng.uniform(0.85, 1.15), beta=rng.uniform(-15, 15))
        if not cv2.imwrite(_path(folder, i), img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY]):
            raise SystemExit(f"cannot write {_path(folder, i)}")


def _path(folder: str, i: int) -> str:
    return os.path.join(folder, f"{i // 10000:02d}", f"{i:06d}.jpg")  # 10,000 files a folder


def make_jpegs(workdir: str, n: int, seed: int, procs: int) -> list[str]:
    """The first n files of the set in <workdir>/jpeg, writing only those a previous run did not."""
    folder = os.path.join(workdir, "jpeg")
    manifest = os.path.join(folder, "manifest.json")
    want = {"seed": seed, "version": DATA_VERSION, "bases": BASES}
    have = 0
    if os.path.exists(manifest):
        with open(manifest) as f:
            m = json.load(f)
        if {k: m.get(k) for k in want} == want:
            have = m["count"]
    if have == 0:
        shutil.rmtree(folder, ignore_errors=True)
    if n > have:
        for d in range(have // 10000, (n - 1) // 10000 + 1):
            os.makedirs(os.path.join(folder, f"{d:02d}"), exist_ok=True)
        t0 = time.perf_counter()
        step = -(-(n - have) // procs)
        ranges = [(folder, lo, min(n, lo + step), seed) for lo in range(have, n, step)]
        from multiprocessing import get_context
        with get_context("fork").Pool(len(ranges)) as pool:
            pool.map(_write_range, ranges)
        with open(manifest, "w") as f:
            json.dump({**want, "count": n}, f)
        print(f"wrote JPEGs {have:,}..{n:,} in {time.perf_counter() - t0:.0f} s", flush=True)
    return [_path(folder, i) for i in range(n)]


# --- one step in a process of its own ---------------------------------------------

def child(a) -> None:
    from trainer.cache import cached_images, fingerprint
    from trainer.images import decode_checks, scan

    with open(a.list) as f:
        paths = json.load(f)
    t0 = time.perf_counter()
    if a.child == "scan":
        _, bad = scan(paths, workers=a.scan_workers, cache_dir=a.cache_dir or None)
        out = {"bad": len(bad), "read": decode_checks()}
    else:
        key = fingerprint(paths, [os.path.getsize(p) for p in paths])
        cached_images(paths, key, a.px, a.mode, a.cache_dir, workers=a.build_workers)
        out = {}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out), flush=True)


def run_step(a, step: str, paths_file: str, cache_dir: str) -> dict:
    """Run one step with --child; its JSON line plus its peak RSS in MiB."""
    if a.drop_caches:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, "--list", paths_file,
           "--cache-dir", cache_dir, "--px", str(a.px), "--mode", a.mode,
           "--scan-workers", str(a.scan_workers), "--build-workers", str(a.build_workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)  # progress lines pass through on stderr
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed: {' '.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    return result


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --- main ----------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="2000,20000", help="dataset sizes, comma-separated (default 2000,20000)")
    ap.add_argument("--px", type=int, default=64, help="cache image size (default 64)")
    ap.add_argument("--mode", default="squish")
    ap.add_argument("--scan-workers", type=int, default=8, help="scan threads (scan's default, as a search uses)")
    ap.add_argument("--build-workers", type=int, default=os.cpu_count(), help="cache build threads (default: cores)")
    ap.add_argument("--workdir", default="/tmp/bench_scale_cache", help="JPEGs and caches go here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drop-caches", action="store_true", help="empty the OS page cache before every step (root)")
    ap.add_argument("--child", choices=["scan", "build"], help=argparse.SUPPRESS)
    ap.add_argument("--list", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)

    counts = sorted(int(x) for x in a.images.split(","))
    load_before = os.getloadavg()[0]
    os.makedirs(a.workdir, exist_ok=True)
    all_paths = make_jpegs(a.workdir, counts[-1], a.seed, os.cpu_count() or 1)
    rows, results = [], {}
    for n in counts:
        paths = all_paths[:n]
        paths_file = os.path.join(a.workdir, f"paths-{n}.json")
        with open(paths_file, "w") as f:
            json.dump(paths, f)
        data_gb = sum(os.path.getsize(p) for p in paths) / 1e9
        caches = os.path.join(a.workdir, f"caches-{n}")
        shutil.rmtree(caches, ignore_errors=True)
        print(f"--- {n:,} images ({data_gb:.2f} GB)", flush=True)
        r = {"today": run_step(a, "scan", paths_file, "")}
        r["first"] = run_step(a, "scan", paths_file, os.path.join(caches, "scan"))
        r["second"] = run_step(a, "scan", paths_file, os.path.join(caches, "scan"))
        now = time.time()
        for p in paths[::100]:
            os.utime(p, (now, now))
        r["touched"] = run_step(a, "scan", paths_file, os.path.join(caches, "scan"))
        r["build"] = run_step(a, "build", paths_file, os.path.join(caches, "build"))
        for step, v in r.items():
            print(f"  {step}: {json.dumps(v)}", flush=True)
        r["cache_gb"] = _folder_bytes(os.path.join(caches, "build")) / 1e9
        r["verdicts_mb"] = os.path.getsize(os.path.join(caches, "scan", "image_checks.sqlite")) / 1e6
        results[n] = r
        speedup = r["first"]["seconds"] / r["second"]["seconds"]
        rows.append([f"{n:,}", f"{data_gb:.2f}", f"{r['today']['seconds']:.1f}", f"{r['first']['seconds']:.1f}",
                     f"{r['second']['seconds']:.2f}", f"{speedup:.0f}x", r["second"]["read"],
                     f"{r['touched']['seconds']:.2f} ({r['touched']['read']})",
                     f"{max(r[s]['rss_mib'] for s in ('first', 'second', 'touched')):.0f}",
                     f"{r['build']['seconds']:.1f}", f"{n / r['build']['seconds']:.0f}",
                     f"{r['build']['rss_mib']:.0f}", f"{r['cache_gb']:.2f}", f"{r['verdicts_mb']:.1f}"])
        shutil.rmtree(caches, ignore_errors=True)

    body = _common.md_table(
        ["images", "JPEGs GB", "scan, no cache s", "first scan s", "second scan s", "first/second",
         "files read, second", "1% touched: s (files read)", "scan peak RSS MiB", f"build {a.px}px s",
         "build img/s", "build peak RSS MiB", "cache GB", "verdicts MB"], rows)
    lo, hi = counts[0], counts[-1]
    if hi > lo:
        measures = [
            ("first scan s", lambda n, r: r["first"]["seconds"], "{:.1f}"),
            ("second scan s", lambda n, r: r["second"]["seconds"], "{:.2f}"),
            ("build s", lambda n, r: r["build"]["seconds"], "{:.1f}"),
            ("build img/s", lambda n, r: n / r["build"]["seconds"], "{:.0f}"),
            ("build peak RSS MiB", lambda n, r: r["build"]["rss_mib"], "{:.0f}"),
            ("second-scan peak RSS MiB", lambda n, r: r["second"]["rss_mib"], "{:.0f}"),
        ]
        table = [[name] + [fmt.format(f(n, results[n])) for n in counts]
                 + [f"{f(hi, results[hi]) / f(lo, results[lo]):.2f}x"] for name, f, fmt in measures]
        body += (f"\n\nGrowth from {lo:,} to {hi:,} images ({hi / lo:.0f}x the images):\n\n"
                 + _common.md_table(["measure"] + [f"{n:,}" for n in counts] + ["growth"], table))
    worst = min(results[n]["first"]["seconds"] / results[n]["second"]["seconds"] for n in counts)
    notes = [
        f"JPEGs: 640x480, quality 90, {BASES} random crops of scikit-image's bundled photos "
        "(input_pipeline.one_photo), each file a shifted, flipped, re-lit variant; "
        + ("the OS page cache emptied before every step" if a.drop_caches else "all in the OS page cache (warm)"),
        (f"scan: {a.scan_workers} threads; build: {a.build_workers} threads, {a.px} px {a.mode}; "
         "each step in a fresh process, timed inside it; peak RSS = ru_maxrss of that process"),
        ("first scan = the no-cache scan plus stat calls and sqlite commits; second scan = a stat per file and "
         "one sqlite lookup per 500 files, no file read"),
        f"target: second start >= 10x faster than the first: worst {worst:.0f}x: {_common.met(worst >= 10)}",
        (f"load average (1 min) {load_before:.1f} before the steps, {os.getloadavg()[0]:.1f} after, "
         f"on {os.cpu_count()} cores (other processes share them: absolute times are noisy, ratios less so)"),
    ]
    _common.report(SCRIPT, "Start-up at scale: image check and node cache build", body, notes)


if __name__ == "__main__":
    main()
