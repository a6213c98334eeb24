"""Benchmark: a trial's fixed costs with a warm cache, tiny model (test_resnet, 32 px, digits).

(a) In a fresh interpreter, a trial's start up to its first optimiser step through trainer.fit.Run, each part timed: the
    first repetition is a new Ray actor's cost after its imports, the next ones a reused actor's.
(b) A real short search (N trials x 1 epoch): from each trial folder's result.json and checkpoint mtimes, when each
    trainable started and ended; the scheduling gap = a trial's start - the latest end of another trial before it.

    python bench/trial_overhead.py                                  # full run
    python bench/trial_overhead.py --repeats 2 --trials 3           # smoke
"""
from __future__ import annotations

import argparse
import datetime
import glob
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


# --- (a) in process ----------------------------------------------------------------

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
    """Runs (a) in a fresh interpreter: the imports, then `repeats` timed trial starts; JSON on stdout."""
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


# --- (b) Ray Tune --------------------------------------------------------------------

def trial_timeline(folder: str) -> dict | None:
    """start/first report/end (epoch seconds) of one Tune trial folder, from result.json and checkpoint mtimes."""
    path = os.path.join(folder, "result.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
    if not results:
        return None
    anchor, precise = None, False
    for ck in sorted(glob.glob(os.path.join(folder, "checkpoint_*")), reverse=True):
        line = next((r for r in results if r.get("checkpoint_dir_name") == os.path.basename(ck)), None)
        files = [os.path.join(ck, n) for n in os.listdir(ck)]
        if line is not None and files:
            anchor = (min(os.path.getmtime(p) for p in files), line["time_total_s"])
            precise = True
            break
    if anchor is None:  # no checkpoint left: whole-second timestamps only
        anchor = (float(results[-1]["timestamp"]), results[-1]["time_total_s"])
    start = anchor[0] - anchor[1]
    first = results[0]
    return dict(trial_id=first.get("trial_id"), pid=first.get("pid"), start=start,
                first_report=start + first["time_total_s"], end=start + results[-1]["time_total_s"],
                first_s=first["time_total_s"], images_per_s=first.get("images_per_s"),
                batch_size=(first.get("config") or {}).get("batch_size"), epochs=len(results), precise=precise)


def ray_search(a, cache_dir: str, storage_root: str, train_images: int) -> tuple[str, list[str]]:
    name = f"overhead-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    argv = ["digits", "--trials", str(a.trials), "--max-epochs", "1", "--archs", "test_resnet",
            "--image-sizes", "32", "--crossfit-top", "0", "--storage", storage_root, "--name", name,
            "--cache-dir", cache_dir, "--seed", str(a.seed)]
    wall = harness.search_in_process(argv)
    t_main = time.time() - wall
    experiment = os.path.join(storage_root, name)
    trials = [t for t in (trial_timeline(d) for d in glob.glob(os.path.join(experiment, "train_trial_*")))
              if t is not None]
    trials.sort(key=lambda t: t["start"])
    gaps = []
    for t in trials:
        freed = [o["end"] for o in trials if o is not t and o["end"] <= t["start"] + 0.05]
        if freed:
            gaps.append(t["start"] - max(freed))
    setup = []  # time to the first report minus the training loop (setup + holdout eval + checkpoint)
    for t in trials:
        if t["images_per_s"] and t["batch_size"]:
            seen = (train_images // int(t["batch_size"])) * int(t["batch_size"])
            setup.append(t["first_s"] - seen / t["images_per_s"])
    rows = [["trials (1 epoch each) / distinct actor pids", f"{len(trials)} / {len({t['pid'] for t in trials})}"],
            ["main() start -> first trainable start (data check, Tune set-up, actor start, imports)",
             f"{trials[0]['start'] - t_main:.2f} s" if trials else "n/a"],
            ["scheduling gap, trial end -> next trainable start: median / max",
             f"{statistics.median(gaps):.2f} / {max(gaps):.2f} s ({len(gaps)} gaps)" if gaps else "n/a"],
            ["trainable start -> first report, minus the training loop: median "
             "(setup + holdout eval + checkpoint, in Ray)",
             f"{statistics.median(setup):.2f} s" if setup else "n/a"],
            ["last trial end -> main() returns (results, trials.parquet, candidates)",
             f"{t_main + wall - max(t['end'] for t in trials):.2f} s" if trials else "n/a"],
            ["main() wall time", f"{wall:.1f} s"]]
    notes = [f"(b) experiment {experiment}; "
             + ("report times from checkpoint file mtimes (sub-second)" if all(t["precise"] for t in trials)
                else "some trials had no checkpoint left: whole-second result timestamps used for them")]
    return harness.md_table(["Ray Tune (b)", "value"], rows), notes


# --- main -----------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="(a) repetitions; the first is the cold process")
    ap.add_argument("--cpus", default="1,2", help="(a) --cpus-per-trial values to time (loader workers = cpus - 1)")
    ap.add_argument("--trials", type=int, default=8, help="(b) trials in the Ray search")
    ap.add_argument("--skip-ray", action="store_true", help="only (a)")
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
    from searchspace.tasks import digits

    cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.workdir, "cache"))
    storage_root = os.path.abspath(os.path.join(a.workdir, "runs"))
    # Warm cache: data written and every 32 px entry built before anything is timed.
    _, index, classes, key = harness.prepare_digits_cache(cache_dir, digits.BUDGET.folds, a.seed, [32])
    # (a) reads folds.parquet like a trial does: write the same index into a scratch experiment.
    prep = storage.join(storage_root, f"prep-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    Experiment(prep).write_folds(index)
    ctx = dict(experiment=prep, data_key=key, cache_dir=cache_dir, num_classes=len(classes))
    train_images = int((index["fold"] != 0).sum())

    cpus_list = [int(c) for c in a.cpus.split(",") if c.strip()]
    table_rows, sums, imports = [], {}, {}
    print("\n(a) in a fresh interpreter per cpus value:", flush=True)
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
    body = harness.md_table(["cpus per trial", "phase (a)", "first run s (fresh process)",
                             f"median of runs 2..{a.repeats} s (reused actor)" if a.repeats > 1 else "same run s"],
                            table_rows)
    worst_warm = max(w for _, w in sums.values())
    worst_cold = max(c for c, _ in sums.values())
    notes = [
        f"(a) digits, {train_images} training images (fold 0 held out), test_resnet at 32 px, batch 64, "
        "albumentations over the warm cache on CPU, timed through trainer.fit.Run, the class every trial uses",
        "(a) each cpus value runs in a fresh interpreter: its first run is what a new Ray actor pays after its "
        "imports (first model build, first step); later runs are what a reused actor pays (Tune reuses actors)",
        f"target <= 3 s to the first step for a tiny model: reused actor {worst_warm:.2f} s, new actor "
        f"{worst_cold:.2f} s + {max(imports.values()):.2f} s imports: {harness.met(worst_warm <= 3)}",
    ]
    if not a.skip_ray:
        ray_table, ray_notes = ray_search(a, cache_dir, storage_root, train_images)
        body += "\n\n" + ray_table
        notes += ray_notes + [
            "(b) method: for each trial folder, report time = earliest mtime of the files of a kept checkpoint "
            "folder (written during tune.report), matched to its result.json line by checkpoint_dir_name; "
            "trainable start = that time - time_total_s of that line; end = start + the last time_total_s. "
            "Gap = a trial's start - the latest end of another trial at or before it. The training loop's time "
            "is train images / images_per_s (both reported)"]
    harness.report(SCRIPT, "Trial overhead: start to first step, and Tune's gap between trials", body, notes)


if __name__ == "__main__":
    main()
