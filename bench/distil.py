"""Benchmark: the shipped ensemble distilled into one student, on real held-out images.

On time_budget.py's default run per dataset and seed, ``python -m ensemble_builder distill --student ARCH`` for two
sizes: test accuracy and log loss of the ensemble, the best single and each student, its size, images/s against the
ensemble's, and the wall time against the pipeline's. Mean and spread over seeds.

    python bench/distil.py                                  # 2 datasets x 3 seeds, 6-minute runs
    python bench/distil.py --datasets animals --seeds 0
    python bench/distil.py --report-only
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import time_budget  # noqa: E402

OUT = os.path.join(harness.RESULTS, "distil")
STUDENTS = ("test_resnet", "mobilenetv3_small_050")   # the two smallest networks the pipeline searches


def student_scores(location: str, info: dict, arch: str) -> dict:
    """Distil one student into the experiment with the CLI, and score it on the test images."""

    from core.experiment import Experiment

    exp = Experiment(location)
    log = os.path.join(OUT, "logs", f"{os.path.basename(os.path.dirname(location))}-{arch}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    r = harness.run([sys.executable, "-m", "ensemble_builder", "distill", "--experiment", location, "--student",
                     arch], log, timeout=3600)
    out = dict(cmd=r["cmd"], rc=r["rc"], seconds=r["seconds"])
    if r["rc"] != 0:
        return out
    student = exp.ensemble()["student"]
    order = exp.test()["sample_id"].tolist()
    y = harness.labels(info, exp.meta()["class_names"], order)
    P = harness.test_probs(exp.candidate(student["candidate"]).test(), order)
    out.update(harness.scores(y, P), holdout=student["scores"], params=student["params"], mb=student["mb"],
               images_per_s=student["images_per_s"], ensemble_images_per_s=student["ensemble_images_per_s"],
               speedup=student["speedup"], ensemble_models=student["ensemble_models"],
               distill_s=student["seconds"])
    return out


def cell(name: str, seed: int, minutes: float) -> dict:

    from core.experiment import Experiment

    info = harness.dataset(name)
    tag = f"{name}-s{seed}-{minutes:g}m"
    location = os.path.join(time_budget.OUT, "runs", tag, "pipeline")
    if not os.path.exists(os.path.join(location, "ensemble", "ensemble.json")):
        time_budget.cell(name, seed, minutes, "pipeline")
    exp = Experiment(location)
    order, P = harness.ensemble_test(location)
    y = harness.labels(info, exp.meta()["class_names"], order)
    record = exp.ensemble()
    single = harness.test_probs(exp.candidate(record["best_single"]).test(), order)
    pipeline = json.load(open(os.path.join(time_budget.OUT, f"{tag}.json")))["pipeline"]
    out = dict(dataset=name, seed=seed, budget_min=minutes, ensemble=harness.scores(y, P),
               single=harness.scores(y, single), pipeline_s=pipeline["seconds"],
               students={arch: student_scores(location, info, arch) for arch in STUDENTS})
    harness.save_json(os.path.join(OUT, f"{tag}.json"), out)
    return out


def _row(name: str, seeds: int, label: str, accs: list[float], lls: list[float], extra=("", "", "", "")) -> list:
    return [name, seeds, label, harness.spread_cell(accs), harness.spread_cell(lls, 3), *extra]


def _student_cells(ran: list[tuple[dict, dict]]) -> tuple:
    """Size, speed, cost and how many ran, over the (cell, student) pairs that ran."""
    def mean(key):
        return harness.mean_spread([s[key] for _, s in ran])[0]

    cost = harness.mean_spread([s["seconds"] / r["pipeline_s"] for r, s in ran])[0]
    return (f"{mean('params') / 1e6:.2f} M / {mean('mb'):.1f} MB",
            f"{mean('speedup'):.1f}x ({mean('images_per_s'):.0f} vs {mean('ensemble_images_per_s'):.0f} img/s, "
            f"{mean('ensemble_models'):.0f} models)", f"{mean('seconds'):.0f} s ({cost:.2f}x the pipeline)")


def table(rows: list[dict]) -> str:
    from collections import defaultdict

    cells = defaultdict(list)
    for r in rows:
        cells[r["dataset"]].append(r)
    lines = []
    for name, rs in sorted(cells.items()):
        lines.append(_row(name, len(rs), "shipped ensemble", [r["ensemble"]["accuracy"] for r in rs],
                          [r["ensemble"]["log_loss"] for r in rs]))
        lines.append(_row(name, len(rs), "best single (by OOF)", [r["single"]["accuracy"] for r in rs],
                          [r["single"]["log_loss"] for r in rs]))
        for arch in STUDENTS:
            ran = [(r, r["students"][arch]) for r in rs if r["students"].get(arch, {}).get("rc") == 0]
            if ran:
                lines.append(_row(name, len(rs), f"student {arch}", [s["accuracy"] for _, s in ran],
                                  [s["log_loss"] for _, s in ran], (*_student_cells(ran), f"{len(ran)}/{len(rs)}")))
    return harness.md_table(["dataset", "seeds", "model", "test acc", "test log loss", "student size",
                             "inference speed vs ensemble", "distil wall time", "ran"], lines)


if __name__ == "__main__":
    harness.over_cells(__doc__, cell, OUT, "distil", "One deployable model: the student against the ensemble", table,
                       "animals,mnist")
