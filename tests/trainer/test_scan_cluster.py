"""trainer.images.scan on a real multi-node Ray cluster, over real image files in moto's S3 server.

A bucket's images are checked by Ray tasks spread over the nodes (``cluster=True``,
what searchspace.prepare asks for when --data is a bucket); a local disk keeps
threads. The cluster is ``ray.cluster_utils.Cluster``: a head and two worker
raylets on this machine, each with moto's credentials in its environment (a
real cluster's nodes get theirs from an instance profile). Nothing is mocked;
the chunk of files per task is made small so that a few dozen files make
several tasks. Slow: it starts Ray (``ray_tmp`` and ``detached`` are in
conftest's RAY_FIXTURES).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
from helpers import (
    MOTO_CREDENTIALS,
    make_paddy,
    prepare_experiment,
    truncate_file,
    uri,
    without_session_ray,
    write_image,
)
from ray.cluster_utils import Cluster

from trainer import images
from trainer.images import cluster_checks, decode_checks, scan

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_tmp():
    """A short /tmp/ray* folder for Ray's sockets, logs and session files; removed afterwards."""
    d = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def detached(tmp_path_factory):
    """No Ray connection in this process during these tests; an equivalent local Ray again after them."""
    with without_session_ray(tmp_path_factory):
        yield


@pytest.fixture(scope="module")
def three_nodes(ray_tmp, detached):
    """A head and two worker nodes (one CPU each), this process connected as the driver; yields the cluster."""
    env = {**MOTO_CREDENTIALS, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(REPO)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", ray_tmp)  # the cluster's address file stays private to these tests
        os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
        cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, env_vars=env, temp_dir=ray_tmp,
                                                                     include_dashboard=False))
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, env_vars=env, temp_dir=ray_tmp)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()


def _upload(s3, bucket: str, root: Path, prefix: str) -> list[str]:
    """Every file under root into the bucket under prefix; their keys, sorted."""
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(root).as_posix()}"
        s3.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


def _delta(before: dict[str, int]) -> dict[str, int]:
    return {node: n - before.get(node, 0) for node, n in cluster_checks().items() if n > before.get(node, 0)}


def test_a_bucket_is_checked_by_tasks_on_every_node_with_the_threads_verdicts(three_nodes, s3, tmp_path,
                                                                              monkeypatch):
    s3.create_bucket(Bucket="imgs")
    local = tmp_path / "src"
    for i in range(40):
        write_image(local / f"{i % 3}" / f"{i:03d}.jpg", "rgb", size=(64, 48), seed=i, cls=i % 3)
    for i, kind in enumerate(("gray", "rgba", "palette", "16bit")):
        write_image(local / "kinds" / f"{kind}.png", kind, size=(40, 30), seed=100 + i)
    truncate_file(write_image(local / "broken" / "cut.jpg", "rgb", size=(320, 240), seed=7))
    truncate_file(write_image(local / "broken" / "cut.png", "rgb", size=(96, 64), seed=8))
    (local / "broken" / "notes.jpg").write_text("not an image at all\n")
    (local / "broken" / "empty.jpg").write_bytes(b"")
    keys = _upload(s3, "imgs", local, "data")
    locations = [uri(s3.endpoint, "imgs", k) for k in keys] + [uri(s3.endpoint, "imgs", "data/0/missing.jpg")]
    broken = {loc for loc in locations if "/broken/" in loc or "/missing.jpg?" in loc}
    monkeypatch.setattr(images, "_SCAN_CHUNK", 8)  # 49 files -> 7 tasks over the 3 nodes

    threaded = scan(locations, workers=2)
    assert set(threaded[1]) == broken

    cache = tmp_path / "cache"
    nodes_before, read_before = cluster_checks(), decode_checks()
    assert scan(locations, workers=2, cache_dir=str(cache), cluster=True) == threaded
    assert decode_checks() == read_before  # this process read none of them: the tasks did
    ran = _delta(nodes_before)
    assert sum(ran.values()) == len(locations)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(ran) >= 2 and set(ran) <= alive  # spread: more than one node checked files
    assert set(ran) - {three_nodes.head_node.node_id}  # and not only the driver's node

    # The second start: the driver's sqlite cache answers; only the missing file is tried again.
    nodes_before = cluster_checks()
    assert scan(locations, workers=2, cache_dir=str(cache), cluster=True) == threaded
    assert sum(_delta(nodes_before).values()) == 1

    # A re-uploaded (now broken) object is checked again, on the cluster.
    s3.put_object(Bucket="imgs", Key="data/1/001.jpg", Body=b"\xff\xd8 cut short")
    nodes_before = cluster_checks()
    _, bad = scan(locations, workers=2, cache_dir=str(cache), cluster=True)
    assert set(bad) == broken | {uri(s3.endpoint, "imgs", "data/1/001.jpg")}
    assert sum(_delta(nodes_before).values()) == 2


def test_prepare_checks_a_bucket_on_the_cluster(three_nodes, s3, tmp_path):
    s3.create_bucket(Bucket="paddy")
    data = make_paddy(tmp_path / "src", classes=3, per_class=4, test=3)
    _upload(s3, "paddy", data, "data")
    nodes_before = cluster_checks()
    argv = ["paddy", "--data", uri(s3.endpoint, "paddy", "data"), "--folds", "2", "--archs", "test_resnet",
            "--pretrained", "no", "--storage", str(tmp_path / "runs"), "--name", "exp",
            "--cache-dir", str(tmp_path / "cache")]
    prepare_experiment(argv, tmp_path / "runs" / "exp")
    assert sum(_delta(nodes_before).values()) == 3 * 4 + 3
    assert os.path.exists(tmp_path / "runs" / "exp" / "folds.parquet")
