"""The trainer's accelerator branch, run on a CPU (``gpu_path_on_cpu``): kornia on the tensor's device, bfloat16
autocast, channels_last, the same scaler and loss code; trained, checkpointed, resumed after a failure and used
for predictions on real images. And the fractional-GPU request, packed by a Ray node that declares a GPU."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_paddy, prepare_experiment, without_session_ray

from core import storage
from trainer.cache import cached_images
from trainer.device import PLAIN_CPU, device_for
from trainer.fit import Run, train_trial
from trainer.inference import load_model, predict_probs

CONFIG = {
    "arch": "test_resnet", "image_size": 16, "resize_mode": "squish", "pretrained": False,
    "freeze_fraction": 0.0, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 8,
    "schedule": "cosine", "warmup_fraction": 0.1, "class_weight_power": 0.5, "label_smoothing": 0.1,
    "scale_min": 0.6, "hflip": 0.5, "vflip": 0.0, "rotate": 10.0, "color_jitter": 0.2, "grayscale": 0.1,
    "noise": 0.1, "blur": 0.1, "jpeg": 0.0, "mix": "mixup", "mix_alpha": 0.4,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared experiment (3 classes x 8 images, 3 folds, 2 epochs) whose trials take the accelerator branch."""
    base = tmp_path_factory.mktemp("device")
    data = make_paddy(base / "data", classes=3, per_class=8, test=4)
    experiment = base / "runs" / "dev"
    argv = ["paddy", "--data", str(data), "--folds", "3", "--max-epochs", "2", "--storage", str(base / "runs"),
            "--name", "dev", "--cache-dir", str(base / "cache"), "--gpu-path-on-cpu"]
    ctx = prepare_experiment(argv, experiment)
    index = storage.read_parquet(str(experiment / "folds.parquet")).to_pandas()
    return types.SimpleNamespace(base=base, ctx=ctx, index=index, experiment=experiment, data=data)


def test_the_switch_chooses_the_branch_and_only_device_for_differs():
    plain, emulated = device_for(), device_for(gpu_path_on_cpu=True)
    if torch.cuda.is_available():   # a GPU takes the accelerator branch either way
        assert plain.accelerated and plain.pin_memory and plain.type == "cuda"
        return
    assert plain == PLAIN_CPU and not plain.accelerated and plain.amp_dtype is None
    assert emulated.type == "cpu" and emulated.accelerated and emulated.amp_dtype == torch.bfloat16
    # what must differ from CUDA: no float16 loss scaling, no pinned memory
    assert not emulated.loss_scaling and not emulated.pin_memory and not emulated.scaler().is_enabled()
    assert emulated.memory_format() == torch.channels_last and plain.memory_format() == torch.contiguous_format


def test_a_run_on_the_switch_takes_the_accelerator_branch(prepared):
    assert prepared.ctx.gpu_path_on_cpu   # --gpu-path-on-cpu reached the trials' context
    run = Run(CONFIG, prepared.ctx, fold=0, epochs=1)
    assert run.dev.accelerated and run.resolved["aug_backend"] == "kornia" and run.on_device_aug is not None
    assert run.resolved["accelerated"] is True and run.resolved["device"] == run.dev.type
    conv = next(m for m in run.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    seen = {}
    hook = conv.register_forward_hook(lambda m, args, out: seen.update(dtype=out.dtype, layout=args[0].is_contiguous(
        memory_format=torch.channels_last)))
    loss = run.step(*next(iter(run.loader)))
    hook.remove()
    assert math.isfinite(loss)
    assert seen["dtype"] == torch.bfloat16 and seen["layout"]   # autocast in bfloat16 on channels_last input


@pytest.mark.slow
def test_train_checkpoint_resume_and_predict_through_the_branch(prepared, ray_session, tmp_path):
    """A real Tune trial on the branch fails after its first epoch's checkpoint, is retried from it, and ends;
    its weights then reproduce its holdout predictions through the branch, and ``predict`` runs them on new
    images."""
    from ray import tune

    marker = tmp_path / "failed-once"

    def fail_in_the_last_epoch_once(trial_id, ids, labels, probs, final):
        # called after an epoch's evaluation and before its report: epoch 1's checkpoint is already there
        if final and not marker.exists():
            marker.write_text(trial_id)
            raise RuntimeError("a worker lost in its last epoch")
        return {}

    def trial(config, ctx):
        train_trial(config, ctx, epoch_metrics=fail_in_the_last_epoch_once)

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial, ctx=prepared.ctx), {"cpu": 1}), param_space=CONFIG,
        run_config=tune.RunConfig(name="branch", storage_path=str(tmp_path / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=1)))
    result = tuner.fit()[0]
    assert result.error is None and marker.exists()
    assert result.metrics["epoch"] == 2
    # one epoch-1 report before the failure, then the retry resumed at epoch 2 from its checkpoint
    assert result.metrics_dataframe["epoch"].tolist() == [1, 2]
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        config = json.loads((d / "config.json").read_text())
        assert config["aug_backend"] == "kornia" and config["accelerated"] is True
        assert torch.load(d / "train_state.pt", weights_only=True)["epoch"] == 2
        holdout = storage.read_parquet(str(d / "holdout.parquet"))
        saved = np.stack(holdout.column("probs").to_numpy(zero_copy_only=False))
        model, _ = load_model(str(d))
        images = cached_images(prepared.index["path"].tolist(), prepared.ctx.data_key, 16, "squish",
                               prepared.ctx.cache_dir)
        rows = prepared.index.index[prepared.index["fold"] == 0].to_numpy()
        model = model.to(memory_format=torch.channels_last)
        again = predict_probs(model, images, rows, dev=device_for(gpu_path_on_cpu=True))
        assert np.allclose(again, saved, atol=1e-3)   # the branch's own predictions, bit for bit up to bf16 order
        plain = predict_probs(load_model(str(d))[0], images, rows)   # float32 on the plain path: close
        assert np.abs(plain - saved).max() < 0.05 and (plain.argmax(1) == saved.argmax(1)).mean() >= 0.8


@pytest.mark.slow
def test_fractional_gpus_pack_two_trials_on_one_declared_gpu(prepared, tmp_path_factory, tmp_path, monkeypatch):
    """A node that declares one GPU runs two --gpus-per-trial 0.5 trials at once, both on GPU 0 (each waits
    for the other's start mark: an event, not a clock); with 1 GPU per trial they run one after the other.
    The node has no CUDA device: the trials train on its CPU."""
    import ray
    from ray import tune
    from ray.cluster_utils import Cluster

    from searchspace.config import Resources
    from searchspace.tuner import concurrency

    def marked_trial(config, ctx, marks, wait_for_the_other):
        """train_trial between two marks on disk: its start time, and (half-GPU case) whether it saw the other
        trial's start while it ran, waiting for it at most 120 s; then its end time."""
        import time

        tag, marks = config["seed_tag"], Path(marks)
        (marks / f"start-{tag}").write_text(repr(time.time()))
        if wait_for_the_other:
            deadline = time.monotonic() + 120
            while not (marks / f"start-{1 - tag}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            (marks / f"saw-{tag}").write_text(str((marks / f"start-{1 - tag}").exists()))
        train_trial(config, ctx)
        (marks / f"end-{tag}").write_text(repr(time.time()))

    ctx = dataclasses.replace(prepared.ctx, gpu_path_on_cpu=False, max_epochs=2)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", temp)   # the address file goes to temp/ray/, not /tmp/ray/
    os.makedirs(os.path.join(temp, "ray"), exist_ok=True)
    marks = {gpus: tmp_path / f"marks-{gpus}" for gpus in (0.5, 1.0)}
    with without_session_ray(tmp_path_factory):
        head = dict(num_cpus=2, num_gpus=1, temp_dir=temp, include_dashboard=False)
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            ray.init(address=cluster.address)
            for gpus in (0.5, 1.0):
                assert concurrency(Resources(cpus_per_trial=1, gpus_per_trial=gpus)) == (2 if gpus == 0.5 else 1)
                marks[gpus].mkdir()
                trainable = tune.with_parameters(marked_trial, ctx=ctx, marks=str(marks[gpus]),
                                                 wait_for_the_other=gpus == 0.5)
                tuner = tune.Tuner(
                    tune.with_resources(trainable, {"cpu": 1, "gpu": gpus}),
                    param_space={**CONFIG, "seed_tag": tune.grid_search([0, 1])},
                    run_config=tune.RunConfig(name=f"gpus-{gpus}", storage_path=str(tmp_path / "ray"), verbose=0))
                results = tuner.fit()
                assert not results.errors
                for r in results:
                    with r.checkpoint.as_directory() as d:
                        assert json.loads((Path(d) / "config.json").read_text())["gpu_ids"] == ["0"]
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    half = marks[0.5]
    assert [(half / f"saw-{tag}").read_text() for tag in (0, 1)] == ["True", "True"]   # the two ran at once
    whole = marks[1.0]
    spans = sorted((float((whole / f"start-{t}").read_text()), float((whole / f"end-{t}").read_text())) for t in (0, 1))
    assert spans[0][1] <= spans[1][0]   # whole-GPU trials did not overlap: the second started after the first ended
