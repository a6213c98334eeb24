"""What the benchmarks share: the repository on ``sys.path``, timing, child processes and their peak memory, running
the CLIs, reading an experiment through the contract, synthetic candidates, scores and the report.

Importing it puts the repository root on ``sys.path`` (and on ``PYTHONPATH``, so Ray workers and child processes
import the same packages) and sets ``NO_ALBUMENTATIONS_UPDATE=1``. Its own imports stay light: a child process's
peak memory starts at what its imports take.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
if REPO not in sys.path:
    sys.path.insert(0, REPO)
_pp = os.environ.get("PYTHONPATH", "")
if REPO not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + _pp if _pp else "")


# --- the machine and the report -------------------------------------------------------------

def _proc_field(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.lower().startswith(key)), None)
    except OSError:
        return None


def gpu_name() -> str | None:
    import torch
    return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else None


def machine_line() -> str:
    """One line: date, CPU model, cores, RAM, GPU (or none), library versions."""
    import torch
    cores, usable = os.cpu_count(), len(os.sched_getaffinity(0))
    ram = _proc_field("/proc/meminfo", "memtotal")
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M} | "
            f"{_proc_field('/proc/cpuinfo', 'model name') or platform.processor() or platform.machine()} | "
            f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "") + " | "
            f"{int(ram.split()[0]) / 2**20 if ram else float('nan'):.0f} GiB RAM | GPU: {gpu_name() or 'none'} | "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def command_line() -> str:
    """The command that ran this script, relative to the repository root where possible."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO)
    return "python " + " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(script: str, title: str, body: str, notes: list[str] | None = None) -> str:
    """Print the result block (title, machine, command, tables, notes) and write bench/results/<script>.md."""
    parts = [f"### {title}", "", f"Machine: {machine_line()}", "", f"Command: `{command_line()}`", "", body]
    if notes:
        parts += [""] + [f"- {n}" for n in notes]
    text = "\n".join(parts) + "\n"
    path = os.path.join(RESULTS, f"{script}.md")
    os.makedirs(RESULTS, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    print(f"(written to {os.path.relpath(path, os.getcwd())})", flush=True)
    return text


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def growth(counts: list, results: dict, measures: list[tuple]) -> str:
    """Each (name, f(n, result), format) at every count, and its growth from the smallest count to the largest."""
    lo, hi = counts[0], counts[-1]
    table = [[name] + [fmt.format(f(n, results[n])) for n in counts]
             + [f"{f(hi, results[hi]) / f(lo, results[lo]):.2f}x"] for name, f, fmt in measures]
    return (f"\n\nGrowth from {lo:,} to {hi:,} images ({hi / lo:.0f}x the images):\n\n"
            + md_table(["measure"] + [f"{n:,}" for n in counts] + ["growth"], table))


# --- timing and memory ------------------------------------------------------------------------

def best_of(repeats: int, fn, *args) -> tuple[float, float, object]:
    """Least wall and least CPU (process) seconds of ``repeats`` calls ``fn(*args)``, and the last result.

    The machine is shared: the least is the cleanest, and the CPU time leaves out the waits for a core.
    """
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu), out


def child_json(cmd: list[str]) -> dict:
    """Run ``cmd`` (a Python step of its own); its last stdout line as JSON, plus its peak RSS ("rss_mib").

    The peak is ``os.wait4``'s ru_maxrss: that process's own, so no step inherits another's memory (a child's
    starts at its parent's RSS: keep the parent's imports light).
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)   # progress passes through stderr
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not out.strip():
        raise SystemExit(f"step failed: {show(cmd)}\n{out[-2000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "rss_mib": usage.ru_maxrss / 1024}   # KiB on Linux


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# --- running the CLIs -------------------------------------------------------------------------

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


def run(cmd: list[str], log: str, timeout: float) -> dict:
    """Run ``cmd`` from the repository root in a session of its own (offline, its own Ray temp dir), its stdout to
    ``log`` and its stderr to ``log + '.stderr'``: rc, seconds and peak RSS. Past ``timeout`` seconds its process
    group is stopped, then killed."""
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp")   # short: Ray's unix socket paths
    rss_file = log + ".rss"
    timed = ["/usr/bin/time", "-o", rss_file, "-f", "%M", *cmd] if os.path.exists("/usr/bin/time") else cmd
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}   # never another user's cluster
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", PYTHONPATH=os.environ["PYTHONPATH"],
               RAY_TMPDIR=ray_tmp)
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    t0, timed_out = time.perf_counter(), False
    with open(log, "w") as out, open(log + ".stderr", "w") as err:
        p = subprocess.Popen(timed, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            rc = p.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig in (signal.SIGTERM, signal.SIGKILL):   # the whole group: Ray's workers too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
                time.sleep(10 if sig == signal.SIGTERM else 0)
            rc = p.wait()
    seconds = time.perf_counter() - t0
    subprocess.run(["rm", "-rf", ray_tmp])
    rss = open(rss_file).read().split() if os.path.exists(rss_file) else []
    return dict(cmd=show(cmd), rc=rc, seconds=seconds, timed_out=timed_out,
                peak_rss_mb=int(rss[-1]) / 1024 if rss and rss[-1].isdigit() else None, log=log)


def start_ray(temp_dir: str | None = None):
    """A local Ray with every core, its temp dir (``temp_dir``, else a new one) short enough for Ray's unix
    sockets (searchspace's own start-up)."""
    import ray

    from searchspace.ray_start import start_ray as start
    if not ray.is_initialized():
        start(num_cpus=os.cpu_count(), temp_dir=temp_dir or tempfile.mkdtemp(prefix="rb", dir="/tmp"),
              include_dashboard=False, env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    return ray


# --- synthetic candidates ---------------------------------------------------------------------

def softmax_rows(z: np.ndarray) -> np.ndarray:
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def synthetic_candidates(m: int, n: int, C: int, seed: int = 0, n_test: int = 0):
    """Labels (and test labels) and a stream of m candidates (skill, out-of-fold probs, test probs), one at a time.

    Logits = skill * onehot(y) + per-sample noise shared by all candidates (hard samples are hard for all) + the
    candidate's own noise, the skill varying across candidates: complementary candidates of unequal skill.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    y_test = rng.integers(0, C, n_test) if n_test else None
    onehot = np.eye(C, dtype=np.float32)[y]
    shared = rng.standard_normal((n, C), dtype=np.float32)
    if n_test:
        onehot_test = np.eye(C, dtype=np.float32)[y_test]
        shared_test = rng.standard_normal((n_test, C), dtype=np.float32)
    skill = rng.uniform(0.5, 3.0, m).astype(np.float32)

    def stream():
        for i in range(m):
            oof = softmax_rows(skill[i] * onehot + shared + rng.standard_normal((n, C), dtype=np.float32))
            test = softmax_rows(skill[i] * onehot_test + shared_test
                                + rng.standard_normal((n_test, C), dtype=np.float32)) if n_test else None
            yield float(skill[i]), oof, test
    return y, y_test, stream()


def synthetic_parser(doc: str, candidates: int) -> argparse.ArgumentParser:
    """The options of a benchmark on synthetic candidates: their number and size, and the seed."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", type=int, default=candidates)
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    return ap


def synthetic_matrix(m: int, n: int, C: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' probabilities as one (m, n, C) float32 array, and the labels."""
    y, _, cands = synthetic_candidates(m, n, C, seed)
    return np.stack([p for _, p, _ in cands]), y


# --- scores on held-out labels, through the experiment contract -----------------------------------------

def labels(info: dict, classes: list[str], order: list[str]) -> np.ndarray:
    """The held-out test labels (a CSV outside the data folder) in ``order``, as class indices."""
    import pandas as pd
    df = pd.read_csv(info["test_labels"], dtype=str, keep_default_na=False)
    truth = dict(zip(df["image_id"], df["label"]))
    missing = [s for s in order if s not in truth]
    if missing:
        raise RuntimeError(f"{len(missing)} test sample id(s) have no held-out label, e.g. {missing[:3]}")
    return np.array([classes.index(truth[s]) for s in order])


def scores(y: np.ndarray, P: np.ndarray) -> dict:
    from core.metrics import accuracy, log_loss
    return dict(accuracy=accuracy(y, P), log_loss=log_loss(y, P))


def test_probs(table, order: list[str]) -> np.ndarray:
    """A probability table's rows in ``order``, as float64."""
    from core.experiment import aligned
    return np.asarray(aligned(table, order), np.float64)


def score_experiment(location: str, info: dict) -> dict:
    """The shipped ensemble on the held-out test labels; the members and what the selection chose."""
    from core.experiment import Experiment
    exp = Experiment(location)
    order = exp.test()["sample_id"].tolist()
    record = exp.ensemble()
    return dict(**scores(labels(info, exp.meta()["class_names"], order), test_probs(exp.ensemble_test(), order)),
                members=[(m["candidate"], round(m["weight"], 3)) for m in record["members"]],
                setting=record["cv"]["chosen"]["name"], cv_gain=record["cv"]["gain"],
                network=best_network(location, info))


def best_network(location: str, info: dict) -> dict | None:
    """The cross-fitted network with the best out-of-fold accuracy, on the held-out test labels: what a user who
    cares for accuracy alone would ship instead of the ensemble. None when no network was cross-fitted."""
    from core.experiment import Experiment, probs_array
    from core.metrics import accuracy
    exp = Experiment(location)
    truth = exp.folds().set_index("sample_id")["label"]
    networks = [exp.candidate(c) for c in exp.candidate_ids() if c.startswith("cv-") and exp.candidate(c).has_test()]
    if not networks:
        return None

    def oof_accuracy(c) -> float:
        oof = c.oof()
        return accuracy(truth.loc[oof.column("sample_id").to_pylist()].to_numpy(), probs_array(oof))
    best = max(networks, key=oof_accuracy)
    order = exp.test()["sample_id"].tolist()
    return dict(candidate=best.cid, arch=best.config().get("arch"),
                **scores(labels(info, exp.meta()["class_names"], order), test_probs(best.test(), order)))


# --- cells over datasets and seeds ------------------------------------------------------------------

def by_cell(rows: list[dict]) -> list[tuple[tuple[str, float], list[dict]]]:
    """Saved results grouped by (dataset, budget in minutes), in order: one table row per cell, over seeds."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["budget_min"]), []).append(r)
    return sorted(cells.items())


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def spread_cell(values: list[float], digits: int = 4, sign: bool = False) -> str:
    """'mean ± sd' over seeds; for one seed the mean alone: a spread of 0 would claim a precision never measured."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m, sd = mean_spread(values)
    head = f"{m:+.{digits}f}" if sign else f"{m:.{digits}f}"
    return head if len(values) < 2 else f"{head} ± {sd:.{digits}f}"


def save_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
