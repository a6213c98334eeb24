"""What the benchmarks share: the real datasets, running the CLIs in a child process, reading an experiment
through the contract, scoring on the held-out labels, timing and peak memory, the report.

Importing it puts the repository on ``sys.path`` (``_common``) so the project imports as it does in tests.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (the repository on sys.path, NO_ALBUMENTATIONS_UPDATE)
import _real  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.experiment import Experiment, aligned  # noqa: E402
from core.metrics import accuracy, log_loss  # noqa: E402

REPO, RESULTS = _common.REPO, _common.RESULTS
DATA_ROOT = os.path.join(RESULTS, "real_data")     # the datasets are written once here (bench/results: gitignored)
# Each real dataset: its builder in _real, the task whose layout it is written in, and flip TTA
# (off for digits: a mirrored digit is another glyph).
DATASETS = {
    "mnist": dict(task="paddy", tta=False),
    "animals": dict(task="imagefolder", tta=True),
    "photos": dict(task="paddy", tta=True),
    "lfw": dict(task="deepfake", tta=True),
    "textures": dict(task="imagefolder", tta=True),
}


def dataset(name: str, root: str = DATA_ROOT, **sizes) -> dict:
    """The dataset's info (folder, test_labels, classes, ...), written on first use."""
    return _real.BUILDERS[name](root, **sizes)


def weights(root: str = DATA_ROOT) -> str:
    """The folder with the real ImageNet EfficientNet-Lite0 weights (written and checked once)."""
    return _real.weights_folder(root)["folder"]


# --- child processes ----------------------------------------------------------------------

def child_env(ray_tmp: str | None = None) -> dict:
    """The environment of a CLI run: offline, its own Ray temp dir, never another user's cluster."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.environ["PYTHONPATH"])
    if ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
    return env


def show(cmd: list[str]) -> str:
    """The command as a user would type it (the venv's python as `python`, repository paths relative)."""
    out = []
    for a in cmd:
        if a == sys.executable:
            a = "python"
        elif os.path.isabs(a) and a.startswith(REPO + os.sep):
            a = os.path.relpath(a, REPO)
        out.append(shlex.quote(a))
    return " ".join(out)


def run(cmd: list[str], log: str, timeout: float, env: dict | None = None) -> dict:
    """Run ``cmd`` from the repository root in a session of its own, output to ``log``; rc, seconds, peak RSS.

    A run past ``timeout`` is killed with its process group.
    """
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    env = env or child_env(ray_tmp)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {show(cmd)}\n")
        f.flush()
        p = subprocess.Popen(["/usr/bin/time", "-f", "peak_rss_kb %M", *cmd] if os.path.exists("/usr/bin/time")
                             else cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            rc = p.wait()
    seconds = time.perf_counter() - t0
    text = open(log, errors="replace").read()
    rss = [int(line.split()[1]) for line in text.splitlines() if line.startswith("peak_rss_kb ")]
    subprocess.run(["rm", "-rf", ray_tmp])
    return dict(cmd=show(cmd), rc=rc, seconds=seconds, peak_rss_mb=rss[-1] / 1024 if rss else None, log=log)


def best_of(fn, repeats: int = 3) -> float:
    """The least wall seconds of ``repeats`` calls of ``fn()`` (the machine is shared: the least is the cleanest)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --- scores ---------------------------------------------------------------------------------

def labels(info: dict, classes: list[str], order: list[str]) -> np.ndarray:
    """The held-out test labels (a CSV outside the data folder) in ``order``, as class indices."""
    df = pd.read_csv(info["test_labels"], dtype=str, keep_default_na=False)
    truth = dict(zip(df["image_id"], df["label"]))
    return np.array([classes.index(truth[s]) for s in order])


def scores(y: np.ndarray, P: np.ndarray) -> dict:
    return dict(accuracy=accuracy(y, P), log_loss=log_loss(y, P))


def ensemble_test(location: str) -> tuple[list[str], np.ndarray]:
    """(test sample ids, the shipped ensemble's test probabilities, as its submission was made)."""
    exp = Experiment(location)
    order = exp.test()["sample_id"].tolist()
    return order, np.asarray(aligned(exp.ensemble_test(), order), np.float64)


def score_experiment(location: str, info: dict) -> dict:
    """The shipped ensemble on the held-out test labels; the members and what the selection chose."""
    exp = Experiment(location)
    order, P = ensemble_test(location)
    record = exp.ensemble()
    return dict(**scores(labels(info, exp.meta()["class_names"], order), P),
                members=[(m["candidate"], round(m["weight"], 3)) for m in record["members"]],
                setting=record["cv"]["chosen"]["name"], cv_gain=record["cv"]["gain"])


def by_cell(rows: list[dict]) -> list[tuple[tuple[str, float], list[dict]]]:
    """Saved results grouped by (dataset, budget in minutes), in order: one table row per cell, over seeds."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["budget_min"]), []).append(r)
    return sorted(cells.items())


def over_cells(doc: str, cell, out: str, key: str, title: str, table, datasets: str) -> None:
    """The CLI of a benchmark over (dataset, seed) cells at one budget: run the missing ones (``cell(name, seed,
    minutes)`` saves its JSON under ``out``), then report the table over every saved cell."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--datasets", default=datasets)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--minutes", type=float, default=6.0, help="the time budget of the pipeline runs")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    if not a.report_only:
        for seed in map(int, a.seeds.split(",")):
            for name in a.datasets.split(","):
                cell(name, seed, a.minutes)
    rows = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(out, "*.json")))]
    report(key, title, table(rows))


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def spread_cell(values: list[float], digits: int = 4, sign: bool = False) -> str:
    """'mean ± sd' over seeds; for one seed the mean alone: a spread of 0 would claim a precision never measured."""
    m, sd = mean_spread(values)
    head = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return head if len(values) < 2 else f"{head} ± {sd:.{digits}f}"


def save_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


md_table, machine_line, report = _common.md_table, _common.machine_line, _common.report
