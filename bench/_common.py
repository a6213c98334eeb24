"""Shared helpers for the benchmark scripts: the machine line, markdown tables, results files, Ray.

Importing this module puts the repository root on ``sys.path`` (and on
``PYTHONPATH``, so Ray workers started later import the same packages) and
sets ``NO_ALBUMENTATIONS_UPDATE=1``.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
import tempfile

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
RESULTS = os.path.join(BENCH, "results")

os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
if REPO not in sys.path:
    sys.path.insert(0, REPO)
_pp = os.environ.get("PYTHONPATH", "")
if REPO not in _pp.split(os.pathsep):
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + _pp if _pp else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def gpu_name() -> str | None:
    import torch
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    return None


def machine_line() -> str:
    """One line: date, CPU model, cores, RAM, GPU (or none), library versions."""
    import torch
    cores = os.cpu_count()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = cores
    cores_text = f"{cores} cores" + (f" ({usable} usable)" if usable != cores else "")
    return (f"{datetime.datetime.now():%Y-%m-%d %H:%M} | {_cpu_model()} | {cores_text} | "
            f"{_ram_gib():.0f} GiB RAM | GPU: {gpu_name() or 'none'} | "
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
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{script}.md")
    with open(path, "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    print(f"(written to {os.path.relpath(path, os.getcwd())})", flush=True)
    return text


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def start_ray():
    """A local Ray with every core, its temp dir short enough for Ray's unix sockets (searchspace's own start-up)."""
    import ray

    from searchspace.ray_start import start_ray as start
    if not ray.is_initialized():
        start(num_cpus=os.cpu_count(), temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"), include_dashboard=False,
              env={"PYTHONPATH": os.environ["PYTHONPATH"]})
    return ray


def prepare_digits_cache(cache_dir: str, folds: int, seed: int, sizes, modes=("squish", "crop", "letterbox"),
                         workers: int | None = None):
    """Write the digits PNGs and build the node cache for every (size, mode), exactly as a search keys it.

    Returns (data folder, the index DataFrame with folds, class names, cache key). The key is
    computed the way searchspace.prepare.prepare computes it (fingerprint of the
    index's paths and byte sizes), so later trials find these entries warm.
    """
    from core import storage
    from searchspace.data import build_index
    from searchspace.tasks import digits
    from trainer.cache import cached_images, fingerprint

    cache_dir = os.path.abspath(cache_dir)
    data = storage.absolute(digits.default_data(cache_dir))
    dataset = digits.load(data)
    index, classes = build_index(dataset.train.reset_index(drop=True), folds, seed)
    paths = index["path"].tolist()
    key = fingerprint(paths, [os.path.getsize(p) for p in paths])
    for size in sizes:
        for mode in modes:
            cached_images(paths, key, int(size), mode, cache_dir, workers=workers or os.cpu_count())
    return data, index, classes, key
