"""Benchmark: ``select`` at scale, 1,000 candidates x 100,000 samples x 10 classes (target: fits in 24 GiB).

A synthetic experiment written through core.experiment (harness.synthetic_candidates, every sample covered), then
``ensemble.select`` end to end (everything ``python -m ensemble_builder select`` computes and writes) in a fresh
process: its wall and CPU time, the cross-validation's share, and its peak RSS (ru_maxrss). The study's split by
phase (load, the estimate, the final fit, each peak sampled) ran from this script at fbd18b6 (BENCHMARKS.md).

    python bench/selection_scale.py                                    # 100 x 10,000 and 1,000 x 100,000
    python bench/selection_scale.py --candidates 1000 --samples 100000 --metric log_loss
    python bench/selection_scale.py --smoke                            # 20 x 2,000, seconds
"""
from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT = "selection_scale"
GIB = 2**30
TARGET_GIB = 24   # the machine the issue names


def write_experiment(root: str, m: int, n: int, C: int, folds: int, n_test: int, metric: str,
                     seed: int = 0) -> None:
    """The files ``select`` reads, one candidate at a time (never all in memory)."""
    from core.experiment import Experiment, probs_table

    exp = Experiment(root)
    exp.write_meta(dict(task="synthetic", metric=metric, class_names=[f"class{c}" for c in range(C)]))
    y, _, cands = harness.synthetic_candidates(m, n, C, seed, n_test)
    ids, test_ids = [f"s{i:07d}" for i in range(n)], [f"t{i:07d}" for i in range(n_test)]
    exp.write_folds(pd.DataFrame(dict(sample_id=ids, path=ids, label=y, fold=np.arange(n) % folds)))
    exp.write_test(pd.DataFrame(dict(sample_id=test_ids, path=test_ids)))
    for i, (skill, oof, test) in enumerate(cands):
        exp.candidate(f"c{i:04d}").write([], probs_table(ids, oof), dict(arch="synthetic", skill=skill),
                                         probs_table(test_ids, test))


def select(root: str, top: int) -> dict:
    """``ensemble.select`` in this process: seconds, CPU, its peak RSS, what it chose and wrote."""
    from ensemble_builder import ensemble

    t0, c0 = time.perf_counter(), time.process_time()
    sel = ensemble.select(root, top)
    return dict(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0, cv_s=sel.cv_seconds,
                members=len(sel.members), maxrss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
                submission=os.path.exists(os.path.join(root, "ensemble", "submission.csv")))


def run(candidates: int, samples: int, classes: int = 10, metric: str = "accuracy", folds: int = 5, top: int = 5,
        test_samples: int = 1000, seed: int = 0, root: str | None = None, keep: bool = False) -> dict:
    """Write the experiment, then ``select`` in a fresh spawned process (its ru_maxrss is that call's own)."""
    if root:
        os.makedirs(root, exist_ok=True)
    parent = tempfile.mkdtemp(prefix="selscale", dir=root)
    exp = os.path.join(parent, "exp")
    try:
        t0 = time.perf_counter()
        write_experiment(exp, candidates, samples, classes, folds, min(test_samples, samples), metric, seed)
        out = dict(candidates=candidates, samples=samples, classes=classes, metric=metric,
                   write_s=time.perf_counter() - t0, disk_gib=harness.folder_bytes(exp) / GIB)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out.update(pool.submit(select, exp, top).result())
        return out
    finally:
        if not keep:
            shutil.rmtree(parent, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--samples", type=int, nargs="+", default=[10000, 100000],
                    help="one per --candidates value")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--test-samples", type=int, default=1000, help="test rows per candidate (for submission.csv)")
    ap.add_argument("--root", help="where to write the experiments (default: the temp dir); removed after")
    ap.add_argument("--keep", action="store_true", help="keep the experiments")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="20 candidates x 2,000 samples")
    a = ap.parse_args()
    sizes = [(20, 2000)] if a.smoke else list(zip(a.candidates, a.samples, strict=True))
    rows = []
    for m, n in sizes:
        print(f"{m} candidates x {n} samples x {a.classes} classes ...", flush=True)
        r = run(m, n, a.classes, a.metric, a.folds, a.top, a.test_samples, a.seed, a.root, a.keep)
        rows.append([f"{m:,} x {n:,} x {a.classes}", a.metric, f"{r['write_s']:.0f} ({r['disk_gib']:.2f} GiB)",
                     f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['cv_s']:.1f}", r["members"],
                     "yes" if r["submission"] else "no", f"{r['maxrss_gib']:.2f}",
                     harness.met(r["maxrss_gib"] < TARGET_GIB)])
    body = harness.md_table(["candidates x samples x classes", "metric", "writing the candidates s (on disk)",
                             "select wall s", "select CPU s", "of which the CV estimate s", "members",
                             "submission", "peak RSS GiB", f"< {TARGET_GIB} GiB"], rows)
    notes = [f"{a.folds} round-robin folds, top {a.top} (at most that many distinct members, as `select`); "
             "each size's `select` in a fresh process; its peak includes Python, numpy and pandas (0.1-0.2 GiB)"]
    harness.report(SCRIPT, "Ensemble selection at scale: time and peak memory of `select`", body, notes)


if __name__ == "__main__":
    main()
