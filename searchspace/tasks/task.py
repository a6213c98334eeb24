"""A task: what the search needs to know of a kind of data (``searchspace.tasks`` maps names to them)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from searchspace.config import Budget

# The space a time budget falls back to when one final config of a task's own architectures cannot fit in it
# (and the user named no --archs or --image-sizes): small architectures at the sizes that the real-data
# benchmarks ran at 6 minutes on 2 CPU cores (BENCHMARKS.md, "Time budget"). test_resnet comes first: one
# of it, trained long, is the simplest alternative that the pipeline is measured against.
SMALL_ARCHS = {"test_resnet": [32, 48], "test_efficientnet": [32, 48], "efficientnet_lite0": [32, 48],
               "mobilenetv3_small_050": [32, 48]}


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
    ``--data`` is required); ``budget_fallback`` is the {arch: sizes} a time
    budget searches instead of ``archs`` when one final config of those
    cannot fit it (None: refuse such a budget).
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
    budget_fallback: dict[str, list[int]] | None = field(default_factory=lambda: dict(SMALL_ARCHS))
