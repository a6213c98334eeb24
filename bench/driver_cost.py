"""Benchmark: the driver's cost per trial as a search grows (100, 300, 1,000 trials of a tiny model).

A real search (``searchspace.api.run_search``) on a digits subset, test_resnet at 16 px, one epoch, each trial
count in a fresh interpreter with its own Ray. In the driver process: CPU over ``Tuner.fit`` per trial and for the
last 10 % of trials, and the parts (TPE ``suggest``, the searcher's callbacks, the progress line, Tune's
bookkeeping and snapshots, ``collect``) in thread CPU seconds of the real methods; gcs_server and raylet by their
CPU seconds. ``--compare``: the code before the two fixes (Optuna handles kept, ``num_to_keep=1``) beside it;
``--keep-all``: Tune keeping every checkpoint, so no trial checkpoint forces a snapshot.

    python bench/driver_cost.py --compare 100,1000       # full: 100, 300, 1000 trials; before/now at 100 and 1000
    python bench/driver_cost.py --trials '' --keep-all 100,1000 --workdir /tmp/bench_driver_cost_keep_all
    python bench/driver_cost.py --smoke                  # 10, 30 trials
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

SCRIPT = "driver_cost"


# --- the tiny data --------------------------------------------------------------------

def tiny_digits(cache_dir: str, out: str, per_class: int) -> str:
    """``per_class`` digits images of each class in the paddy layout (no test set); returns the folder."""
    import pandas as pd

    from searchspace.tasks import digits

    src = digits.default_data(cache_dir)
    if os.path.exists(os.path.join(out, "train.csv")):
        return out
    df = pd.read_csv(os.path.join(src, "train.csv"), dtype=str)
    df = df.groupby("label", group_keys=False).head(per_class).reset_index(drop=True)
    for r in df.itertuples():
        dst = os.path.join(out, "train_images", r.label, r.image_id)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(src, "train_images", r.label, r.image_id), dst)
    df.to_csv(os.path.join(out, "train.csv"), index=False)
    return out


# --- timing the real methods ----------------------------------------------------------

class Clock:
    """CPU (this thread) and wall seconds of wrapped methods, summed per name; per call where asked."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.each: dict[str, list[float]] = {}

    def wrap(self, owner, attr: str, name: str, keep: bool = False) -> None:
        inner = getattr(owner, attr)
        clock = self

        def timed(*args, **kwargs):
            c0, w0 = time.thread_time(), time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                cpu = time.thread_time() - c0
                clock.cpu[name] = clock.cpu.get(name, 0.0) + cpu
                clock.wall[name] = clock.wall.get(name, 0.0) + time.perf_counter() - w0
                clock.calls[name] = clock.calls.get(name, 0) + 1
                if keep:
                    clock.each.setdefault(name, []).append(cpu)

        timed.__wrapped__ = inner
        setattr(owner, attr, timed)


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def ray_system_cpu() -> dict[str, float]:
    """CPU seconds so far of this node's gcs_server and raylet (Ray's own head-node processes)."""
    import psutil

    out = {"gcs_server": 0.0, "raylet": 0.0}
    for p in psutil.Process().children(recursive=True):
        try:
            name = p.name()
            if name in out:
                t = p.cpu_times()
                out[name] += t.user + t.system
        except psutil.Error:
            pass
    return out


# --- one search in this interpreter ---------------------------------------------------

def child(spec: dict) -> dict:
    """One search of ``spec['trials']`` trials, instrumented; returns the measurements."""
    import warnings

    warnings.filterwarnings("ignore")
    import ray
    from ray.tune.analysis.experiment_analysis import ExperimentAnalysis
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.tuner import Tuner

    import searchspace.api as api
    import searchspace.tuner as tuner
    from searchspace import searcher
    from searchspace.config import SearchConfig
    from searchspace.progress import Progress

    if spec["variant"] == "before":
        # The searcher as it was: on_trial_complete told the study and kept the trial's Optuna handle.
        def keep_handles(self, trial_id, result=None, error=False):
            return self._tell(trial_id, result, error)

        searcher.TruthfulOptunaSearch.on_trial_complete = keep_handles
        # and Ray deleted the superseded checkpoints itself (num_to_keep=1), snapshotting the
        # whole experiment at every trial checkpoint; KeepLatest does it now, without them
        import ray.tune

        from searchspace.storage_policy import KeepLatest

        class RunConfig(ray.tune.RunConfig):   # a subclass: Tune checks the type
            def __init__(self, **kw):
                super().__init__(**{**kw, "checkpoint_config": ray.tune.CheckpointConfig(num_to_keep=1),
                                    "callbacks": [c for c in kw.get("callbacks", [])
                                                  if not isinstance(c, KeepLatest)]})

        ray.tune.RunConfig = RunConfig
    elif spec["variant"] == "keep-all":
        # Tune keeps every checkpoint (num_to_keep=None) and so never forces an experiment snapshot
        # when a trial checkpoints: what those snapshots cost (a measurement, not a setting to ship).
        import ray.tune

        config = ray.tune.CheckpointConfig
        ray.tune.CheckpointConfig = lambda **kw: config(**{**kw, "num_to_keep": None})
    elif spec["variant"] != "now":
        raise ValueError(f"variant {spec['variant']!r}: 'now', 'before' or 'keep-all'")

    n = spec["trials"]
    clock = Clock()
    clock.wrap(searcher.TruthfulOptunaSearch, "suggest", "suggest", keep=True)
    clock.wrap(searcher.TruthfulOptunaSearch, "on_trial_result", "searcher.on_trial_result")
    clock.wrap(searcher.TruthfulOptunaSearch, "on_trial_complete", "searcher.on_trial_complete")
    for m in ("on_trial_result", "on_trial_complete", "on_trial_error"):
        clock.wrap(Progress, m, "progress")
    clock.wrap(TuneController, "step", "tune.step")
    clock.wrap(TuneController, "checkpoint", "tune.checkpoint")
    clock.wrap(ExperimentAnalysis, "__init__", "ExperimentAnalysis")
    clock.wrap(tuner, "collect", "collect")
    clock.wrap(api, "finish_search", "finish_search")

    # The process CPU and the time at each trial's completion (the progress callback sees every one).
    marks: list[tuple[float, float]] = []
    done = Progress.on_trial_complete

    def mark(self, *args, **kwargs):
        result = done(self, *args, **kwargs)
        marks.append((process_cpu(), time.perf_counter()))
        return result

    Progress.on_trial_complete = mark

    fit = Tuner.fit
    span = {}

    def fit_timed(self):
        span["cpu0"], span["wall0"] = process_cpu(), time.perf_counter()
        try:
            return fit(self)
        finally:
            span["cpu1"], span["wall1"] = process_cpu(), time.perf_counter()

    Tuner.fit = fit_timed

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=spec["ray_tmp"], log_to_driver=False,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": os.environ["PYTHONPATH"]}})
    system0 = ray_system_cpu()
    load0 = os.getloadavg()
    name = f"driver-{n}-{spec['variant']}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    code, experiment = api.run_search("digits", spec["data"], SearchConfig.from_kwargs(
        trials=n, max_epochs=1, grace_period=1, folds=2, crossfit_top=0,
        archs="test_resnet", image_sizes="16", storage=spec["storage"], name=name, cache_dir=spec["cache_dir"],
        seed=spec["seed"], cpus_per_trial=1, keep_checkpoints=True))
    system1 = ray_system_cpu()
    load1 = os.getloadavg()
    trials = experiment.trials() if code == 0 else None
    ray.shutdown()

    suggest = clock.each.get("suggest", [])
    tail = max(1, n // 10)
    searcher_cpu = sum(clock.cpu.get(k, 0.0) for k in ("suggest", "searcher.on_trial_result",
                                                        "searcher.on_trial_complete"))
    out = dict(
        trials=n, variant=spec["variant"], code=code, experiment=experiment.location,
        finished=len(marks), errors=int((trials["status"] == "error").sum()) if trials is not None else None,
        fit_cpu=span["cpu1"] - span["cpu0"], fit_wall=span["wall1"] - span["wall0"],
        suggest_ms=1e3 * sum(suggest) / max(len(suggest), 1),
        suggest_tail_ms=1e3 * sum(suggest[-tail:]) / max(len(suggest[-tail:]), 1),
        suggest_calls=len(suggest),
        searcher_cpu=searcher_cpu,
        searcher_wall=sum(clock.wall.get(k, 0.0) for k in ("suggest", "searcher.on_trial_result",
                                                           "searcher.on_trial_complete")),
        progress_cpu=clock.cpu.get("progress", 0.0),
        step_cpu=clock.cpu.get("tune.step", 0.0), steps=clock.calls.get("tune.step", 0),
        snapshot_cpu=clock.cpu.get("tune.checkpoint", 0.0),
        analysis_cpu=clock.cpu.get("ExperimentAnalysis", 0.0), analysis_wall=clock.wall.get("ExperimentAnalysis", 0.0),
        finish_cpu=clock.cpu.get("finish_search", 0.0), finish_wall=clock.wall.get("finish_search", 0.0),
        collect_cpu=clock.cpu.get("collect", 0.0),
        gcs_cpu=system1["gcs_server"] - system0["gcs_server"], raylet_cpu=system1["raylet"] - system0["raylet"],
        load_start=load0, load_end=load1,
        trial_s=float(trials["seconds"].mean()) if trials is not None else None,
        trial_tail_s=float(trials["seconds"].tail(tail).mean()) if trials is not None else None,
    )
    out["bookkeeping_cpu"] = out["step_cpu"] - searcher_cpu - out["progress_cpu"]
    if len(marks) >= 2 * tail:
        (c0, w0), (c1, w1) = marks[-tail - 1], marks[-1]
        out["tail_cpu_per_trial"] = (c1 - c0) / tail
        out["tail_wall_per_trial"] = (w1 - w0) / tail
    return out


def run(trials: list[int], workdir: str, per_class: int = 10, seed: int = 0,
        compare: tuple[int, ...] = (), keep_all: tuple[int, ...] = (), keep_runs: bool = False) -> list[dict]:
    """One fresh interpreter (with its own Ray) per search; a list of measurement dicts, one per search.

    Every count in ``trials`` runs the code as it is (variant "now"); the counts
    in ``compare`` also run variant "before" (the searcher before the fix), and
    those in ``keep_all`` variant "keep-all" (Tune told to keep every checkpoint,
    so that no trial checkpoint forces an experiment snapshot), next to it.
    Each experiment is deleted once measured, unless ``keep_runs``.
    """
    workdir = os.path.abspath(workdir)
    cache_dir = os.path.join(workdir, "cache")
    data = tiny_digits(cache_dir, os.path.join(workdir, f"digits-{per_class}"), per_class)
    rows = []
    for n in sorted(set(trials) | set(compare) | set(keep_all)):
        for variant in ([v for v, counts in (("now", trials), ("before", compare), ("keep-all", keep_all))
                         if n in counts]):
            ray_tmp = tempfile.mkdtemp(prefix="dc", dir="/tmp")  # short: Ray's unix socket paths
            spec = dict(trials=n, variant=variant, data=data, storage=os.path.join(workdir, "runs"),
                        cache_dir=cache_dir, seed=seed, ray_tmp=ray_tmp)
            path = os.path.join(workdir, f"spec-{n}-{variant}.json")
            with open(path, "w") as f:
                json.dump(spec, f)
            print(f"\n{n} trials ({variant}) ...", flush=True)
            t0 = time.time()
            log = os.path.join(workdir, f"search-{n}-{variant}.log")
            with open(log, "w") as f:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path],
                                      stdout=f, stderr=subprocess.STDOUT, cwd=harness.REPO, env=os.environ.copy())
            shutil.rmtree(ray_tmp, ignore_errors=True)
            with open(log) as f:
                lines = f.read().splitlines()
            line = next((x for x in reversed(lines) if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise SystemExit(f"{n} trials ({variant}) failed, see {log}:\n" + "\n".join(lines[-40:]))
            row = json.loads(line[len("RESULT "):])
            if not keep_runs:  # ~4 GB of trial folders and candidates at 1,000 trials
                shutil.rmtree(row["experiment"], ignore_errors=True)
            print(f"  done in {time.time() - t0:.0f} s: driver {row['fit_cpu'] / n * 1e3:.1f} ms CPU per trial, "
                  f"suggest {row['suggest_ms']:.1f} ms (last 10 %: {row['suggest_tail_ms']:.1f})", flush=True)
            rows.append(row)
    return rows


# --- the report -----------------------------------------------------------------------

def tables(rows: list[dict]) -> str:
    base = {}  # each variant's smallest search
    for r in sorted(rows, key=lambda r: -r["trials"]):
        base[r["variant"]] = r
    main, parts = [], []
    for r in rows:
        n = r["trials"]
        cpu = r["fit_cpu"] / n
        ref = base[r["variant"]]["fit_cpu"] / base[r["variant"]]["trials"]
        tail_cpu = r.get("tail_cpu_per_trial")
        ref_tail = base[r["variant"]].get("tail_cpu_per_trial")
        main.append([
            n, r["variant"], f"{cpu:.3f}", f"{tail_cpu:.3f}" if tail_cpu is not None else "n/a",
            f"{r['fit_wall'] / n:.2f}", f"{r['suggest_ms']:.1f} / {r['suggest_tail_ms']:.1f}",
            f"{1e3 * r['bookkeeping_cpu'] / n:.1f}", f"{r['finish_wall'] + r['analysis_wall']:.1f}",
            f"{cpu / ref:.2f}x" + (f" / {tail_cpu / ref_tail:.2f}x" if tail_cpu and ref_tail else "")])
        parts.append([
            n, r["variant"], f"{1e3 * r['searcher_cpu'] / n:.1f} ({1e3 * r['searcher_wall'] / n:.1f} wall)",
            f"{1e3 * r['progress_cpu'] / n:.2f}", f"{1e3 * r['snapshot_cpu'] / n:.1f}",
            f"{1e3 * (r['fit_cpu'] - r['step_cpu']) / n:.1f}",
            f"{r['analysis_cpu']:.1f} / {r['finish_cpu']:.1f} ({r['collect_cpu']:.1f})",
            f"{1e3 * r['gcs_cpu'] / n:.0f} / {1e3 * r['raylet_cpu'] / n:.0f}",
            f"{r['trial_s']:.2f} / {r['trial_tail_s']:.2f}",
            " ".join(f"{x:.2f}" for x in r["load_start"]) + " -> " + " ".join(f"{x:.2f}" for x in r["load_end"])])
    t1 = harness.md_table(
        ["N", "searcher", "driver CPU s per trial", "same, last 10 % of trials", "wall s per trial",
         "TPE suggest ms per trial (mean / last 10 %)", "Tune bookkeeping ms per trial", "collect s",
         "driver CPU per trial vs smallest N (mean / last 10 %)"], main)
    t2 = harness.md_table(
        ["N", "searcher", "searcher ms CPU per trial (suggest + report + tell)", "progress line ms",
         "Tune state snapshots ms", "driver CPU outside the Tune loop ms (Ray threads, set-up)",
         "collect CPU s: ExperimentAnalysis / finish_search (collect)", "gcs_server / raylet ms CPU per trial",
         "trial s in the worker (mean / last 10 %)", "load average start -> end"], parts)
    return t1 + "\n\n" + t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", default="100,300,1000", help="comma-separated trial counts")
    ap.add_argument("--smoke", action="store_true", help="10,30 trials")
    ap.add_argument("--compare", default="",
                    help="comma-separated trial counts that also run the searcher as it was before the fix")
    ap.add_argument("--keep-all", default="",
                    help="comma-separated trial counts that also run with Tune keeping every checkpoint "
                         "(no snapshot forced by a trial checkpoint)")
    ap.add_argument("--keep-runs", action="store_true", help="keep each search's experiment folder")
    ap.add_argument("--per-class", type=int, default=10, help="digits images per class (2 folds: half train)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default="/tmp/bench_driver_cost")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        with open(a.child) as f:
            out = child(json.load(f))
        print("RESULT " + json.dumps(out), flush=True)
        return
    def counts(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    trials = [10, 30] if a.smoke else list(counts(a.trials))
    rows = run(trials, a.workdir, a.per_class, a.seed, counts(a.compare), counts(a.keep_all), a.keep_runs)
    with open(os.path.join(a.workdir, "driver_cost.json"), "w") as f:
        json.dump(rows, f, indent=1)
    notes = [
        f"a real search per row (searchspace.api.run_search, fresh interpreter and Ray): digits, {a.per_class} images "
        "per class, 2 folds, test_resnet at 16 px, 1 epoch, grace 1, 1 CPU per trial, no cross-fit; errors: "
        + ", ".join(f"{r['trials']} ({r['variant']}): {r['errors']}" for r in rows),
        "driver CPU = getrusage of the driver process over Tuner.fit (all its threads; not Ray's workers, gcs or "
        "raylet); last 10 % = CPU between the completion of trial 0.9 N and trial N, per trial",
        "TPE suggest = CPU of TruthfulOptunaSearch.suggest (ask + sampling every parameter); Tune bookkeeping = "
        "CPU of TuneController.step minus the searcher and the progress callbacks; collect = wall seconds of "
        "ExperimentAnalysis + finish_search (trials.parquet, candidates, leaderboard)",
    ]
    harness.report(SCRIPT, "Driver cost per trial as the search grows", tables(rows), notes)


if __name__ == "__main__":
    main()
