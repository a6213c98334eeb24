"""core.storage on the local filesystem: locations, joining, listing, atomic writes, JSON and Parquet.

Every test works in ``tmp_path`` through plain paths and through ``file://``
URIs (the same code path a bucket takes, with pyarrow's local filesystem).
"""
from __future__ import annotations

import os
import threading

import pyarrow as pa
import pyarrow.fs as pafs

from core import storage


def uri(path) -> str:
    return f"file://{path}"


# --- locations ---------------------------------------------------------------

def test_is_uri_only_for_a_scheme():
    assert storage.is_uri("s3://bucket/prefix")
    assert storage.is_uri("file:///tmp/x")
    assert storage.is_uri("gs://b?endpoint_override=x")
    assert not storage.is_uri("/tmp/x")
    assert not storage.is_uri("runs/exp")
    assert not storage.is_uri("~/runs")


def test_is_local_for_a_path_or_a_file_uri_not_a_bucket(tmp_path):
    """Where a plain write can be cut half way (searchspace.searcher keeps Tune's snapshot whole there)."""
    assert storage.is_local(str(tmp_path)) and storage.is_local(f"file://{tmp_path}")
    assert not storage.is_local("s3://bucket/x?endpoint_override=127.0.0.1:1&scheme=http&region=us-east-1")


def test_absolute_makes_a_relative_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.absolute("runs/exp") == str(tmp_path / "runs" / "exp")
    assert storage.absolute("./a/../b") == str(tmp_path / "b")


def test_absolute_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.absolute("~/runs") == str(tmp_path / "runs")


def test_absolute_leaves_a_uri_unchanged():
    for location in ("s3://b/p/../q", "file:///tmp/./x", "gs://b/p?endpoint_override=h:1&scheme=http"):
        assert storage.absolute(location) == location


def test_join_keeps_the_query_at_the_end():
    assert (storage.join("s3://b/p?endpoint_override=x", "a", "b.json")
            == "s3://b/p/a/b.json?endpoint_override=x")
    assert storage.join("s3://b/p?k=1&scheme=http", "c") == "s3://b/p/c?k=1&scheme=http"


def test_join_strips_duplicate_slashes():
    assert storage.join("s3://b/p/", "/a/", "/b.json") == "s3://b/p/a/b.json"
    assert storage.join("/tmp/runs//", "exp/", "x") == "/tmp/runs/exp/x"
    assert storage.join("file:///tmp/runs/", "exp") == "file:///tmp/runs/exp"


def test_join_without_parts_is_the_location():
    assert storage.join("s3://b/p?q=1") == "s3://b/p?q=1"


def test_resolve_a_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("sub/file.txt")
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "sub" / "file.txt")


def test_resolve_a_file_uri(tmp_path):
    fs, path = storage.resolve(uri(tmp_path / "a" / "b.json"))
    assert isinstance(fs, pafs.LocalFileSystem)
    assert path == str(tmp_path / "a" / "b.json")


def test_exists_and_is_dir(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.txt").write_text("x")
    for as_location in (str, uri):
        assert storage.exists(as_location(tmp_path / "d"))
        assert storage.is_dir(as_location(tmp_path / "d"))
        assert storage.exists(as_location(tmp_path / "d" / "f.txt"))
        assert not storage.is_dir(as_location(tmp_path / "d" / "f.txt"))
        assert not storage.exists(as_location(tmp_path / "missing"))
        assert not storage.is_dir(as_location(tmp_path / "missing"))


# --- listing -----------------------------------------------------------------

def test_list_files_gives_relative_paths_and_sizes_sorted(tmp_path):
    root = tmp_path / "root"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "z.bin").write_bytes(b"12345")
    (root / "a.txt").write_bytes(b"")
    (root / "b" / "c.json").write_bytes(b"{}")
    (root / "b" / "deep" / "d").write_bytes(b"x" * 300)
    expected = [("a.txt", 0), ("b/c.json", 2), ("b/deep/d", 300), ("z.bin", 5)]
    assert storage.list_files(str(root)) == expected
    assert storage.list_files(uri(root)) == expected
    assert storage.list_files(str(root) + "/") == expected


def test_list_files_not_recursive_stays_at_the_top(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "top.txt").write_bytes(b"abc")
    (tmp_path / "sub" / "inner.txt").write_bytes(b"abcd")
    assert storage.list_files(str(tmp_path), recursive=False) == [("top.txt", 3)]


def test_list_files_of_a_missing_folder_is_empty(tmp_path):
    assert storage.list_files(str(tmp_path / "nothing")) == []
    assert storage.list_files(uri(tmp_path / "nothing")) == []


# --- bytes, JSON, Parquet ----------------------------------------------------

def test_write_bytes_creates_parent_folders_and_reads_back(tmp_path):
    target = tmp_path / "x" / "y" / "z.bin"
    data = bytes(range(256)) * 10
    storage.write_bytes(str(target), data)
    assert target.read_bytes() == data
    assert storage.read_bytes(str(target)) == data
    assert storage.read_bytes(uri(target)) == data


def test_write_bytes_through_a_file_uri(tmp_path):
    storage.write_bytes(uri(tmp_path / "new" / "f.bin"), b"payload")
    assert (tmp_path / "new" / "f.bin").read_bytes() == b"payload"


def test_write_bytes_leaves_no_tmp_file_and_replaces_the_old_content(tmp_path):
    target = tmp_path / "d" / "model.pt"
    storage.write_bytes(str(target), b"old content that is longer")
    storage.write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.pt"]
    assert not os.path.exists(str(target) + ".tmp")


def test_a_reader_never_sees_half_a_file(tmp_path):
    """While one thread rewrites a 2 MB file, every read is one whole version."""
    target = str(tmp_path / "big.bin")
    versions = [bytes([v]) * (2 << 20) for v in range(4)]
    storage.write_bytes(target, versions[0])
    seen, stop = [], threading.Event()

    def read_loop():
        while not stop.is_set():
            seen.append(storage.read_bytes(target))

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for i in range(40):
            storage.write_bytes(target, versions[i % len(versions)])
    finally:
        stop.set()
        reader.join()
    assert seen
    for data in seen:
        assert data in versions, f"a read returned {len(data)} bytes, not one whole version"
    assert not os.path.exists(target + ".tmp")
    assert not [n for n in os.listdir(os.path.dirname(target)) if n.endswith(".tmp")]


def test_json_round_trip(tmp_path):
    obj = {"arch": "test_resnet", "num_classes": 3, "sizes": [16, 24], "nested": {"a": None, "b": 0.5}}
    for location in (str(tmp_path / "a" / "c.json"), uri(tmp_path / "b" / "c.json")):
        storage.write_json(location, obj)
        assert storage.read_json(location) == obj


def test_write_json_turns_unknown_types_into_strings(tmp_path):
    location = str(tmp_path / "c.json")
    storage.write_json(location, {"path": tmp_path})
    assert storage.read_json(location) == {"path": str(tmp_path)}


def test_parquet_round_trip(tmp_path):
    table = pa.table({
        "sample_id": ["a", "b", "c"],
        "fold": pa.array([0, 1, 2], pa.int32()),
        "probs": pa.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]], pa.list_(pa.float32())),
    })
    for location in (str(tmp_path / "x" / "t.parquet"), uri(tmp_path / "y" / "t.parquet")):
        storage.write_parquet(location, table)
        back = storage.read_parquet(location)
        assert back.equals(table)
        assert back.schema == table.schema
    assert not os.path.exists(str(tmp_path / "x" / "t.parquet.tmp"))
    assert not list((tmp_path / "x").glob("*.tmp"))


# --- deleting ----------------------------------------------------------------

def test_delete_dir_removes_a_tree(tmp_path):
    root = tmp_path / "exp"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"x")
    (tmp_path / "keep.txt").write_bytes(b"k")
    storage.delete_dir(str(root))
    assert not root.exists()
    assert (tmp_path / "keep.txt").read_bytes() == b"k"


def test_delete_dir_through_a_file_uri(tmp_path):
    (tmp_path / "exp" / "a").mkdir(parents=True)
    storage.delete_dir(uri(tmp_path / "exp"))
    assert not (tmp_path / "exp").exists()


def test_delete_dir_ignores_a_missing_folder_and_a_file(tmp_path):
    storage.delete_dir(str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_bytes(b"stay")
    storage.delete_dir(str(tmp_path / "file.txt"))
    assert (tmp_path / "file.txt").read_bytes() == b"stay"
