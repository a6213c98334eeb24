"""Building blocks for the tasks' define-by-run search spaces.

Only ``trial.suggest_*`` calls live here; each task picks the ranges. Every
augmentation parameter is a probability or a strength whose zero means "off",
so one policy config drives both augmentation backends.
"""
from __future__ import annotations


def suggest_model(trial, archs: dict[str, list[int]], pretrained: bool | None = None) -> dict:
    """Architecture, then an image size among the ones that architecture allows."""
    arch = trial.suggest_categorical("arch", sorted(archs))
    # A per-architecture parameter name keeps the size choice conditional
    # (Optuna needs fixed choices per name); it is returned as image_size.
    size = trial.suggest_categorical(f"image_size_{arch}", archs[arch])
    trial.suggest_categorical("resize_mode", ["squish", "crop", "letterbox"])
    if pretrained is None:
        trial.suggest_categorical("pretrained", [True, False])
    trial.suggest_float("freeze_fraction", 0.0, 0.75, step=0.25)
    return {"image_size": size}


def suggest_optimiser(trial, lr: tuple[float, float], batch_sizes: list[int]) -> None:
    trial.suggest_categorical("optimizer", ["adamw", "sgd"])
    trial.suggest_float("lr", *lr, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    trial.suggest_categorical("batch_size", batch_sizes)
    trial.suggest_categorical("schedule", ["cosine", "onecycle"])
    trial.suggest_float("warmup_fraction", 0.0, 0.2)


def suggest_loss(trial) -> None:
    # weight_c = (1 / freq_c) ** power: 0 is unweighted, 1 fully balanced.
    trial.suggest_float("class_weight_power", 0.0, 1.0)
    trial.suggest_float("label_smoothing", 0.0, 0.2)


def suggest_augmentation(trial, rotate_max: float = 30.0, jpeg: bool = True,
                         hflip: bool = True, vflip: bool = True) -> None:
    trial.suggest_float("scale_min", 0.35, 1.0)
    trial.suggest_categorical("hflip", [0.0, 0.5] if hflip else [0.0])
    trial.suggest_categorical("vflip", [0.0, 0.5] if vflip else [0.0])
    trial.suggest_float("rotate", 0.0, rotate_max)
    trial.suggest_float("color_jitter", 0.0, 0.4)
    trial.suggest_float("grayscale", 0.0, 0.2)
    trial.suggest_float("noise", 0.0, 0.2)
    trial.suggest_float("blur", 0.0, 0.2)
    trial.suggest_float("jpeg", 0.0, 0.5 if jpeg else 0.0)
    trial.suggest_categorical("mix", ["none", "mixup", "cutmix"])
    trial.suggest_float("mix_alpha", 0.2, 1.0)
