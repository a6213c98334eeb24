"""Benchmark: images per second delivered to the model, classic decode-per-image vs the node cache.

Every path hands the model a normalised (B, 3, 224, 224) float batch from the same JPEGs (640x480, quality 90, made
from scikit-image's photos): A classic DataLoader decoding each image + albumentations; B our node cache +
albumentations (0 and 2 workers); C kornia on CPU over the cache. Cold: one cache build against one epoch of A.

    python bench/input_pipeline.py                                  # full run
    python bench/input_pipeline.py --images 200 --measure 256 --kornia-measure 64 --repeats 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cv2  # noqa: E402
import harness  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SCRIPT = "input_pipeline"
SIZE = 224
WIDTH, HEIGHT, QUALITY = 640, 480, 90
DATA_VERSION = 1
# Bundled colour photos (no download). Any that needs pooch is skipped.
SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "stereo_motorcycle", "colorwheel", "cat")


# --- data ----------------------------------------------------------------------

def source_photos() -> dict[str, np.ndarray]:
    import skimage.data
    out = {}
    for name in SOURCES:
        try:
            img = getattr(skimage.data, name)()
        except Exception as e:  # needs a download (pooch) or not in this version
            print(f"  skipping skimage.data.{name}: {type(e).__name__}", file=sys.stderr)
            continue
        if isinstance(img, tuple):  # stereo pairs
            img = img[0]
        if img.ndim == 3 and img.shape[2] >= 3 and img.dtype == np.uint8:
            out[name] = np.ascontiguousarray(img[..., :3])
    if not out:
        raise SystemExit("no bundled scikit-image colour photo could be loaded")
    return out


def one_photo(src: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random 4:3-ish crop of a source, resized to 640x480, colour-jittered, flipped, noised; BGR uint8."""
    h, w = src.shape[:2]
    area = rng.uniform(0.3, 1.0) * h * w
    ratio = (WIDTH / HEIGHT) * np.exp(rng.uniform(-0.2, 0.2))
    ch = int(min(h, np.sqrt(area / ratio)))
    cw = int(min(w, ch * ratio))
    y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = src[y0:y0 + ch, x0:x0 + cw]
    shrink = cw * ch > WIDTH * HEIGHT
    img = cv2.resize(crop, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-10, 10)) % 180
    hsv[..., 1] *= rng.uniform(0.7, 1.3)
    img = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.7, 1.3) + mean * rng.uniform(0.7, 1.3)
    img += rng.normal(0, rng.uniform(1.0, 4.0), img.shape).astype(np.float32)  # sensor noise
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return cv2.cvtColor(np.clip(img, 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)


def make_jpegs(workdir: str, n: int, seed: int) -> list[str]:
    """n JPEGs in <workdir>/jpeg, reused when a previous run wrote the same set."""
    folder = os.path.join(workdir, "jpeg")
    manifest = os.path.join(folder, "manifest.json")
    want = dict(n=n, seed=seed, version=DATA_VERSION, size=[WIDTH, HEIGHT], quality=QUALITY)
    paths = [os.path.join(folder, f"{i:05d}.jpg") for i in range(n)]
    if os.path.exists(manifest):
        with open(manifest) as f:
            if json.load(f) == want and all(os.path.exists(p) for p in paths):
                return paths
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    photos = list(source_photos().values())
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        img = one_photo(photos[int(rng.integers(len(photos)))], rng)
        if not cv2.imwrite(path, img, [cv2.IMWRITE_JPEG_QUALITY, QUALITY]):
            raise SystemExit(f"cannot write {path}")
    with open(manifest, "w") as f:
        json.dump(want, f)
    print(f"wrote {n} JPEGs ({len(photos)} source photos) in {time.perf_counter() - t0:.1f} s", flush=True)
    return paths


# --- the paths -----------------------------------------------------------------

class ClassicJpegs(torch.utils.data.Dataset):
    """The seeds' loader: decode every JPEG in __getitem__, augment at full resolution."""

    def __init__(self, paths, labels, transform):
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = cv2.cvtColor(cv2.imread(self.paths[i], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        return self.transform(image=img)["image"], int(self.labels[i])


def classic_transform(policy):
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    from trainer.augment import RATIO
    j = policy.color_jitter
    # The same ranges as trainer.augment.albumentations_pipeline, so only decoding and resizing differ.
    return A.Compose([
        A.RandomResizedCrop(size=(SIZE, SIZE), scale=(policy.scale_min, 1.0), ratio=RATIO),
        A.HorizontalFlip(p=policy.hflip),
        A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4, p=0.8),
        A.Normalize(),
        ToTensorV2(),
    ])


def loader(dataset, batch: int, workers: int, total: int | None, seed: int):
    """total: images to draw (several shuffled passes when larger than the data); None: one epoch."""
    g = torch.Generator().manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=total, generator=g)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                       drop_last=total is not None)


def throughput(make_loader, finish, images: int, batch: int, warmup: int) -> tuple[float, float]:
    """(img/s, seconds) over `images` images, after `warmup` batches (worker start-up excluded)."""
    it = iter(make_loader(images + warmup * batch))
    with torch.no_grad():
        for _ in range(warmup):
            x = finish(next(it))
        assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32, (x.shape, x.dtype)
        seen, t0 = 0, time.perf_counter()
        while seen < images:
            x = finish(next(it))
            seen += len(x)
        seconds = time.perf_counter() - t0
    del it
    return seen / seconds, seconds


def gpu_share(images: np.ndarray, policy, batch: int, steps: int) -> list[str]:
    """kornia augmentation time against a resnet50 fwd+bwd+step at 224 px, on the GPU."""
    from trainer.augment import kornia_pipeline
    from trainer.inference import norm_stats, to_input
    from trainer.model import create

    dev = torch.device("cuda")
    aug = kornia_pipeline(policy).to(dev)
    model = create("resnet50", 1000, SIZE).to(dev).to(memory_format=torch.channels_last)
    mean, std = norm_stats(model, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    rows = np.arange(batch) % len(images)
    batch_u8 = torch.from_numpy(np.asarray(images[rows])).to(dev)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def aug_only():
        with torch.no_grad():
            return to_input(batch_u8, mean, std, aug)

    def step():
        x = to_input(batch_u8, mean, std)
        with torch.autocast("cuda", dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps * 1000

    aug_ms, step_ms = timed(aug_only), timed(step)
    share = aug_ms / (aug_ms + step_ms)
    return [f"GPU ({harness.gpu_name()}): kornia augmentation {aug_ms:.2f} ms per batch of {batch}, "
            f"resnet50 fwd+bwd+step {step_ms:.2f} ms (bf16/fp16 autocast, channels_last): "
            f"augmentation {share:.1%} of the step time; target <= 10%: {harness.met(share <= 0.10)}"]


# --- main ----------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000, help="JPEG files to write and use (default 1000)")
    ap.add_argument("--workdir", default="/tmp/bench_input_pipeline", help="JPEGs and caches go here")
    ap.add_argument("--measure", type=int, default=2048, help="images timed per path, after the warm-up")
    ap.add_argument("--kornia-measure", type=int, default=512, help="images timed for kornia on CPU (slow)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=1, help="warm-up batches before timing")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per path; the median is reported")
    ap.add_argument("--classic-workers", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=20, help="timed steps for the GPU share (GPU only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-caches", action="store_true", help="keep the cache folders built by this run")
    a = ap.parse_args()
    # CachedImages wraps the read-only memmap without a copy (kornia path); harmless here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

    from trainer.augment import AugPolicy, albumentations_pipeline, kornia_pipeline
    from trainer.cache import cached_images, fingerprint
    from trainer.fit import CachedImages
    from trainer.inference import norm_stats, to_input

    os.makedirs(a.workdir, exist_ok=True)
    paths = make_jpegs(a.workdir, a.images, a.seed)
    sizes = [os.path.getsize(p) for p in paths]
    labels = np.random.default_rng(a.seed).integers(0, 10, len(paths))
    policy = AugPolicy(size=SIZE, scale_min=0.35, hflip=0.5, color_jitter=0.4)
    mean, std = norm_stats(type("M", (), {"pretrained_cfg": {}})(), "cpu")  # ImageNet statistics
    key = fingerprint(paths, sizes)
    print(f"{len(paths)} JPEGs {WIDTH}x{HEIGHT} q{QUALITY}, mean {np.mean(sizes) / 1024:.0f} KiB; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    # Cold cost: the cache built once in a fresh folder (workers = threads), and one classic epoch.
    cold = {}
    keep = None
    for workers in sorted({os.cpu_count() or 1, 1}, reverse=True):
        d = os.path.join(a.workdir, f"cache-cold-{workers}w-{os.getpid()}")
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        cached_images(paths, key, SIZE, "squish", d, workers=workers)
        cold[workers] = time.perf_counter() - t0
        print(f"cache build, {workers} thread(s): {cold[workers]:.2f} s", flush=True)
        if keep is None:
            keep = d
        elif not a.keep_caches:
            shutil.rmtree(d, ignore_errors=True)
    cache = cached_images(paths, key, SIZE, "squish", keep)  # warm: the built entry

    classic_ds = ClassicJpegs(paths, labels, classic_transform(policy))
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader(classic_ds, a.batch, a.classic_workers, None, a.seed):
        n += len(x)
    epoch_s = time.perf_counter() - t0
    print(f"one classic epoch ({n} images, {a.classic_workers} workers, start-up included): {epoch_s:.2f} s",
          flush=True)

    rows = np.arange(len(paths))
    ours_ds = CachedImages(cache, rows, labels, albumentations_pipeline(policy))
    raw_ds = CachedImages(cache, rows, labels, None)
    kornia = kornia_pipeline(policy)
    paths_to_time = [
        ("A classic (seeds): cv2 decode + albumentations at full size", a.classic_workers, a.measure,
         lambda total: loader(classic_ds, a.batch, a.classic_workers, total, a.seed),
         lambda b: b[0]),
        ("B ours, CPU: cache + albumentations, to_input", 0, a.measure,
         lambda total: loader(ours_ds, a.batch, 0, total, a.seed),
         lambda b: to_input(b[0], mean, std)),
        ("B ours, CPU: cache + albumentations, to_input", 2, a.measure,
         lambda total: loader(ours_ds, a.batch, 2, total, a.seed),
         lambda b: to_input(b[0], mean, std)),
        ("C kornia on CPU: cache uint8 batch, to_input + kornia", 0, a.kornia_measure,
         lambda total: loader(raw_ds, a.batch, 0, total, a.seed),
         lambda b: to_input(b[0], mean, std, kornia)),
    ]
    results = []
    for name, workers, images, make, finish in paths_to_time:
        runs = [throughput(make, finish, images, a.batch, a.warmup) for _ in range(a.repeats)]
        rate = statistics.median(r[0] for r in runs)
        results.append((name, workers, images, rate, [r[0] for r in runs]))
        print(f"{name} [{workers} workers]: {rate:.0f} img/s (runs: {', '.join(f'{r[0]:.0f}' for r in runs)})",
              flush=True)

    classic_rate = results[0][3]
    table = [[name, workers, images, f"{rate:.0f}", f"{rate / classic_rate:.2f}x"]
             for name, workers, images, rate, _ in results]
    body = harness.md_table(["path", "loader workers", "images timed", "img/s (median)", "vs classic"], table)
    ours_best = max(results[1:3], key=lambda r: r[3])
    cold_rows = [[f"cache build, {w} thread(s), fresh folder", f"{s:.2f}", f"{s / epoch_s:.2f}x"]
                 for w, s in cold.items()]
    cold_rows.append([f"one epoch of A ({len(paths)} images, {a.classic_workers} workers, start-up included)",
                      f"{epoch_s:.2f}", "1.00x"])
    body += "\n\nCold cost (same files):\n\n" + harness.md_table(["what", "seconds", "vs classic epoch"], cold_rows)

    build_s = cold[max(cold)]
    notes = [
        f"data: {len(paths)} JPEGs {WIDTH}x{HEIGHT}, quality {QUALITY}, mean {np.mean(sizes) / 1024:.0f} KiB, "
        f"from scikit-image's bundled photos (random crop, colour jitter, noise); in the OS page cache for every path",
        f"every path delivers a normalised float32 batch ({a.batch}, 3, {SIZE}, {SIZE}); policy: "
        f"RandomResizedCrop scale 0.35-1, hflip 0.5, ColorJitter 0.4 (p 0.8); cache: {SIZE} px squish",
        f"timing starts after {a.warmup} warm-up batch(es) (worker start-up excluded); median of {a.repeats} run(s)",
        f"target warm CPU path >= 5x classic: best ours ({ours_best[1]} workers) {ours_best[3] / classic_rate:.1f}x: "
        f"{harness.met(ours_best[3] >= 5 * classic_rate)}",
        f"target cache build <= one classic epoch: {build_s:.2f} s vs {epoch_s:.2f} s "
        f"({max(cold)} threads): {harness.met(build_s <= epoch_s)}"
        + (f"; with 1 thread: {cold[1]:.2f} s (a trial builds with all the node's cores)"
           if 1 in cold and max(cold) != 1 else ""),
    ]
    if torch.cuda.is_available():
        notes += gpu_share(cache, policy, a.batch, a.gpu_steps)
    else:
        notes.append("GPU: kornia augmentation share of a resnet50 step (target <= 10%): no GPU")
    harness.report(SCRIPT, "Input pipeline: images per second to the model (224 px)", body, notes)
    if not a.keep_caches:
        shutil.rmtree(keep, ignore_errors=True)


if __name__ == "__main__":
    main()
