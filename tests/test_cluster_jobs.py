"""The documented cluster path, run as docs/cluster.md gives it: a head and a worker started with ``ray start``
(token auth on), the search submitted with ``ray job submit --working-dir .`` (step 5), followed with
``ray job status`` and ``ray job logs``; a submit without the token is refused.

What ``cluster.yaml`` would do on AWS is done here by hand on this machine: RAY_AUTH_MODE=token before every
``ray start``, one token file that every node and the client read (RAY_AUTH_TOKEN_PATH instead of
~/.ray/auth_token, so nothing is written outside the test's tmp dir), the project installed with its cluster
extra (the venv this test runs in: ``ray[default]`` gives the dashboard, the jobs server and the jobs CLI).
Only the processes this test started are stopped (by their temp dir), never ``ray stop``.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def ray_cli(*args: str, env: dict, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def stop_started(temp: str) -> None:
    """Kill the processes whose command line names this test's Ray temp dir (gcs, raylets, dashboard), and
    every process below them: Ray's workers and agents rename themselves (``ray::DashboardAgent``), so their
    command lines no longer name it. Never ``ray stop``, which would stop other Rays on the machine."""
    # -ww: full command lines even where COLUMNS is set (pytest sets it), else the temp dir is cut off
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    roots = []
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (*line.split(), "")
        children.setdefault(int(ppid), []).append(int(pid))
        if temp in args and int(pid) != os.getpid():
            roots.append(int(pid))
    doomed, stack = set(), list(roots)
    while stack:
        pid = stack.pop()
        if pid not in doomed and pid != os.getpid():
            doomed.add(pid)
            stack.extend(children.get(pid, []))
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def submit_when_agent_is_up(address: str, command: list[str], env: dict) -> subprocess.CompletedProcess:
    """``ray job submit``, polled until the head's job agent has registered: right after ``ray start`` the
    jobs server answers "No available agent to submit job, please try again later" (HTTP 500), as a user
    sees it too. Any other failure fails at once."""
    for _ in range(30):
        proc = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--", *command, env=env,
                       timeout=600, check=False)
        if "No available agent" not in proc.stderr:
            break
        time.sleep(1)   # a poll interval on the agent's registration, not a margin on a timing
    if proc.returncode != 0:
        raise AssertionError(f"ray job submit -> {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture
def token_cluster(tmp_path):
    """A head (2 CPUs, dashboard and jobs server on 127.0.0.1) and a worker (1 CPU), both with token auth."""
    # Two temp dirs, as two machines would have: a worker that shares the head's unpacks the job's
    # working_dir package into the same runtime_resources path when its first trial starts, which deletes the
    # driver's current directory under it (the job then fails at its next os.getcwd(), inside Tuner.fit).
    short = len(str(tmp_path)) < 50
    temp = str(tmp_path / "ray") if short else tempfile.mkdtemp(prefix="ray", dir="/tmp")
    worker_temp = str(tmp_path / "rayw") if short else tempfile.mkdtemp(prefix="rayw", dir="/tmp")
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # No RAY_ setting of the pytest process leaks into the cluster, except the workers' niceness (conftest): at
    # Ray's default, nice 15, the job's driver and trials get a sliver of a core on a busy machine (beside a busy
    # loop per core the test took 344 s, 55 s at nice 0, 26 s idle).
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") or k == "RAY_worker_niceness"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), PATH=f"{BIN}{os.pathsep}{env['PATH']}",
               NO_ALBUMENTATIONS_UPDATE="1", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    port, dashboard = free_port(), free_port()
    try:
        # each node's dashboard agent on a port of its own: the default (52365) is one per machine, and the
        # jobs server submits through the head's agent
        ray_cli("start", "--head", f"--port={port}", "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", env=env)
        ray_cli("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--temp-dir={worker_temp}",
                f"--dashboard-agent-listen-port={free_port()}", env=env)
        yield dict(env=env, address=f"http://127.0.0.1:{dashboard}", temp=temp)
    finally:
        for started in (temp, worker_temp):
            stop_started(started)
            if not started.startswith(str(tmp_path)):
                shutil.rmtree(started, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_digits_search_on_a_token_cluster(token_cluster, tmp_path):
    env, address = token_cluster["env"], token_cluster["address"]
    runs = tmp_path / "runs"
    command = ["python", "-m", "searchspace.run", "digits", "--storage", str(runs), "--name", "jobexp",
               "--cache-dir", str(tmp_path / "cache"), "--trials", "2", "--max-epochs", "1", "--folds", "2",
               "--crossfit-top", "1", "--archs", "test_resnet", "--image-sizes", "16"]

    # without the token: refused, nothing runs
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    no_token["HOME"] = str(tmp_path / "no-home")   # no ~/.ray/auth_token to fall back on either
    refused = ray_cli("job", "submit", "--address", address, "--working-dir", ".", "--no-wait", "--", *command,
                      env=no_token, check=False)
    assert refused.returncode != 0
    assert re.search(r"auth|token|401|403", refused.stdout + refused.stderr, re.I), refused.stderr[-2000:]
    assert "Job 'raysubmit" not in refused.stdout + refused.stderr

    # as docs/cluster.md step 5 gives it: submit, wait, then its status and logs by the submission id
    submitted = submit_when_agent_is_up(address, command, env)
    text = submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_\w+", text).group(0)
    assert "succeeded" in text.lower(), text[-3000:]
    status = ray_cli("job", "status", "--address", address, job_id, env=env)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = ray_cli("job", "logs", "--address", address, job_id, env=env).stdout
    assert "search finished" in logs and "cross-fit:" in logs
    # the experiment is in its storage, whole
    exp = runs / "jobexp"
    meta = json.loads((exp / "experiment.json").read_text())
    assert meta["task"] == "digits" and (exp / "trials.parquet").exists()
    assert any(p.name.startswith("cv-") for p in (exp / "candidates").iterdir())
    # both nodes took part in the cluster the job ran on
    nodes = json.loads(ray_cli("list", "nodes", "--address", address, "--format", "json", env=env).stdout)
    assert sum(n.get("state") == "ALIVE" for n in nodes) == 2
