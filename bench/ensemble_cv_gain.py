"""Does the printed ensemble gain hold on held-out images? In-sample vs cross-validated vs test gain.

For each finished experiment of ``bench/real_data.py`` (cross-fitted candidates,
a test split whose labels only the benchmark knows), runs
``python -m ensemble_builder select --top 5`` again and compares three gains of
the ensemble over the best single candidate (chosen by its out-of-fold score):

- in-sample, 50 steps: what ``select`` printed before the estimate (50 greedy steps, no choice);
- in-sample: the out-of-fold scores the chosen selection was fitted on (optimistic);
- cross-validated: ``ensemble.json``'s ``cv.gain`` (selection rerun without each fold);
- test: the submission and the best single candidate's test predictions scored
  on the held-out labels.

Usage: ``python bench/ensemble_cv_gain.py RUN_DIR...`` (experiment folders);
the held-out labels are found as ``<data>-test_labels.csv`` beside each
experiment's data folder, as ``bench/_real.py`` writes them.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import pandas as pd

from core.experiment import Experiment, probs_array
from core.metrics import METRICS


def test_accuracy(exp: Experiment, cid: str, labels: pd.Series, names: list[str]) -> float:
    table = exp.candidate(cid).test()
    pred = probs_array(table).argmax(1)
    truth = labels.loc[table.column("sample_id").to_pylist()].map({n: i for i, n in enumerate(names)})
    return float(np.mean(pred == truth.to_numpy()))


def measure(location: str) -> dict:
    from ensemble_builder.__main__ import main

    exp = Experiment(location)
    meta = exp.meta()
    labels_file = meta["data"].rstrip("/") + "-test_labels.csv"
    labels = pd.read_csv(labels_file, dtype=str).set_index("image_id")["label"]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["select", "--experiment", location, "--top", "5"])
    if code != 0:
        raise SystemExit(f"{location}: select exited {code}")
    ens = exp.ensemble()
    metric, names = ens["metric"], meta["class_names"]
    in_sample = ens["scores"]["ensemble"][metric] - ens["scores"]["best_single"][metric]
    sub = pd.read_csv(exp.submission_file, dtype=str)
    test_ens = float(np.mean(sub["label"].to_numpy() == labels.loc[sub.iloc[:, 0]].to_numpy()))
    test_single = test_accuracy(exp, ens["best_single"], labels, names)
    cv = ens.get("cv", {})
    from ensemble_builder.ensemble import fit
    plain = fit(location, 5, auto=False)      # the landed default: 50 greedy steps, no choice, no fallback
    sign = METRICS[metric].sign
    old_gain = sign * (plain.scores["ensemble"][metric] - plain.scores["best_single"][metric])
    return dict(experiment=os.path.basename(location), task=meta["task"], candidates=len(ens["candidates"]),
                oof_images=len(exp.folds()), test_images=len(sub), chosen=str(cv.get("chosen", {}).get("name", "?")),
                fallback=cv.get("fallback"), in_sample_50_steps=old_gain, in_sample_gain=in_sample,
                cv_gain=cv.get("gain"),
                test_gain=test_ens - test_single, test_ensemble=test_ens, test_best_single=test_single,
                greater=METRICS[metric].greater_is_better)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+")
    args = p.parse_args(argv)
    rows = [measure(os.path.abspath(e)) for e in args.experiments]
    cols = ["experiment", "task", "candidates", "oof_images", "test_images", "chosen", "fallback",
            "in_sample_50_steps", "in_sample_gain", "cv_gain", "test_gain", "test_best_single", "test_ensemble"]
    frame = pd.DataFrame(rows)[cols]
    print(f"Machine: {_common.machine_line()}\n")
    print(f"Command: `python bench/ensemble_cv_gain.py {' '.join(args.experiments)}`\n")

    def fmt(v):
        return f"{v:+.4f}" if isinstance(v, float) else str(v)
    print(_common.md_table(cols, [[fmt(v) for v in row] for row in frame.itertuples(index=False)]))
    for col in ("in_sample_50_steps", "in_sample_gain", "cv_gain"):
        err = np.abs(frame[col].astype(float) - frame["test_gain"])
        print(f"- {col}: mean |gain - test gain| = {err.mean():.4f}, mean signed (gain - test) = "
              f"{(frame[col].astype(float) - frame['test_gain']).mean():+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
