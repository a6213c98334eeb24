"""An experiment in a bucket: moto's real S3 server on 127.0.0.1, real Ray, real search, no mocks.

moto runs as its own process (``moto_server``), so pyarrow in the driver and
in every Ray worker talks HTTP to it exactly as it would to AWS (the URI
carries ``endpoint_override=127.0.0.1:PORT&scheme=http``). The credentials are
moto's dummy ones; Ray workers get them through the job's runtime_env, since
a worker only inherits environment variables that were set before Ray started.
The server (``moto_endpoint``) and the boto3 client (``s3``) are conftest
fixtures; ``uri`` and ``MOTO_CREDENTIALS`` come from helpers.py.

- ``test_storage_roundtrip_s3``: core.storage's read/write/list helpers
  against the server, checked object by object with boto3.
- ``test_search_and_select_in_bucket`` (slow): the whole pipeline with both
  ``--data`` and ``--storage`` in the bucket; every artifact of the experiment
  contract (and every checkpoint) is in the bucket and none is on local disk;
  then ``ensemble_builder select`` reads the experiment back from the bucket.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile

import pandas as pd
import pyarrow as pa
import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

pytest.importorskip("boto3")
pytest.importorskip("moto")

from helpers import MOTO_CREDENTIALS, make_paddy, uri, without_session_ray, write_weights  # noqa: E402

from core import storage  # noqa: E402


def keys(client, bucket: str, prefix: str = "") -> list[str]:
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


# --- core.storage against the server -----------------------------------------------

def test_storage_roundtrip_s3(s3):
    s3.create_bucket(Bucket="roundtrip")
    base = uri(s3.endpoint, "roundtrip", "exp")
    # join keeps the pyarrow options at the end, so children open the same filesystem
    assert storage.join(base, "a", "b.json") == uri(s3.endpoint, "roundtrip", "exp/a/b.json")
    assert storage.is_uri(base) and storage.absolute(base) == base

    storage.write_json(storage.join(base, "meta", "experiment.json"), {"task": "paddy", "classes": ["a", "b"]})
    assert storage.read_json(storage.join(base, "meta", "experiment.json")) == {"task": "paddy", "classes": ["a", "b"]}

    table = pa.table({"sample_id": ["x", "y", "z"], "fold": pa.array([0, 1, 2], pa.int64())})
    storage.write_parquet(storage.join(base, "folds.parquet"), table)
    assert storage.read_parquet(storage.join(base, "folds.parquet")).equals(table)

    storage.write_bytes(storage.join(base, "candidates", "c1", "model.pt"), b"\x00" * 1234)
    assert storage.read_bytes(storage.join(base, "candidates", "c1", "model.pt")) == b"\x00" * 1234

    listed = dict(storage.list_files(base))
    assert set(listed) == {"meta/experiment.json", "folds.parquet", "candidates/c1/model.pt"}
    assert listed["candidates/c1/model.pt"] == 1234
    assert [p for p, _ in storage.list_files(storage.join(base, "candidates"))] == ["c1/model.pt"]
    assert storage.list_files(storage.join(base, "nothing-here")) == []

    assert storage.exists(storage.join(base, "folds.parquet"))
    assert not storage.exists(storage.join(base, "trials.parquet"))
    assert storage.is_dir(storage.join(base, "candidates"))
    assert not storage.is_dir(storage.join(base, "folds.parquet"))

    # What boto3 sees: exactly these objects (the write-then-move leaves no .tmp behind)
    found = keys(s3, "roundtrip")
    assert [k for k in found if not k.endswith("/")] == [
        "exp/candidates/c1/model.pt", "exp/folds.parquet", "exp/meta/experiment.json"]
    body = json.loads(s3.get_object(Bucket="roundtrip", Key="exp/meta/experiment.json")["Body"].read())
    assert body["task"] == "paddy"

    storage.delete_dir(storage.join(base, "candidates"))
    assert not storage.exists(storage.join(base, "candidates", "c1", "model.pt"))
    assert [k for k in keys(s3, "roundtrip", "exp/candidates") if not k.endswith("/")] == []
    assert storage.exists(storage.join(base, "folds.parquet"))


# --- the whole pipeline in a bucket -----------------------------------------------------

@pytest.fixture
def own_ray(tmp_path_factory):
    """A local Ray (2 CPUs) with moto's credentials in every worker (runtime_env); yields its temp dir.

    If this process was connected to another Ray (conftest's ``ray_session``),
    it is disconnected first and an equivalent local Ray is started again at the end.
    """
    import ray

    with without_session_ray(tmp_path_factory):
        temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        ray.init(num_cpus=2, _temp_dir=temp, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {**MOTO_CREDENTIALS, "NO_ALBUMENTATIONS_UPDATE": "1"}})
        try:
            yield temp
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def _local_artifacts(*roots) -> list[str]:
    """Experiment files (or checkpoints) found on local disk under any of ``roots``."""
    names = {"folds.parquet", "test.parquet", "trials.parquet", "experiment.json", "oof.parquet",
             "members.json", "holdout.parquet", "model.pt", "train_state.pt", "submission.csv", "ensemble.json"}
    hits = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            hits += [os.path.join(dirpath, d) for d in dirnames if d.startswith("checkpoint_")]
            hits += [os.path.join(dirpath, f) for f in filenames if f in names]
    return hits


@pytest.mark.slow
def test_search_and_select_in_bucket(own_ray, s3, tmp_path):
    from core.experiment import STUDY_FILE
    from ensemble_builder.__main__ import main as ensemble_main
    from searchspace.run import main

    ep = s3.endpoint
    s3.create_bucket(Bucket="bkt")
    local_data = make_paddy(tmp_path / "src", classes=3, per_class=8, test=4)
    for path in sorted(p for p in local_data.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "bkt", "data/" + path.relative_to(local_data).as_posix())
    shutil.rmtree(local_data)  # the search can only read the bucket
    cache, weights = tmp_path / "cache", write_weights(tmp_path / "weights")
    workdir = tmp_path / "cwd"
    workdir.mkdir()

    argv = ["paddy", "--data", uri(ep, "bkt", "data"), "--storage", uri(ep, "bkt", "runs"), "--name", "s3exp",
            "--archs", "test_resnet", "--image-sizes", "16", "--trials", "2", "--max-epochs", "2",
            "--folds", "2", "--crossfit-top", "1", "--cache-dir", str(cache), "--weights-dir", str(weights),
            "--seed", "0"]
    out = io.StringIO()
    # In an empty working directory: a relative default (./runs) would land there and be caught below
    here = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out):
            code = main(argv)
    finally:
        os.chdir(here)
    assert code == 0, out.getvalue()

    objects = keys(s3, "bkt", "runs/s3exp/")
    rel = [k[len("runs/s3exp/"):] for k in objects]
    for name in ("folds.parquet", "test.parquet", "trials.parquet", "experiment.json", STUDY_FILE):
        assert name in rel, f"{name} not in the bucket: {rel}"
    trials = pd.read_parquet(io.BytesIO(s3.get_object(Bucket="bkt", Key="runs/s3exp/trials.parquet")["Body"].read()))
    assert len(trials) == 2 and (trials["status"] == "ok").all(), trials
    for tid in trials["trial_id"]:
        assert f"candidates/{tid}/oof.parquet" in rel and f"candidates/{tid}/members.json" in rel
    cv = sorted({r.split("/")[1] for r in rel if r.startswith("candidates/cv-")})
    assert len(cv) == 1, rel
    for name in ("oof.parquet", "test.parquet", "members.json"):
        assert f"candidates/{cv[0]}/{name}" in rel
    # Every checkpoint URI in trials.parquet points into the bucket and holds the weights
    prefix = uri(ep, "bkt", "runs/s3exp").split("?")[0]
    for ck in trials["checkpoint"]:
        assert ck.startswith(prefix) and ck.endswith(f"?endpoint_override={ep}&scheme=http"), ck
        key = ck.split("?")[0][len("s3://bkt/"):]
        assert f"{key}/model.pt" in objects and f"{key}/holdout.parquet" in objects, key
    # The cross-fit fold models too
    members = json.loads(s3.get_object(Bucket="bkt", Key=f"runs/s3exp/candidates/{cv[0]}/members.json")["Body"].read())
    for m in members["members"]:
        assert storage.exists(storage.join(m["checkpoint"], "model.pt")), m
        assert m["checkpoint"].startswith("s3://bkt/runs/s3exp/"), m

    # Nothing of the experiment on local disk: not in the working directory, the data
    # or cache folders, Ray's temp dir or ~/ray_results. (The Optuna journal is kept in
    # the node cache while the search runs, by design, and copied into the bucket after.)
    assert _local_artifacts(tmp_path, own_ray) == []
    journals = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.log"))
    assert journals == ["cache/studies/s3exp.log"], journals
    assert not os.path.exists(os.path.expanduser("~/ray_results/s3exp"))
    assert not (workdir / "runs").exists() and os.listdir(workdir) == []

    # ensemble_builder reads the experiment back from the bucket
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = ensemble_main(["select", "--experiment", uri(ep, "bkt", "runs/s3exp"), "--top", "2"])
    assert code == 0, out.getvalue()
    assert "runs/s3exp/ensemble/ensemble.json" in keys(s3, "bkt", "runs/s3exp/ensemble/")
    sub = pd.read_csv(io.BytesIO(s3.get_object(Bucket="bkt", Key="runs/s3exp/ensemble/submission.csv")["Body"].read()))
    assert list(sub.columns) == ["image_id", "label"]
    assert sorted(sub["image_id"]) == [f"{200000 + i}.jpg" for i in range(4)]
    assert set(sub["label"]) <= {"tungro", "blast", "normal"}
    assert _local_artifacts(tmp_path) == []
