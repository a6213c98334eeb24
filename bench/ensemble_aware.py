"""Benchmark: does searching for what the ensemble lacks beat "search, then select"? Four pipelines, real data.

On bench/real_data.py's held-out datasets, with equal compute in every cell, the CLIs run four pipelines (PIPELINES:
(a) own metric, top-M cross-fit; (b) complementarity cross-fit; (c) (b) + portfolio; (d) (c) + ``--objective
ensemble``), then ``ensemble_builder select``, scored on the test labels over seeds. Every finished run is appended
to ``<workdir>/ensemble_aware.jsonl`` at once, and a rerun skips the cells already there.

    python bench/ensemble_aware.py                               # mnist + lfw, 4 pipelines, seeds 0,1,2
    python bench/ensemble_aware.py --smoke                       # tiny budgets: proves the script works
    python bench/ensemble_aware.py --report-only                 # the table from the finished runs
    python bench/ensemble_aware.py --report-only --reselect      # select again with today's ensemble_builder
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _real  # noqa: E402
import harness  # noqa: E402
import real_data  # noqa: E402

SCRIPT = "ensemble_aware"
PIPELINES = {
    "score": ["--no-portfolio", "--objective", "own", "--crossfit-by", "score"],
    "compl": ["--no-portfolio", "--objective", "own", "--crossfit-by", "complementarity"],
    "portfolio": ["--objective", "own", "--crossfit-by", "complementarity"],
    "ensemble": ["--objective", "ensemble", "--crossfit-by", "complementarity"],
}
LABELS = {"score": "(a) own metric, top-M", "compl": "(b) complementarity cross-fit",
          "portfolio": "(c) (b) + portfolio", "ensemble": "(d) (c) + --objective ensemble"}
FULL = dict(trials=16, max_epochs=10, grace_period=2, folds=3, crossfit_top=4)
SMOKE = dict(trials=3, max_epochs=2, grace_period=1, folds=2, crossfit_top=2)


def run_cell(dataset: str, pipeline: str, seed: int, a, info: dict, weights: dict) -> dict:
    """One search + cross-fit + select through the CLIs, scored on the held-out test labels."""
    b = SMOKE if a.smoke else FULL
    runs, logs = os.path.join(a.workdir, "runs"), os.path.join(a.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    name = f"{dataset}-{pipeline}-s{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    experiment = os.path.join(runs, name)
    cmd = harness.search_command(
        harness.DATASETS[dataset]["task"], info, runs, name, seed,
        *(x for k, v in b.items() for x in ("--" + k.replace("_", "-"), str(v))),
        "--cache-dir", os.path.join(a.workdir, "cache"), "--weights-dir", weights["folder"], "--pretrained", "auto",
        *PIPELINES[pipeline], archs=a.archs, image_sizes=a.image_sizes, tta=harness.DATASETS[dataset]["tta"])
    t0 = time.perf_counter()
    search = harness.run(cmd, os.path.join(logs, name + ".search.log"), a.timeout, tag=dataset, cpu=True)
    row = dict(dataset=dataset, pipeline=pipeline, seed=seed, experiment=experiment, budget=b,
               command=search["cmd"], search_rc=search.get("rc"), load=os.getloadavg())
    if not os.path.exists(os.path.join(experiment, "trials.parquet")):
        return {**row, "error": f"the search wrote no trials.parquet (rc {search.get('rc')})"}
    row.update(select(row, a, info), seconds=time.perf_counter() - t0)
    return row


def select(row: dict, a, info: dict) -> dict:
    """``ensemble_builder select`` on a finished experiment, then its scores on the held-out labels."""
    experiment = row["experiment"]
    sel = [sys.executable, "-m", "ensemble_builder", "select", "--top", str(a.top), "--experiment", experiment]
    log = os.path.join(a.workdir, "logs", os.path.basename(experiment) + ".select.log")
    out = harness.run(sel, log, a.timeout, tag=row["dataset"], cpu=True)
    return dict(select_rc=out.get("rc"), **scores(real_data.measure(experiment, info)))


def scores(m: dict) -> dict:
    """The figures of one run: ensemble and best single on the test split, archs, search outcome."""
    cands, out = m.get("candidates") or {}, {}
    out.update(trials=m["trials"], failed=m["failed"], crossfitted=len(cands),
               crossfit_archs=len({c["arch"] for c in cands.values()}))
    best = m.get("best")
    if best:
        out.update(single_acc=cands[best]["test_acc"], single_ll=cands[best]["test_ll"],
                   single_arch=cands[best]["arch"], single_oof=cands[best]["oof_acc"])
    ens = m.get("ensemble_json")
    if ens and "ens_test_ll" in m:
        members = [x["candidate"] for x in ens["members"]]
        cv = ens.get("cv") or {}
        out.update(ens_acc=m.get("ens_test_acc", m["ens_test_acc_blend"]), ens_ll=m["ens_test_ll"],
                   ens_members=len(members), ens_archs=len({cands[c]["arch"] for c in members if c in cands}),
                   fallback=bool(cv.get("fallback")), chosen=(cv.get("chosen") or {}).get("name"),
                   cv_gain=cv.get("gain"),
                   insample_gain=ens["scores"]["ensemble"]["accuracy"] - ens["scores"]["best_single"]["accuracy"])
        if best:
            out.update(gain_acc=out["ens_acc"] - out["single_acc"], gain_ll=out["single_ll"] - out["ens_ll"])
    return out


# --- the report ---------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    headers = ["dataset", "pipeline", "runs", "ensemble test acc", "ensemble test log loss",
               "best single test acc", "best single test log loss", "gain (acc)", "gain (log loss)",
               "ensemble archs", "cross-fit archs", "fallback to single", "failed trials"]
    body = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        for p in PIPELINES:
            g = [r for r in rows if r["dataset"] == ds and r["pipeline"] == p and "ens_acc" in r]
            if not g:
                continue
            body.append([ds, LABELS[p], f"{len(g)} (seeds {','.join(str(r['seed']) for r in g)})",
                         *(harness.spread_cell([r[k] for r in g]) for k in ("ens_acc", "ens_ll", "single_acc",
                                                                           "single_ll", "gain_acc", "gain_ll",
                                                                           "ens_archs", "crossfit_archs")),
                         f"{sum(r['fallback'] for r in g)} of {len(g)}",
                         f"{sum(r['failed'] for r in g)} of {sum(r['trials'] for r in g)}"])
    return harness.md_table(headers, body)


def per_run(rows: list[dict]) -> str:
    headers = ["dataset", "pipeline", "seed", "ensemble acc", "ensemble ll", "single acc", "single ll",
               "gain acc", "members", "archs", "chosen", "in-sample gain", "cv gain", "s"]
    f = real_data.f4
    body = [[r["dataset"], r["pipeline"], r["seed"], f(r.get("ens_acc")), f(r.get("ens_ll")), f(r.get("single_acc")),
             f(r.get("single_ll")), f(r.get("gain_acc")), r.get("ens_members", "-"), r.get("ens_archs", "-"),
             r.get("chosen", "-"), f(r.get("insample_gain")), f(r.get("cv_gain")), f"{r.get('seconds', 0):.0f}"]
            for r in rows]
    return harness.md_table(headers, body)


def paired(rows: list[dict]) -> str:
    """Each pipeline against (a) on the same dataset and seed: mean difference and its spread."""
    lines = []
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        base = {r["seed"]: r for r in rows if r["dataset"] == ds and r["pipeline"] == "score" and "ens_acc" in r}
        for p in list(PIPELINES)[1:]:
            d_acc, d_ll = [], []
            for r in rows:
                if r["dataset"] == ds and r["pipeline"] == p and "ens_acc" in r and r["seed"] in base:
                    d_acc.append(r["ens_acc"] - base[r["seed"]]["ens_acc"])
                    d_ll.append(base[r["seed"]]["ens_ll"] - r["ens_ll"])
            if d_acc:
                lines.append(f"{ds}: {LABELS[p]} minus (a), same seeds (n={len(d_acc)}): ensemble test acc "
                             f"{harness.spread_cell(d_acc)}, log loss improvement {harness.spread_cell(d_ll)}")
    return "\n".join(f"- {x}" for x in lines)


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,lfw", help="comma-separated: mnist, lfw, textures")
    ap.add_argument("--pipelines", default=",".join(PIPELINES), help=f"comma-separated: {', '.join(PIPELINES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--smoke", action="store_true", help=f"tiny budgets ({SMOKE}) and subsets")
    ap.add_argument("--report-only", action="store_true", help="print the table from the finished runs")
    ap.add_argument("--reselect", action="store_true",
                    help="run select again on every finished run (today's ensemble_builder) and re-score it")
    ap.add_argument("--root", default=harness.DATA_ROOT, help="datasets and weights (bench/real_data.py's)")
    ap.add_argument("--workdir", default="/tmp/bench_ensemble_aware", help="runs, cache, logs, results jsonl")
    ap.add_argument("--archs", default=harness.ARCHS)
    ap.add_argument("--image-sizes", default="32,48")
    ap.add_argument("--top", type=int, default=5, help="ensemble_builder select --top")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess before it is killed")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--mnist-train", type=int, default=1200, help="mnist training images (the test split is 600)")
    a = ap.parse_args()
    a.root, a.workdir = os.path.abspath(a.root), os.path.abspath(a.workdir)
    os.makedirs(a.workdir, exist_ok=True)
    jsonl = os.path.join(a.workdir, f"{SCRIPT}{'-smoke' if a.smoke else ''}.jsonl")
    datasets = [d for d in a.datasets.split(",") if d]
    pipelines = [p for p in a.pipelines.split(",") if p]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)

    sizes = dict(mnist_train=300, mnist_test=100) if a.smoke else dict(mnist_train=a.mnist_train, mnist_test=600)
    ns = argparse.Namespace(root=a.root, data_seed=a.data_seed, lfw_train=120, lfw_valid=20, lfw_test=60,
                            textures_train=96, textures_test=32, **sizes)
    infos = {d: real_data.build_dataset(d, ns) for d in datasets}
    if a.reselect:
        rows = read_rows(jsonl)
        for r in rows:
            if "error" not in r and r["dataset"] in infos:
                r.update(select(r, a, infos[r["dataset"]]))
                print(f"{r['dataset']} {r['pipeline']} seed {r['seed']}: selected again", flush=True)
        with open(jsonl, "w") as f:
            f.writelines(json.dumps(r, default=str) + "\n" for r in rows)
    if not a.report_only:
        weights = _real.weights_folder(a.root)
        done = {(r["dataset"], r["pipeline"], r["seed"]) for r in read_rows(jsonl) if "error" not in r}
        # seed-major order: a stopped run leaves whole seeds, every pipeline alike
        for seed in seeds:
            for d in datasets:
                for p in pipelines:
                    if (d, p, seed) in done:
                        continue
                    print(f"\n== {d} {p} seed {seed} (load {os.getloadavg()[0]:.2f})", flush=True)
                    try:
                        row = run_cell(d, p, seed, a, infos[d], weights)
                    except Exception as e:  # noqa: BLE001  (recorded; the next cell still runs)
                        traceback.print_exc()
                        row = dict(dataset=d, pipeline=p, seed=seed, error=f"{type(e).__name__}: {e}")
                    print(json.dumps({k: v for k, v in row.items() if k not in ("command", "budget")},
                                     default=str), flush=True)
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(row, default=str) + "\n")

    rows = [r for r in read_rows(jsonl) if "error" not in r and r["dataset"] in datasets]
    b = SMOKE if a.smoke else FULL
    body = "\n".join([table(rows), "", "Same seed, paired against (a):", "", paired(rows), "",
                      "Every run:", "", per_run(rows)])
    notes = [f"budget per run (every cell alike): {b}; archs {a.archs}; sizes {a.image_sizes}; "
             f"ensemble_builder select --top {a.top} (its cross-validated settings and fallback)",
             "best single = the cross-fitted config with the best out-of-fold accuracy, scored on the test split "
             "with the mean of its fold models; gain = ensemble minus that; log-loss gain = single minus ensemble",
             "mean ± sample std over seeds; a difference smaller than the spread is not a finding",
             f"results: {jsonl}"]
    harness.report(SCRIPT, "Ensemble-aware search: four pipelines on held-out real images", body, notes)


if __name__ == "__main__":
    main()
