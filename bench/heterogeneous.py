"""Benchmark: diverse, cheap ensemble members at equal wall time, on real held-out images.

At one time budget per dataset and seed: (a) networks only (a run of its own, ``--members none``); over the default
run shared with time_budget.py: (b) + probe and kNN, (c) + pixels, (d) + stacking and uniform top-K as shipped, and
(d) with accuracy as the objective. Test accuracy and log loss, gain over the best single, kinds and weights.

    python bench/heterogeneous.py                       # 3 datasets x 3 seeds at 6 minutes
    python bench/heterogeneous.py --datasets animals --seeds 0
    python bench/heterogeneous.py --report-only
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import time_budget  # noqa: E402

OUT = os.path.join(harness.RESULTS, "heterogeneous")
NETWORK_SELECTION = dict(uniform=False, stacking=False)


def selected(location: str, info: dict, kinds: tuple[str, ...], **options) -> dict:
    """``select`` over the experiment's candidates of these kinds; the shipped ensemble's and the best single
    candidate's test scores, and what the ensemble holds."""
    import numpy as np

    from core.experiment import Experiment
    from ensemble_builder.ensemble import fit

    exp = Experiment(location)
    ids = [c for c in exp.candidate_ids() if exp.candidate(c).config().get("kind", "network") in kinds
           and exp.candidate(c).exists()]
    with contextlib.redirect_stdout(io.StringIO()):
        sel = fit(location, top=5, candidates=ids, **options)
    test_ids, P = sel.test_probs()
    y = harness.labels(info, exp.meta()["class_names"], test_ids)
    single = harness.test_probs(exp.candidate(sel.best_single).test(), test_ids)
    ens, best = harness.scores(y, np.asarray(P, np.float64)), harness.scores(y, single)
    kinds_of = {c: exp.candidate(c).config().get("kind", "network") for c in ids}
    return dict(**ens, single_accuracy=best["accuracy"], single_log_loss=best["log_loss"],
                gain=ens["accuracy"] - best["accuracy"], setting=sel.chosen["name"], cv_gain=sel.cv_gain,
                members=[(c, kinds_of[c], round(w, 3)) for c, w in sel.members], candidates=len(ids))


def cell(name: str, seed: int, minutes: float) -> dict:
    info = harness.dataset(name)
    tag = f"{name}-s{seed}-{minutes:g}m"
    shared = os.path.join(time_budget.OUT, "runs", tag)   # the default run, shared with time_budget.py
    default = os.path.join(shared, "pipeline")
    if not os.path.exists(os.path.join(default, "ensemble", "ensemble.json")):
        time_budget.cell(name, seed, minutes, "pipeline")
    work = os.path.join(OUT, "runs", tag)
    os.makedirs(work, exist_ok=True)
    networks = time_budget.run_pipeline(name, seed, minutes * 60, work, "networks", ("--members", "none"))
    seconds = json.load(open(os.path.join(time_budget.OUT, f"{tag}.json")))["pipeline"]["seconds"]
    out = dict(dataset=name, seed=seed, budget_min=minutes, seconds=dict(a=networks["seconds"], d=seconds))
    out["a"] = selected(networks["location"], info, ("network",), **NETWORK_SELECTION)
    out["b"] = selected(default, info, ("network", "probe", "knn"), **NETWORK_SELECTION)
    out["c"] = selected(default, info, ("network", "probe", "knn", "pixels"), **NETWORK_SELECTION)
    out["d"] = selected(default, info, ("network", "probe", "knn", "pixels"))
    out["d_accuracy_objective"] = selected(default, info, ("network", "probe", "knn", "pixels"), metric="accuracy")
    harness.save_json(os.path.join(OUT, f"{tag}.json"), out)
    print(f"{tag}: " + ", ".join(f"{k} {out[k]['accuracy']:.4f}" for k in "abcd"), flush=True)
    return out


PIPELINES = {"a": "(a) networks only", "b": "(b) + probe, kNN", "c": "(c) + pixels",
             "d": "(d) + stacking, uniform", "d_accuracy_objective": "(d), accuracy as the objective"}


def table(rows: list[dict]) -> str:
    from collections import Counter

    lines = []
    for (name, minutes), rs in harness.by_cell(rows):
        for key, label in PIPELINES.items():
            single = harness.mean_spread([r[key]["single_accuracy"] for r in rs])[0]
            kinds = Counter()
            for r in rs:
                for _, kind, w in r[key]["members"]:
                    kinds[kind] += w / len(rs)
            settings = ", ".join(sorted({r[key]["setting"] for r in rs}))
            wall = harness.mean_spread([r["seconds"]["a" if key == "a" else "d"] for r in rs])[0]
            lines.append([name, f"{minutes:g}", len(rs), label, harness.spread_cell([r[key]["accuracy"] for r in rs]),
                          harness.spread_cell([r[key]["log_loss"] for r in rs], 3), f"{single:.4f}",
                          harness.spread_cell([r[key]["gain"] for r in rs], sign=True),
                          ", ".join(f"{k} {w:.2f}" for k, w in kinds.most_common()), settings, f"{wall:.0f}"])
    return harness.md_table(["dataset", "budget (min)", "seeds", "pipeline", "test acc", "test log loss",
                             "best single (by OOF), test acc", "gain over it", "kinds: mean weight", "settings",
                             "wall s"], lines)


if __name__ == "__main__":
    harness.over_cells(__doc__, cell, OUT, "heterogeneous", "Diverse, cheap members at equal wall time", table,
                       "mnist,animals,photos")
