"""Benchmark: what the greedy ensemble gains over the best single config and a uniform top-K mean.

On a finished experiment's candidates (out of fold when cross-fitted), and on the test split where the data folder
has test_labels.csv: the best single candidate, the uniform top-K mean and the greedy ensemble (50 steps, at most K
members, as ``ensemble_builder select --top K``). Without --experiment it first searches digits into --workdir.

    python bench/ensemble_gain.py --experiment runs/digits-...     # an existing digits run with cross-fit
    python bench/ensemble_gain.py                                  # full run: searches digits itself
    python bench/ensemble_gain.py --trials 4 --max-epochs 1 --top 3 --archs test_resnet --image-sizes 16   # smoke
"""
from __future__ import annotations

import argparse
import datetime
import io
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402

SCRIPT = "ensemble_gain"


def run_search(a) -> str:
    cache_dir = os.path.abspath(a.cache_dir or os.path.join(a.workdir, "cache"))
    storage_root = os.path.abspath(os.path.join(a.workdir, "runs"))
    name = f"digits-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    argv = ["digits", "--storage", storage_root, "--name", name, "--cache-dir", cache_dir, "--seed", str(a.seed),
            "--crossfit-top", str(a.crossfit_top if a.crossfit_top is not None else a.top)]
    for flag, value in (("--trials", a.trials), ("--max-epochs", a.max_epochs), ("--archs", a.archs),
                        ("--image-sizes", a.image_sizes)):
        if value is not None:
            argv += [flag, str(value)]
    print(f"search + cross-fit took {harness.search_in_process(argv):.0f} s", flush=True)
    return os.path.join(storage_root, name)


def test_labels(c, test_ids: list[str]) -> np.ndarray | None:
    """Integer labels of the test samples from <data>/test_labels.csv, or None."""
    import pandas as pd

    from core import storage
    data = c.meta.get("data")
    if not data:
        return None
    location = storage.join(data, "test_labels.csv")
    if not storage.exists(location):
        return None
    df = pd.read_csv(io.BytesIO(storage.read_bytes(location)), dtype=str, keep_default_na=False)
    id_col = c.meta.get("id_column", "image_id") if c.meta.get("id_column", "image_id") in df else df.columns[0]
    label_col = c.meta.get("label_column", "label") if c.meta.get("label_column", "label") in df else df.columns[1]
    truth = dict(zip(df[id_col], df[label_col]))
    names = c.meta["class_names"]
    if any(s not in truth for s in test_ids):
        return None
    return np.array([names.index(truth[s]) for s in test_ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", help="a finished experiment (ideally cross-fitted); default: search digits now")
    ap.add_argument("--top", type=int, default=5, help="K: uniform top-K and the ensemble's most distinct members")
    ap.add_argument("--steps", type=int, default=50, help="greedy steps (ensemble_size)")
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_argument_group("the digits search run when --experiment is not given")
    g.add_argument("--workdir", default="/tmp/bench_ensemble_gain")
    g.add_argument("--cache-dir", help="node cache (default: <workdir>/cache)")
    g.add_argument("--trials", type=int, help="default: the task's budget")
    g.add_argument("--max-epochs", type=int, help="default: the task's budget")
    g.add_argument("--crossfit-top", type=int, help="configs to cross-fit (default: --top)")
    g.add_argument("--archs")
    g.add_argument("--image-sizes")
    a = ap.parse_args()

    from core import storage
    from core.metrics import METRICS, accuracy, log_loss
    from ensemble_builder import candidates as cands
    from ensemble_builder.greedy import EnsembleSelection

    experiment = storage.absolute(a.experiment) if a.experiment else run_search(a)
    c = cands.load(experiment)
    metric = c.meta["metric"]
    greater = METRICS[metric].greater_is_better
    m = len(c.ids)
    top = min(a.top, m)

    t0 = time.perf_counter()
    sel = EnsembleSelection(ensemble_size=a.steps, metric=metric, n_init=1, max_members=top,
                            random_state=a.seed).fit(c.P, c.y)
    select_s = time.perf_counter() - t0
    single = np.array([METRICS[metric].fn(c.y, p) for p in c.P])
    ranked = np.argsort(-single if greater else single, kind="stable")
    best = int(ranked[0])
    members = np.flatnonzero(sel.weights_)
    blends = {
        f"best single ({c.ids[best]})": (np.eye(m)[best], c.P[best]),
        f"uniform mean of top {top}": (np.isin(np.arange(m), ranked[:top]) / top, c.P[ranked[:top]].mean(0)),
        f"greedy ensemble ({len(members)} members, {a.steps} steps)": (sel.weights_, sel.predict_proba(c.P)),
    }

    test = cands.test_matrix(c, c.ids)
    y_test = test_labels(c, test[0]) if test is not None else None
    headers = ["predictor", "OOF accuracy", "OOF log loss"]
    if metric not in ("accuracy", "log_loss"):
        headers.append(f"OOF {metric}")
    if y_test is not None:
        headers += ["test accuracy", "test log loss"]
    rows = []
    for label, (weights, P) in blends.items():
        row = [label, f"{accuracy(c.y, P):.4f}", f"{log_loss(c.y, P):.4f}"]
        if metric not in ("accuracy", "log_loss"):
            row.append(f"{METRICS[metric].fn(c.y, P):.4f}")
        if y_test is not None:
            T = np.tensordot(np.asarray(weights, np.float64), test[1], axes=1)
            row += [f"{accuracy(y_test, T):.4f}", f"{log_loss(y_test, T):.4f}"]
        rows.append(row)
    body = harness.md_table(headers, rows)
    weights = ", ".join(f"{c.ids[i]} {sel.weights_[i]:.2f}" for i in members[np.argsort(-sel.weights_[members])])
    ens_P = sel.predict_proba(c.P)
    notes = [
        f"experiment: {experiment} ({c.meta.get('task')}); {m} candidate(s), "
        + ("cross-fitted: out of fold over all" if c.full_coverage else "holdout fold only (no cross-fit):")
        + f" {len(c.y)} training images; objective {metric}",
        f"greedy ensemble = EnsembleSelection(ensemble_size={a.steps}, metric={metric!r}, n_init=1, "
        f"max_members={top}) as `python -m ensemble_builder select --top {top}`; weights: {weights}; "
        f"selection took {select_s:.3f} s",
        f"gain over the best single, out of fold: accuracy {accuracy(c.y, ens_P) - accuracy(c.y, c.P[best]):+.4f}, "
        f"log loss {log_loss(c.y, ens_P) - log_loss(c.y, c.P[best]):+.4f}",
        "the greedy ensemble is selected on the same out-of-fold predictions it is scored on (optimistic); "
        "the test split is the unbiased check"
        if y_test is not None else
        "no test-split scores: " + ("the candidates lack test predictions (cross-fit writes them)" if test is None
                                    else "no <data>/test_labels.csv covering the test set"),
    ]
    if m < a.top:
        notes.append(f"only {m} candidate(s): top {a.top} shrinks to {top}")
    harness.report(SCRIPT, "Ensemble gain: best single vs uniform top-K vs greedy ensemble", body, notes)


if __name__ == "__main__":
    main()
