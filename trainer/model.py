"""timm models: creation with pretrained weights from a resolved local file, and freezing."""
from __future__ import annotations

import timm
import torch

from core.errors import BadInput


def check_arch(name: str) -> None:
    if not timm.is_model(name):
        raise BadInput(f"unknown timm model {name!r}; see timm.list_models() for the names")


def create(arch: str, num_classes: int, image_size: int, weights: str | None = None,
           freeze_fraction: float = 0.0) -> torch.nn.Module:
    """A timm model with a fresh head of ``num_classes``; pretrained when ``weights`` names a local file.

    The file was found before the search by ``trainer.weights.resolve``; timm
    never goes to the hub from here (offline, its download retries for minutes).
    """
    kwargs = dict(pretrained=weights is not None, num_classes=num_classes)
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=weights)
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
