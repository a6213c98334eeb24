"""A task: what the search needs to know of a kind of data (``searchspace.tasks`` maps names to them)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from searchspace.config import Budget


@dataclass(frozen=True)
class Task:
    """What the search needs to know of a kind of data.

    ``load(data)`` reads a data folder (or URI) into a ``searchspace.data.Dataset``;
    ``define_search_space(trial, archs, pretrained, search_pretrained)`` is
    the Optuna define-by-run space (only ``trial.suggest_*`` calls) and
    returns the config's constants; ``budget`` is complete (no None);
    ``archs`` maps each timm architecture to its image sizes;
    ``default_recipe`` is the recipe a portfolio entry starts from and what an
    architecture no portfolio entry covers is tried with; ``portfolio`` are
    known-good, mutually different configs tried first; ``pretrained`` is the
    default of ``--pretrained``; ``flip_tta`` whether a mirrored image is the
    same class (the test set's flip TTA); ``default_data(cache_dir)``, where
    the task embeds its data, writes it and returns its folder (else
    ``--data`` is required).
    """

    name: str
    load: Callable
    define_search_space: Callable
    budget: Budget
    archs: dict[str, list[int]]
    default_recipe: dict
    metric: str = "accuracy"
    portfolio: list[dict] = field(default_factory=list)
    pretrained: str = "auto"
    flip_tta: bool = True
    default_data: Callable[[str], str] | None = None
