"""Benchmark: the whole system on real labelled images, held out from the search, fully offline.

For each dataset of bench/_real.py (mnist in the paddy layout, lfw in the deepfake layout, textures in the
imagefolder layout; the test labels outside the data folder) it runs the CLIs, ``python -m searchspace.run`` with
the real EfficientNet-Lite0 weights and ``HF_HUB_OFFLINE=1``, then ``python -m ensemble_builder select``, and scores
the experiment, read through the contract (``core.experiment``), on the held-out labels: failed trials, failed
attempts and fold jobs, wall time, each cross-fitted config's per-fold scores against its fold-0 search score, the
best single config and the ensemble.

    python bench/real_data.py                       # full: mnist and lfw (24 trials, <= 12 epochs, 3 folds)
    python bench/real_data.py --smoke               # tiny budgets and subsets: proves the script works
    python bench/real_data.py --measure mnist=/tmp/bench_real_data/runs/mnist-...   # re-score a finished run
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _real  # noqa: E402
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.experiment import Experiment, aligned, probs_array  # noqa: E402
from core.metrics import accuracy, log_loss  # noqa: E402

SCRIPT = "real_data"
FULL = dict(trials=24, max_epochs=12, grace_period=2, folds=3, crossfit_top=3)
SMOKE = dict(trials=3, max_epochs=2, grace_period=1, folds=2, crossfit_top=2)
SMOKE_DATA = dict(mnist_train=300, mnist_test=100, textures_train=32, textures_test=16)
SIZES = {"mnist": ("train", "test"), "lfw": ("train", "valid", "test"), "textures": ("train", "test")}


def stdout_counts(lines: list[str]) -> dict:
    """What the search's own output says failed: Ray's line for every failed attempt (retried or not), the
    trials that failed for good, and the cross-fit's failed fold jobs."""
    return dict(failed_attempts=sum(1 for ln in lines if re.search(r"Trial \S+ errored after \d+ iterations", ln)),
                failed_lines=[ln.strip() for ln in lines if re.search(r"trial \S+ failed", ln)],
                crossfit_failed=[ln.strip() for ln in lines if "failed (run --crossfit-only" in ln])


# --- the experiment, through the contract ----------------------------------------------------

def _candidate(exp: Experiment, cid: str, labels: pd.Series, folds: int, y_test, test_ids, search: float) -> dict:
    """One cross-fitted config: out of fold, per fold, and on the test split (the mean of its fold models)."""
    cand = exp.candidate(cid)

    def scored(table, fn):
        return fn(labels.loc[table.column("sample_id").to_pylist()].to_numpy(), probs_array(table))

    fold_scores = [scored(f.holdout(), accuracy) if f.has("holdout.parquet") else float("nan")
                   for f in map(cand.fold, range(folds))]
    test = np.asarray(aligned(cand.test(), test_ids)) if cand.has_test() else None
    config, members = cand.config(), cand.members().get("members", [])
    return dict(arch=config.get("arch"), image_size=config.get("image_size"), pretrained=config.get("pretrained"),
                epochs=members[0].get("epochs") if members else None, oof_acc=scored(cand.oof(), accuracy),
                oof_ll=scored(cand.oof(), log_loss), folds=fold_scores, search=search, test=test,
                folds_done=sum(cand.fold(k).done() for k in range(folds)),
                test_acc=accuracy(y_test, test) if test is not None else None,
                test_ll=log_loss(y_test, test) if test is not None else None)


def measure(experiment: str, info: dict) -> dict:
    """The figures of the report, from the experiment and the held-out labels."""
    exp = Experiment(experiment)
    meta, trials = exp.meta(), exp.trials()
    labels = exp.folds().set_index("sample_id")["label"]
    test_ids = exp.test()["sample_id"].tolist()
    y_test = harness.labels(info, meta["class_names"], test_ids)
    failed = trials[trials["status"] == "error"]
    out = dict(experiment=experiment, n_train=len(labels), n_test=len(test_ids), trials=len(trials),
               failed=len(failed), errors=[f"{r.trial_id}: {r.error}" for r in failed.itertuples()],
               folds=int(meta["folds"]), pretrained=int(trials.get("pretrained", pd.Series(dtype=bool))
                                                         .fillna(False).astype(bool).sum()))
    search = trials.set_index("trial_id")["score"]
    cands = out["candidates"] = {
        cid: _candidate(exp, cid, labels, out["folds"], y_test, test_ids, float(search.get(cid[3:], np.nan)))
        for cid in exp.candidate_ids() if cid.startswith("cv-")}
    if cands:
        out["best"] = max(cands, key=lambda c: (cands[c]["oof_acc"], -cands[c]["oof_ll"]))
    if exp.has_ensemble():
        ens = out["ensemble_json"] = exp.ensemble()
        order, P = harness.ensemble_test(experiment)
        y = harness.labels(info, meta["class_names"], order)
        out.update(ens_test_acc=accuracy(y, P), ens_test_ll=log_loss(y, P), ens_oof=ens["scores"]["ensemble"],
                   best_single_oof=ens["scores"]["best_single"])
        out["ens_test_acc_blend"] = out["ens_test_acc"]
    return out


# --- one dataset ------------------------------------------------------------------------

def build_dataset(name: str, a) -> dict:
    if name not in SIZES:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(SIZES)}")
    return harness.dataset(name, a.root, seed=a.data_seed,
                           **{f"n_{s}": getattr(a, f"{name}_{s}") for s in SIZES[name]})


def run_dataset(name: str, a, info: dict, weights: dict) -> dict:
    b = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in (SMOKE if a.smoke else FULL).items()}
    runs, logs = os.path.join(a.workdir, "runs"), os.path.join(a.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    exp_name = f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tta = harness.DATASETS[name]["tta"] if a.tta == "auto" else a.tta == "on"
    cmd = harness.search_command(
        harness.DATASETS[name]["task"], info, runs, exp_name, a.seed,
        *(x for k, v in b.items() for x in ("--" + k.replace("_", "-"), str(v))),
        "--cache-dir", os.path.join(a.workdir, "cache"), "--weights-dir", weights["folder"],
        "--pretrained", a.pretrained, archs=a.archs, image_sizes=a.image_sizes, tta=tta)
    r = dict(name=name, info=info, budget=b, tta=tta, experiment=os.path.join(runs, exp_name))
    r["search"] = harness.run(cmd, os.path.join(logs, exp_name + ".search.log"), a.timeout, tag=name)
    r.update(stdout_counts(r["search"]["stdout"]))
    if Experiment(r["experiment"]).has_trials():
        sel = [sys.executable, "-m", "ensemble_builder", "select", "--top", str(a.top), "--experiment",
               r["experiment"]]
        r["select"] = harness.run(sel, os.path.join(logs, exp_name + ".select.log"), a.timeout, tag=name)
    return r


# --- the report -------------------------------------------------------------------------------

def f4(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def diff(a, b) -> str:
    return f"{a - b:+.4f}" if a is not None and b is not None else "-"


def summary_row(r: dict) -> list:
    m, search, select = r.get("m") or {}, r.get("search") or {}, r.get("select") or {}
    cands = m.get("candidates") or {}
    best = cands[m["best"]]["test_acc"] if m.get("best") else None
    fold_jobs = f"{sum(m['folds'] - c['folds_done'] for c in cands.values())} of {m['folds'] * len(cands)}" \
        if cands else "-"
    return [f"{r['name']} ({harness.DATASETS[r['name']]['task']})",
            "/".join(str(r["info"]["splits"].get(k, 0)) for k in ("train", "valid", "test")),
            search.get("rc", "-"), select.get("rc", "-"), f"{m['failed']} of {m['trials']}" if m else "-", fold_jobs,
            r.get("failed_attempts", "-"), f"{search['seconds']:.0f}" if search else "-", f4(best),
            f4(m.get("ens_test_acc")), diff(m.get("ens_test_acc"), best),
            diff((m.get("ens_oof") or {}).get("accuracy"), (m.get("best_single_oof") or {}).get("accuracy"))]


def crossfit_rows(r: dict) -> list[list]:
    """Each cross-fitted config: its fold-0 search score against its per-fold cross-fit scores."""
    m = r.get("m") or {}
    rows = []
    for cid, c in sorted((m.get("candidates") or {}).items(), key=lambda kv: -kv[1]["oof_acc"]):
        fs = np.array(c["folds"], dtype=float)
        rows.append([r["name"], cid + (" (best single)" if cid == m.get("best") else ""),
                     f"{c['arch']}@{c['image_size']}" + (", pretrained" if c["pretrained"] else ""), c["epochs"],
                     f4(c["search"]), " / ".join(f4(x) for x in fs), f4(np.nanmean(fs)), f4(np.nanstd(fs)),
                     f4(np.nanmean(fs[1:])) if len(fs) > 1 else "-", f4(c["oof_acc"]), f4(c["test_acc"])])
    return rows


def step_notes(r: dict) -> list[str]:
    notes = []
    for key in ("search", "select"):
        step = r.get(key)
        if step:
            notes.append(f"{r['name']}: `{step['cmd']}` -> exit {step['rc']} in {step['seconds']:.0f} s"
                         + (" (TIMED OUT)" if step.get("timed_out") else "")
                         + ("; last stderr lines: " + " | ".join(step["stderr_tail"]) if step["rc"] else ""))
    m = r.get("m") or {}
    for line in m.get("errors", []) + r.get("failed_lines", []) + r.get("crossfit_failed", []):
        notes.append(f"{r['name']}: failed: {line}")
    if r.get("error"):
        notes.append(f"{r['name']}: **benchmark step failed**: {r['error']}")
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,lfw", help="comma-separated: mnist, lfw, textures")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny budgets ({SMOKE}) and subsets ({SMOKE_DATA}) to prove the script works")
    ap.add_argument("--root", default=harness.DATA_ROOT, help="where the datasets and the weights folder are "
                                                              "written once (default: bench/results/real_data)")
    ap.add_argument("--workdir", default="/tmp/bench_real_data", help="runs, node cache, logs")
    ap.add_argument("--measure", action="append", default=[], metavar="DATASET=EXPERIMENT",
                    help="score an existing experiment of that dataset instead of running it (repeatable)")
    g = ap.add_argument_group("the data (subset sizes; a new size writes a new folder)")
    g.add_argument("--data-seed", type=int, default=0)
    for flag, default in (("mnist-train", 1200), ("mnist-test", 600), ("lfw-train", 120), ("lfw-valid", 20),
                          ("lfw-test", 60), ("textures-train", 96), ("textures-test", 32)):
        g.add_argument("--" + flag, type=int, default=default, help="per class" if "textures" in flag else None)
    g = ap.add_argument_group("the search (defaults: full run; --smoke for the tiny one)")
    g.add_argument("--archs", default=harness.ARCHS)
    g.add_argument("--image-sizes", default="32,48")
    for flag in ("trials", "max-epochs", "grace-period", "folds", "crossfit-top"):
        g.add_argument("--" + flag, type=int)
    g.add_argument("--top", type=int, default=5, help="ensemble_builder select --top")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto")
    g.add_argument("--tta", choices=["auto", "on", "off"], default="auto",
                   help="test-time flip TTA: auto = off for mnist, the task's default (on) for lfw and textures")
    g.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess before it is killed")
    a = ap.parse_args()
    for k, v in SMOKE_DATA.items():
        if a.smoke and getattr(a, k) == ap.get_default(k):
            setattr(a, k, v)
    a.root, a.workdir = os.path.abspath(a.root), os.path.abspath(a.workdir)
    measure_only = dict(x.split("=", 1) for x in a.measure)
    names = list(dict.fromkeys([n for n in a.datasets.split(",") if n] + list(measure_only)))

    t_all = time.perf_counter()
    weights = _real.weights_folder(a.root)
    results = []
    for name in names:
        info = build_dataset(name, a)
        print(f"\n== {name}: {info['folder']} (" + ", ".join(f"{k} {v}" for k, v in info["splits"].items()) + ")",
              flush=True)
        r = (dict(name=name, info=info, experiment=os.path.abspath(measure_only[name])) if name in measure_only
             else run_dataset(name, a, info, weights))
        if Experiment(r["experiment"]).has_trials():
            r["m"] = measure(r["experiment"], info)
        results.append(r)

    body = "\n\n".join([
        harness.md_table(["dataset (task layout)", "train/valid/test", "search rc", "select rc", "failed trials",
                          "failed fold jobs", "failed attempts (retries)", "search + cross-fit s",
                          "best single test acc", "ensemble test acc", "test gain", "in-sample OOF gain"],
                         [summary_row(r) for r in results]),
        "The cross-fit retrains what was searched: each cross-fitted config's fold-0 search score against its "
        "per-fold scores (fold 0 reuses the search trial's checkpoint unless the length changed; its test "
        "predictions average its fold models):",
        harness.md_table(["dataset", "candidate", "arch@size", "epochs", "search fold 0", "cross-fit folds",
                          "mean", "std", "mean of the retrained folds", "OOF accuracy", "test accuracy"],
                         [row for r in results for row in crossfit_rows(r)])])
    notes = [f"weights: `{os.path.basename(weights['file'])}`, checked when written: {weights['check']}",
             "best single = the cross-fitted config with the best out-of-fold accuracy; failed attempts = Ray's "
             "`Trial ... errored after N iterations` lines in the search's output, one per failed attempt",
             *(n for r in results for n in step_notes(r)), f"this run took {time.perf_counter() - t_all:.0f} s"]
    harness.report(SCRIPT, "Real data: search, cross-fit and ensemble judged on held-out real images", body, notes)
    harness.save_json(os.path.join(harness.RESULTS, f"{SCRIPT}.json"),
                      [{**{k: v for k, v in r.items() if k not in ("m", "search", "select")},
                        "m": {k: v for k, v in (r.get("m") or {}).items() if k != "candidates"}} for r in results])


if __name__ == "__main__":
    main()
