"""The cost of ensemble_gain per report: reading the pool of finished trials and two greedy selections.

A trial's first report reads the whole pool of an experiment on local disk (a new actor), later reports the
listing and only new entries.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.experiment import Experiment, probs_table  # noqa: E402
from ensemble_builder.gain import Pool  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--pool", default="10,100,300")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    n, C = a.samples, a.classes
    y = rng.integers(0, C, n)
    ids = [f"s{i}" for i in range(n)]

    def model():
        logits = rng.normal(0, 1, (n, C))
        logits[np.arange(n), y] += rng.uniform(0.5, 2.0)
        e = np.exp(logits)
        return (e / e.sum(1, keepdims=True)).astype(np.float32)

    rows = []
    for m in [int(x) for x in a.pool.split(",")]:
        with tempfile.TemporaryDirectory() as d:
            exp = Experiment(d)
            exp.write_folds(pd.DataFrame({"sample_id": ids, "path": "", "label": y, "fold": 0}))
            for t in range(m):
                exp.write_pool(f"t{t:04d}", probs_table(ids, model()))
            new = model()
            cold, warm = [], []
            for _ in range(a.repeats):   # the least of each: the machine is shared
                pool = Pool(d, ids, y, "accuracy")
                t0 = time.perf_counter()
                pool.gain(new)
                cold.append(time.perf_counter() - t0)
                warm.append(pool.gain(new)[2])
            rows.append([m, n, C, f"{min(cold):.3f}", f"{min(warm):.3f}"])
    harness.report("pool_cost", "The cost of ensemble_gain per report", harness.md_table(
        ["pool (finished trials)", "holdout samples", "classes", "first report s (reads the pool)",
         "later report s (listing + greedy)"], rows))


if __name__ == "__main__":
    main()
