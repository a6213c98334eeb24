"""trainer.fit: one epoch of one config inside a real 1-trial Ray Tune run, a cross-fit fold job,
and every schedule, optimiser and mix setting on a dataset too small for one batch.

The experiment is prepared by searchspace.run's own data step (folds.parquet,
experiment.json) on a tiny paddy dataset; the trial reads the node cache,
trains test_resnet for one epoch on folds 1-2 and scores fold 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_paddy, prepare_experiment

from core import storage
from core.experiment import probs_table
from trainer.cache import cached_images
from trainer.fit import Run, crossfit_fold, finite_gradients, train_trial
from trainer.inference import load_model, predict_probs
from trainer.recipe import lr_factor

CONFIG = {
    "arch": "test_resnet", "image_size": 16, "resize_mode": "letterbox", "pretrained": False,
    "freeze_fraction": 0.25, "optimizer": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "batch_size": 8,
    "schedule": "onecycle", "warmup_fraction": 0.1, "class_weight_power": 0.5, "label_smoothing": 0.1,
    "scale_min": 0.6, "hflip": 0.5, "vflip": 0.0, "rotate": 10.0, "color_jitter": 0.2, "grayscale": 0.1,
    "noise": 0.1, "blur": 0.1, "jpeg": 0.2, "mix": "mixup", "mix_alpha": 0.4,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared (not searched) experiment: 3 classes x 6 images, 3 folds, max 1 epoch."""
    base = tmp_path_factory.mktemp("fit")
    data = make_paddy(base / "data", classes=3, per_class=6, test=0)
    experiment = base / "runs" / "fit"
    argv = ["paddy", "--data", str(data), "--folds", "3", "--max-epochs", "1", "--storage", str(base / "runs"),
            "--name", "fit", "--cache-dir", str(base / "cache")]
    ctx = prepare_experiment(argv, experiment)
    index = storage.read_parquet(str(experiment / "folds.parquet")).to_pandas()
    return types.SimpleNamespace(base=base, ctx=ctx, index=index, experiment=experiment)


def _run_one_trial(ctx: dict, config: dict, storage_path: Path, name: str, resources: dict | None = None,
                   trainable=train_trial):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, ctx=ctx), resources or {"cpu": 1}),
        param_space=config,
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name=name, storage_path=str(storage_path), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)))
    results = tuner.fit()
    assert len(results) == 1
    result = results[0]
    assert result.error is None, result.error
    return result


@pytest.mark.parametrize("backend", [None, "kornia"], ids=["default-backend", "kornia-on-cpu"])
def test_one_epoch_reports_and_checkpoints(prepared, ray_session, tmp_path, backend):
    ctx = dataclasses.replace(prepared.ctx, aug_backend=backend)
    result = _run_one_trial(ctx, CONFIG, tmp_path, "one")

    m = result.metrics
    assert m["epoch"] == 1 and m["fold"] == 0
    assert 0.0 <= m["accuracy"] <= 1.0
    assert math.isfinite(m["val_loss"]) and m["val_loss"] > 0
    assert math.isfinite(m["train_loss"]) and m["train_loss"] > 0
    assert m["images_per_s"] > 0
    assert result.metrics_dataframe is not None and len(result.metrics_dataframe) == 1

    assert result.checkpoint is not None
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        assert {"model.pt", "train_state.pt", "config.json", "holdout.parquet"} <= set(os.listdir(d))

        config = json.loads((d / "config.json").read_text())
        assert config["arch"] == "test_resnet" and config["image_size"] == 16
        assert config["resize_mode"] == "letterbox" and config["num_classes"] == 3
        assert config["fold"] == 0 and config["epoch"] == 1 and config["epochs"] == 1
        # on a CPU node the default backend is albumentations
        assert config["aug_backend"] == (backend or "albumentations")
        assert config["accuracy"] == pytest.approx(m["accuracy"])

        state = torch.load(d / "train_state.pt", weights_only=True)
        assert state["epoch"] == 1 and "optimizer" in state and "scheduler" in state

        holdout = storage.read_parquet(str(d / "holdout.parquet"))
        fold0 = prepared.index[prepared.index["fold"] == 0]
        assert holdout.column("sample_id").to_pylist() == fold0["sample_id"].tolist()
        probs = np.stack(holdout.column("probs").to_numpy(zero_copy_only=False))
        assert probs.shape == (len(fold0), 3) and probs.dtype == np.float32
        assert np.allclose(probs.sum(1), 1, atol=1e-5)

        # the saved weights reproduce the saved holdout predictions
        model, loaded_config = load_model(str(d))
        assert loaded_config["arch"] == "test_resnet"
        images = cached_images(prepared.index["path"].tolist(), ctx.data_key, 16, "letterbox", ctx.cache_dir)
        again = predict_probs(model, images, fold0.index.to_numpy())
        assert np.allclose(again, probs, atol=1e-4)

    # the trial read the node cache: one build of (16, letterbox) over every training image
    builds = [json.loads(line) for line in (Path(ctx.cache_dir) / "builds.jsonl").read_text().splitlines()]
    entry = [b for b in builds if b["shape"][1] == 16 and b["mode"] == "letterbox"]
    assert len(entry) == 1 and entry[0]["decoded"] == len(prepared.index)


def test_a_fold_job_holds_out_its_own_fold_and_writes_its_record(prepared, ray_session, tmp_path):
    """A cross-fit job ({"job": {..., "fold": k, "epochs": n, "candidate": id}}) trains on the other
    folds for the whole schedule, scores fold k, and writes the fold record with done.json last."""
    job = {**CONFIG, "fold": 2, "epochs": 2, "mix": "cutmix", "schedule": "cosine", "optimizer": "sgd",
           "resize_mode": "crop", "candidate": "cv-test"}
    result = _run_one_trial(prepared.ctx, {"job": job}, tmp_path, "fold2", trainable=crossfit_fold)
    assert result.metrics["fold"] == 2 and result.metrics["epoch"] == 2
    assert len(result.metrics_dataframe) == 2   # the searched schedule's length, not squeezed
    with result.checkpoint.as_directory() as d:
        holdout = storage.read_parquet(os.path.join(d, "holdout.parquet"))
    fold2 = prepared.index.loc[prepared.index["fold"] == 2, "sample_id"].tolist()
    assert holdout.column("sample_id").to_pylist() == fold2
    record = prepared.experiment / "candidates" / "cv-test" / "folds" / "2"
    done = json.loads((record / "done.json").read_text())
    assert done.pop("seconds") > 0   # the fold job's own training time, for the report's cost column
    assert done == {"checkpoint": str(record), "fold": 2, "epochs": 2}
    assert storage.read_parquet(str(record / "holdout.parquet")).column("sample_id").to_pylist() == fold2
    assert json.loads((record / "config.json").read_text())["epochs"] == 2


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix"])
def test_every_schedule_optimiser_and_mix_trains_on_a_tiny_dataset(tiny_prepared, schedule, optimizer, mix):
    """30 images, 2 folds: the batch (64) is larger than the training fold, so each epoch is one
    step; OneCycleLR used to divide by zero here. Two epochs train and give finite losses."""
    config = {**CONFIG, "batch_size": 64, "schedule": schedule, "optimizer": optimizer, "mix": mix,
              "warmup_fraction": 0.2}
    run = Run(config, tiny_prepared.ctx, fold=1, epochs=2)
    assert len(run.loader) == 1 and run.loader.batch_size == len(run.train_rows) == 15
    lrs = []
    for epoch in range(2):
        loss, _ = run.train_epoch()
        assert math.isfinite(loss) and loss > 0
        lrs.append(run.optimizer.param_groups[0]["lr"])
        metrics, probs = run.evaluate(epoch + 1)
        assert math.isfinite(metrics["val_loss"]) and probs.shape == (15, 3)
    assert all(math.isfinite(lr) and lr >= 0 for lr in lrs)


@pytest.mark.parametrize("branch", ["plain", "accelerator"])
def test_a_step_with_a_nan_gradient_is_left_out_and_counted(tiny_prepared, branch):
    """One backward pass gives a NaN gradient (a hook on one weight): the optimiser skips that step, so no
    weight turns NaN, the schedule still advances, and the epoch's report says how many steps were left out;
    the next steps train as usual.

    The steps after the poisoned one are checked against their own gradients (every step whose gradient
    norm is not finite is counted, and only those), so that the test holds where a kernel gives such a
    gradient by itself, as oneDNN's bfloat16 convolutions did (trainer.device)."""
    ctx = dataclasses.replace(tiny_prepared.ctx, gpu_path_on_cpu=branch == "accelerator")
    run = Run({**CONFIG, "batch_size": 4}, ctx, fold=1, epochs=1)
    weight = next(p for p in run.model.parameters() if p.requires_grad)
    poisoned = {"left": 1}

    def poison(grad):
        if poisoned["left"]:
            poisoned["left"] -= 1
            return grad * float("nan")
        return grad

    weight.register_hook(poison)
    before = [p.detach().clone() for p in run.model.parameters()]
    batch, y = next(iter(run.loader))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = run.step(batch, y)
    assert math.isfinite(loss) and run.skipped_steps == 1 and run.scheduler.last_epoch == 1
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]   # the schedule kept its length on purpose
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))   # nothing was applied
    step, not_finite = run.step, []

    def watched(batch, y):   # the gradients a step left behind say whether it could have applied
        loss = step(batch, y)
        not_finite.append(not finite_gradients(run.optimizer))
        return loss

    run.step = watched
    for _ in range(5):   # the hook is spent: train until a step has applied
        run.train_epoch()
        if not all(not_finite):
            break
    assert run.skipped_steps == 1 + sum(not_finite) and not torch.equal(before[0], weight.detach())
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    metrics, probs = run.evaluate(1)
    assert metrics["skipped_steps"] == run.skipped_steps and np.isfinite(probs).all()


def test_the_accelerator_branch_on_a_cpu_trains_without_a_garbage_gradient(tiny_prepared):
    """60 steps of the branch's bfloat16, channels_last training leave none out. With oneDNN's convolutions
    on a CPU with bfloat16 instructions, about 1 step in 7 had a weight gradient of NaN or 1e21-1e31 blocks
    (trainer.device); on a CPU without them this passes either way."""
    run = Run({**CONFIG, "batch_size": 4}, dataclasses.replace(tiny_prepared.ctx, gpu_path_on_cpu=True),
              fold=1, epochs=20)
    assert run.dev.accelerated and run.dev.amp_dtype == torch.bfloat16
    for _ in range(20):
        run.train_epoch()
    assert run.scheduler.last_epoch == 60 and run.skipped_steps == 0


def test_a_model_with_nan_weights_fails_its_evaluation_instead_of_writing_nan(tiny_prepared):
    """Predictions that are not finite would break every ensemble built on them: evaluate raises Diverged,
    naming the architecture, the learning rate and the epoch."""
    from trainer.fit import Diverged

    run = Run(CONFIG, tiny_prepared.ctx, fold=1, epochs=1)
    with torch.no_grad():
        next(run.model.parameters()).fill_(float("nan"))
    with pytest.raises(Diverged, match=r"test_resnet \(lr 0.003\) diverged: .* after epoch 3 are not finite"):
        run.evaluate(3)


def test_a_run_built_only_to_evaluate_a_checkpoint_reports_like_a_trained_one(tiny_prepared):
    """A cross-fit's fold-0 job evaluates the search trial's checkpoint with a Run built with train=False
    (no loader, no optimiser): its report has the same keys as a trained run's, with no steps skipped.
    This path once raised AttributeError in every fold-0 job of every cross-fit."""
    trained = Run(CONFIG, tiny_prepared.ctx, fold=1, epochs=1)
    scored = Run(CONFIG, tiny_prepared.ctx, fold=1, epochs=1, train=False)
    scored.model.load_state_dict(trained.model.state_dict())
    metrics, probs = scored.evaluate(1)
    expected, expected_probs = trained.evaluate(1)
    assert metrics.keys() == expected.keys() and metrics["skipped_steps"] == 0
    assert np.allclose(probs, expected_probs, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    """3 classes x 10 images, 2 folds: 15 training images per fold."""
    base = tmp_path_factory.mktemp("tinyfit")
    data = make_paddy(base / "data", classes=3, per_class=10, test=0)
    argv = ["paddy", "--data", str(data), "--folds", "2", "--max-epochs", "2", "--storage", str(base / "runs"),
            "--name", "tiny", "--cache-dir", str(base / "cache"), "--pretrained", "no"]
    return types.SimpleNamespace(ctx=prepare_experiment(argv, base / "runs" / "tiny"))


# --- the helpers -------------------------------------------------------------------

def test_probs_table_is_the_experiment_contract():
    probs = np.array([[0.2, 0.8], [0.5, 0.5]], np.float64)
    table = probs_table([3, "b"], probs)
    assert table.column_names == ["sample_id", "probs"]
    assert table.column("sample_id").to_pylist() == ["3", "b"]
    import pyarrow as pa
    assert table.schema.field("probs").type == pa.list_(pa.float32(), 2)
    assert np.allclose(np.stack(table.column("probs").to_numpy(zero_copy_only=False)), probs)


def test_cosine_warms_up_then_decays_to_zero():
    f = lr_factor("cosine", 0.2, 20)   # 4 warm-up steps
    warm = [f(s) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    decay = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(20) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor("cosine", 0.0, 10)(0) == pytest.approx(1.0)


def test_onecycle_starts_low_peaks_and_ends_lower():
    f = lr_factor("onecycle", 0.25, 40)
    assert f(0) < 0.2 and f(0) < f(5) and max(f(s) for s in range(40)) == pytest.approx(1.0)
    assert f(40) == pytest.approx(1 / 25 / 1e4)


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("warmup", [0.0, 0.05, 0.2, 1.0])
def test_every_schedule_is_finite_for_a_handful_of_steps(schedule, steps, warmup):
    f = lr_factor(schedule, warmup, steps)
    values = [f(s) for s in range(steps + 1)]
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in values)
    assert max(values) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_epoch_on_a_gpu_augments_with_kornia(prepared, ray_session, tmp_path):
    # On a GPU node the default backend is kornia on the device, with mixed precision.
    result = _run_one_trial(prepared.ctx, CONFIG, tmp_path, "gpu", {"cpu": 1, "gpu": 1})
    assert math.isfinite(result.metrics["val_loss"])
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "config.json").read_text())["aug_backend"] == "kornia"
