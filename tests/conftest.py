"""Fixtures and pytest hooks: a local Ray, offline weights, one tiny search, moto's S3 server.

Everything here is real: Ray is a real local cluster, ``tiny_experiment`` is
a real (tiny) search through ``searchspace.run.main`` and moto's S3 server is
a real HTTP server in its own process. Nothing is mocked. The plain helpers
(image files, dataset layouts, ``prepare_experiment``, ``free_port``, ``uri``...)
are in tests/helpers.py, imported with ``from helpers import make_paddy``
(pytest's default import mode puts tests/ on sys.path). No test module imports
from another test module. The test folders have no ``__init__.py``: without a
tests/__init__.py, a tests/trainer/__init__.py would make ``import trainer``
find the test folder instead of the package.

- ``pytest_configure``: HOME, the caches and Ray's auth token inside pytest's
  tmp dir, so the suite writes nothing outside it; Ray's workers at nice 0.
- ``pytest_collection_modifyitems``: a test that uses a fixture in
  ``RAY_FIXTURES`` (it starts Ray or runs a search) is marked ``slow``, so
  ``pytest -m "not slow"`` starts no Ray.
- ``pytest_runtest_protocol``: under pytest-xdist (``-n 2``, the default in
  pyproject.toml), a test marked ``exclusive`` runs with no test beside it.
- ``ray_session`` (session): ``ray.init`` with 2 CPUs and its temp dir inside
  the pytest tmp dir; shut down at the end.
- ``weights_dir`` (session): a folder with ``test_resnet.pth`` (seed 0), so
  that ``pretrained=True`` works offline.
- ``tiny_experiment`` (session): one finished ``searchspace.run`` search on a
  tiny paddy dataset; a namespace with ``experiment``, ``data``, ``cache_dir``,
  ``storage``, ``weights_dir``, ``stdout``, ``argv``, ``images`` (train count),
  ``test_images``, ``folds``, ``trials``, ``max_epochs``, ``crossfit_top``.
- ``moto_endpoint`` (module): moto's standalone S3 server as its own process
  on 127.0.0.1 (``moto_server``, or ``python -m moto.server``); yields
  ``host:port``. ``s3``: a boto3 client for it, with ``MOTO_CREDENTIALS`` in
  this process's environment and the endpoint as ``s3.endpoint``. Both skip
  the test where boto3 or moto is not installed (the ``test`` extra).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from helpers import MOTO_CREDENTIALS, free_port, machine_share, make_paddy, ray_temp_dir, write_weights

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# --- test tiers ------------------------------------------------------------------

# Fixtures that start Ray (a local instance or a multi-node cluster) or run a
# search. A test that uses one is slow, whatever its own marks say, so that
# `pytest -m "not slow"` starts no Ray and no search.
RAY_FIXTURES = {"ray_session", "tiny_experiment", "own_ray", "ray_tmp", "detached", "offline_ray"}


@pytest.hookimpl(trylast=True)   # after pytest's tmp_path plugin has configured
def pytest_configure(config):
    """Nothing a test does writes outside pytest's tmp dir: HOME is a folder there, so Ray's auth token
    (token auth is on by default: ``ray.init`` writes ~/.ray/auth_token), the default node cache
    (~/.cache/searchspace), matplotlib's and torch's caches land there, and every Ray process of the session
    (``ray start`` subprocesses and job drivers included) reads the same token through RAY_AUTH_TOKEN_PATH."""
    import secrets

    home = config._tmp_path_factory.mktemp("home", numbered=False)
    token = home / ".ray" / "auth_token"
    token.parent.mkdir(parents=True, exist_ok=True)
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), MPLCONFIGDIR=str(home / ".matplotlib"),
                      RAY_AUTH_TOKEN_PATH=str(token))
    # Ray starts its workers at nice 15. On a machine kept busy at nice 0 (CI beside another job,
    # bench/faults.py's busy loops) the trials then get a sliver of a core: a 46 s fault test took 381 s.
    # At nice 0 the load slows every process of a test alike, driver and trials, which is the load the
    # fault tests are meant to survive.
    os.environ.setdefault("RAY_worker_niceness", "0")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# --- two tests at a time, and a budgeted one alone ---------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under pytest-xdist (pyproject's addopts: ``-n 2``), a test marked ``exclusive`` runs with no other
    test beside it: its setup, call and teardown wait until the other worker's test ends, and the other
    worker's next test waits for it. Those tests hold a job to its wall-clock budget, which a second search
    on the same cores would spend. Without xdist every test runs alone anyway."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    folder = item.config._tmp_path_factory.getbasetemp().parent   # shared: each worker's basetemp is popen-gw<N>
    with machine_share(folder, exclusive=item.get_closest_marker("exclusive") is not None):
        yield


# --- Ray ---------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """A real local Ray (2 CPUs), its temp dir inside pytest's tmp dir when the path is short enough.

    Ray's unix sockets live under the temp dir and a socket path may not
    exceed ~107 bytes, so a long pytest path falls back to a fresh /tmp/ray*
    folder. searchspace.run.main() skips ray.init when Ray is up, so tests
    that call main() with a real search request this fixture.
    """
    import ray

    tmp, fallback = ray_temp_dir(tmp_path_factory)
    if ray.is_initialized():
        ray.shutdown()
    # Workers find this repository's packages because Ray puts the driver's
    # working directory on their sys.path: run pytest from the repository root.
    ray.init(num_cpus=2, _temp_dir=tmp, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    yield ray
    ray.shutdown()
    if fallback:
        shutil.rmtree(tmp, ignore_errors=True)


# --- weights and one tiny search ---------------------------------------------

@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory) -> Path:
    """A folder holding test_resnet.pth: the state_dict of test_resnet (1000 classes) made with seed 0."""
    return write_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def tiny_experiment(tmp_path_factory, ray_session, weights_dir):
    """One real search through searchspace.run.main, shared by the whole session.

    Paddy layout, 3 classes x 10 images, 6 test images, 3 folds; test_resnet at
    16 or 24 px, 3 trials of 2 epochs (ASHA grace 2: none is stopped, so all
    three ran their whole schedule), then the cross-fit of the best 2 configs
    (candidates cv-<trial_id> with full out-of-fold coverage). --weights-dir
    holds a local test_resnet.pth, so the trials fine-tune it (there is no
    network). Asserts that main() returned 0; its stdout is kept in ``.stdout``.
    """
    import io

    from searchspace.run import main

    base = tmp_path_factory.mktemp("tiny")
    data = make_paddy(base / "data", classes=3, per_class=10, test=6)
    storage, cache_dir = base / "runs", base / "cache"
    argv = ["paddy", "--data", str(data), "--archs", "test_resnet", "--image-sizes", "16,24",
            "--trials", "3", "--max-epochs", "2", "--grace-period", "2", "--folds", "3",
            "--storage", str(storage), "--cache-dir", str(cache_dir), "--name", "tiny", "--seed", "0",
            "--weights-dir", str(weights_dir), "--crossfit-top", "2",
            # the networks only: the classical members have tests of their own (tests/trainer/test_classical.py)
            "--members", "none"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    stdout = out.getvalue()
    assert code == 0, stdout
    return types.SimpleNamespace(
        experiment=storage / "tiny", data=data, cache_dir=cache_dir, storage=storage, weights_dir=weights_dir,
        stdout=stdout, argv=argv, images=30, test_images=6, folds=3, trials=3, max_epochs=2, crossfit_top=2)


# --- moto's S3 server ----------------------------------------------------------

def _needs_moto() -> None:
    if not all(importlib.util.find_spec(name) for name in ("boto3", "moto")):
        pytest.skip("needs boto3 and moto (the test extra)")


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory):
    """moto's standalone S3 server as a separate process on 127.0.0.1; yields 'host:port'."""
    _needs_moto()
    port = free_port()
    script = Path(sys.executable).parent / "moto_server"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **MOTO_CREDENTIALS})
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"moto_server did not start (exit {proc.poll()}); see {log.name}")
            time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def s3(moto_endpoint, monkeypatch):
    """boto3 client for the moto server, with moto's credentials in this process's environment."""
    import boto3

    for k, v in MOTO_CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=f"http://{moto_endpoint}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.endpoint = moto_endpoint
    return client
