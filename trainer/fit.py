"""Training one recipe on one fold, reporting to Ray Tune every epoch.

Two Tune trainables share one training loop:

- ``train_trial(config, ctx)``: a search trial, the sampled config on fold 0,
  for the run's full schedule (``ctx.max_epochs``) unless ASHA stops it.
- ``crossfit_fold(config, ctx)``: a cross-fit job ``{"job": {..., "fold": k,
  "epochs": n, "candidate": id}}``: the same recipe, the same schedule, on
  fold k, writing a fold record into the experiment when it ends. For fold 0
  it reuses the search trial's final checkpoint, which is that same training.

``ctx`` holds what every trial of a run shares: where the experiment and the
node cache are, the task's metric, the epoch budget, the resolved pretrained
weights per architecture and the resources.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from core import storage
from core.experiment import (
    CONFIG_FILE,
    HOLDOUT_FILE,
    MODEL_FILE,
    TRAIN_STATE_FILE,
    Experiment,
    TrialContext,
    probs_table,
)
from core.metrics import METRICS, log_loss
from trainer.augment import AugPolicy, albumentations_pipeline, kornia_pipeline, mix_batch
from trainer.cache import cached_images
from trainer.device import device_for
from trainer.inference import norm_stats, predict_probs, save_weights, to_input
from trainer.model import class_weights, create
from trainer.recipe import Recipe, lr_factor


class Diverged(RuntimeError):
    """A model whose predictions are no longer finite: the trial fails rather than write NaN probabilities,
    which no ensemble could use."""


def finite_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every gradient the optimiser would apply is finite (one fused norm, one sync)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)))


class CachedImages(torch.utils.data.Dataset):
    """Rows of the node cache as uint8 HxWx3 tensors, optionally augmented (CPU path)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray, transform=None,
                 yield_rows: bool = False):
        """``yield_rows``: each item's second element is its row of the index instead of its label (a
        distillation looks up both the label and the teacher's probabilities by it)."""
        self.images, self.rows, self.labels, self.transform = images, rows, labels, transform
        self.yield_rows = yield_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        img = self.images[self.rows[i]]
        # The cache is mapped read-only: augmenting or copying gives torch its own array.
        img = np.ascontiguousarray(self.transform(image=img)["image"] if self.transform is not None else img)
        if not img.flags.writeable:   # a transform that changed nothing hands back the read-only cache row
            img = img.copy()
        row = int(self.rows[i])
        return torch.from_numpy(img), row if self.yield_rows else int(self.labels[row])


@dataclass(frozen=True)
class Teacher:
    """Soft targets for a distilled student: the teacher's probabilities for every row of the index, the
    temperature that softens them, and ``alpha``, the soft loss's share (the hard labels get the rest)."""

    probs: np.ndarray
    temperature: float = 2.0
    alpha: float = 0.7

    def softened(self) -> np.ndarray:
        """p ** (1/T), renormalised: the teacher's softmax at temperature T, from its probabilities."""
        logp = np.log(np.clip(np.asarray(self.probs, np.float64), 1e-8, 1.0)) / self.temperature
        logp -= logp.max(1, keepdims=True)
        p = np.exp(logp)
        return (p / p.sum(1, keepdims=True)).astype(np.float32)


def assigned_gpus() -> list[str] | None:
    """The GPUs Ray gave this worker (several trials share one under a fractional --gpus-per-trial); None
    outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def node_cache_dir(ctx: TrialContext) -> str:
    """This node's image cache: SEARCHSPACE_CACHE_DIR in the node's environment (say, a
    local NVMe disk set in cluster.yaml) wins over the driver's --cache-dir."""
    return os.environ.get("SEARCHSPACE_CACHE_DIR") or ctx.cache_dir


def weights_file(location: str | None, cache_dir: str) -> str | None:
    """A resolved weights location as a local file: a bucket copy is fetched once into the (node) cache."""
    if location is None or not storage.is_uri(location):
        return location
    suffix = os.path.splitext(location.partition("?")[0])[1]
    local = os.path.join(cache_dir, "weights", hashlib.sha1(location.encode()).hexdigest()[:16] + suffix)
    if not os.path.exists(local):
        storage.write_bytes(local, storage.read_bytes(location))
    return local


class Run:
    """Everything one recipe needs on one fold: data, model, optimiser, schedule; ``epoch()`` trains one."""

    def __init__(self, config: dict, ctx: TrialContext, fold: int | None, epochs: int, train: bool = True,
                 teacher: Teacher | None = None):
        """``fold=None``: train on every training image (no holdout). ``train=False``: only the data and the
        model's architecture, to load finished weights into. ``teacher``: distil, the loss mixing the hard
        labels with the teacher's softened probabilities (Hinton et al., 2015)."""
        self.ctx, self.fold, self.epochs, self.teacher = ctx, fold, epochs, teacher
        self.recipe = r = Recipe.from_config(config)
        self.experiment = Experiment(ctx.experiment)
        cpus = max(1, int(ctx.cpus_per_trial))
        torch.set_num_threads(cpus)
        self.index = self.experiment.folds()
        folds = self.index["fold"].to_numpy()
        # Each fold's model has a seed of its own; the all-images model the next one.
        seed = int(ctx.seed) + (int(folds.max()) + 1 if fold is None else fold)
        torch.manual_seed(seed)
        self.rng = np.random.default_rng(seed)

        # --- data: the node cache, split by fold; nothing is decoded from here on
        self.images = cached_images(self.index["path"].tolist(), ctx.data_key, r.image_size, r.resize_mode,
                                    node_cache_dir(ctx), workers=os.cpu_count() or 1)
        self.labels = self.index["label"].to_numpy()
        self.num_classes = int(ctx.num_classes)
        held = np.zeros(len(folds), bool) if fold is None else folds == fold
        self.train_rows, self.hold_rows = np.flatnonzero(~held), np.flatnonzero(held)

        # --- device and branch (trainer.device): the accelerator branch augments on the device with kornia,
        # the plain CPU branch with albumentations in the loader's workers
        self.dev = device_for(ctx.gpu_path_on_cpu)
        self.device = device = self.dev.device
        backend = ctx.aug_backend or ("kornia" if self.dev.accelerated else "albumentations")
        self.resolved = {**r.as_dict(), "fold": fold, "epochs": epochs, "num_classes": self.num_classes,
                         "aug_backend": backend, "metric": ctx.metric, "device": device.type,
                         "accelerated": self.dev.accelerated, "gpu_ids": assigned_gpus()}
        self.skipped_steps = 0   # optimiser steps left out for a non-finite loss or gradient (step)
        if not train:
            self.model = create(r.arch, self.num_classes, r.image_size).to(device)
            return
        self.policy = AugPolicy.from_config(config)
        self.on_device_aug = kornia_pipeline(self.policy).to(device) if backend == "kornia" else None
        dataset = CachedImages(self.images, self.train_rows, self.labels,
                               albumentations_pipeline(self.policy, seed) if backend == "albumentations" else None,
                               yield_rows=teacher is not None)
        # A batch never exceeds the training fold (small data), and with drop_last
        # every step sees a full batch, so BatchNorm never gets a batch of one.
        batch_size = max(1, min(r.batch_size, len(self.train_rows)))
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True,
            num_workers=cpus - 1 if backend == "albumentations" else min(2, cpus - 1),
            pin_memory=self.dev.pin_memory, persistent_workers=cpus > 1,
            generator=torch.Generator().manual_seed(seed))

        # --- model, loss, optimiser, schedule
        weights = ctx.weights.get(r.arch)
        if r.pretrained and weights is None:
            raise RuntimeError(f"{r.arch}: the config asks for pretrained weights but none were resolved")
        model = create(r.arch, self.num_classes, r.image_size,
                       weights=weights_file(weights, node_cache_dir(ctx)) if r.pretrained else None,
                       freeze_fraction=r.freeze_fraction if r.pretrained else 0.0).to(device)
        self.model = model.to(memory_format=self.dev.memory_format())
        self.mean, self.std = norm_stats(model, device)
        if teacher is not None:
            self.labels_on_device = torch.as_tensor(np.array(self.labels)).to(device)   # a copy: the index is read-only
            self.soft_targets = torch.from_numpy(teacher.softened()).to(device)
        self.loss_weights = class_weights(self.labels[self.train_rows], self.num_classes,
                                          r.class_weight_power).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if r.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=r.lr, momentum=0.9, nesterov=True, weight_decay=r.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(r.schedule, r.warmup_fraction, epochs * len(self.loader)))
        self.scaler = self.dev.scaler()

    @property
    def hold_ids(self) -> np.ndarray:
        return self.index["sample_id"].to_numpy()[self.hold_rows]

    def restore(self, checkpoint) -> int:
        """Continue a retried trial from its last checkpoint; returns the epoch to start at."""
        if checkpoint is None:
            return 0
        with checkpoint.as_directory() as d:
            self.model.load_state_dict(torch.load(os.path.join(d, MODEL_FILE), map_location=self.device,
                                                  weights_only=True))
            state = torch.load(os.path.join(d, TRAIN_STATE_FILE), map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        return int(state["epoch"])

    def train_epoch(self) -> tuple[float, float]:
        """One pass over the training fold: (mean training loss, images/s)."""
        self.model.train()
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        for batch, y in self.loader:
            loss_sum += self.step(batch, y) * len(y)
            seen += len(y)
        return loss_sum / max(1, seen), seen / (time.perf_counter() - t0)

    def step(self, batch: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step on a uint8 batch and its labels (with a teacher: its rows); returns the loss."""
        batch, y = batch.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.no_grad():
            x = to_input(batch, self.mean, self.std, self.on_device_aug, self.dev.memory_format())
        if self.teacher is None:
            target = F.one_hot(y, self.num_classes).float()
        else:   # the hard and the soft targets side by side, so that MixUp/CutMix mix both alike
            target = torch.cat([F.one_hot(self.labels_on_device[y], self.num_classes).float(), self.soft_targets[y]], 1)
        x, target = mix_batch(x, target, self.policy, self.rng)
        self.optimizer.zero_grad(set_to_none=True)
        with self.dev.kernels():
            with self.dev.autocast():
                loss = self.loss(self.model(x).float(), target)
            self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():   # float16: the scaler itself skips a step whose gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite_gradients(self.optimizer):
            self.optimizer.step()
        else:   # one NaN gradient would make every weight NaN for good: leave this batch out, count it
            self.skipped_steps += 1
            with warnings.catch_warnings():   # the schedule keeps its length; torch would warn of the order
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
                self.scheduler.step()
            return float(loss.detach())
        self.scheduler.step()
        return float(loss.detach())

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class-weighted, label-smoothed cross-entropy on the hard targets; with a teacher, mixed with the
        KL divergence from its softened probabilities at temperature T (scaled by T^2, so its gradients keep
        their size as T changes)."""
        C = self.num_classes
        hard = F.cross_entropy(logits, target[:, :C], weight=self.loss_weights,
                               label_smoothing=self.recipe.label_smoothing)
        if self.teacher is None:
            return hard
        T, alpha = self.teacher.temperature, self.teacher.alpha
        soft = F.kl_div(F.log_softmax(logits / T, 1), target[:, C:], reduction="batchmean") * T * T
        return (1 - alpha) * hard + alpha * soft

    def evaluate(self, epoch: int) -> tuple[dict, np.ndarray]:
        """The holdout fold's probabilities and the metrics Tune gets."""
        import ray

        t0 = time.perf_counter()
        probs = predict_probs(self.model, self.images, self.hold_rows, dev=self.dev)
        eval_s = time.perf_counter() - t0
        if not np.isfinite(probs).all():
            raise Diverged(f"{self.recipe.arch} (lr {self.recipe.lr:g}) diverged: its holdout predictions after "
                           f"epoch {epoch} are not finite ({self.skipped_steps} steps skipped for non-finite "
                           "gradients); nothing of this epoch is kept")
        y = self.labels[self.hold_rows]
        name = self.ctx.metric
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {name: METRICS[name].fn(y, probs), "val_loss": log_loss(y, probs), "epoch": epoch,
                "fold": self.fold, "node_id": node, "eval_s": eval_s, "skipped_steps": self.skipped_steps}, probs

    def report(self, metrics: dict, probs: np.ndarray) -> None:
        """Checkpoint (weights, training state, config, holdout predictions) and report to Tune."""
        from ray import tune

        with tempfile.TemporaryDirectory() as d:
            save_weights(self.model, os.path.join(d, MODEL_FILE))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "epoch": metrics["epoch"]}, os.path.join(d, TRAIN_STATE_FILE))
            with open(os.path.join(d, CONFIG_FILE), "w") as f:
                json.dump({**self.resolved, **metrics}, f, indent=2, default=str)
            storage.write_parquet(os.path.join(d, HOLDOUT_FILE), probs_table(self.hold_ids, probs))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _quiet() -> None:
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one line per checkpoint otherwise


def train_trial(config: dict, ctx: TrialContext, epoch_metrics=None) -> None:
    """A search trial: the config on fold 0 for the run's whole schedule, one report per epoch.

    ``epoch_metrics(trial_id, sample_ids, labels, probs, final)``, when given,
    returns more metrics for each epoch's report from the holdout predictions
    (the driver passes ``ensemble_builder.gain.PoolGain``: how much they raise
    the greedy ensemble of the trials finished so far). The trainer knows
    nothing of ensembles: it only reports what it is handed.
    """
    from ray import tune

    _quiet()
    run = Run(config, ctx, fold=0, epochs=int(ctx.max_epochs))
    trial_id = tune.get_context().get_trial_id()
    labels = run.labels[run.hold_rows]
    for epoch in range(run.restore(tune.get_checkpoint()), run.epochs):
        train_loss, images_per_s = run.train_epoch()
        metrics, probs = run.evaluate(epoch + 1)
        more = epoch_metrics(trial_id, run.hold_ids, labels, probs, epoch + 1 == run.epochs) if epoch_metrics else {}
        run.report({**metrics, "train_loss": train_loss, "images_per_s": images_per_s, **more}, probs)


def crossfit_fold(config: dict, ctx: TrialContext) -> None:
    """A cross-fit job: the searched recipe and schedule on one fold; its fold record when it ends.

    Why this is honest: a sample's out-of-fold prediction comes from the model
    of its own fold, which never trained on it, at the end of a schedule whose
    length was fixed before (the search's full schedule), not at an epoch
    picked by looking at that sample's score. Fold 0 is the search trial's
    final checkpoint: the same recipe, seed and schedule on the same split.
    """
    from ray import tune

    _quiet()
    t0 = time.perf_counter()
    job = dict(config["job"])
    fold, epochs = int(job["fold"]), int(job["epochs"])
    if job.get("from_checkpoint") and tune.get_checkpoint() is None:
        run = Run(job, ctx, fold=fold, epochs=epochs, train=False)
        run.model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(
            storage.join(job["from_checkpoint"], MODEL_FILE))), map_location=run.device, weights_only=True))
        metrics, probs = run.evaluate(epochs)
        write_fold(ctx, job["candidate"], run, probs, checkpoint=job["from_checkpoint"])
        tune.report(metrics)
        return
    run = Run(job, ctx, fold=fold, epochs=epochs)
    first = run.restore(tune.get_checkpoint())
    for epoch in range(first, epochs):
        train_loss, images_per_s = run.train_epoch()
        metrics, probs = run.evaluate(epoch + 1)
        if epoch + 1 == epochs:
            # what the fold cost: this attempt's seconds, scaled up to every epoch when it resumed part way
            seconds = (time.perf_counter() - t0) * epochs / max(1, epochs - first)
            write_fold(ctx, job["candidate"], run, probs, seconds=seconds)
        run.report({**metrics, "train_loss": train_loss, "images_per_s": images_per_s}, probs)


def measure(config: dict, ctx: TrialContext, seconds: float = 6.0) -> dict:
    """What ``config`` costs on this node, on fold 0: seconds per training image and per predicted image
    (no augmentation cost left out: the real loader), and the set-up (node cache, model) of a job.

    Trains for about ``seconds`` after one warm-up batch; the weights are thrown away.
    """
    t0 = time.perf_counter()
    run = Run(config, ctx, fold=0, epochs=1)
    setup = time.perf_counter() - t0
    run.model.train()
    seen, start, first = 0, None, 1
    for batch, y in run.loader:
        run.step(batch, y)
        if start is None:   # the first batch warms up the loader workers and the kernels
            start, first = time.perf_counter(), max(1, len(y))
            continue
        seen += len(y)
        if time.perf_counter() - start >= seconds:
            break
    # with one batch in all (a tiny dataset), that batch's time, warm-up included, per image
    train = (time.perf_counter() - start) / seen if seen else (time.perf_counter() - t0 - setup) / first
    # Predicting: batches of 32 holdout images for about a second, at most 512 images (a large model on
    # a CPU would spend a minute of a small budget on all 512).
    rows, done, t1 = run.hold_rows[:512], 0, time.perf_counter()
    for i in range(0, len(rows), 32):
        predict_probs(run.model, run.images, rows[i:i + 32], dev=run.dev)
        done += len(rows[i:i + 32])
        if time.perf_counter() - t1 >= 1.0:
            break
    predict = (time.perf_counter() - t1) / max(1, done)
    return dict(train_s_per_image=train, predict_s_per_image=predict, setup_s=setup)


def write_fold(ctx: TrialContext, candidate: str, run: Run, hold_probs: np.ndarray,
               checkpoint: str | None = None, seconds: float | None = None) -> None:
    """A cross-fit fold's record: its model, holdout and test predictions, then done.json.

    Written by the job itself into the experiment (not Ray's trial folder), so
    a resumed cross-fit can tell finished folds by done.json alone.
    """
    fold = run.experiment.candidate(candidate).fold(run.fold)
    model = None
    if not checkpoint:
        buf = io.BytesIO()
        save_weights(run.model, buf)
        model, checkpoint = buf.getvalue(), fold.location
    test = None
    if ctx.test_key:
        frame = run.experiment.test()
        r = run.recipe
        test_images = cached_images(frame["path"].tolist(), ctx.test_key, r.image_size, r.resize_mode,
                                    node_cache_dir(ctx), workers=os.cpu_count() or 1)
        test = probs_table(frame["sample_id"], predict_probs(run.model, test_images, tta=ctx.tta, dev=run.dev))
    fold.write(probs_table(run.hold_ids, hold_probs), test,
               dict(checkpoint=checkpoint, fold=run.fold, epochs=run.epochs,
                    seconds=None if seconds is None else round(seconds, 2)), model=model, config=run.resolved)
