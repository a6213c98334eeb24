"""Benchmark: vectorised vs per-candidate-loop greedy ensemble selection on synthetic candidates.

    python bench/ensemble_selection.py --candidates 1000 --samples 10000 --classes 10 --steps 50
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from ensemble_builder.greedy import EnsembleSelection  # noqa: E402


def timed_fit(P, y, steps: int, metric: str, vectorised: bool, repeats: int):
    """Best wall time of ``repeats`` fits and the fitted selector."""
    wall, _, sel = harness.best_of(repeats, lambda: EnsembleSelection(
        ensemble_size=steps, metric=metric, vectorised=vectorised).fit(P, y))
    return wall, sel


def main() -> None:
    ap = harness.synthetic_parser(__doc__, 1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--naive-steps", type=int, default=5,
                    help="greedy steps for the naive loop; its time is extrapolated per step")
    ap.add_argument("--metric", default="accuracy")
    ap.add_argument("--repeats", type=int, default=3, help="time each fit this many times, keep the best")
    a = ap.parse_args()

    P, y = harness.synthetic_matrix(a.candidates, a.samples, a.classes, a.seed)
    ns = min(a.naive_steps, a.steps)
    t_vec, vec = timed_fit(P, y, a.steps, a.metric, True, a.repeats)
    t_vec_few, vec_few = timed_fit(P, y, ns, a.metric, True, a.repeats)
    t_naive, naive = timed_fit(P, y, ns, a.metric, False, a.repeats)
    same = (vec_few.all_indices_ == naive.all_indices_ == vec.all_indices_[:ns]
            and vec_few.trajectory_ == naive.trajectory_)
    naive_full = t_naive / ns * a.steps

    print(f"best of {a.repeats} runs each; load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"metric={a.metric}; best single {vec.trajectory_[0]:.4f}, ensemble {vec.trajectory_[vec.best_step_]:.4f} "
          f"at step {vec.best_step_ + 1} with {len(set(vec.indices_))} distinct members")
    print(f"vectorised: {a.steps} steps in {t_vec:.2f} s (incl. setup); first {ns} steps alone {t_vec_few:.2f} s")
    print(f"naive loop: {ns} steps in {t_naive:.2f} s = {t_naive / ns:.3f} s/step; "
          f"'naive s' below is that per-step time x {a.steps} (extrapolated)")
    print(f"speed-up per step: {naive_full / t_vec:.1f}x over {a.steps} steps; "
          f"{t_naive / t_vec_few:.1f}x on the same first {ns} steps")
    print()
    print("| candidates | samples | classes | steps | vectorised s | naive s (extrapolated) "
          "| speed-up | identical picks |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {a.candidates} | {a.samples} | {a.classes} | {a.steps} | {t_vec:.2f} | {naive_full:.1f} "
          f"| {naive_full / t_vec:.1f}x | {'yes' if same else 'no'} (first {ns} steps) |")


if __name__ == "__main__":
    main()
