"""Benchmark: ensemble selection at scale, 1,000 candidates x 100,000 samples x 10 classes (issue #13).

A synthetic experiment written through core.experiment (harness.synthetic_candidates, every sample covered), then,
each in a fresh process so every peak is that size's own: ``candidates.load``, ``SelectionCV.fit`` as ``select``
runs it and the final fit alone (the cross-validation's cost is the difference), and ``ensemble.select`` end to end.
Wall and CPU time per phase; peak RSS per phase sampled every 5 ms, and the process's ru_maxrss.

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
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT = "selection_scale"
GIB = 2**30
TARGET_GIB = 24   # the machine the issue names


# --- the synthetic experiment ---------------------------------------------------------

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


# --- measuring --------------------------------------------------------------------------

def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Phase:
    """Wall and CPU time of a block, and its peak RSS sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self) -> Phase:
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    def row(self) -> dict:
        return dict(wall_s=self.wall, cpu_s=self.cpu, peak_gib=self.peak / GIB)


def maxrss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def phases(root: str, metric: str, top: int) -> dict:
    """Load, the cross-validated estimate with its final fit, and the final fit alone (in this process)."""
    from ensemble_builder import candidates as cands
    from ensemble_builder.crossval import SelectionCV
    from ensemble_builder.greedy import EnsembleSelection

    out = dict(start_gib=rss() / GIB)
    with Phase() as p:
        c = cands.load(root)
    out["load"], out["dtype"], out["P_gib"] = p.row(), str(c.P.dtype), c.P.nbytes / GIB
    top = min(top, len(c.ids))
    with Phase() as p:   # as ensemble.fit runs it: the default grid, the fallback, --top distinct members
        cv = SelectionCV(metric, max_members=top, top=top, random_state=0).fit(c.P, c.y, c.folds)
    out["cv"] = p.row()
    chosen = cv.settings_[cv.chosen_]
    with Phase() as p:
        final = EnsembleSelection(chosen["steps"], metric, max_members=top, bags=chosen["bags"]).fit(c.P, c.y)
    out["final"] = p.row()
    assert np.array_equal(final.weights_, cv.selector_.weights_)
    out.update(chosen=chosen["name"], cv_gain=cv.gain_, members=int(np.count_nonzero(final.weights_)),
               ensemble=cv.estimate_["ensemble"]["scores"][metric],
               best_single=cv.estimate_["best_single"]["scores"][metric], maxrss_gib=maxrss_gib())
    return out


def end_to_end(root: str, top: int) -> dict:
    """``ensemble_builder.ensemble.select``: everything ``python -m ensemble_builder select`` computes and writes."""
    from ensemble_builder import ensemble

    start = rss() / GIB
    with Phase() as p:
        sel = ensemble.select(root, top)
    wrote = os.path.exists(os.path.join(root, "ensemble", "submission.csv"))
    return dict(select=p.row(), start_gib=start, maxrss_gib=maxrss_gib(), submission=wrote,
                cv_seconds=sel.cv_seconds, members=len(sel.members))


def in_child(fn, *args):
    """``fn(*args)`` in a fresh spawned process: its ru_maxrss is that call's own peak."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def run(candidates: int, samples: int, classes: int = 10, metric: str = "accuracy", folds: int = 5, top: int = 5,
        test_samples: int = 1000, seed: int = 0, root: str | None = None, keep: bool = False) -> dict:
    """Write the experiment, then measure the phases and ``select`` end to end, each in a fresh process."""
    if root:
        os.makedirs(root, exist_ok=True)
    parent = tempfile.mkdtemp(prefix="selscale", dir=root)
    exp = os.path.join(parent, "exp")
    try:
        t0 = time.perf_counter()
        write_experiment(exp, candidates, samples, classes, folds, min(test_samples, samples), metric, seed)
        write_s = time.perf_counter() - t0
        disk = harness.folder_bytes(exp)
        out = dict(candidates=candidates, samples=samples, classes=classes, metric=metric, folds=folds, top=top,
                   write_s=write_s, disk_gib=disk / GIB)
        out["phases"] = in_child(phases, exp, metric, top)
        out["end_to_end"] = in_child(end_to_end, exp, top)
        out["load_avg"] = os.getloadavg()
        return out
    finally:
        if not keep:
            shutil.rmtree(parent, ignore_errors=True)


# --- the report -------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        p, e = r["phases"], r["end_to_end"]
        cv_only = dict(wall_s=p["cv"]["wall_s"] - p["final"]["wall_s"], cpu_s=p["cv"]["cpu_s"] - p["final"]["cpu_s"])
        size = f"{r['candidates']:,} x {r['samples']:,} x {r['classes']}"
        for name, ph in (("load (parquet -> P)", p["load"]), ("SelectionCV.fit (CV + final fit)", p["cv"]),
                         ("  of which the CV estimate", cv_only), ("  of which the final fit", p["final"]),
                         ("ensemble.select end to end", e["select"])):
            peak = f"{ph['peak_gib']:.2f}" if "peak_gib" in ph else ""
            rows.append([size, r["metric"], p["dtype"], name, f"{ph['wall_s']:.1f}", f"{ph['cpu_s']:.1f}", peak])
        rows.append([size, r["metric"], p["dtype"], "process peak (ru_maxrss): phases / select",
                     "", "", f"{p['maxrss_gib']:.2f} / {e['maxrss_gib']:.2f}"])
    return harness.md_table(["candidates x samples x classes", "metric", "P dtype", "phase", "wall s", "CPU s",
                             "peak RSS GiB"], rows)


def notes(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        p, e = r["phases"], r["end_to_end"]
        size = f"{r['candidates']:,} x {r['samples']:,}"
        out.append(f"{size}: P held as {p['dtype']}, {p['P_gib']:.2f} GiB; writing the {r['candidates']:,} candidates' "
                   f"parquet files took {r['write_s']:.0f} s ({r['disk_gib']:.2f} GiB on disk); chose "
                   f"{p['chosen']} with {p['members']} members, CV {r['metric']} {p['ensemble']:.4f} vs best single "
                   f"{p['best_single']:.4f} (gain {p['cv_gain']:+.4f}); submission written: "
                   f"{'yes' if e['submission'] else 'no'}; peak {max(p['maxrss_gib'], e['maxrss_gib']):.2f} GiB, "
                   f"{harness.met(max(p['maxrss_gib'], e['maxrss_gib']) < TARGET_GIB)} (< {TARGET_GIB} GiB); "
                   f"load average at the end {r['load_avg'][0]:.2f}")
    out.append(f"{results[0]['folds']} round-robin folds, top {results[0]['top']} (at most that many distinct "
               "members, as `select`); each size in fresh processes; the RSS before each phase includes "
               "Python, numpy and pandas (about 0.1-0.2 GiB)")
    out.append(f"the machine is shared ({os.cpu_count()} cores, other benchmarks running): the CPU time is "
               "closer than the wall time to what a quiet machine gives")
    return out


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

    results = []
    for m, n in sizes:
        print(f"{m} candidates x {n} samples x {a.classes} classes ...", flush=True)
        results.append(run(m, n, a.classes, a.metric, a.folds, a.top, a.test_samples, a.seed, a.root, a.keep))
    harness.report(SCRIPT, "Ensemble selection at scale: time and peak memory of `select`", table(results),
                   notes(results))


if __name__ == "__main__":
    main()
