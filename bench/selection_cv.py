"""Benchmark: the cost of cross-validating the greedy ensemble selection, against one plain selection.

``SelectionCV`` as ``ensemble_builder select`` runs it, on synthetic candidates (harness.synthetic_matrix) in
round-robin folds, in all and less the final refit (the one selection ``select`` always ran): the cost of the
cross-validation itself. Best of --repeats, wall and CPU (single-threaded: the target is judged on the CPU time).

    python bench/selection_cv.py                                   # 50 x 10,000 x 10, 5 folds
    python bench/selection_cv.py --candidates 10 --samples 1000 --repeats 1   # smoke
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import numpy as np  # noqa: E402

from core.metrics import METRICS  # noqa: E402
from ensemble_builder.crossval import STEPS_GRID, SelectionCV  # noqa: E402
from ensemble_builder.greedy import EnsembleSelection  # noqa: E402

SCRIPT = "selection_cv"
TARGET_S = 1.0   # the cross-validation (folds' selections + settings search) must stay well under this


def main() -> None:
    ap = harness.synthetic_parser(__doc__, 50)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--top", type=int, default=5, help="most distinct members, and K of the uniform top-K (as select)")
    ap.add_argument("--metrics", default="accuracy,log_loss")
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()

    P, y = harness.synthetic_matrix(a.candidates, a.samples, a.classes, a.seed)
    folds = np.arange(a.samples) % a.folds
    rows = []
    for metric in a.metrics.split(","):
        # the greedy settings only, as in the BENCHMARKS.md entry (uniform and stacking came later and have no
        # selector to refit: with them the chosen setting can have no step count)
        cv = SelectionCV(metric, n_init=1, max_members=a.top, top=a.top, random_state=a.seed,
                         uniform=False, stacking=())
        t_total, c_total, fitted = harness.best_of(a.repeats, cv.fit, P, y, folds)
        chosen = fitted.settings_[fitted.chosen_]
        refit = EnsembleSelection(chosen["steps"], metric, max_members=a.top, random_state=a.seed)
        t_refit, c_refit, _ = harness.best_of(a.repeats, refit.fit, P, y)
        plain = EnsembleSelection(50, metric, max_members=a.top, random_state=a.seed)
        t_plain, c_plain, _ = harness.best_of(a.repeats, plain.fit, P, y)
        # what select now does on top of the one selection it always ran
        t_cv, c_cv = t_total - t_refit, c_total - c_refit
        fn, sign = METRICS[metric].fn, METRICS[metric].sign
        single = sign * max(sign * fn(y, p) for p in P)
        in_sample_gain = sign * (fn(y, plain.predict_proba(P)) - single)
        rows.append([metric, a.folds, f"{t_cv:.3f}", f"{c_cv:.3f}", f"{t_total:.3f}", f"{t_refit:.3f}",
                     f"{t_plain:.3f}", f"{c_plain:.3f}", f"{c_cv / c_plain:.1f}x", chosen["name"],
                     f"{fitted.gain_:+.4f}", f"{in_sample_gain:+.4f}", harness.met(c_cv < TARGET_S)])
    body = harness.md_table(
        ["metric", "folds", "CV s (folds + settings)", "CV CPU s", "SelectionCV.fit s", "refit s",
         "plain 50-step fit s", "plain CPU s", "CV / plain (CPU)", "chosen", "CV gain", "in-sample gain (50 steps)",
         f"CV CPU < {TARGET_S:g} s"], rows)
    grid = ", ".join(map(str, STEPS_GRID))
    notes = [(f"{a.candidates} candidates x {a.samples:,} samples x {a.classes} classes (float32), {a.folds} "
              f"round-robin folds; top {a.top}; settings: best single + {grid} steps, the unbagged ones read off "
              "one 50-step selection per fold"),
             (f"best of {a.repeats} runs each; load average at the end {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} cores"),
             "gains are in the metric's units, positive = better than the best single candidate"]
    harness.report(SCRIPT, "Cross-validated ensemble selection: cost of the honest estimate", body, notes)


if __name__ == "__main__":
    main()
