"""trainer.fit.train_trial: one epoch of one config inside a real 1-trial Ray Tune run.

The experiment is prepared by searchspace.run's own data step (folds.parquet,
experiment.json) on a tiny paddy dataset; the trial reads the node cache,
trains test_resnet for one epoch on folds 1-2 and scores fold 0.
"""
from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_paddy, prepare_experiment

from trainer import storage
from trainer.cache import cached_images
from trainer.fit import probs_table, train_trial, warmup_cosine
from trainer.inference import load_model, predict_probs

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


def _run_one_trial(ctx: dict, config: dict, storage_path: Path, name: str, resources: dict | None = None):
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(train_trial, ctx=ctx), resources or {"cpu": 1}),
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
    ctx = {**prepared.ctx, "aug_backend": backend}
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
        images = cached_images(prepared.index["path"].tolist(), ctx["data_key"], 16, "letterbox", ctx["cache_dir"])
        again = predict_probs(model, images, fold0.index.to_numpy())
        assert np.allclose(again, probs, atol=1e-4)

    # the trial read the node cache: one build of (16, letterbox) over every training image
    builds = [json.loads(line) for line in (Path(ctx["cache_dir"]) / "builds.jsonl").read_text().splitlines()]
    entry = [b for b in builds if b["shape"][1] == 16 and b["mode"] == "letterbox"]
    assert len(entry) == 1 and entry[0]["decoded"] == len(prepared.index)


def test_a_fold_job_holds_out_its_own_fold(prepared, ray_session, tmp_path):
    """A cross-fit style job ({"job": {..., "fold": k, "epochs": n}}) trains on the other folds and scores fold k."""
    job = {**CONFIG, "fold": 2, "epochs": 1, "mix": "cutmix", "schedule": "cosine", "optimizer": "sgd",
           "resize_mode": "crop"}
    result = _run_one_trial(prepared.ctx, {"job": job}, tmp_path, "fold2")
    assert result.metrics["fold"] == 2 and result.metrics["epoch"] == 1
    with result.checkpoint.as_directory() as d:
        holdout = storage.read_parquet(os.path.join(d, "holdout.parquet"))
    fold2 = prepared.index.loc[prepared.index["fold"] == 2, "sample_id"].tolist()
    assert holdout.column("sample_id").to_pylist() == fold2


# --- the helpers -------------------------------------------------------------------

def test_probs_table_is_the_experiment_contract():
    probs = np.array([[0.2, 0.8], [0.5, 0.5]], np.float64)
    table = probs_table([3, "b"], probs)
    assert table.column_names == ["sample_id", "probs"]
    assert table.column("sample_id").to_pylist() == ["3", "b"]
    import pyarrow as pa
    assert table.schema.field("probs").type == pa.list_(pa.float32(), 2)
    assert np.allclose(np.stack(table.column("probs").to_numpy(zero_copy_only=False)), probs)


def test_warmup_cosine_rises_then_decays_to_zero():
    f = warmup_cosine(4, 20)
    warm = [f(s) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    decay = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert f(20) == pytest.approx(0.0, abs=1e-9)
    assert warmup_cosine(0, 10)(0) == pytest.approx(1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_epoch_on_a_gpu_augments_with_kornia(prepared, ray_session, tmp_path):
    # On a GPU node the default backend is kornia on the device, with mixed precision.
    result = _run_one_trial(prepared.ctx, CONFIG, tmp_path, "gpu", {"cpu": 1, "gpu": 1})
    assert math.isfinite(result.metrics["val_loss"])
    with result.checkpoint.as_directory() as d:
        assert json.loads((Path(d) / "config.json").read_text())["aug_backend"] == "kornia"
