"""Distributed behaviour on real Ray clusters: several nodes, a lost node, a killed driver, a failing config.

Nothing is mocked. The multi-node tests use ``ray.cluster_utils.Cluster``:
real raylets on this machine, each with its own resources and its own
environment (``env_vars``), so each simulated node gets its own image cache
through ``SEARCHSPACE_CACHE_DIR``, as a real node would via cluster.yaml.
Storage is a local folder that every node sees (the stand-in for NFS or a
bucket; tests/test_storage_s3.py covers the bucket).

Isolation from other Ray users on the machine:

- Ray's temp dirs are short /tmp/ray* folders (unix socket paths are limited)
  that the tests remove; the data, caches and experiments are in tmp_path.
- ``RAY_TMPDIR`` points at that folder while a test's cluster exists, so the
  "current cluster" address file that ``Cluster`` writes (and that a plain
  ``ray.init()`` reads) is private to the test: another process on the machine
  can neither join this cluster by accident nor lose its own address file.
- Only what a test started is stopped (its Cluster, its subprocess' process
  group); never ``ray stop``.
- If this pytest process is connected to conftest's ``ray_session``, a test that
  needs its own driver connection disconnects it and starts an equivalent
  local Ray again afterwards (``detached`` fixture).

Durations measured on a 2-core machine shared with other test runs (pytest
--durations=0): multi-node 24-57 s, lost node 28-48 s, killed driver 51-68 s,
failing config 19-30 s; about 2.5-3.5 minutes for the file (budget: ~6).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import ray
from helpers import make_paddy, without_session_ray, write_weights
from ray.cluster_utils import Cluster

from core.experiment import Experiment
from searchspace.searcher import restore_spare, snapshot_names
from searchspace.tuner import CHECKPOINT_LOST, TIME_BUDGET

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REPO = Path(__file__).resolve().parents[1]

# Fast node-death detection on the test clusters (default: ~30 s of missed health checks).
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                          "health_check_failure_threshold": 3}


# --- fixtures and helpers ----------------------------------------------------------

@pytest.fixture
def ray_tmp():
    """A short /tmp/ray* folder for Ray's sockets, logs and session files; removed afterwards."""
    d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def detached(tmp_path_factory):
    """No Ray connection in this process during the test; an equivalent local Ray again after it."""
    with without_session_ray(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """Local 'pretrained' weights (seed 0) for the models used here: the paddy space samples
    pretrained=True/False and there is no network."""
    return write_weights(tmp_path_factory.mktemp("weights"), ("test_resnet", "test_convnext"))


@contextlib.contextmanager
def local_cluster(monkeypatch, ray_tmp: str, caches: Path, head_cpus: int, workers: int = 2,
                  system_config: dict | None = None):
    """A head and ``workers`` one-CPU worker nodes; each node's SEARCHSPACE_CACHE_DIR is caches/<name>.

    Yields (cluster, {"head": node, "w1": node, ...}); shuts down only this cluster.
    """
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # the address file goes to ray_tmp/ray/, not /tmp/ray/
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)

    def env(name: str) -> dict:
        # PYTHONPATH: the project is importable on every node, as cluster.yaml's
        # `pip install -e` makes it on a real cluster (a worker does not get the
        # driver's sys.path when the driver is another process).
        return {"SEARCHSPACE_CACHE_DIR": str(caches / name), "NO_ALBUMENTATIONS_UPDATE": "1",
                "PYTHONPATH": str(REPO)}

    head = dict(num_cpus=head_cpus, env_vars=env("head"), temp_dir=ray_tmp, include_dashboard=False)
    if system_config:
        head["_system_config"] = system_config
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        nodes = {"head": cluster.head_node}
        for i in range(1, workers + 1):
            nodes[f"w{i}"] = cluster.add_node(num_cpus=1, env_vars=env(f"w{i}"), temp_dir=ray_tmp)
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def driver_env(**extra: str) -> dict:
    """Environment for a `python -m searchspace.run` subprocess: this repo importable, no inherited RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"
    env.update(extra)
    return env


def start_driver(argv: list[str], log: Path, cwd: Path, env: dict) -> subprocess.Popen:
    """`python -m searchspace.run ARGV` in its own session (so its whole process group can be killed)."""
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "searchspace.run", *argv], cwd=cwd, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of a driver this test started (no-op when it is gone)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)


def wait(proc: subprocess.Popen, log: Path, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        pytest.fail(f"driver still running after {timeout:.0f} s:\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else "(no log)"


def trial_dirs(experiment: Path) -> list[Path]:
    return sorted(p for p in experiment.glob("train_trial_*") if p.is_dir())


def results(trial_dir: Path) -> list[dict]:
    """The trial's result.json: one dict per reported epoch, in order."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trial_id(trial_dir: Path) -> str:
    return trial_dir.name.split("_")[2]  # train_trial_<id>_<n>_<params>_<date>


def checkpoints(trial_dir: Path) -> dict[str, dict]:
    """{checkpoint_00000k: its config.json (epoch, node_id, metrics...)} of the complete ones."""
    out = {}
    for cfg in sorted(trial_dir.glob("checkpoint_*/config.json")):
        with contextlib.suppress(OSError, ValueError):
            out[cfg.parent.name] = json.loads(cfg.read_text())
    return out


def restarted_from_scratch(epochs: list[int]) -> bool:
    """True when the epoch sequence goes back to 1 after a later epoch (a restart from no checkpoint)."""
    return any(e == 1 for e in epochs[1:])


def build_records(cache_dir: Path) -> list[dict]:
    path = cache_dir / "builds.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def select(experiment, top: int = 3) -> tuple[int, str]:
    from ensemble_builder.__main__ import main as ensemble_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ensemble_main(["select", "--experiment", str(experiment), "--top", str(top)])
    return code, out.getvalue()


# --- a. several nodes --------------------------------------------------------------

@pytest.mark.slow
def test_search_spreads_over_nodes_and_each_node_builds_its_cache_once(tmp_path, ray_tmp, detached, weights,
                                                                       monkeypatch):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from searchspace.run import main

    # Tune reuses actors: a finished trial's actor is cached, and a pending trial whose own actor is still
    # starting (imports: ~4 s, twice that on a busy machine) takes the cached one and drops its own. Trials
    # shorter than an actor's start therefore all run on the first actor up (two failed runs here: six 16 px
    # trials all on the head, then six 3-epoch trials all on w1). So each trial here lasts well over an actor's
    # start (6 epochs of 240 images at 128 px), and the trials run on the two workers alone.
    data = make_paddy(tmp_path / "data", classes=3, per_class=120, test=4, size=(128, 128))
    caches, storage_root = tmp_path / "caches", tmp_path / "runs"
    with local_cluster(monkeypatch, ray_tmp, caches, head_cpus=0) as (cluster, nodes):
        ray.init(address=cluster.address)

        # Each node's processes see that node's env_vars (RayParams.env_vars -> raylet -> workers).
        @ray.remote(num_cpus=0)
        def node_env():
            return ray.get_runtime_context().get_node_id(), os.environ.get("SEARCHSPACE_CACHE_DIR")

        seen = ray.get([node_env.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
                        .remote() for n in nodes.values()])
        assert seen == [(n.node_id, str(caches / name)) for name, n in nodes.items()]

        argv = ["paddy", "--data", str(data), "--storage", str(storage_root), "--name", "multi",
                "--archs", "test_resnet", "--image-sizes", "128", "--trials", "4", "--max-epochs", "6",
                "--grace-period", "6", "--folds", "2", "--crossfit-top", "1", "--cpus-per-trial", "1",
                "--cache-dir", str(tmp_path / "driver-cache"), "--weights-dir", str(weights), "--seed", "0"]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(argv)
        assert code == 0, out.getvalue()
        ray.shutdown()
    node_name = {n.node_id: name for name, n in nodes.items()}

    experiment = storage_root / "multi"
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    assert (trials["status"] == "ok").all(), trials[["trial_id", "status", "error"]]

    # Trials ran on both workers (1 CPU each, 1 CPU per trial, none on the head)
    dirs = trial_dirs(experiment)
    assert sorted(trial_id(d) for d in dirs) == sorted(trials["trial_id"])
    ran_on = {trial_id(d): {r["node_id"] for r in results(d)} for d in dirs}
    assert all(len(ids) == 1 for ids in ran_on.values()), ran_on  # nothing failed over
    used = set().union(*ran_on.values())
    assert used <= set(node_name), used
    assert sorted(node_name[u] for u in used) == ["w1", "w2"], f"trials ran on {[node_name[u] for u in used]}"

    # The pool of finished trials' predictions (ensemble_gain) lives in the experiment's storage:
    # every finished trial wrote to it, and trials on more than one node read it.
    assert sorted(Experiment(str(experiment)).pool_ids()) == sorted(trials["trial_id"])
    pooled_on = {r["node_id"] for d in dirs for r in results(d) if r.get("pool_size", 0) >= 1}
    assert len(pooled_on) >= 2, f"only {[node_name[u] for u in pooled_on]} read a non-empty pool"

    # Each node built each cache entry at most once, in its own cache dir; the
    # driver's --cache-dir was never used for a cache (the node setting wins).
    for name in nodes:
        records = build_records(caches / name)
        entries = [r["entry"] for r in records]
        assert len(entries) == len(set(entries)), f"{name} built an entry twice: {entries}"
        assert all(e.startswith(str(caches / name) + os.sep) for e in entries), entries
    for node_id in used:
        assert build_records(caches / node_name[node_id]), f"{node_name[node_id]} ran trials but built no cache"
    assert not (tmp_path / "driver-cache" / "builds.jsonl").exists()

    # Every artifact in the shared storage
    for name in ("experiment.json", "folds.parquet", "test.parquet", "trials.parquet", "optuna_journal.log"):
        assert (experiment / name).is_file(), name
    for row in trials.itertuples():
        assert (experiment / "candidates" / row.trial_id / "oof.parquet").is_file()
        assert Path(row.checkpoint, "model.pt").is_file(), row.checkpoint
    cv = sorted(p.name for p in (experiment / "candidates").glob("cv-*"))
    assert len(cv) == 1
    written = {p.name for p in (experiment / "candidates" / cv[0]).iterdir()}
    assert {"oof.parquet", "test.parquet", "members.json"} <= written, written

    code, text = select(experiment, top=3)
    assert code == 0, text
    sub = pd.read_csv(experiment / "ensemble" / "submission.csv")
    assert len(sub) == 4 and list(sub.columns) == ["image_id", "label"]


# --- b. a node is lost in the middle of the search -----------------------------------

def registered(experiment: Path) -> dict[str, tuple[str, dict, dict, str]]:
    """{trial_id: (status, metrics of the newest checkpoint Tune has registered, last result, that checkpoint's
    path)} from the newest experiment snapshot; trials with no registered checkpoint are left out.

    Registered is not the same as written: a trial's worker writes a checkpoint to storage and reports it,
    but Tune's controller takes it as the trial's checkpoint only when a second round trip to the trial's
    actor (its ``save``) returns, and it restores a failed trial from that registered one. A worker lost in
    between costs the epochs since the registered checkpoint; a checkpoint on storage alone promises nothing.
    """
    import ray.cloudpickle as cloudpickle

    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(states[-1].read_text()) if states else {"trial_data": []}
    except (OSError, ValueError):
        return {}  # being rewritten
    out = {}
    for trial_json, runtime_json in data["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        manager, last = runtime.get("checkpoint_manager"), runtime.get("last_result")
        if not isinstance(manager, dict) or "value" not in manager:
            continue
        latest = cloudpickle.loads(bytes.fromhex(manager["value"])).latest_checkpoint_result
        if isinstance(last, str):
            with contextlib.suppress(ValueError):
                last = json.loads(last)
        if latest is not None:
            out[trial["trial_id"]] = (trial["status"], dict(latest.metrics), last if isinstance(last, dict) else {},
                                      latest.checkpoint.path)
    return out


def _interrupted_search(tmp_path: Path, ray_tmp: str, weights: Path, monkeypatch, fault: str) -> None:
    """A search on a head without CPUs and two one-CPU workers; once Tune has registered a checkpoint that
    a running trial wrote on w1, ``fault`` strikes: "node" crashes w1, "worker" SIGKILLs the trial's worker
    process. The trial must finish elsewhere (another node, or another process), from its checkpoint."""
    # Larger images than elsewhere so that an epoch takes a noticeable time (~0.5 s)
    # and the fault strikes in the middle of a trial, not after it.
    data = make_paddy(tmp_path / "data", classes=3, per_class=40, test=0, size=(128, 128))
    caches, storage_root, max_epochs = tmp_path / "caches", tmp_path / "runs", 6
    experiment = storage_root / "lost"
    log = tmp_path / "driver.log"
    argv = ["paddy", "--data", str(data), "--storage", str(storage_root), "--name", "lost",
            "--archs", "test_resnet", "--image-sizes", "128", "--trials", "3", "--max-epochs", str(max_epochs),
            "--grace-period", str(max_epochs), "--folds", "2", "--crossfit-top", "0", "--members", "none",
            "--cpus-per-trial", "1", "--max-failures", "2", "--cache-dir", str(tmp_path / "driver-cache"),
            "--weights-dir", str(weights), "--seed", "0"]
    # TUNE_GLOBAL_CHECKPOINT_S=0: Tune writes its snapshot (what registered() reads) at every step of its
    # loop, so the test sees each registration.
    with local_cluster(monkeypatch, ray_tmp, caches, head_cpus=0, system_config=FAST_FAILURE_DETECTION) \
            as (cluster, nodes):
        w1 = nodes["w1"]
        proc = start_driver(argv, log, tmp_path,
                            driver_env(RAY_ADDRESS=cluster.address, TUNE_GLOBAL_CHECKPOINT_S="0"))
        try:
            # The event: Tune has registered a checkpoint of a running trial written on w1 (not merely
            # found one on storage: see registered()).
            struck = None
            deadline = time.time() + 300
            while struck is None and proc.poll() is None and time.time() < deadline:
                for t, (status, metrics, last, _) in registered(experiment).items():
                    if status == "RUNNING" and metrics.get("node_id") == w1.node_id and metrics["epoch"] < max_epochs:
                        if fault == "node":
                            cluster.remove_node(w1, allow_graceful=False)  # a crash, not a drain
                            struck = (t, metrics["epoch"], "node_id", w1.node_id)
                        elif last.get("trial_id") == t and last.get("pid"):
                            os.kill(last["pid"], signal.SIGKILL)
                            struck = (t, metrics["epoch"], "pid", last["pid"])
                        break
                time.sleep(0.2)
            assert struck is not None, f"no registered checkpoint from w1 before the search ended:\n{tail(log)}"
            code = wait(proc, log, 300)
        finally:
            stop_group(proc)
    assert code == 0, tail(log)

    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert (trials["status"] == "ok").all(), trials[["trial_id", "status", "error"]]
    assert (trials["epochs_run"] == max_epochs).all(), trials[["trial_id", "epochs_run"]]
    assert trials["checkpoint"].notna().all()

    key, gone = struck[2], struck[3]   # what the fault took away: the node, or the worker process
    runs = {trial_id(d): [(r["epoch"], r[key]) for r in results(d)] for d in trial_dirs(experiment)}
    moved = {}
    for t, rows in runs.items():
        epochs, on = [e for e, _ in rows], [w for _, w in rows]
        assert epochs[-1] == max_epochs, (t, rows)
        if gone in on and on[-1] != gone:
            moved[t] = rows
        else:  # never interrupted: each epoch once, in order, from 1
            assert epochs == list(range(1, max_epochs + 1)), (t, rows)
    # The struck trial finished elsewhere ...
    assert struck[0] in moved, (struck, runs)
    for t, rows in moved.items():
        first = next(i for i, (_, w) in enumerate(rows) if w != gone)
        before, after = [e for e, _ in rows[:first]], [e for e, _ in rows[first:]]
        assert all(w == gone for _, w in rows[:first]) and all(w != gone for _, w in rows[first:]), rows
        assert before == list(range(1, len(before) + 1)) and after == list(range(after[0], max_epochs + 1)), rows
        # ... from a checkpoint, not from scratch: at the epoch after the last registered one (at least
        # the one seen before the fault), rerunning at most the epochs it ran after that one.
        assert 1 < after[0] <= before[-1] + 1, rows
        if t == struck[0]:
            assert after[0] >= struck[1] + 1, (struck, rows)
    restored = next(r for r in results(next(d for d in trial_dirs(experiment) if trial_id(d) == struck[0]))
                    if r[key] != gone)
    assert restored["iterations_since_restore"] == 1 and restored["training_iteration"] == restored["epoch"]


@pytest.mark.slow
def test_a_lost_node_s_trial_continues_elsewhere_from_its_checkpoint(tmp_path, ray_tmp, weights, monkeypatch):
    _interrupted_search(tmp_path, ray_tmp, weights, monkeypatch, "node")


@pytest.mark.slow
def test_a_killed_worker_s_trial_continues_from_its_checkpoint(tmp_path, ray_tmp, weights, monkeypatch):
    _interrupted_search(tmp_path, ray_tmp, weights, monkeypatch, "worker")


# --- c. the driver is killed; --resume continues the same search ------------------------

def _processes_with(marker: str) -> list[int]:
    """Live processes whose environment holds ``marker`` (everything the killed driver started)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
    return pids


def _tune_state(experiment: Path) -> dict[str, dict]:
    """{trial_id: {"status", "last_result"}} from the experiment state that Tune synced to storage."""
    states = sorted(experiment.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (OSError, ValueError):
        return {}  # being rewritten
    out = {}
    for trial_json, runtime_json in data["trial_data"]:
        trial, runtime = json.loads(trial_json), json.loads(runtime_json)
        last = runtime.get("last_result")
        if isinstance(last, str):
            with contextlib.suppress(ValueError):
                last = json.loads(last)
        out[trial["trial_id"]] = {"status": trial["status"], "last_result": last if isinstance(last, dict) else {}}
    return out


def _kill_mid_search(tmp_path: Path, ray_tmp: str, argv: list[str], max_epochs: int, failed: bool = False):
    """Start the search's driver, SIGKILL it (and its Ray) once Tune's stored state has a finished
    trial and a running one with a registered checkpoint past its first epoch (and, with ``failed``, a
    failed one), and check nothing of it is left running.

    Returns (env, marker, log, Tune's stored state, finished trial ids, {running trial id: the path of the
    checkpoint Tune registered for it, the one --resume restores}). A running trial with a checkpoint on
    storage that Tune had not registered yet (see registered()) is not among them: it has nothing to be
    restored from, and starts again from its first epoch."""
    experiment = tmp_path / "runs" / "killed"
    token = uuid.uuid4().hex
    marker = f"SEARCHSPACE_TEST_DRIVER={token}"
    # The driver starts its own local Ray (ray.init() in start_ray); RAY_TMPDIR keeps
    # that Ray's files and address file in ray_tmp. Every process it starts inherits
    # the marker, which is how the test finds leftovers after the kill.
    # TUNE_GLOBAL_CHECKPOINT_S=0: Tune snapshots the experiment at every step of its loop, not
    # every ~10 s, so that its stored state catches these second-long trials mid-search.
    env = driver_env(RAY_TMPDIR=ray_tmp, SEARCHSPACE_TEST_DRIVER=token, TUNE_GLOBAL_CHECKPOINT_S="0")
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    log = tmp_path / "driver.log"
    proc = start_driver(argv, log, tmp_path, env)

    def finished_and_running(state: dict) -> tuple[list[str], dict[str, str]]:
        done = [t for t, s in state.items() if s["status"] == "TERMINATED"]
        mid = {t: path for t, (status, metrics, _, path) in registered(experiment).items()
               if status == "RUNNING" and 1 <= metrics.get("epoch", 0) < max_epochs}
        if failed and not any(s["status"] == "ERROR" for s in state.values()):
            return [], {}
        return done, mid

    try:
        # Kill once Tune's state in the storage has a finished trial and a running one
        # with a registered checkpoint (the state is what --resume restores from)
        state, deadline = {}, time.time() + 300
        while proc.poll() is None and time.time() < deadline:
            state = _tune_state(experiment)
            if all(finished_and_running(state)):
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the search ended before it could be killed ({state}):\n{tail(log)}"
        assert all(finished_and_running(state)), f"no finished and running trial within the time limit: {state}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, at once
        proc.wait(30)
    finally:
        stop_group(proc)
    # Nothing of the killed run is left running (it could still write to the storage)
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == [], "processes of the killed driver are still running"
    assert not (experiment / "trials.parquet").exists()

    # What --resume restores (nothing writes to the storage any more): Tune's newest whole snapshot, which
    # searchspace.searcher keeps beside Tune's copy and puts back; a kill during that copy leaves the copy
    # older than it, or cut
    restore_spare(Experiment(str(experiment)))
    state = _tune_state(experiment)
    done, mid = finished_and_running(state)
    assert done and mid, state
    return env, marker, log, state, done, mid


def _resume(argv: list[str], log: Path, tmp_path: Path, env: dict) -> None:
    """Run the driver again with --resume, to the end; it must succeed."""
    resumed = start_driver(argv + ["--resume"], log, tmp_path, env)
    try:
        code = wait(resumed, log, 300)
    finally:
        stop_group(resumed)
    assert code == 0, tail(log)


def _lost(mid: dict[str, str]) -> list[str]:
    """The running trials whose registered checkpoint is not on storage (Ray had deleted it, replaced
    by a newer one, and not yet written its next snapshot)."""
    return [t for t, path in mid.items() if not Path(path).exists()]


def _unregistered(state: dict, mid: dict[str, str]) -> list[str]:
    """The trials running at the kill with no registered checkpoint: Tune starts them from their first epoch."""
    return [t for t, s in state.items() if s["status"] == "RUNNING" and t not in mid]


def _killed_argv(storage_root: Path, cache: Path, max_epochs: int, n_trials: int) -> list[str]:
    return ["digits", "--storage", str(storage_root), "--name", "killed", "--archs", "test_resnet",
            "--image-sizes", "16", "--trials", str(n_trials), "--max-epochs", str(max_epochs),
            "--grace-period", str(max_epochs), "--folds", "3", "--crossfit-top", "0",
            # compared file by file below: keep what the storage policy would drop after the search
            "--keep-checkpoints",
            "--cache-dir", str(cache), "--seed", "0"]


@pytest.mark.slow
def test_a_killed_driver_resumes_without_rerunning_finished_or_failed_trials(tmp_path, ray_tmp):
    """One kill, three promises of --resume: a finished trial is not run again, a running one goes on from
    its registered checkpoint, and a failed one stays failed. test_convnext cannot run at 16 px (see the
    last test); with --max-failures 0 it fails once and is recorded, and the kill waits for such a failure."""
    storage_root, cache = tmp_path / "runs", tmp_path / "cache"
    experiment, max_epochs, n_trials = storage_root / "killed", 3, 6
    argv = _killed_argv(storage_root, cache, max_epochs, n_trials)
    argv[argv.index("test_resnet")] = "test_resnet,test_convnext"
    argv += ["--max-failures", "0"]
    env, marker, log, state, done, mid = _kill_mid_search(tmp_path, ray_tmp, argv, max_epochs, failed=True)
    # Killed in Ray's own window (old checkpoint deleted, snapshot not yet written), a running
    # trial cannot be restored: it starts again from its first epoch (the budgeted test below forces it).
    # So does one killed before Tune registered any checkpoint of it.
    lost = _lost(mid) + _unregistered(state, mid)
    failed = [t for t, s in state.items() if s["status"] == "ERROR"]
    before = {trial_id(d): d for d in trial_dirs(experiment)}
    errors = {t: (before[t] / "error.txt").read_text() for t in failed}
    assert all("Failure # 1" in text for text in errors.values())
    finished = {t: ([r["epoch"] for r in results(before[t])],
                    {p.relative_to(before[t]).as_posix(): p.stat().st_mtime_ns
                     for p in before[t].glob("checkpoint_*/*")}) for t in done}

    # The kill as it can come during Tune's copy of its snapshot to the storage: every file of it cut
    snapshot = [max(experiment.glob(pattern)) for pattern in snapshot_names("*")]
    for path in snapshot:
        path.write_bytes(b"")
    with open(log, "a") as f:
        f.write("\n=== resume ===\n")
    _resume(argv, log, tmp_path, env)
    resumed = log.read_text().split("=== resume ===")[1]
    assert "resuming" in resumed and "Restarting experiment" not in resumed, tail(log)
    assert f"cut by the kill ({', '.join(p.name for p in snapshot)})" in resumed, tail(log)

    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == n_trials and trials["trial_id"].is_unique, trials["trial_id"].tolist()
    # (a lost trial runs again under its own id, the budgeted test below checks how)
    assert set(state) <= set(trials["trial_id"]), "a trial known before the kill is missing"
    trials = trials.set_index("trial_id")
    ok, bad = trials[trials["arch"] == "test_resnet"], trials[trials["arch"] == "test_convnext"]
    assert (ok["status"] == "ok").all(), ok[["status", "error"]]
    assert (ok["epochs_run"] == max_epochs).all(), ok[["epochs_run"]]
    assert (bad["status"] == "error").all() and (bad["epochs_run"] == 0).all(), bad[["status", "epochs_run"]]
    after = {trial_id(d): d for d in trial_dirs(experiment)}
    assert set(failed) <= set(bad.index), trials[["arch", "status", "epochs_run", "error"]]
    for t in failed:
        # failed before the kill: not run again
        assert (after[t] / "error.txt").read_text() == errors[t], "a failed trial ran again on --resume"
    for t, (epochs, ckpts) in finished.items():
        # finished before the kill: not run again (same results, same checkpoint files)
        assert [r["epoch"] for r in results(after[t])] == epochs == list(range(1, max_epochs + 1)), t
        assert {p.relative_to(after[t]).as_posix(): p.stat().st_mtime_ns
                for p in after[t].glob("checkpoint_*/*")} == ckpts, t
    for t in ok.index:
        if t in lost:
            continue
        epochs = [r["epoch"] for r in results(after[t])]
        assert not restarted_from_scratch(epochs), (t, epochs)
        assert epochs[-1] == max_epochs and epochs == sorted(epochs), (t, epochs)
    for t in set(mid) - set(lost):
        # running at the kill: restored from its checkpoint (Tune's iteration counter
        # since restore starts again at 1 on an epoch after the first)
        rs = results(after[t])
        assert any(r["iterations_since_restore"] == 1 and r["epoch"] > 1 for r in rs), \
            (t, [(r["epoch"], r["iterations_since_restore"]) for r in rs])
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == [], "the resumed driver left processes running"

    # The Optuna study went on instead of starting again: one study, whose finished
    # trials are exactly the search's. A trial the searcher had asked for when the
    # driver died (never run by Tune) may remain; it is closed as failed, not left running.
    import optuna
    study_storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna_journal.log")))
    studies = optuna.get_all_study_summaries(study_storage)
    assert [s.study_name for s in studies] == ["killed"]
    study = optuna.load_study(study_name="killed", storage=study_storage)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    # (a lost trial ran again under its own id, and the study was told how it ended)
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(ok), states
    assert states.count(optuna.trial.TrialState.FAIL) >= len(bad), states
    assert optuna.trial.TrialState.RUNNING not in states, states


@pytest.mark.slow
@pytest.mark.exclusive   # under xdist no second test shares its 150 s (conftest.py)
def test_a_killed_budgeted_search_resumes_its_clock_and_restarts_lost_trials(tmp_path, ray_tmp):
    """The job's clock goes on across a kill and --resume. And a trial whose checkpoint was replaced at the
    kill starts again: Ray, keeping one checkpoint per trial, deletes the old one before its next snapshot of
    the experiment, and a driver killed in between leaves a trial that names a deleted checkpoint. Here the
    window is forced: the checkpoint each running trial's stored state names is deleted."""
    storage_root, cache = tmp_path / "runs", tmp_path / "cache"
    experiment, max_epochs, budget = storage_root / "killed", 3, 150
    argv = ["digits", "--storage", str(storage_root), "--name", "killed", "--archs", "test_resnet",
            "--image-sizes", "16", "--max-epochs", str(max_epochs), "--grace-period", str(max_epochs),
            "--cache-dir", str(cache), "--seed", "0", "--time-budget", str(budget),
            # one final config on 2 folds: the final stage ends well inside the budget (the job's clock is
            # what the test checks, and a test that fills 2m30s of final training costs CI 2m30s)
            "--folds", "2", "--crossfit-top", "1"]
    env, marker, log, state, done, mid = _kill_mid_search(tmp_path, ray_tmp, argv, max_epochs)
    before = json.loads((experiment / "clock.json").read_text())
    assert before["budget_s"] == budget and before["state"]["phase"] == "search" and before["used_s"] > 0
    for path in mid.values():
        shutil.rmtree(path, ignore_errors=True)
    assert _lost(mid) == list(mid)
    with open(log, "a") as f:
        f.write("\n=== resume ===\n")
    _resume(argv, log, tmp_path, env)
    text = log.read_text().split("=== resume ===")[1]
    assert "time budget 2m30s: " in text and "used before the resume" in text, text
    after = json.loads((experiment / "clock.json").read_text())
    # the clock went on from what the killed session had used; the search kept its deadline
    assert after["state"]["phase"] == "done" and after["state"]["search_until_s"] == before["state"]["search_until_s"]
    assert before["used_s"] < after["used_s"] <= budget + 20, (before, after)
    assert (experiment / "ensemble" / "submission.csv").exists()
    trials = pd.read_parquet(experiment / "trials.parquet").set_index("trial_id")
    assert set(done) <= set(trials.index) and set(mid) <= set(trials.index)
    # A lost trial starts again under its own id, from epoch 1, and runs to the end. On a busy machine the
    # search's share can end first (the resumed driver's start eats what was left of it): then the trial stops
    # at the deadline, or, with no checkpoint made since, keeps its scores as "checkpoint lost", no candidate
    dirs = {trial_id(d): d for d in trial_dirs(experiment)}
    for t in mid:
        row = trials.loc[t]
        assert row["status"] == "ok", row
        if row["stop_reason"] == CHECKPOINT_LOST:
            assert f"trial {t}: its checkpoint" in text and "without a candidate" in text, text
            assert pd.isna(row["checkpoint"]) and not Experiment(str(experiment)).candidate(t).exists(), row
            continue
        assert f"trial {t}: its checkpoint" in text and "starting it again from its first epoch" in text, t
        epochs = [r["epoch"] for r in results(dirs[t])]
        assert restarted_from_scratch(epochs), (t, epochs)
        assert row["stop_reason"] in ("completed", TIME_BUDGET), row
        if row["stop_reason"] == "completed":
            assert row["epochs_run"] == max_epochs and epochs[-max_epochs:] == list(range(1, max_epochs + 1)), epochs
    # ... and the study, restored with the search, learns how each of them ended
    import optuna
    study = optuna.load_study(study_name="killed", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(experiment / "optuna_journal.log"))))
    told = {}
    for ot in study.get_trials(deepcopy=False):
        told.setdefault(ot.user_attrs.get("tune_trial_id"), []).append(ot.state)
    assert all(told.get(t) == [optuna.trial.TrialState.COMPLETE] for t in mid
               if trials.loc[t, "stop_reason"] == "completed"), told
    assert not any(optuna.trial.TrialState.RUNNING in states for states in told.values()), told
    deadline = time.time() + 30
    while _processes_with(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert _processes_with(marker) == [], "the resumed driver left processes running"


# --- d. a config that fails every time -------------------------------------------------

@pytest.mark.slow
def test_a_config_that_always_fails_is_recorded_and_the_search_completes(tmp_path, ray_session, weights):
    """test_convnext cannot run at 16 px (it downsamples 32x: a 2x2 kernel meets a 1x1 map), a
    real failure inside the trial's forward pass; test_resnet can. With --max-failures 1 the
    failing trial is tried twice, recorded as an error, and the search goes on."""
    from searchspace.run import main

    data = make_paddy(tmp_path / "data", classes=3, per_class=8, test=4)
    argv = ["paddy", "--data", str(data), "--storage", str(tmp_path / "runs"), "--name", "failing",
            "--archs", "test_resnet,test_convnext", "--image-sizes", "16", "--trials", "4", "--max-epochs", "1",
            "--folds", "2", "--crossfit-top", "1", "--max-failures", "1", "--cache-dir", str(tmp_path / "cache"),
            "--weights-dir", str(weights), "--seed", "0",
            # the networks only: five classical members (probe and kNN on each architecture, pixels), each a
            # Ray task that imports torch, would check nothing this test is about
            "--members", "none"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    text = out.getvalue()
    assert code == 0, text

    experiment = tmp_path / "runs" / "failing"
    trials = pd.read_parquet(experiment / "trials.parquet")
    assert len(trials) == 4 and trials["trial_id"].is_unique
    bad, good = trials[trials["arch"] == "test_convnext"], trials[trials["arch"] == "test_resnet"]
    assert len(bad) >= 1 and len(good) >= 1, f"seed 0 should sample both archs: {trials['arch'].tolist()}"
    assert (bad["status"] == "error").all(), bad[["trial_id", "status"]]
    assert bad["error"].str.contains("Kernel size can't be greater than actual input size").all(), bad["error"].tolist()
    assert bad["checkpoint"].isna().all() and (bad["epochs_run"] == 0).all()
    assert (good["status"] == "ok").all() and good["error"].isna().all()
    assert good["best_score"].notna().all() and good["checkpoint"].notna().all()
    for row in bad.itertuples():
        assert f"failed {row.trial_id}" in text
        # tried 1 + max_failures times, then given up
        d = next(d for d in trial_dirs(experiment) if trial_id(d) == row.trial_id)
        errors = (d / "error.txt").read_text()
        assert "Failure # 2" in errors and "Failure # 3" not in errors, errors[:2000]
        assert not (experiment / "candidates" / row.trial_id).exists()
    # The cross-fit took a working config; select reads the experiment
    cv = [p.name for p in (experiment / "candidates").glob("cv-*")]
    assert len(cv) == 1 and cv[0].removeprefix("cv-") in set(good["trial_id"]), cv
    code, text = select(experiment, top=2)
    assert code == 0, text
