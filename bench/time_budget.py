"""Benchmark: anytime performance against the simplest alternative, at equal wall time, on real held-out images.

For each dataset, seed and budget B, alternating which goes first: the pipeline (``searchspace.run --time-budget
B``), and in a child process the task's default recipe on one architecture trained on every image for as many epochs
as fit in B. Both start cold; test accuracy and log loss, wall time, the pipeline's split; mean and spread over seeds.

    python bench/time_budget.py                                   # full: 3 datasets x 3 seeds x 3, 6, 12, 24 min
    python bench/time_budget.py --datasets animals --budgets 6 --seeds 0          # one cell
    python bench/time_budget.py --report-only                     # the table and plot from the saved results
    python bench/time_budget.py --datasets animals --budgets 12 --seeds 2 --pipeline-only anchor
                                  # the pipeline alone again (code changed), against the cell's saved alternative
    python bench/time_budget.py baseline --task T --data DIR ...  # the alternative alone (what the runs call)
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import real_data  # noqa: E402

ARCHS = "test_resnet,test_efficientnet,efficientnet_lite0,mobilenetv3_small_050"
SIZES = "32,48"   # the images are 25-40 px
OUT = os.path.join(harness.RESULTS, "time_budget")


# --- the simplest alternative ------------------------------------------------------------

def baseline(a) -> None:
    """One default recipe, trained long: what a user writes in 60 lines. Writes its test probabilities."""
    import contextlib
    import io

    import numpy as np

    from core.experiment import probs_table
    from core.storage import write_parquet
    from searchspace.api import prepare_search
    from searchspace.config import SearchConfig
    from searchspace.tuner import first_config
    from trainer.cache import cached_images
    from trainer.fit import Run
    from trainer.inference import predict_probs

    deadline = a.start + a.budget
    config = SearchConfig.from_kwargs(storage=a.work, name="baseline", archs=a.arch, image_sizes=SIZES,
                                      cache_dir=a.cache_dir,
                                      weights_dir=a.weights_dir, folds=2, cpus_per_trial=os.cpu_count(),
                                      tta=not a.no_tta)
    with contextlib.redirect_stdout(io.StringIO()):
        p = prepare_search(a.task, a.data, config)
    recipe = first_config(p.task, p.archs, p.ctx)
    test = p.experiment.test()
    images = cached_images(test["path"].tolist(), p.ctx.test_key, recipe["image_size"], recipe["resize_mode"],
                           p.ctx.cache_dir)
    # two epochs of a throw-away model: the second, warmed up (loader workers, kernels), says how many fit
    probe = Run(recipe, p.ctx, fold=None, epochs=2)
    probe.train_epoch()
    t0 = time.time()
    probe.train_epoch()
    t1 = time.time()
    epoch_s = t1 - t0
    left = deadline - t1 - 2 * epoch_s * len(test) / max(1, len(p.experiment.folds()))   # the test predictions
    epochs = max(1, int(left * 0.97 / epoch_s))
    run = Run(recipe, p.ctx, fold=None, epochs=epochs)
    for _ in range(epochs):
        run.train_epoch()
    probs = predict_probs(run.model, images, tta=p.ctx.tta)
    write_parquet(a.out, probs_table(test["sample_id"], probs))
    with open(a.out + ".json", "w") as f:
        json.dump(dict(epochs=epochs, epoch_s=epoch_s, recipe={k: recipe[k] for k in ("arch", "image_size", "lr")},
                       classes=p.experiment.meta()["class_names"]), f)
    print(f"baseline: {recipe['arch']}@{recipe['image_size']} {epochs} epochs ({epoch_s:.2f} s each)", flush=True)
    assert np.isfinite(probs).all()


# --- one cell ------------------------------------------------------------------------------

def run_pipeline(name: str, seed: int, budget: float, work: str, run_name: str = "pipeline",
                 extra: tuple = ()) -> dict:
    """``searchspace.run`` under ``--time-budget`` on a dataset; its wall time, and the shipped ensemble's test
    scores and the budget's split when it ended with one."""
    from core.experiment import Experiment

    spec, info = real_data.DATASETS[name], real_data.dataset(name)
    cmd = [sys.executable, "-m", "searchspace.run", spec["task"], "--data", info["folder"], "--archs", ARCHS,
           "--image-sizes", SIZES, "--time-budget", f"{budget:g}", "--seed", str(seed), "--storage", work,
           "--name", run_name, "--cache-dir", os.path.join(work, f"cache-{run_name}"), "--weights-dir",
           real_data.weights(), *([] if spec["tta"] else ["--no-tta"]), *extra]
    r = harness.run(cmd, os.path.join(work, f"{run_name}.log"), timeout=budget * 2 + 300)
    res = dict(seconds=r["seconds"], rc=r["rc"], cmd=r["cmd"], location=os.path.join(work, run_name))
    exp = Experiment(res["location"])
    trials = exp.trials() if exp.has_trials() else None
    if r["rc"] == 0 and exp.has_ensemble():
        res.update(harness.score_experiment(exp.location, info))
        clock = exp.clock()
        res.update(search_until_s=clock["state"].get("search_until_s"), final_stage_s=clock["state"].get(
            "final_stage_s"), plan=exp.meta().get("final_plan") or {}, trials=len(trials),
            folds=exp.meta()["folds"], completed=int(trials["completed"].sum()))
    if trials is not None:
        res["failed"] = failed_trials(trials)
    return res


def failed_trials(trials) -> int:
    """Trials that ended in an error (a real-data run should have none: the offline checks run before the search)."""
    return int((trials["status"] == "error").sum())


def cell(name: str, seed: int, minutes: float, first: str) -> dict:
    import numpy as np

    from core.experiment import aligned
    from core.storage import read_parquet

    spec = real_data.DATASETS[name]
    info = real_data.dataset(name)
    tag = f"{name}-s{seed}-{minutes:g}m"
    work = os.path.join(OUT, "runs", tag)
    os.makedirs(work, exist_ok=True)
    budget = minutes * 60
    out = {"dataset": name, "seed": seed, "budget_min": minutes, "task": spec["task"]}
    tta = [] if spec["tta"] else ["--no-tta"]

    def pipeline():
        out["pipeline"] = run_pipeline(name, seed, budget, work)

    def simplest():
        target = os.path.join(work, "baseline.parquet")
        cmd = [sys.executable, os.path.abspath(__file__), "baseline", "--task", spec["task"], "--data",
               info["folder"], "--arch", ARCHS.split(",")[0], "--budget", f"{budget:g}", "--start",
               f"{time.time():.3f}", "--work", work, "--cache-dir", os.path.join(work, "cache-baseline"),
               "--weights-dir", real_data.weights(), "--out", target, *tta]
        r = harness.run(cmd, os.path.join(work, "baseline.log"), timeout=budget * 2 + 300)
        res = dict(seconds=r["seconds"], rc=r["rc"], cmd=r["cmd"])
        if r["rc"] == 0:
            meta = json.load(open(target + ".json"))
            table = read_parquet(target)
            order = table.column("sample_id").to_pylist()
            y = harness.labels(info, meta["classes"], order)
            res.update(harness.scores(y, np.asarray(aligned(table, order), np.float64)), epochs=meta["epochs"],
                       epoch_s=meta["epoch_s"], recipe=meta["recipe"])
        out["baseline"] = res

    for step in ((pipeline, simplest) if first == "pipeline" else (simplest, pipeline)):
        step()
        out.setdefault("load_after", {})[step.__name__] = round(os.getloadavg()[1], 2)   # 5-minute load average
    harness.save_json(os.path.join(OUT, f"{tag}.json"), out)
    p, b = out["pipeline"], out["baseline"]
    print(f"{tag}: pipeline {p.get('accuracy', float('nan')):.4f} in {p['seconds']:.0f} s, "
          f"baseline {b.get('accuracy', float('nan')):.4f} in {b['seconds']:.0f} s", flush=True)
    return out


def pipeline_again(name: str, seed: int, minutes: float, variant: str) -> dict:
    """A saved cell's pipeline side run again as ``variant`` (the code changed), beside the alternative that cell
    saved: results/time_budget/<variant>/<cell>.json."""
    tag = f"{name}-s{seed}-{minutes:g}m"
    saved = json.load(open(os.path.join(OUT, f"{tag}.json")))
    out = {**saved, "variant": variant, "before": {k: saved["pipeline"].get(k) for k in
                                                   ("accuracy", "log_loss", "seconds", "plan", "members")}}
    out["pipeline"] = run_pipeline(name, seed, minutes * 60, os.path.join(OUT, "runs", tag), run_name=variant)
    harness.save_json(os.path.join(OUT, variant, f"{tag}.json"), out)
    p, before, b = out["pipeline"], out["before"], out["baseline"]
    print(f"{tag} {variant}: pipeline {p.get('accuracy', float('nan')):.4f} (before {before['accuracy']:.4f}), "
          f"alternative {b.get('accuracy', float('nan')):.4f}", flush=True)
    return out


# --- the report ------------------------------------------------------------------------------

def load_results() -> list[dict]:
    """Every saved cell; the best network alone and the failed trials are counted from the run where a cell saved
    before they were kept and its run is still on disk."""
    from core.experiment import Experiment

    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(OUT, "*.json")))]
    for r in rows:
        location = r["pipeline"].get("location")
        if "network" not in r["pipeline"] and location and os.path.exists(os.path.join(location, "ensemble")):
            r["pipeline"]["network"] = harness.best_network(location, real_data.dataset(r["dataset"]))
        if "failed" not in r["pipeline"] and location and Experiment(location).has_trials():
            r["pipeline"]["failed"] = failed_trials(Experiment(location).trials())
    return rows


def table(rows: list[dict]) -> str:
    lines = []
    for (name, minutes), rs in harness.by_cell(rows):
        ok = [r for r in rs if "accuracy" in r["pipeline"] and "accuracy" in r["baseline"]]
        if not ok:
            continue
        diff, ds = harness.mean_spread([r["pipeline"]["accuracy"] - r["baseline"]["accuracy"] for r in ok])
        pl = harness.mean_spread([r["pipeline"]["log_loss"] for r in ok])[0]
        bl = harness.mean_spread([r["baseline"]["log_loss"] for r in ok])[0]
        pt = harness.mean_spread([r["pipeline"]["seconds"] for r in ok])[0]
        bt = harness.mean_spread([r["baseline"]["seconds"] for r in ok])[0]
        plans = [r["pipeline"].get("plan") or {} for r in ok]
        split = "; ".join(f"K={r['pipeline'].get('folds')}, {len(pl_.get('configs', []))}x{pl_.get('epochs')} ep "
                          f"(searched {pl_.get('searched_epochs')}), {r['pipeline'].get('trials')} trials"
                          for r, pl_ in zip(ok, plans))
        beats = ("n/a (1 seed: no spread)" if len(ok) < 2 else "yes" if diff > ds and diff > 0 else "no")
        alone = [r["pipeline"]["network"]["accuracy"] for r in ok if r["pipeline"].get("network")]
        lines.append([name, f"{minutes:g}", len(ok), harness.spread_cell([r["pipeline"]["accuracy"] for r in ok]),
                      harness.spread_cell([r["baseline"]["accuracy"] for r in ok]),
                      harness.spread_cell([r["pipeline"]["accuracy"] - r["baseline"]["accuracy"] for r in ok],
                                          sign=True),
                      beats, harness.spread_cell(alone) + (f" ({len(alone)} of {len(ok)})" if len(alone) < len(ok)
                                                           and alone else ""),
                      f"{pl:.3f}", f"{bl:.3f}", f"{pt:.0f}", f"{bt:.0f}",
                      ", ".join(str(r["baseline"].get("epochs")) for r in ok), split])
    return harness.md_table(
        ["dataset", "budget (min)", "seeds", "pipeline acc", "alternative acc", "difference", "beats by > spread",
         "its best network alone, acc (seeds with the run here)", "pipeline log loss", "alternative log loss",
         "pipeline s", "alternative s", "alternative epochs",
         "pipeline: K, configs x epochs, trials (per seed)"], lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = sorted({r["dataset"] for r in rows})
    metrics = (("accuracy", "test accuracy"), ("log_loss", "test log loss"))
    fig, axes = plt.subplots(len(metrics), len(names), figsize=(4.2 * len(names), 3.2 * len(metrics)), squeeze=False)
    for (metric, label), row in zip(metrics, axes):
        for ax, name in zip(row, names):
            budgets = sorted({r["budget_min"] for r in rows if r["dataset"] == name})
            for who, colour, legend in (("pipeline", "#2f7ed8", "pipeline"),
                                        ("baseline", "#f28e2b", "simplest alternative")):
                cells = [[r[who][metric] for r in rows if r["dataset"] == name and r["budget_min"] == m
                          and metric in r[who]] for m in budgets]
                mean, sd = zip(*(harness.mean_spread(c) if c else (np.nan, 0.0) for c in cells))
                ax.errorbar(budgets, mean, yerr=sd, marker="o", capsize=3, color=colour, label=legend)
            ax.set_xscale("log", base=2)
            ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
            ax.set_title(f"{name} (mean and sd over seeds)")
            ax.set_xlabel("budget (minutes)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "baseline":
        ap = argparse.ArgumentParser(prog="time_budget.py baseline")
        for flag in ("--task", "--data", "--arch", "--work", "--cache-dir", "--weights-dir", "--out"):
            ap.add_argument(flag, required=True)
        ap.add_argument("--budget", type=float, required=True)
        ap.add_argument("--start", type=float, required=True, help="when the parent started the clock (epoch s)")
        ap.add_argument("--no-tta", action="store_true")
        return baseline(ap.parse_args(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="mnist,animals,photos")
    ap.add_argument("--budgets", default="3,6,12,24", help="minutes")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--redo", action="store_true", help="run cells that already have a result again")
    ap.add_argument("--pipeline-only", metavar="VARIANT",
                    help="run the pipeline side of saved cells again, as VARIANT, against their saved alternative")
    a = ap.parse_args()
    if a.pipeline_only:
        for seed in map(int, a.seeds.split(",")):
            for minutes in map(float, a.budgets.split(",")):
                for name in a.datasets.split(","):
                    pipeline_again(name, seed, minutes, a.pipeline_only)
        return
    if not a.report_only:
        k = 0
        for seed in map(int, a.seeds.split(",")):
            for minutes in map(float, a.budgets.split(",")):
                for name in a.datasets.split(","):
                    if a.redo or not os.path.exists(os.path.join(OUT, f"{name}-s{seed}-{minutes:g}m.json")):
                        cell(name, seed, minutes, "pipeline" if k % 2 == 0 else "baseline")
                    k += 1
    rows = load_results()
    figure = os.path.join(harness.REPO, "docs", "time-budget.png")
    plot(rows, figure)
    picture = f"![accuracy against budget]({os.path.relpath(figure, harness.REPO)})"
    counted = [r["pipeline"] for r in rows if "failed" in r["pipeline"]]
    harness.report("time_budget", "Anytime performance: the pipeline against the simplest alternative at equal "
                   "wall time", table(rows) + "\n\n" + picture,
                   [f"failed trials: {sum(p['failed'] for p in counted)} in the {len(counted)} cells whose run is "
                    f"on disk or counted them (of {len(rows)}); {sum(p.get('trials', 0) for p in counted)} trials"])


if __name__ == "__main__":
    main()
