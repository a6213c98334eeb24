"""Benchmark: is the out-of-fold score honest on this data? Each candidate's OOF score beside its held-out test score.

The ensemble's weights and its nested estimate are fitted on out-of-fold predictions; where training images
overlap across folds (crops of one photo, shots of one plant) OOF scores are inflated, and most for members
that memorise appearance. This reads a finished experiment through the contract and scores both.

    python bench/oof_vs_test.py bench/results/time_budget/runs/photos-s1-6m/pipeline photos
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    from core.experiment import Experiment

    location, name = sys.argv[1], sys.argv[2]
    exp, info = Experiment(os.path.abspath(location)), harness.dataset(name)
    classes = exp.meta()["class_names"]
    folds = exp.folds()
    truth = dict(zip(folds["sample_id"], folds["label"]))   # class indices
    rows = []
    for cid in exp.candidate_ids():
        c = exp.candidate(cid)
        if not (c.exists() and c.has("test.parquet")):
            continue
        oof_ids = c.oof().column("sample_id").to_pylist()
        oof = harness.scores(np.array([truth[s] for s in oof_ids]), harness.test_probs(c.oof(), oof_ids))
        test_ids = c.test().column("sample_id").to_pylist()
        test = harness.scores(harness.labels(info, classes, test_ids), harness.test_probs(c.test(), test_ids))
        rows.append([cid, c.config().get("kind", "network"), f"{oof['accuracy']:.3f} / {oof['log_loss']:.3f}",
                     f"{test['accuracy']:.3f} / {test['log_loss']:.3f}"])
    harness.report("oof_vs_test", "Out-of-fold against held-out test, per candidate", harness.md_table(
        ["candidate", "kind", "out-of-fold accuracy / log loss", "test accuracy / log loss"], rows))


if __name__ == "__main__":
    main()
