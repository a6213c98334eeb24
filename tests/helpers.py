"""Plain helpers for the tests: real image files, each task's real data layout, process state, ports, S3 URIs.

Imported with ``from helpers import make_paddy``: pytest's default (prepend)
import mode puts tests/ on sys.path when it loads tests/conftest.py, so test
modules in every folder below import this module by its bare name. Fixtures
and pytest hooks are in conftest.py; nothing here is a fixture.

Image content depends on the class (a class colour, a class-specific stripe
period and orientation, plus noise), so a tiny model can learn something and
two classes never produce identical files.

- ``write_image(path, kind, size, seed, cls)``: one image file;
  ``class_pixels(cls, size, seed)`` its RGB content; ``IMAGE_KINDS``,
  ``CLASS_COLOURS``.
- ``make_paddy``, ``make_deepfake_folders``, ``make_deepfake_csv``,
  ``make_imagefolder``: a tiny dataset in a task's layout; each returns its
  root. ``PADDY_CLASSES``: paddy's class names, deliberately unsorted.
- ``truncate_file(path)``: cut an image file in half (a "broken download").
- ``prepare_experiment(argv, experiment)``: searchspace.run's data step only
  (folds.parquet, test.parquet, experiment.json; no Ray); returns the TrialContext.
- ``write_weights(folder, archs)``: ``<arch>.pth`` (seed 0) for each arch,
  the offline "pretrained" weights a search finds through --weights-dir.
- ``environment(env, cwd)``: a block with this environment and working
  directory, both restored after it.
- ``ray_temp_dir(tmp_path_factory)``: a temp dir short enough for Ray's sockets.
- ``without_session_ray(tmp_path_factory)``: a block with no Ray connection in
  this process; an equivalent local Ray again after it (for tests that start
  their own Ray while conftest's ``ray_session`` may be up).
- ``machine_share(folder, exclusive)``: a block that holds a readers-writer
  lock shared by every process that uses the same folder (conftest's
  ``exclusive`` tests under pytest-xdist).
- ``free_port()``: a TCP port on 127.0.0.1 that nothing listened on a moment ago.
- ``MOTO_CREDENTIALS``: moto's dummy AWS credentials (and no metadata lookups);
  ``uri(endpoint, bucket, key)``: an s3:// URI that pyarrow opens against
  moto's server at ``endpoint`` (conftest's ``moto_endpoint`` and ``s3``).
"""
from __future__ import annotations

import contextlib
import csv
import html.parser
import os
import random
import socket
import tempfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

# --- images ------------------------------------------------------------------

IMAGE_KINDS = ("rgb", "gray", "rgba", "palette", "16bit")

# Distinct RGB colours, one per class (cycled beyond eight classes).
CLASS_COLOURS = [
    (220, 40, 40), (40, 190, 40), (40, 60, 220), (220, 200, 40),
    (200, 40, 200), (40, 200, 200), (240, 140, 20), (120, 120, 120),
]


def class_pixels(cls: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """HxWx3 uint8 RGB: the class colour, class-dependent stripes and a little noise."""
    w, h = size
    rng = np.random.default_rng(seed)
    colour = np.array(CLASS_COLOURS[cls % len(CLASS_COLOURS)], np.float32)
    img = np.empty((h, w, 3), np.float32)
    img[:] = colour
    period = 2 + cls % 4
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx if cls % 2 else yy) // period) % 2 == 0
    img[stripes] *= 0.55
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path, kind: str = "rgb", size: tuple[int, int] = (32, 32), seed: int = 0,
                cls: int = 0) -> Path:
    """Write one real image file and return its path.

    kind: ``rgb`` (3 channels), ``gray`` (1 channel), ``rgba`` (4 channels,
    PNG only), ``palette`` (Pillow mode P, PNG only) or ``16bit`` (3-channel
    uint16 PNG). The format follows the suffix (.jpg/.jpeg or .png). ``size``
    is (width, height); ``cls`` picks the class-dependent content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = class_pixels(cls, size, seed)
    jpeg = path.suffix.lower() in (".jpg", ".jpeg")
    if jpeg and kind not in ("rgb", "gray"):
        raise ValueError(f"{kind} images need a .png name, not {path.name}")
    if kind == "rgb":
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    elif kind == "gray":
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    elif kind == "rgba":
        alpha = np.full(rgb.shape[:2] + (1,), 200, np.uint8)
        ok = cv2.imwrite(str(path), np.concatenate([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), alpha], 2))
    elif kind == "palette":
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path)
        ok = True
    elif kind == "16bit":
        ok = cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR).astype(np.uint16) * 257)
    else:
        raise ValueError(f"unknown kind {kind!r}; one of {IMAGE_KINDS}")
    assert ok, f"could not write {path}"
    return path


def truncate_file(path) -> Path:
    """Keep only the first half of a file's bytes (a broken download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _write_csv(path: Path, header: list[str], rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


# --- task layouts ------------------------------------------------------------

# Deliberately not in sorted order, so tests can see that labels are encoded
# in sorted class-name order and not in order of appearance.
PADDY_CLASSES = ["tungro", "blast", "normal", "hispa", "brown_spot", "dead_heart", "downy_mildew",
                 "bacterial_panicle_blight"]


def make_paddy(root, classes: int = 3, per_class: int = 6, test: int = 4, size=(32, 32),
               kinds: list[str] | None = None, seed: int = 0) -> Path:
    """The Kaggle paddy layout; returns ``root``.

    train.csv (image_id,label,variety,age); train_images/<label>/<image_id>;
    test_images/<image_id>; sample_submission.csv (image_id,label) in a
    shuffled order. Ids are ``100000.jpg``, ``100001.jpg``...; test ids
    ``200000.jpg``... With ``kinds`` (cycled over the training images), the
    images are PNG files of those kinds and ids end in ``.png``. ``test=0``
    writes no test_images/ folder and no sample_submission.csv.
    """
    root = Path(root)
    rng = random.Random(seed)
    rows = []
    n = 0
    for c in range(classes):
        label = PADDY_CLASSES[c]
        for j in range(per_class):
            kind = kinds[n % len(kinds)] if kinds else "rgb"
            image_id = f"{100000 + n}" + (".png" if kinds else ".jpg")
            write_image(root / "train_images" / label / image_id, kind, size, seed=seed * 1000 + n, cls=c)
            rows.append((image_id, label, ["ADT45", "KarnatakaPonni"][j % 2], 45 + j))
            n += 1
    rng.shuffle(rows)  # the CSV is not grouped by class
    _write_csv(root / "train.csv", ["image_id", "label", "variety", "age"], rows)
    if test:
        ids = [f"{200000 + i}.jpg" for i in range(test)]
        for i, image_id in enumerate(ids):
            write_image(root / "test_images" / image_id, "rgb", size, seed=seed * 1000 + 500 + i, cls=i % classes)
        order = ids[:]
        rng.shuffle(order)
        if order == sorted(order) and len(order) > 1:
            order.reverse()  # never the file-listing order, so the test sees the reordering
        _write_csv(root / "sample_submission.csv", ["image_id", "label"], [(i, "") for i in order])
    return root


def make_deepfake_folders(root, per_class: int = 5, valid: int = 2, test: int = 2, size=(32, 32),
                          valid_name: str = "valid", test_classes: bool = True) -> Path:
    """{train,valid,test}/{real,fake}/<image>.jpg; returns ``root``.

    ``valid`` and ``test`` are images per class (0 leaves the folder out);
    ``test_classes=False`` writes a flat test/ folder.
    """
    root = Path(root)
    n = 0
    for split, count in (("train", per_class), (valid_name, valid), ("test", test)):
        for c, label in enumerate(("fake", "real")):
            for j in range(count):
                sub = root / split / label if (split != "test" or test_classes) else root / split
                write_image(sub / f"{split}_{label}_{j}.jpg", "rgb", size, seed=n, cls=c)
                n += 1
    return root


def make_deepfake_csv(root, with_ext: bool = True, test_csv: bool = True, per_class: int = 5,
                      valid: int = 2, test: int = 3, size=(32, 32)) -> Path:
    """train.csv and validation.csv (image_id,label) with train/, validation/, test/; returns ``root``.

    Files are ``<split>_<k>.jpg``; ids in the CSVs keep the ``.jpg`` when
    ``with_ext`` and drop it otherwise. ``test_csv`` writes test.csv listing
    the test ids in reverse file order.
    """
    root = Path(root)
    n = 0
    for split, count in (("train", per_class), ("validation", valid)):
        rows = []
        for c, label in enumerate(("FAKE", "REAL")):
            for j in range(count):
                name = f"{split}_{label.lower()}_{j}"
                write_image(root / split / f"{name}.jpg", "rgb", size, seed=n, cls=c)
                rows.append((name + (".jpg" if with_ext else ""), label))
                n += 1
        _write_csv(root / f"{split}.csv", ["image_id", "label"], rows)
    ids = []
    for k in range(test):
        write_image(root / "test" / f"test_{k}.jpg", "rgb", size, seed=n, cls=k % 2)
        ids.append(f"test_{k}" + (".jpg" if with_ext else ""))
        n += 1
    if test_csv:
        _write_csv(root / "test.csv", ["image_id"], [(i,) for i in reversed(ids)])
    return root


def make_imagefolder(root, classes: int = 3, per_class: int = 4, test: bool = True, train_subdir: bool = False,
                     size=(32, 32)) -> Path:
    """<class>/<image>.png (or train/<class>/ with ``train_subdir``) and a flat test/; returns ``root``.

    Class names are ``class_c``, ``class_a``, ``class_b``... (not sorted).
    With ``test`` a flat test/ folder holds 3 unlabelled images.
    """
    root = Path(root)
    base = root / "train" if train_subdir else root
    names = ["class_c", "class_a", "class_b", "class_e", "class_d"]
    n = 0
    for c in range(classes):
        for j in range(per_class):
            write_image(base / names[c] / f"img_{j}.png", "rgb", size, seed=n, cls=c)
            n += 1
    if test:
        for j in range(3):
            write_image(root / "test" / f"t{j}.png", "rgb", size, seed=100 + j, cls=j)
    return root


# --- experiments without a search -------------------------------------------

def prepare_experiment(argv: list[str], experiment):
    """searchspace.run's data step alone (no Ray): load, check, index; returns the TrialContext.

    ``argv`` is a searchspace.run command line; folds.parquet, test.parquet
    and experiment.json are written under ``experiment``.
    """
    import dataclasses

    from searchspace.api import prepare_search
    from searchspace.config import SearchConfig
    from searchspace.run import parse_args

    args = parse_args(argv)
    config = SearchConfig.from_args(args)
    experiment = str(experiment)
    options = dataclasses.replace(config.options, storage=os.path.dirname(experiment),
                                  name=os.path.basename(experiment))
    return prepare_search(args.task, args.data, dataclasses.replace(config, options=options)).ctx


# --- offline weights ----------------------------------------------------------

def write_weights(folder, archs=("test_resnet",)) -> Path:
    """``<arch>.pth`` for each of ``archs``: the timm model's state_dict made with seed 0; returns ``folder``.

    The search spaces sample pretrained=True and there is no network, so a
    search reads its "pretrained" weights from this folder (--weights-dir).
    """
    import timm
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        torch.manual_seed(0)
        torch.save(timm.create_model(arch).state_dict(), folder / f"{arch}.pth")
    return folder


# --- process state -----------------------------------------------------------

@contextlib.contextmanager
def environment(env: dict, cwd: str):
    """Run a block with this process's environment and working directory as given, then put them back."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)


def ray_temp_dir(tmp_path_factory) -> tuple[str, bool]:
    """A temp dir for ``ray.init``: inside pytest's tmp dir when the path is short enough.

    Ray's unix sockets live under the temp dir and a socket path may not
    exceed ~107 bytes, so a long pytest path falls back to a fresh /tmp/ray*
    folder; the flag says so (the caller removes that folder when done).
    """
    temp = str(tmp_path_factory.mktemp("ray"))
    if len(temp) > 60:
        return tempfile.mkdtemp(prefix="ray", dir="/tmp"), True
    return temp, False


@contextlib.contextmanager
def without_session_ray(tmp_path_factory):
    """No Ray connection in this process inside the block; an equivalent local Ray again after it.

    ``ray_session`` may be connected when a test that needs its own Ray (a
    cluster, other credentials) starts; a driver holds one connection only, so
    it is shut down here and restarted afterwards (same CPUs and runtime_env,
    new temp dir) from the environment and working directory it had: workers
    inherit both, and the project is imported from the driver's working directory.
    """
    import ray

    previous = None
    if ray.is_initialized():
        previous = dict(num_cpus=int(ray.cluster_resources().get("CPU", 2)),
                        runtime_env=dict(ray.get_runtime_context().runtime_env or {}),
                        env=dict(os.environ), cwd=os.getcwd())
        ray.shutdown()
    try:
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if previous is not None:
            temp, _ = ray_temp_dir(tmp_path_factory)
            with environment(previous["env"], previous["cwd"]):
                ray.init(num_cpus=previous["num_cpus"], _temp_dir=temp, include_dashboard=False,
                         log_to_driver=True, runtime_env=previous["runtime_env"] or None)


# --- two tests at a time -----------------------------------------------------

@contextlib.contextmanager
def machine_share(folder, exclusive: bool):
    """A readers-writer lock over processes, on two files in ``folder``: many shared holders, or one exclusive.

    Every holder passes a turnstile on its way to the machine lock. An exclusive holder keeps the turnstile
    while it waits for the machine lock alone, so that no shared holder starts in the meantime (without it,
    two shared holders taking turns could keep it waiting forever)."""
    import fcntl

    with open(Path(folder) / "turnstile.lock", "a") as turnstile, open(Path(folder) / "machine.lock", "a") as machine:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(machine, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(machine, fcntl.LOCK_UN)


# --- ports and S3 -------------------------------------------------------------

def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, read, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    # No instance-metadata lookups (there is no network beyond 127.0.0.1).
    "AWS_EC2_METADATA_DISABLED": "true",
}


def uri(endpoint: str, bucket: str, key: str = "") -> str:
    """s3://bucket/key with the pyarrow options that reach moto's server at ``endpoint`` (host:port) over HTTP."""
    return f"s3://{bucket}/{key}".rstrip("/") + f"?endpoint_override={endpoint}&scheme=http"


# --- report pages -----------------------------------------------------------------

class Links(html.parser.HTMLParser):
    """Every src/href, every <img> src, and the text of each table cell, in order."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.tables, self.scripts = [], [], [], 0
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.links += [v for k, v in attrs.items() if k in ("src", "href") and v is not None]
        if tag == "img":
            self.images.append(attrs.get("src"))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self.tables.append([])
        if tag == "tr" and self.tables:
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None


def parse(index: Path) -> Links:
    p = Links()
    p.feed(index.read_text())
    return p
