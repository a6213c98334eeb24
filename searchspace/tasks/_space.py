"""Building blocks for the tasks' define-by-run search spaces.

Only ``trial.suggest_*`` calls live here; each task picks the ranges. Every
augmentation parameter is a probability or a strength whose zero means "off",
so one policy config drives both augmentation backends.
"""
from __future__ import annotations


def suggest_model(trial, archs: dict[str, list[int]], pretrained: dict[str, bool] | None = None,
                  search_pretrained: bool = False) -> dict:
    """Architecture, an image size among the ones it allows, and whether it starts from pretrained weights.

    ``pretrained`` says which architectures have weights (resolved before the
    search): those fine-tune, the others train from scratch. Only with
    ``search_pretrained`` is that a searched choice, for the architectures
    that have weights.
    """
    arch = trial.suggest_categorical("arch", sorted(archs))
    # A per-architecture parameter name keeps the size choice conditional
    # (Optuna needs fixed choices per name); it is returned as image_size.
    size = trial.suggest_categorical(f"image_size_{arch}", archs[arch])
    trial.suggest_categorical("resize_mode", ["squish", "crop", "letterbox"])
    use = bool((pretrained or {}).get(arch))
    if use and search_pretrained:
        use = trial.suggest_categorical("pretrained", [True, False])
    if use:  # freezing only makes sense for weights that already mean something
        trial.suggest_float("freeze_fraction", 0.0, 0.75, step=0.25)
    return {"image_size": size, "pretrained": use}


# Fine-tuning pretrained weights wants a small learning rate; training from
# scratch a larger one. Separate parameter names keep the two TPE models apart.
LR_FINETUNE = (1e-4, 3e-3)
LR_SCRATCH = (1e-3, 3e-2)


def suggest_optimiser(trial, pretrained: bool, batch_sizes: list[int],
                      lr_finetune: tuple[float, float] = LR_FINETUNE,
                      lr_scratch: tuple[float, float] = LR_SCRATCH) -> dict:
    trial.suggest_categorical("optimizer", ["adamw", "sgd"])
    lr = trial.suggest_float("lr", *lr_finetune, log=True) if pretrained else \
        trial.suggest_float("lr_scratch", *lr_scratch, log=True)
    trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True)
    trial.suggest_categorical("batch_size", batch_sizes)
    trial.suggest_categorical("schedule", ["cosine", "onecycle"])
    trial.suggest_float("warmup_fraction", 0.0, 0.2)
    return {"lr": lr}


def suggest_recipe(trial, archs: dict[str, list[int]], pretrained: dict[str, bool] | None,
                   search_pretrained: bool, batch_sizes: list[int] = (32, 64), **augmentation) -> dict:
    """Model, optimiser, loss and augmentation in one define-by-run pass; ``augmentation`` are the
    task's choices for ``suggest_augmentation``. Returns the constants for the config."""
    constants = suggest_model(trial, archs, pretrained, search_pretrained)
    constants.update(suggest_optimiser(trial, constants["pretrained"], batch_sizes=list(batch_sizes)))
    suggest_loss(trial)
    suggest_augmentation(trial, **augmentation)
    return constants


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


# --- the portfolio: known-good, mutually different configs tried first --------------------

# The recipe every portfolio entry starts from (the space's own parameter names).
BASE_RECIPE = dict(resize_mode="squish", optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size=32,
                   schedule="cosine", warmup_fraction=0.1, class_weight_power=0.0, label_smoothing=0.1,
                   scale_min=0.75, hflip=0.5, vflip=0.0, rotate=0.0, color_jitter=0.0, grayscale=0.0,
                   noise=0.0, blur=0.0, jpeg=0.0, mix="none", mix_alpha=0.4)

def portfolio_points(portfolio: list[dict], default: dict, archs: dict[str, list[int]],
                     has_weights: dict[str, bool], search_pretrained: bool = False,
                     limit: int | None = None) -> list[dict]:
    """A task's portfolio as Optuna parameters, filtered to the allowed architectures.

    Each recipe names ``arch``, ``image_size`` (the nearest allowed size is
    taken) and a fine-tuning ``lr``; the rest are the space's own parameter
    names. An allowed architecture that no recipe covers gets the task's
    ``default`` recipe at its largest size, so the first trials span every
    architecture. Without weights a recipe trains from scratch at ten times
    its learning rate (within the scratch range).
    """
    points = [_point(r, archs, has_weights, search_pretrained) for r in portfolio if r["arch"] in archs]
    covered = {p["arch"] for p in points}
    points += [_point({**default, "arch": a, "image_size": max(archs[a])}, archs, has_weights, search_pretrained)
               for a in archs if a not in covered]
    return points[:limit] if limit is not None else points


def _point(recipe: dict, archs: dict[str, list[int]], has_weights: dict[str, bool], search_pretrained: bool) -> dict:
    arch = recipe["arch"]
    size = min(archs[arch], key=lambda s: (abs(s - recipe["image_size"]), -s))
    point = {k: v for k, v in recipe.items() if k not in ("arch", "image_size", "lr", "freeze_fraction")}
    point.update({"arch": arch, f"image_size_{arch}": size})
    if has_weights.get(arch):
        if search_pretrained:
            point["pretrained"] = True
        point.update(lr=recipe["lr"], freeze_fraction=recipe.get("freeze_fraction", 0.0))
    else:
        point["lr_scratch"] = min(max(recipe["lr"] * 10, LR_SCRATCH[0]), LR_SCRATCH[1])
    return point
