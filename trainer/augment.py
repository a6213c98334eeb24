"""One augmentation policy, two realisations.

On a GPU, uint8 batches move to the device and a kornia pipeline augments
them there; on a CPU-only node albumentations augments the cached uint8
images in the loader (kornia on CPU is far slower: see BENCHMARKS.md). Both
are built from the same ``AugPolicy``, with matching parameter ranges.
MixUp/CutMix act on whole batches, after either backend.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import cv2
import numpy as np
import torch

BACKENDS = ("albumentations", "kornia")


@dataclass(frozen=True)
class AugPolicy:
    size: int
    scale_min: float = 1.0   # RandomResizedCrop's smallest area fraction
    hflip: float = 0.0       # probabilities ...
    vflip: float = 0.0
    rotate: float = 0.0      # ... or strengths; 0 switches a transform off
    color_jitter: float = 0.0
    grayscale: float = 0.0
    noise: float = 0.0
    blur: float = 0.0
    jpeg: float = 0.0
    mix: str = "none"        # none | mixup | cutmix
    mix_alpha: float = 0.4

    @classmethod
    def from_config(cls, config: dict) -> AugPolicy:
        names = {f.name for f in fields(cls)}
        return cls(size=config["image_size"], **{k: v for k, v in config.items() if k in names and k != "size"})


# The shared ranges, so that the two backends draw from the same family.
NOISE_STD = (0.02, 0.1)      # fraction of the value range
BLUR_SIGMA = (0.1, 1.5)
JPEG_QUALITY = (60, 100)     # the DFDC recipe in the seeds
RATIO = (3 / 4, 4 / 3)


def albumentations_pipeline(p: AugPolicy, seed: int | None = None):
    """uint8 HxWx3 in, uint8 HxWx3 out; ``seed`` makes it repeatable (per loader worker)."""
    import albumentations as A

    steps = [A.RandomResizedCrop(size=(p.size, p.size), scale=(p.scale_min, 1.0), ratio=RATIO)]
    if p.hflip:
        steps.append(A.HorizontalFlip(p=p.hflip))
    if p.vflip:
        steps.append(A.VerticalFlip(p=p.vflip))
    if p.rotate:
        steps.append(A.Rotate(limit=p.rotate, border_mode=cv2.BORDER_CONSTANT, p=1.0))
    if p.color_jitter:
        j = p.color_jitter
        steps.append(A.ColorJitter(brightness=j, contrast=j, saturation=j, hue=j / 4, p=0.8))
    if p.grayscale:
        steps.append(A.ToGray(p=p.grayscale))
    if p.noise:
        steps.append(A.GaussNoise(std_range=NOISE_STD, p=p.noise))
    if p.blur:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=BLUR_SIGMA, p=p.blur))
    if p.jpeg:
        steps.append(A.ImageCompression(quality_range=JPEG_QUALITY, p=p.jpeg))
    return A.Compose(steps, seed=seed)


def kornia_pipeline(p: AugPolicy) -> torch.nn.Module:
    """float Bx3xHxW in [0, 1] in, same out."""
    import kornia.augmentation as K

    steps = [K.RandomResizedCrop((p.size, p.size), scale=(p.scale_min, 1.0), ratio=RATIO)]
    if p.hflip:
        steps.append(K.RandomHorizontalFlip(p=p.hflip))
    if p.vflip:
        steps.append(K.RandomVerticalFlip(p=p.vflip))
    if p.rotate:
        steps.append(K.RandomRotation(degrees=p.rotate, p=1.0))
    if p.color_jitter:
        j = p.color_jitter
        steps.append(K.ColorJitter(j, j, j, j / 4, p=0.8))
    if p.grayscale:
        steps.append(K.RandomGrayscale(p=p.grayscale))
    if p.noise:
        steps.append(K.RandomGaussianNoise(std=sum(NOISE_STD) / 2, p=p.noise))
    if p.blur:
        steps.append(K.RandomGaussianBlur((5, 5), BLUR_SIGMA, p=p.blur))
    if p.jpeg:
        steps.append(K.RandomJPEG(jpeg_quality=JPEG_QUALITY, p=p.jpeg))
    return K.AugmentationSequential(*steps)


def mix_batch(x: torch.Tensor, target: torch.Tensor, p: AugPolicy, rng: np.random.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix on a whole batch; target holds class probabilities (B, C)."""
    if p.mix == "none" or len(x) < 2:
        return x, target
    lam = float(rng.beta(p.mix_alpha, p.mix_alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if p.mix == "mixup":
        x = lam * x + (1 - lam) * x[perm]
    else:
        h, w = x.shape[-2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        x = x.clone()
        x[..., y0:y0 + ch, x0:x0 + cw] = x[perm][..., y0:y0 + ch, x0:x0 + cw]
        lam = 1 - (ch * cw) / (h * w)  # the area actually kept
    return x, lam * target + (1 - lam) * target[perm]
