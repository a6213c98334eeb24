"""One trial: train one config on one fold, reporting to Ray Tune every epoch.

``train_trial(config, ctx)`` is the Tune trainable. ``config`` holds the
sampled hyperparameters (for a cross-fit job: ``{"job": {..., "fold": k,
"epochs": n}}``); ``ctx`` holds what every trial of a run shares: where the
experiment and the node cache are, the task's metric, the epoch budget and the
resources. The loop reads top to bottom: data, device, model, optimiser,
resume, epochs.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from trainer import storage
from trainer.augment import AugPolicy, albumentations_pipeline, kornia_pipeline, mix_batch
from trainer.cache import cached_images
from trainer.inference import norm_stats, predict_probs, save_weights, to_input
from trainer.metrics import METRICS, log_loss
from trainer.model import class_weights, create


class CachedImages(torch.utils.data.Dataset):
    """Rows of the node cache as uint8 HxWx3 tensors, optionally augmented (CPU path)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.rows, self.labels, self.transform = images, rows, labels, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = self.images[self.rows[i]]
        # The cache is mapped read-only: augmenting or copying gives torch its own array.
        img = self.transform(image=img)["image"] if self.transform is not None else np.array(img)
        return torch.from_numpy(np.ascontiguousarray(img)), int(self.labels[self.rows[i]])


def probs_table(sample_ids, probs: np.ndarray) -> pa.Table:
    """sample_id + probs as a fixed-size list of float32 (the experiment contract)."""
    flat = pa.array(np.ascontiguousarray(probs, np.float32).ravel(), pa.float32())
    return pa.table({"sample_id": pa.array([str(s) for s in sample_ids], pa.string()),
                     "probs": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1])})


def node_cache_dir(ctx: dict) -> str:
    """This node's image cache: SEARCHSPACE_CACHE_DIR in the node's environment (say, a
    local NVMe disk set in cluster.yaml) wins over the driver's --cache-dir."""
    return os.environ.get("SEARCHSPACE_CACHE_DIR") or ctx["cache_dir"]


def probs_array(table: pa.Table) -> np.ndarray:
    """The probs column back as an (n, C) float32 array, read as one flat buffer."""
    probs = table.column("probs").combine_chunks()
    if len(probs) == 0:
        return np.zeros((0, 0), np.float32)
    return probs.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(probs), probs.type.list_size)


def warmup_cosine(warmup_steps: int, total_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


def train_trial(config: dict, ctx: dict) -> None:
    import ray
    from ray import tune

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint otherwise
    hp = dict(config.get("job", config))
    fold = int(hp.get("fold", 0))
    epochs = int(hp.get("epochs", ctx["max_epochs"]))
    cpus = max(1, int(ctx.get("cpus_per_trial", 1)))
    torch.set_num_threads(cpus)
    seed = int(ctx.get("seed", 0)) + fold
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # --- data: the node cache, split by fold; nothing is decoded from here on
    index = storage.read_parquet(storage.join(ctx["experiment"], "folds.parquet")).to_pandas()
    size, mode = int(hp["image_size"]), hp.get("resize_mode", "squish")
    images = cached_images(index["path"].tolist(), ctx["data_key"], size, mode,
                           node_cache_dir(ctx), workers=os.cpu_count() or 1)
    labels = index["label"].to_numpy()
    num_classes = int(ctx["num_classes"])
    train_rows = np.flatnonzero(index["fold"].to_numpy() != fold)
    hold_rows = np.flatnonzero(index["fold"].to_numpy() == fold)

    # --- device and augmentation backend (kornia on a GPU, albumentations on CPU)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = ctx.get("aug_backend") or ("kornia" if device.type == "cuda" else "albumentations")
    policy = AugPolicy.from_config(hp)
    on_device_aug = kornia_pipeline(policy).to(device) if backend == "kornia" else None
    dataset = CachedImages(images, train_rows, labels,
                           albumentations_pipeline(policy, seed) if backend == "albumentations" else None)
    batch_size = min(int(hp.get("batch_size", 64)), len(train_rows))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, drop_last=True,
        num_workers=cpus - 1 if backend == "albumentations" else min(2, cpus - 1),
        pin_memory=device.type == "cuda", persistent_workers=cpus > 1,
        generator=torch.Generator().manual_seed(seed))

    # --- model, loss, optimiser, schedule
    # (A fold-0 cross-fit job loads the search trial's weights: no download.)
    pretrained = bool(hp.get("pretrained", False)) and not hp.get("from_checkpoint")
    model = create(hp["arch"], num_classes, size, pretrained=pretrained,
                   weights_dir=ctx.get("weights_dir"), freeze_fraction=float(hp.get("freeze_fraction", 0)))
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    mean, std = norm_stats(model, device)
    weights = class_weights(labels[train_rows], num_classes, float(hp.get("class_weight_power", 0))).to(device)
    smoothing = float(hp.get("label_smoothing", 0))
    params = [p for p in model.parameters() if p.requires_grad]
    lr, wd = float(hp.get("lr", 1e-3)), float(hp.get("weight_decay", 0.0))
    if hp.get("optimizer", "adamw") == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    steps = epochs * len(loader)
    warmup = int(float(hp.get("warmup_fraction", 0.05)) * steps)
    if hp.get("schedule", "cosine") == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=max(warmup / max(1, steps), 0.05))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, steps))
    amp = dict(device_type=device.type, enabled=device.type == "cuda",
               dtype=torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16)
    scaler = torch.amp.GradScaler(enabled=device.type == "cuda" and amp["dtype"] == torch.float16)

    # --- resume: a restarted trial continues from its last checkpoint; a
    # cross-fit job for fold 0 starts from the search trial's own checkpoint
    start_epoch = 0
    checkpoint = tune.get_checkpoint()
    if hp.get("from_checkpoint") and checkpoint is None:
        model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(
            storage.join(hp["from_checkpoint"], "model.pt"))), map_location=device, weights_only=True))
        start_epoch = epochs
    elif checkpoint is not None:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "model.pt"), map_location=device, weights_only=True))
            state = torch.load(os.path.join(d, "train_state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])

    node_id = ray.get_runtime_context().get_node_id()
    metric_name = ctx["metric"]
    metric_fn = METRICS[metric_name][0]
    resolved = {**hp, "fold": fold, "epochs": epochs, "num_classes": num_classes, "image_size": size,
                "resize_mode": mode, "aug_backend": backend, "metric": metric_name}

    # --- epochs: train, score the holdout fold, checkpoint, report
    for epoch in range(start_epoch, epochs):
        model.train()
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        for batch, y in loader:
            batch, y = batch.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                x = to_input(batch, mean, std, on_device_aug)
            target = F.one_hot(y, num_classes).float()
            x, target = mix_batch(x, target, policy, rng)
            with torch.autocast(**amp):
                loss = F.cross_entropy(model(x).float(), target, weight=weights, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
        images_per_s = seen / (time.perf_counter() - t0)

        probs = predict_probs(model, images, hold_rows)
        y_hold = labels[hold_rows]
        metrics = {metric_name: metric_fn(y_hold, probs), "val_loss": log_loss(y_hold, probs),
                   "train_loss": loss_sum / max(1, seen), "epoch": epoch + 1,
                   "images_per_s": images_per_s, "fold": fold, "node_id": node_id}
        if epoch + 1 == epochs and hp.get("candidate"):
            write_fold(ctx, hp, model, resolved, index["sample_id"].to_numpy()[hold_rows], probs)
        with tempfile.TemporaryDirectory() as d:
            save_weights(model, os.path.join(d, "model.pt"))
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1}, os.path.join(d, "train_state.pt"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({**resolved, "epoch": epoch + 1, **metrics}, f, indent=2, default=str)
            storage.write_parquet(os.path.join(d, "holdout.parquet"),
                                  probs_table(index["sample_id"].to_numpy()[hold_rows], probs))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if start_epoch == epochs and hp.get("from_checkpoint"):
        probs = predict_probs(model, images, hold_rows)
        write_fold(ctx, hp, model, resolved, index["sample_id"].to_numpy()[hold_rows], probs)
        y_hold = labels[hold_rows]
        tune.report({metric_name: metric_fn(y_hold, probs), "val_loss": log_loss(y_hold, probs),
                     "epoch": epochs, "fold": fold})


def write_fold(ctx: dict, hp: dict, model: torch.nn.Module, resolved: dict, hold_ids, hold_probs) -> None:
    """A cross-fit fold's record: its model, holdout and test predictions, then done.json.

    Written by the job itself into the experiment (not Ray's trial folder), so
    a resumed cross-fit can tell finished folds by done.json alone.
    """
    base = storage.join(ctx["experiment"], "candidates", hp["candidate"], "folds", str(resolved["fold"]))
    checkpoint = hp.get("from_checkpoint")
    if not checkpoint:
        buf = io.BytesIO()
        save_weights(model, buf)
        storage.write_bytes(storage.join(base, "model.pt"), buf.getvalue())
        storage.write_json(storage.join(base, "config.json"), resolved)
        checkpoint = base
    storage.write_parquet(storage.join(base, "holdout.parquet"), probs_table(hold_ids, hold_probs))
    if ctx.get("test_key"):
        test = storage.read_parquet(storage.join(ctx["experiment"], "test.parquet")).to_pandas()
        test_images = cached_images(test["path"].tolist(), ctx["test_key"], resolved["image_size"],
                                    resolved["resize_mode"], node_cache_dir(ctx), workers=os.cpu_count() or 1)
        probs = predict_probs(model, test_images, tta=ctx.get("tta", True))
        storage.write_parquet(storage.join(base, "test.parquet"), probs_table(test["sample_id"], probs))
    storage.write_json(storage.join(base, "done.json"), dict(checkpoint=checkpoint, fold=resolved["fold"],
                                                             epochs=resolved["epochs"]))
