"""Does the printed ensemble gain hold on held-out images? In-sample vs cross-validated vs test gain.

For finished experiments of ``bench/real_data.py`` (their held-out labels beside the data folder, as
``bench/_real.py`` writes them): selects again (``ensemble_builder select --top 5``), then compares the ensemble's
gain over the best single candidate four ways: in-sample with 50 plain greedy steps, in-sample as chosen,
cross-validated (``ensemble.json``'s ``cv.gain``) and on the test split.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.experiment import Experiment, probs_array  # noqa: E402
from core.metrics import METRICS, accuracy  # noqa: E402


def measure(location: str) -> dict:
    from ensemble_builder.__main__ import main
    from ensemble_builder.ensemble import fit

    exp = Experiment(location)
    meta = exp.meta()
    info = dict(test_labels=meta["data"].rstrip("/") + "-test_labels.csv")
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["select", "--experiment", location, "--top", "5"])
    if code != 0:
        raise SystemExit(f"{location}: select exited {code}")
    ens = exp.ensemble()
    metric, names = ens["metric"], meta["class_names"]
    sub = pd.read_csv(exp.submission_file, dtype=str)
    test_ens = float(np.mean(harness.labels(info, names, sub.iloc[:, 0].tolist())
                             == np.array([names.index(v) for v in sub["label"]])))
    single = exp.candidate(ens["best_single"]).test()
    test_single = accuracy(harness.labels(info, names, single.column("sample_id").to_pylist()), probs_array(single))
    cv = ens.get("cv", {})
    plain = fit(location, 5, auto=False)      # the landed default: 50 greedy steps, no choice, no fallback
    sign = METRICS[metric].sign
    return dict(experiment=os.path.basename(location), task=meta["task"], candidates=len(ens["candidates"]),
                oof_images=len(exp.folds()), test_images=len(sub), chosen=str(cv.get("chosen", {}).get("name", "?")),
                fallback=cv.get("fallback"),
                in_sample_50_steps=sign * (plain.scores["ensemble"][metric] - plain.scores["best_single"][metric]),
                in_sample_gain=ens["scores"]["ensemble"][metric] - ens["scores"]["best_single"][metric],
                cv_gain=cv.get("gain"), test_gain=test_ens - test_single, test_best_single=test_single,
                test_ensemble=test_ens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiments", nargs="+")
    frame = pd.DataFrame([measure(os.path.abspath(e)) for e in p.parse_args(argv).experiments])
    notes = []
    for col in ("in_sample_50_steps", "in_sample_gain", "cv_gain"):
        err = frame[col].astype(float) - frame["test_gain"]
        notes.append(f"{col}: mean |gain - test gain| = {err.abs().mean():.4f}, mean signed (gain - test) = "
                     f"{err.mean():+.4f}")
    rows = [[f"{v:+.4f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    harness.report("ensemble_cv_gain", "In-sample, cross-validated and test gains of the ensemble",
                   harness.md_table(list(frame.columns), rows), notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
