"""Benchmark: what the shipped ensemble gains over the best single config and a uniform top-K mean.

On a finished experiment's candidates (out of fold when cross-fitted), and on the test split where the data folder
has test_labels.csv: the best single candidate, the uniform top-K mean and the ensemble that ``ensemble_builder
select --top K`` ships (the setting its nested cross-validation chooses). Without --experiment it first searches
digits into --workdir.

    python bench/ensemble_gain.py --experiment runs/digits-...     # an existing digits run with cross-fit
    python bench/ensemble_gain.py                                  # full run: searches digits itself
    python bench/ensemble_gain.py --trials 4 --max-epochs 1 --top 3 --archs test_resnet --image-sizes 16   # smoke
"""
from __future__ import annotations

import argparse
import contextlib
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
    from core.metrics import accuracy, log_loss
    from ensemble_builder import candidates as cands
    from ensemble_builder.crossval import rank_candidates
    from ensemble_builder.ensemble import fit

    experiment = storage.absolute(a.experiment) if a.experiment else run_search(a)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        sel = fit(experiment, top=a.top, seed=a.seed)   # what `ensemble_builder select --top K` ships
    select_s = time.perf_counter() - t0
    c, top = sel.candidates, sel.top
    ranked = rank_candidates(c.P, c.y, sel.metric)
    test = cands.test_matrix(c, c.ids)
    y_test = test_labels(c, test[0]) if test is not None else None
    blends = {f"best single ({sel.best_single})": (c.P[sel.best], test[1][sel.best] if test else None),
              f"uniform mean of top {top}": (c.P[ranked[:top]].mean(0),
                                             test[1][ranked[:top]].mean(0) if test else None),
              f"shipped ensemble ({sel.chosen['name']}, {len(sel.members)} members)":
                  (sel.blend(), sel.test_probs()[1] if test else None)}
    headers = ["predictor", "OOF accuracy", "OOF log loss"] + (["test accuracy", "test log loss"] if y_test is not None
                                                              else [])
    rows = [[label, f"{accuracy(c.y, P):.4f}", f"{log_loss(c.y, P):.4f}"]
            + ([f"{accuracy(y_test, T):.4f}", f"{log_loss(y_test, T):.4f}"] if y_test is not None else [])
            for label, (P, T) in blends.items()]
    notes = [
        f"experiment: {experiment} ({c.meta.get('task')}); {len(c.ids)} candidate(s), "
        + ("cross-fitted: out of fold over all" if c.full_coverage else "holdout fold only (no cross-fit):")
        + f" {len(c.y)} training images; objective {sel.metric}",
        f"shipped ensemble = `python -m ensemble_builder select --top {a.top}` (ensemble_builder.ensemble.fit: the "
        f"setting chosen by its nested cross-validation); members: "
        + ", ".join(f"{cid} {w:.2f}" for cid, w in sel.members) + f"; selection took {select_s:.1f} s; "
        f"its cross-validated gain over the best single {sel.cv_gain:+.4f} {sel.metric}",
        "the out-of-fold columns are in-sample for the ensemble (chosen on these predictions); the test split is "
        "the unbiased check" if y_test is not None else
        "no test-split scores: " + ("the candidates lack test predictions (cross-fit writes them)" if test is None
                                    else "no <data>/test_labels.csv covering the test set"),
    ]
    harness.report(SCRIPT, "Ensemble gain: best single vs uniform top-K vs the shipped ensemble",
                   harness.md_table(headers, rows), notes)

if __name__ == "__main__":
    main()
