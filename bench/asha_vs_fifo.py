"""Benchmark: ASHA early stopping against no early stopping, same searcher, seed and trial count (digits).

Two searches in one process on one Ray, the cache warm: ASHA, and grace period = max epochs (no trial stops
early); trial-epochs, wall time and the best holdout (fold 0) accuracy of each.

    python bench/asha_vs_fifo.py                                    # full run: 24 trials, 9 epochs
    python bench/asha_vs_fifo.py --trials 4 --max-epochs 3 --archs test_resnet --image-sizes 16   # smoke
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SCRIPT = "asha_vs_fifo"


def main() -> None:
    from core.experiment import Experiment
    from searchspace import run
    from searchspace.prepare import architectures
    from searchspace.tasks import digits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--max-epochs", type=int, default=digits.BUDGET.max_epochs)
    ap.add_argument("--grace-period", type=int, default=digits.BUDGET.grace_period, help="ASHA run's grace period")
    ap.add_argument("--reduction-factor", type=int, default=digits.BUDGET.reduction_factor)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus-per-trial", type=float, default=1)
    ap.add_argument("--max-concurrent", type=int, default=0,
                    help="passed to searchspace.run (0: as resources allow; 1: TPE sees results in a fixed order)")
    ap.add_argument("--archs", help="passed to searchspace.run (narrow the space for smoke runs)")
    ap.add_argument("--image-sizes", help="passed to searchspace.run")
    ap.add_argument("--workdir", default="/tmp/bench_asha_vs_fifo", help="experiments and the cache go here")
    ap.add_argument("--cache-dir", help="shared node cache (default: <workdir>/cache)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed 1-trial search that warms Ray's workers before the two timed runs")
    a = ap.parse_args()

    cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.workdir, "cache"))
    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    storage_root = os.path.abspath(os.path.join(a.workdir, f"runs-{stamp}"))
    common = ["digits", "--trials", str(a.trials), "--max-epochs", str(a.max_epochs), "--seed", str(a.seed),
              "--reduction-factor", str(a.reduction_factor), "--cpus-per-trial", str(a.cpus_per_trial),
              "--max-concurrent", str(a.max_concurrent),
              "--crossfit-top", "0", "--storage", storage_root, "--cache-dir", cache_dir]
    if a.archs:
        common += ["--archs", a.archs]
    if a.image_sizes:
        common += ["--image-sizes", a.image_sizes]
    variants = [("ASHA", f"asha-{stamp}", ["--grace-period", str(a.grace_period)]),
                ("no early stopping", f"nostop-{stamp}", ["--grace-period", str(a.max_epochs)])]

    # Warm everything a trial could read, so that neither run pays for the first decode.
    args = run.parse_args(common)
    archs = architectures(digits.TASK, args.archs, args.image_sizes)
    sizes = sorted({s for v in archs.values() for s in v})
    t0 = time.perf_counter()
    harness.prepare_digits_cache(cache_dir, digits.BUDGET.folds, a.seed, sizes)
    print(f"digits data and cache ({sizes} px x 3 resize modes) ready in {time.perf_counter() - t0:.1f} s", flush=True)

    harness.start_ray()
    if not a.no_warmup:
        # Ray's first Tuner pays for worker start-up and imports; without this
        # the first timed run (ASHA) would carry that cost alone.
        warm = list(common)
        warm[warm.index("--trials") + 1] = "1"
        warm[warm.index("--max-epochs") + 1] = "1"
        seconds = harness.search_in_process(warm + ["--name", f"warmup-{stamp}", "--grace-period", "1"])
        print(f"untimed warm-up search (1 trial, 1 epoch): {seconds:.0f} s", flush=True)
    runs = []
    for label, name, extra in variants:
        wall = harness.search_in_process(common + ["--name", name] + extra)
        trials = Experiment(os.path.join(storage_root, name)).trials()
        runs.append(dict(label=label, name=name, wall=wall, trials=len(trials),
                         epochs=int(trials["epochs_run"].sum()), stopped=int(trials["stopped_early"].sum()),
                         failed=int((trials["status"] == "error").sum()),
                         trial_s=float(trials["seconds"].fillna(0).sum()),
                         best=float(trials["best_score"].max())))

    asha, full = runs
    rows = [[r["label"], r["trials"], r["epochs"], r["stopped"], r["failed"], f"{r['wall']:.0f}",
             f"{r['trial_s']:.0f}", f"{r['best']:.4f}"] for r in runs]
    body = harness.md_table(["run", "trials", "trial-epochs", "stopped early", "failed", "wall s",
                             "sum of trial s", "best holdout accuracy"], rows)
    epochs_ratio = full["epochs"] / max(1, asha["epochs"])
    acc_ratio = asha["best"] / full["best"] if full["best"] else float("nan")
    body += "\n\n" + harness.md_table(
        ["no stopping / ASHA", "trial-epochs", "wall time", "sum of trial s", "ASHA best / no-stopping best"],
        [["ratio", f"{epochs_ratio:.2f}x", f"{full['wall'] / asha['wall']:.2f}x",
          f"{full['trial_s'] / max(1e-9, asha['trial_s']):.2f}x", f"{acc_ratio:.2%}"]])
    notes = [
        f"digits task, {a.trials} trials each, seed {a.seed}, max {a.max_epochs} epochs, reduction factor "
        f"{a.reduction_factor}; ASHA grace {a.grace_period}; baseline grace = max epochs ({a.max_epochs}): "
        f"ASHA's only rung is max_t, so no trial stops early (same OptunaSearch TPE sampler and seed)",
        f"space: {', '.join(f'{k} {v}' for k, v in archs.items())}; cross-fit off; {a.cpus_per_trial:g} CPU per trial, "
        f"{os.cpu_count()} CPUs for Ray, max concurrent {a.max_concurrent or 'as resources allow'}; "
        "cache prebuilt for every size and resize mode"
        + ("" if a.no_warmup else "; an untimed 1-trial search warmed Ray's workers first"),
        "best holdout accuracy: max of best_score (fold 0) in trials.parquet; trial-epochs: sum of epochs_run; "
        "wall: around searchspace.run.main (data check, Tune, trials.parquet)",
        "with concurrent trials the TPE sampler sees results in timing-dependent order, so two runs with the "
        "same seed need not sample the same configs after TPE's random start-up trials; and the same config "
        "need not reach the same accuracy twice (two trials share the CPUs, so thread timing differs): "
        "compare over repeated runs",
        f"target >= 3x fewer trial-epochs at >= 99% of the no-stopping best accuracy: "
        f"{epochs_ratio:.2f}x, {acc_ratio:.2%}: {harness.met(epochs_ratio >= 3 and acc_ratio >= 0.99)}",
        f"experiments: {storage_root}",
    ]
    harness.report(SCRIPT, "ASHA against no early stopping (digits)", body, notes)


if __name__ == "__main__":
    main()
