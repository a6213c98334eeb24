"""One training recipe: every hyperparameter a trial reads, with its default, in one place.

A config sampled by a task's search space (plus the constants it returns)
becomes a ``Recipe``; keys the recipe does not know (``image_size_<arch>``,
``lr_scratch``: search-space bookkeeping) are ignored here and kept in the
trial's config. The augmentation fields live in ``trainer.augment.AugPolicy``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields


@dataclass(frozen=True)
class Recipe:
    arch: str
    image_size: int
    resize_mode: str = "squish"
    pretrained: bool = False
    freeze_fraction: float = 0.0
    optimizer: str = "adamw"         # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 64
    schedule: str = "cosine"         # cosine | onecycle
    warmup_fraction: float = 0.05
    class_weight_power: float = 0.0
    label_smoothing: float = 0.0

    @classmethod
    def from_config(cls, config: dict) -> Recipe:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in config.items() if k in names}
        return cls(**{**known, "image_size": int(known["image_size"]), "batch_size": int(known.get("batch_size", 64))})

    def as_dict(self) -> dict:
        return asdict(self)


# One-cycle as in torch's OneCycleLR defaults: start at lr/25, end at lr/25/1e4.
ONECYCLE_DIV, ONECYCLE_FINAL_DIV, ONECYCLE_MIN_WARMUP = 25.0, 1e4, 0.05


def lr_factor(schedule: str, warmup_fraction: float, total_steps: int):
    """step -> multiplier of the base lr, for any ``total_steps`` >= 1 (a LambdaLR function).

    Both schedules are written out here rather than taken from torch because
    ``OneCycleLR`` divides by ``pct_start * total_steps - 1``, which is zero
    for the few steps a small dataset gives (one step per epoch, or a batch
    larger than the fold). One-cycle does not cycle momentum here.
    """
    total = max(1, int(total_steps))
    if schedule == "onecycle":
        warmup = max(warmup_fraction, ONECYCLE_MIN_WARMUP) * total
        start, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    elif schedule == "cosine":
        warmup = warmup_fraction * total
        start, end = 0.0, 0.0
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use cosine or onecycle")

    def f(step: int) -> float:
        if step < warmup:   # linear warm-up; the first step already moves
            return start + (1 - start) * (step + 1) / math.ceil(warmup)
        t = min(1.0, (step - warmup) / max(1.0, total - warmup))
        return end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t))
    return f
