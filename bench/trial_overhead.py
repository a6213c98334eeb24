"""Benchmark: a trial's start-up to its first optimiser step with a warm cache, tiny model (target: <= 3 s).

In a fresh interpreter per ``--cpus`` value, test_resnet at 32 px on digits through ``trainer.fit.Run``, each part
timed: the first repetition is a new Ray actor's cost after its imports, the next ones a reused actor's. Tune's
scheduling gap between trials (part (b) of the study) ran from this script at fbd18b6 (BENCHMARKS.md).

    python bench/trial_overhead.py                                  # full run
    python bench/trial_overhead.py --repeats 2 --cpus 1             # smoke
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SCRIPT = "trial_overhead"

# A representative digits config for test_resnet at 32 px (what the space samples).
HP = dict(arch="test_resnet", image_size=32, resize_mode="squish", pretrained=False, freeze_fraction=0.0,
          optimizer="adamw", lr=3e-3, weight_decay=1e-4, batch_size=64, schedule="cosine", warmup_fraction=0.05,
          class_weight_power=0.5, label_smoothing=0.1, scale_min=0.5, hflip=0.0, vflip=0.0, rotate=10.0,
          color_jitter=0.2, grayscale=0.1, noise=0.1, blur=0.1, jpeg=0.0, mix="none", mix_alpha=0.4)


def in_process(ctx: dict, cpus: int, max_epochs: int) -> dict[str, float]:
    """Seconds of a trial's start up to its first optimiser step, through the trainer's own ``Run``."""
    from core.experiment import TrialContext
    from trainer.fit import Run

    context = TrialContext.from_dict({**ctx, "cpus_per_trial": cpus, "max_epochs": max_epochs, "metric": "accuracy"})
    t0 = time.perf_counter()
    run = Run(HP, context, fold=0, epochs=max_epochs)
    t1 = time.perf_counter()
    run.model.train()
    batch, y = next(iter(run.loader))
    t2 = time.perf_counter()
    run.step(batch, y)
    t3 = time.perf_counter()
    del run   # stops the loader's persistent workers
    return {"Run set-up (folds, warm cache, dataset + DataLoader, model, optimiser, schedule)": t1 - t0,
            "first batch (loader start, augment)": t2 - t1,
            "first optimiser step (Run.step: forward, backward, step)": t3 - t2}


def child(spec_path: str) -> None:
    """In a fresh interpreter: the imports, then `repeats` timed trial starts; JSON on stdout."""
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    import ray.tune  # noqa: F401  (a Tune actor has it loaded)

    import trainer.fit  # noqa: F401
    imports = time.perf_counter() - t0
    runs = [in_process(spec["ctx"], spec["cpus"], spec["max_epochs"]) for _ in range(spec["repeats"])]
    print(json.dumps(dict(imports=imports, runs=runs)), flush=True)


def in_fresh_process(ctx: dict, cpus: int, repeats: int, max_epochs: int, workdir: str) -> dict:
    spec = os.path.join(workdir, f"spec-{os.getpid()}-{cpus}.json")
    with open(spec, "w") as f:
        json.dump(dict(ctx=ctx, cpus=cpus, repeats=repeats, max_epochs=max_epochs), f)
    out = harness.child_json([sys.executable, os.path.abspath(__file__), "--child", spec])
    os.remove(spec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="repetitions; the first is the cold process")
    ap.add_argument("--cpus", default="1,2", help="--cpus-per-trial values to time (loader workers = cpus - 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/bench_trial_overhead")
    ap.add_argument("--cache-dir", help="node cache (default: <workdir>/cache)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    if a.child:
        return child(a.child)

    from core import storage
    from core.experiment import Experiment
    from searchspace.data import build_index
    from searchspace.tasks import digits
    from trainer.cache import cached_images, fingerprint

    cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.workdir, "cache"))
    storage_root = os.path.abspath(os.path.join(a.workdir, "runs"))
    # Warm cache: the data written and its 32 px entry built before anything is timed, keyed as a search keys it.
    data = storage.absolute(digits.default_data(cache_dir))
    index, classes = build_index(digits.load(data).train.reset_index(drop=True), digits.BUDGET.folds, a.seed)
    paths = index["path"].tolist()
    key = fingerprint(paths, [os.path.getsize(p) for p in paths])
    cached_images(paths, key, HP["image_size"], HP["resize_mode"], cache_dir, workers=os.cpu_count())
    # Run reads folds.parquet like a trial does: write the same index into a scratch experiment.
    prep = storage.join(storage_root, f"prep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    Experiment(prep).write_folds(index)
    ctx = dict(experiment=prep, data_key=key, cache_dir=cache_dir, num_classes=len(classes))
    train_images = int((index["fold"] != 0).sum())

    cpus_list = [int(c) for c in a.cpus.split(",") if c.strip()]
    table_rows, sums, imports = [], {}, {}
    print("\nIn a fresh interpreter per cpus value:", flush=True)
    for cpus in cpus_list:
        res = in_fresh_process(ctx, cpus, a.repeats, digits.BUDGET.max_epochs, a.workdir)
        runs, imports[cpus] = res["runs"], res["imports"]
        for r, one in enumerate(runs):
            print(f"  cpus {cpus} run {r + 1}: {sum(one.values()):.3f} s = "
                  + ", ".join(f"{k.split(' (')[0]} {v:.3f}" for k, v in one.items()), flush=True)
        warm = runs[1:] or runs
        table_rows.append([cpus, "import trainer.fit + ray.tune (new actor only)", f"{res['imports']:.3f}", "0"])
        for phase in runs[0]:
            table_rows.append([cpus, phase, f"{runs[0][phase]:.3f}",
                               f"{statistics.median(w[phase] for w in warm):.3f}"])
        cold_sum = sum(runs[0].values())
        warm_sum = statistics.median(sum(w.values()) for w in warm)
        sums[cpus] = (cold_sum, warm_sum)
        table_rows.append([cpus, "**trial start to first step (in-process), imports excluded**",
                           f"**{cold_sum:.3f}**", f"**{warm_sum:.3f}**"])
    body = harness.md_table(["cpus per trial", "phase", "first run s (fresh process)",
                             f"median of runs 2..{a.repeats} s (reused actor)" if a.repeats > 1 else "same run s"],
                            table_rows)
    worst_warm = max(w for _, w in sums.values())
    worst_cold = max(c for c, _ in sums.values())
    notes = [
        f"digits, {train_images} training images (fold 0 held out), test_resnet at 32 px, batch 64, "
        "albumentations over the warm cache on CPU, timed through trainer.fit.Run, the class every trial uses",
        "each cpus value runs in a fresh interpreter: its first run is what a new Ray actor pays after its "
        "imports (first model build, first step); later runs are what a reused actor pays (Tune reuses actors)",
        f"target <= 3 s to the first step for a tiny model: reused actor {worst_warm:.2f} s, new actor "
        f"{worst_cold:.2f} s + {max(imports.values()):.2f} s imports: {harness.met(worst_warm <= 3)}",
    ]
    harness.report(SCRIPT, "Trial overhead: start to first step", body, notes)


if __name__ == "__main__":
    main()
