"""Benchmark: the driver's CPU per trial as a search grows (target: within 2x from 100 to 1,000 trials).

A real search (``searchspace.api.run_search``) on a digits subset, test_resnet at 16 px, one epoch, ASHA grace 1,
2 folds, no cross-fit, each trial count in a fresh interpreter with its own Ray. Driver CPU = getrusage of the
driver process over ``Tuner.fit`` (every thread), per trial, over all trials and over the last 10 % (between the
completions of trial 0.9 N and trial N). The study behind the target (the parts: TPE suggest, Tune's bookkeeping
and snapshots, collect; the code before the fixes) ran from this script at fbd18b6 (BENCHMARKS.md).

    python bench/driver_cost.py                        # 100, 300, 1,000 trials
    python bench/driver_cost.py --trials 10,30         # smoke
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SCRIPT = "driver_cost"


def tiny_digits(cache_dir: str, out: str, per_class: int) -> str:
    """``per_class`` digits images of each class in the paddy layout (no test set); returns the folder."""
    import pandas as pd

    from searchspace.tasks import digits

    src = digits.default_data(cache_dir)
    if os.path.exists(os.path.join(out, "train.csv")):
        return out
    df = pd.read_csv(os.path.join(src, "train.csv"), dtype=str)
    df = df.groupby("label", group_keys=False).head(per_class).reset_index(drop=True)
    for r in df.itertuples():
        dst = os.path.join(out, "train_images", r.label, r.image_id)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(src, "train_images", r.label, r.image_id), dst)
    df.to_csv(os.path.join(out, "train.csv"), index=False)
    return out


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(spec: dict) -> dict:
    """One search of ``spec['trials']`` trials in this interpreter; the driver's CPU and wall time over it."""
    import warnings

    warnings.filterwarnings("ignore")
    import ray
    from ray.tune.tuner import Tuner

    from searchspace import api
    from searchspace.config import SearchConfig
    from searchspace.progress import Progress

    marks, span = [], {}   # the process CPU at each trial's completion; Tuner.fit's start and end
    done, fit = Progress.on_trial_complete, Tuner.fit

    def mark(self, *args, **kwargs):
        result = done(self, *args, **kwargs)
        marks.append(process_cpu())
        return result

    def fit_timed(self):
        span["cpu0"], span["wall0"] = process_cpu(), time.perf_counter()
        try:
            return fit(self)
        finally:
            span["cpu1"], span["wall1"] = process_cpu(), time.perf_counter()

    Progress.on_trial_complete, Tuner.fit = mark, fit_timed
    harness.start_ray(spec["ray_tmp"])
    n, tail = spec["trials"], max(1, spec["trials"] // 10)
    code, experiment = api.run_search("digits", spec["data"], SearchConfig.from_kwargs(
        trials=n, max_epochs=1, grace_period=1, folds=2, crossfit_top=0, archs="test_resnet", image_sizes="16",
        storage=spec["storage"], name=f"driver-{n}-{datetime.datetime.now():%Y%m%d-%H%M%S}",
        cache_dir=spec["cache_dir"], seed=spec["seed"], cpus_per_trial=1, keep_checkpoints=True))
    trials = experiment.trials() if code == 0 else None
    ray.shutdown()
    return dict(trials=n, code=code, experiment=experiment.location, finished=len(marks),
                errors=int((trials["status"] == "error").sum()) if trials is not None else None,
                fit_cpu=span["cpu1"] - span["cpu0"], fit_wall=span["wall1"] - span["wall0"],
                tail_cpu=(marks[-1] - marks[-tail - 1]) / tail if len(marks) > tail else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", default="100,300,1000", help="comma-separated trial counts")
    ap.add_argument("--per-class", type=int, default=10, help="digits images per class (2 folds: half train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-runs", action="store_true", help="keep each search's experiment folder")
    ap.add_argument("--workdir", default="/tmp/bench_driver_cost")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        with open(a.child) as f, contextlib.redirect_stdout(sys.stderr):   # progress to stderr, the JSON last
            out = child(json.load(f))
        print(json.dumps(out), flush=True)
        return
    workdir = os.path.abspath(a.workdir)
    cache_dir = os.path.join(workdir, "cache")
    data = tiny_digits(cache_dir, os.path.join(workdir, f"digits-{a.per_class}"), a.per_class)
    rows = []
    for n in sorted(int(t) for t in a.trials.split(",") if t.strip()):
        spec, ray_tmp = os.path.join(workdir, f"spec-{n}.json"), tempfile.mkdtemp(prefix="dc", dir="/tmp")
        with open(spec, "w") as f:
            json.dump(dict(trials=n, data=data, storage=os.path.join(workdir, "runs"), cache_dir=cache_dir,
                           seed=a.seed, ray_tmp=ray_tmp), f)
        print(f"\n{n} trials ...", flush=True)
        try:
            row = harness.child_json([sys.executable, os.path.abspath(__file__), "--child", spec])
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)   # Ray's session logs: large at 1,000 trials
        if not a.keep_runs:   # ~4 GB of trial folders and candidates at 1,000 trials
            shutil.rmtree(row["experiment"], ignore_errors=True)
        print(f"  driver {row['fit_cpu'] / n * 1e3:.1f} ms CPU per trial", flush=True)
        rows.append(row)
    with open(os.path.join(workdir, "driver_cost.json"), "w") as f:
        json.dump(rows, f, indent=1)
    base = rows[0]["fit_cpu"] / rows[0]["trials"]
    table = [[r["trials"], f"{r['fit_cpu'] / r['trials']:.3f}",
              f"{r['tail_cpu']:.3f}" if r["tail_cpu"] is not None else "n/a", f"{r['fit_wall'] / r['trials']:.2f}",
              f"{r['fit_cpu'] / r['trials'] / base:.2f}x"
              + (f" / {r['tail_cpu'] / rows[0]['tail_cpu']:.2f}x" if r["tail_cpu"] and rows[0]["tail_cpu"] else ""),
              r["errors"], f"{r['rss_mib']:.0f}"] for r in rows]
    body = harness.md_table(["N", "driver CPU s per trial", "same, last 10 % of trials", "wall s per trial",
                             "vs smallest N (mean / last 10 %)", "failed trials", "driver peak RSS MiB"], table)
    growth = rows[-1]["fit_cpu"] / rows[-1]["trials"] / base
    notes = [f"digits, {a.per_class} images per class, 2 folds, test_resnet at 16 px, 1 epoch, grace 1, 1 CPU per "
             "trial, no cross-fit; a fresh interpreter and Ray per row",
             f"target: driver CPU per trial within 2x from the smallest N to the largest: {growth:.2f}x, "
             f"{harness.met(growth <= 2)}"]
    harness.report(SCRIPT, "Driver cost per trial as the search grows", body, notes)


if __name__ == "__main__":
    main()
