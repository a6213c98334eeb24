"""trainer.augment: one AugPolicy, two backends, and mix_batch.

albumentations works on uint8 HxWx3 images, kornia on float Bx3xHxW batches in [0, 1].
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import class_pixels

from trainer.augment import AugPolicy, albumentations_pipeline, kornia_pipeline, mix_batch

IDENTITY = AugPolicy(size=24)  # scale_min 1, every transform off
EVERYTHING = AugPolicy(size=16, scale_min=0.35, hflip=0.5, vflip=0.5, rotate=30.0, color_jitter=0.4,
                       grayscale=0.5, noise=0.5, blur=0.5, jpeg=0.5, mix="cutmix", mix_alpha=0.4)


def _image(size: int = 24, cls: int = 2, seed: int = 0) -> np.ndarray:
    return class_pixels(cls, (size, size), seed)


def _batch(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HxWx3 images -> float Bx3xHxW in [0, 1], as the trainer feeds kornia."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)


def _asymmetric(size: int = 24) -> np.ndarray:
    """A gradient left to right and top to bottom, so any flip changes it."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 10, yy * 10, (xx + yy) * 5], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


# --- the policy ----------------------------------------------------------------

def test_policy_from_a_trial_config_takes_only_its_fields():
    config = {"image_size": 32, "hflip": 0.5, "rotate": 12.0, "mix": "mixup", "lr": 0.01, "arch": "test_resnet",
              "size": 999}
    p = AugPolicy.from_config(config)
    assert p.size == 32  # from image_size, never from a stray "size"
    assert (p.hflip, p.rotate, p.mix) == (0.5, 12.0, "mixup")
    assert p.vflip == 0.0 and p.scale_min == 1.0


# --- both backends -------------------------------------------------------------

@pytest.mark.parametrize("in_size", [24, 40])
def test_albumentations_shapes_and_dtype(in_size):
    out = albumentations_pipeline(AugPolicy(size=16, scale_min=0.5))(image=_image(in_size))["image"]
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("in_size", [24, 40])
def test_kornia_shapes_and_dtype(in_size):
    x = _batch([_image(in_size, seed=i) for i in range(3)])
    out = kornia_pipeline(AugPolicy(size=16, scale_min=0.5))(x)
    assert out.shape == (3, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1


def test_every_transform_on_runs_in_albumentations():
    pipe = albumentations_pipeline(EVERYTHING)
    assert len(pipe.transforms) == 9  # the crop and the eight transforms the policy switches on
    rng_outputs = [pipe(image=_image(24, seed=i))["image"] for i in range(8)]
    for out in rng_outputs:
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    # it is random: not every output is the same
    assert len({o.tobytes() for o in rng_outputs}) > 1


def test_every_transform_on_runs_in_kornia():
    pipe = kornia_pipeline(EVERYTHING)
    assert len(list(pipe.children())) == 9
    x = _batch([_image(24, seed=i) for i in range(8)])
    torch.manual_seed(0)
    out = pipe(x)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_identity_policy_leaves_an_image_unchanged_in_albumentations():
    img = _image(24)
    for _ in range(5):
        out = albumentations_pipeline(IDENTITY)(image=img)["image"]
        assert out.shape == img.shape
        assert np.abs(out.astype(int) - img).max() <= 1


def test_identity_policy_leaves_an_image_unchanged_in_kornia():
    x = _batch([_image(24, seed=i) for i in range(4)])
    for _ in range(5):
        out = kornia_pipeline(IDENTITY)(x)
        assert out.shape == x.shape
        assert (out - x).abs().max() <= 1 / 255


def test_hflip_p1_flips_in_both_backends():
    img = _asymmetric()
    p = AugPolicy(size=24, hflip=1.0)
    out = albumentations_pipeline(p)(image=img)["image"]
    assert np.array_equal(out, img[:, ::-1])
    x = _batch([img])
    assert torch.allclose(kornia_pipeline(p)(x), x.flip(3), atol=1e-6)


def test_vflip_p1_flips_in_both_backends():
    img = _asymmetric()
    p = AugPolicy(size=24, vflip=1.0)
    out = albumentations_pipeline(p)(image=img)["image"]
    assert np.array_equal(out, img[::-1])
    x = _batch([img])
    assert torch.allclose(kornia_pipeline(p)(x), x.flip(2), atol=1e-6)


def test_grayscale_p1_gives_equal_channels_in_both_backends():
    img = _image(24, cls=0)
    p = AugPolicy(size=24, grayscale=1.0)
    out = albumentations_pipeline(p)(image=img)["image"]
    assert np.abs(out[..., 0].astype(int) - out[..., 2]).max() <= 1
    k = kornia_pipeline(p)(_batch([img]))
    assert torch.allclose(k[:, 0], k[:, 2], atol=1e-5)


# --- mix_batch -----------------------------------------------------------------

def _distinct_batch(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i is an image filled with the value i+1, its target the one-hot of class i."""
    x = torch.stack([torch.full((3, size, size), float(i + 1)) for i in range(n)])
    return x, torch.eye(n)


def test_no_mix_returns_the_batch_unchanged():
    x, t = _distinct_batch()
    x2, t2 = mix_batch(x, t, AugPolicy(size=8, mix="none"), np.random.default_rng(0))
    assert torch.equal(x2, x) and torch.equal(t2, t)


def test_a_batch_of_one_is_not_mixed():
    x, t = _distinct_batch(1)
    x2, t2 = mix_batch(x, t, AugPolicy(size=8, mix="mixup"), np.random.default_rng(0))
    assert torch.equal(x2, x) and torch.equal(t2, t)


@pytest.mark.parametrize("seed", range(5))
def test_mixup_mixes_images_and_targets_with_the_same_lambda(seed):
    x, t = _distinct_batch()
    x2, t2 = mix_batch(x, t, AugPolicy(size=8, mix="mixup", mix_alpha=0.4), np.random.default_rng(seed))
    assert t2.shape == t.shape
    assert torch.allclose(t2.sum(1), torch.ones(len(t)))
    mixed_rows = 0
    for i in range(len(x)):
        # target row i: lam on class i and 1 - lam on its partner (or 1 on i when paired with itself)
        lam = float(t2[i, i])
        others = [j for j in range(len(x)) if j != i and t2[i, j] > 0]
        assert len(others) <= 1
        if others and 0 < lam < 1:
            mixed_rows += 1
            j = others[0]
            assert float(t2[i, j]) == pytest.approx(1 - lam, abs=1e-6)
            # the pixels are the same mixture: lam * (i+1) + (1 - lam) * (j+1)
            assert torch.allclose(x2[i], torch.full_like(x2[i], lam * (i + 1) + (1 - lam) * (j + 1)), atol=1e-4)
    assert mixed_rows > 0


@pytest.mark.parametrize("seed", range(5))
def test_cutmix_pastes_a_box_and_weights_targets_by_area(seed):
    x, t = _distinct_batch(6, size=16)
    x2, t2 = mix_batch(x, t, AugPolicy(size=16, mix="cutmix", mix_alpha=1.0), np.random.default_rng(seed))
    assert torch.allclose(t2.sum(1), torch.ones(len(t)))
    assert not torch.equal(x, x2) or torch.equal(t, t2)
    assert torch.equal(x[0], torch.full((3, 16, 16), 1.0))  # the input is not modified in place
    for i in range(len(x)):
        values, counts = torch.unique(x2[i], return_counts=True)
        # each sample's pixel share equals its target weight
        for v, c in zip(values.tolist(), counts.tolist()):
            cls = int(round(v)) - 1
            assert float(t2[i, cls]) == pytest.approx(c / x2[i].numel(), abs=1e-6)
        assert float(t2[i].max()) > 0
