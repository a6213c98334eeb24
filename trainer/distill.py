"""A distilled student: one network trained on the ensemble's soft targets, as a Ray Tune trainable.

``distill_job({"job": {...}}, ctx)`` trains the student recipe with the
trainer's own loop (``Run`` with a ``Teacher``): its cache, augmentation, loss
and schedule, the hard labels mixed with the teacher's softened probabilities.
A job trains either without one fold (``fold`` = k: the student whose score on
fold k is honest) or on every training image (``fold`` = None: the student
that ships). It keeps its training state in its own folder of the experiment
after every epoch, so a job that dies (a lost worker, a killed driver) starts
again where it was, on any node; ``done.json`` is written last.
"""
from __future__ import annotations

import io
import time

import numpy as np
import torch

from core import storage
from core.experiment import TRAIN_STATE_FILE, Experiment, TrialContext, aligned, probs_table
from trainer.cache import cached_images
from trainer.fit import Run, Teacher, _quiet, node_cache_dir
from trainer.inference import predict_probs, save_weights


def teacher_for(experiment: Experiment, teacher_file: str, temperature: float, alpha: float) -> Teacher:
    """The soft targets (a probability table of every training image) as a Teacher in the index's row order."""
    order = experiment.folds()["sample_id"].tolist()
    return Teacher(aligned(storage.read_parquet(teacher_file), order), temperature, alpha)


def distill_job(config: dict, ctx: TrialContext) -> None:
    """Train one student (``config["job"]``: candidate, part, fold, epochs, recipe, teacher, temperature,
    alpha) to its end, resuming from its saved state; write its model, predictions and done.json."""
    from ray import tune

    _quiet()
    t0 = time.perf_counter()
    job = config["job"]
    exp = Experiment(ctx.experiment)
    folder = exp.candidate(job["candidate"]).fold(job["part"])
    if folder.done():
        return
    teacher = teacher_for(exp, job["teacher"], float(job["temperature"]), float(job["alpha"]))
    run = Run(job["recipe"], ctx, fold=job["fold"], epochs=int(job["epochs"]), teacher=teacher)
    first = restore(run, folder)
    for epoch in range(first, run.epochs):
        train_loss, images_per_s = run.train_epoch()
        save_state(run, folder, epoch + 1, time.perf_counter() - t0)
        tune.report({"epoch": epoch + 1, "train_loss": train_loss, "images_per_s": images_per_s,
                     "resumed_at": first})
    finish(run, folder, ctx, job, time.perf_counter() - t0, first)


def save_state(run: Run, folder, epoch: int, seconds: float) -> None:
    """The student's training state after ``epoch`` (weights, optimiser, schedule), in the experiment."""
    buf = io.BytesIO()
    torch.save({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "epoch": epoch, "seconds": seconds}, buf)
    storage.write_bytes(folder.file(TRAIN_STATE_FILE), buf.getvalue())


def restore(run: Run, folder) -> int:
    """The epoch to start at: 0, or where the saved state left off (its weights, optimiser and schedule)."""
    if not folder.has(TRAIN_STATE_FILE):
        return 0
    state = torch.load(io.BytesIO(storage.read_bytes(folder.file(TRAIN_STATE_FILE))), map_location=run.device,
                       weights_only=True)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.resumed_seconds = float(state.get("seconds", 0.0))
    return int(state["epoch"])


def finish(run: Run, folder, ctx: TrialContext, job: dict, seconds: float, resumed_at: int) -> None:
    """The student's weights, its predictions on its held-out fold (none for the one on every image) and on
    the test images, then done.json with what it cost."""
    buf = io.BytesIO()
    save_weights(run.model, buf)
    hold = probs_table(run.hold_ids, predict_probs(run.model, run.images, run.hold_rows, dev=run.dev)
                       if len(run.hold_rows) else np.zeros((0, run.num_classes), np.float32))
    test = None
    if ctx.test_key:
        frame = run.experiment.test()
        images = cached_images(frame["path"].tolist(), ctx.test_key, run.recipe.image_size, run.recipe.resize_mode,
                               node_cache_dir(ctx))
        test = probs_table(frame["sample_id"], predict_probs(run.model, images, tta=ctx.tta, dev=run.dev))
    total = seconds + getattr(run, "resumed_seconds", 0.0)
    record = dict(checkpoint=folder.location, fold=job["fold"], part=job["part"], epochs=run.epochs,
                  seconds=round(total, 2), params=int(sum(p.numel() for p in run.model.parameters())),
                  resumed_at=resumed_at)
    folder.write(hold, test, record, model=buf.getvalue(), config=run.resolved)
    if folder.has(TRAIN_STATE_FILE):
        storage.delete_file(folder.file(TRAIN_STATE_FILE))   # done.json now says it is finished
