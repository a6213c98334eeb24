"""trainer.inference: input normalisation, normalisation stats, probabilities (batching, rows, TTA), checkpoints.

Real tiny timm models (``test_resnet``, whose pretrained_cfg mean/std are
0.5, not ImageNet's) on random uint8 batches; every expected value is
computed here with the plain formula, independently of the module.
"""
from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
import torch

from core import storage
from trainer.augment import AugPolicy, kornia_pipeline
from trainer.inference import load_model, norm_stats, predict_probs, save_weights, to_input
from trainer.model import create

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and far faster on a busy machine; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def stats(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


def plain_normalise(images: np.ndarray, mean, std) -> torch.Tensor:
    """(x / 255 - mean) / std, channels first, in float64 then float32."""
    x = images.astype(np.float64).transpose(0, 3, 1, 2) / 255
    x = (x - np.asarray(mean).reshape(1, 3, 1, 1)) / np.asarray(std).reshape(1, 3, 1, 1)
    return torch.from_numpy(x.astype(np.float32))


def tiny_model(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("test_resnet", num_classes=num_classes, image_size=16).eval()


# --- to_input ----------------------------------------------------------------

def test_to_input_equals_the_plain_formula():
    images = random_images(5, size=12)
    batch = torch.from_numpy(images)
    mean, std = stats()
    x = to_input(batch, mean, std)
    assert x.shape == (5, 3, 12, 12)
    assert x.dtype == torch.float32
    expected = plain_normalise(images, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(x, expected, atol=1e-5, rtol=0)
    # the uint8 batch the caller holds is untouched
    assert torch.equal(batch, torch.from_numpy(images))


def test_to_input_uses_the_given_stats():
    images = random_images(2)
    x = to_input(torch.from_numpy(images), *stats((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
    expected = plain_normalise(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert torch.allclose(x, expected, atol=1e-5, rtol=0)
    assert x.min() < -1.5 and x.max() > 1.5  # channel 0 spans [-2, 2]


def test_to_input_with_an_identity_augment_is_the_plain_normalisation():
    images = random_images(3)
    seen = []

    def identity(x):
        seen.append((x.min().item(), x.max().item()))
        return x

    x = to_input(torch.from_numpy(images), *stats(), augment=identity)
    assert torch.allclose(x, plain_normalise(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5, rtol=0)
    # the augment saw float images in [0, 1], not 0..255
    (low, high), = seen
    assert 0.0 <= low and high <= 1.0 and high > 0.9


def test_to_input_normalises_the_augmented_image():
    images = random_images(4)
    flip = kornia_pipeline(AugPolicy(size=16, hflip=1.0))  # crop of the whole image, then always mirrored
    x = to_input(torch.from_numpy(images), *stats(), augment=flip)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    assert x.shape == (4, 3, 16, 16)
    assert torch.allclose(x, plain_normalise(mirrored, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5, rtol=0)
    assert not torch.allclose(x, plain_normalise(images, IMAGENET_MEAN, IMAGENET_STD), atol=1e-2)


# --- norm_stats --------------------------------------------------------------

def test_norm_stats_come_from_the_pretrained_cfg():
    model = tiny_model()
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    mean, std = norm_stats(model, "cpu")
    assert mean.shape == std.shape == (1, 3, 1, 1)
    assert torch.allclose(mean.flatten(), torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(std.flatten(), torch.tensor([0.5, 0.5, 0.5]))

    model.pretrained_cfg = dict(model.pretrained_cfg, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    mean, std = norm_stats(model, "cpu")
    assert torch.allclose(mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(std.flatten(), torch.tensor([0.4, 0.5, 0.6]))


def test_norm_stats_fall_back_to_imagenet():
    model = tiny_model()
    model.pretrained_cfg = {}
    mean, std = norm_stats(model, torch.device("cpu"))
    assert torch.allclose(mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.allclose(std.flatten(), torch.tensor(IMAGENET_STD))


# --- predict_probs -----------------------------------------------------------

def softmax_of(model, images: np.ndarray) -> np.ndarray:
    """The model's softmax on images normalised by the plain formula with its own stats."""
    cfg = model.pretrained_cfg
    with torch.no_grad():
        return model(plain_normalise(images, cfg["mean"], cfg["std"])).softmax(1).numpy()


def test_predict_probs_rows_sum_to_one():
    model, images = tiny_model(num_classes=3), random_images(6)
    probs = predict_probs(model, images)
    assert probs.shape == (6, 3)
    assert probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    assert np.allclose(probs, softmax_of(model, images), atol=1e-5)


def test_predict_probs_puts_the_model_in_eval_mode():
    model, images = tiny_model(), random_images(4)
    expected = predict_probs(model, images)
    model.train()
    assert np.allclose(predict_probs(model, images), expected, atol=1e-6)
    assert not model.training


def test_predict_probs_rows_selects_rows_in_order():
    model, images = tiny_model(), random_images(8)
    everything = predict_probs(model, images)
    rows = np.array([5, 0, 7, 5])
    picked = predict_probs(model, images, rows=rows)
    assert picked.shape == (4, 3)
    assert np.allclose(picked, everything[rows], atol=1e-6)
    assert not np.allclose(picked[0], picked[1])  # different images, different outputs


def test_predict_probs_batching_changes_nothing():
    model, images = tiny_model(), random_images(7)
    one_batch = predict_probs(model, images, batch_size=256)
    for batch_size in (1, 3, 7):
        assert np.allclose(predict_probs(model, images, batch_size=batch_size), one_batch, atol=1e-6)
    rows = np.array([6, 2, 4, 1, 3])
    assert np.allclose(predict_probs(model, images, rows=rows, batch_size=2), one_batch[rows], atol=1e-6)


def test_predict_probs_tta_averages_with_the_mirror_image():
    model, images = tiny_model(), random_images(5)
    mirrored = np.ascontiguousarray(images[:, :, ::-1])
    expected = (softmax_of(model, images) + softmax_of(model, mirrored)) / 2
    tta = predict_probs(model, images, tta=True, batch_size=2)
    assert np.allclose(tta, expected, atol=1e-5)
    assert np.allclose(tta.sum(1), 1.0, atol=1e-5)
    assert not np.allclose(tta, predict_probs(model, images), atol=1e-4)


def test_predict_probs_of_no_rows_is_empty():
    model, images = tiny_model(), random_images(3)
    probs = predict_probs(model, images, rows=np.array([], dtype=np.int64))
    assert probs.shape[0] == 0 and probs.size == 0
    assert probs.dtype == np.float32


# --- checkpoints -------------------------------------------------------------

def write_checkpoint(folder, model, config: dict) -> None:
    save_weights(model, str(folder / "model.pt"))
    storage.write_json(str(folder / "config.json"), config)


def test_a_saved_checkpoint_loads_with_identical_predictions(tmp_path):
    model, images = tiny_model(num_classes=4, seed=0), random_images(5)
    config = {"arch": "test_resnet", "num_classes": 4, "image_size": 16, "lr": 0.01}
    (tmp_path / "ckpt").mkdir()
    write_checkpoint(tmp_path / "ckpt", model, config)

    torch.manual_seed(99)  # a fresh model would start from other weights
    loaded, loaded_config = load_model(str(tmp_path / "ckpt"))
    assert loaded_config == config
    assert not loaded.training
    assert np.array_equal(predict_probs(loaded, images), predict_probs(model, images))
    fresh = create("test_resnet", num_classes=4, image_size=16)
    assert not np.allclose(predict_probs(fresh, images), predict_probs(model, images), atol=1e-4)


def test_a_checkpoint_loads_through_a_file_uri_from_a_buffer(tmp_path):
    model, images = tiny_model(num_classes=3, seed=1), random_images(3)
    buf = io.BytesIO()
    save_weights(model, buf)
    storage.write_bytes(f"file://{tmp_path}/c/model.pt", buf.getvalue())
    storage.write_json(f"file://{tmp_path}/c/config.json", {"arch": "test_resnet", "num_classes": 3, "image_size": 16})
    loaded, _ = load_model(f"file://{tmp_path}/c")
    assert np.array_equal(predict_probs(loaded, images), predict_probs(model, images))


class _NotWeights:
    """Any pickled object that is not a tensor: loading it could run code."""


def test_a_checkpoint_holding_pickled_objects_is_refused(tmp_path):
    torch.save({"payload": _NotWeights()}, tmp_path / "model.pt")
    storage.write_json(str(tmp_path / "config.json"), {"arch": "test_resnet", "num_classes": 3, "image_size": 16})
    with pytest.raises(pickle.UnpicklingError):
        load_model(str(tmp_path))
