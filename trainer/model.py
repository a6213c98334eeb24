"""timm models: creation with pretrained weights from the hub or a local file, and freezing."""
from __future__ import annotations

import os

import timm
import torch

from trainer.errors import BadInput

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


def check_arch(name: str) -> None:
    if not timm.is_model(name):
        raise BadInput(f"unknown timm model {name!r}; see timm.list_models() for the names")


def local_weights(arch: str, weights_dir: str | None) -> str | None:
    """<weights_dir>/<arch>{.safetensors,.pth,...}, also without a '.tag' suffix."""
    if not weights_dir:
        return None
    for name in (arch, arch.split(".")[0]):
        for suffix in WEIGHT_SUFFIXES:
            path = os.path.join(weights_dir, name + suffix)
            if os.path.exists(path):
                return path
    return None


def create(arch: str, num_classes: int, image_size: int, pretrained: bool = False,
           weights_dir: str | None = None, freeze_fraction: float = 0.0) -> torch.nn.Module:
    """A timm model with a fresh head of ``num_classes``.

    Pretrained weights come from a local file when ``weights_dir`` has one
    for the architecture, else from timm's hub download (which also uses the
    Hugging Face cache, so a machine that downloaded once can go offline).
    """
    kwargs = dict(pretrained=pretrained, num_classes=num_classes)
    path = local_weights(arch, weights_dir) if pretrained else None
    if path:
        kwargs["pretrained_cfg_overlay"] = dict(file=path)
    try:
        # Transformers need the input size fixed at creation; CNNs refuse the argument.
        model = timm.create_model(arch, img_size=image_size, **kwargs)
    except TypeError:
        model = timm.create_model(arch, **kwargs)
    if freeze_fraction > 0:
        freeze(model, freeze_fraction)
    return model


def freeze(model: torch.nn.Module, fraction: float) -> None:
    """Freeze the first ``fraction`` of the backbone's parameter tensors (never the head)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    backbone = [p for p in model.parameters() if id(p) not in head]
    for p in backbone[: int(len(backbone) * fraction)]:
        p.requires_grad_(False)


def class_weights(labels, num_classes: int, power: float) -> torch.Tensor:
    """(1 / class frequency) ** power, scaled to mean 1: power 0 is unweighted."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=num_classes).float().clamp(min=1)
    w = (counts.sum() / counts) ** power
    return w / w.mean()
