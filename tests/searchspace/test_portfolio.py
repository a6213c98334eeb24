"""Each task's portfolio: known-good, mutually different configs enqueued as the first trials.

The points are real Optuna parameters: enqueued into a real study, the task's
own define-by-run space must take every one of them as given (no value out of
its range), and ``--archs`` filters them.
"""
from __future__ import annotations

import warnings

import optuna
import pytest

from searchspace.tasks import TASKS, paddy
from searchspace.tasks._space import LR_SCRATCH, portfolio_points


def test_the_portfolio_is_filtered_to_the_allowed_architectures():
    archs = {"vit_small_patch16_224": [224], "resnet50": [224, 256], "efficientnet_b0": [128, 224]}
    points = portfolio_points(paddy.PORTFOLIO, paddy.DEFAULT_RECIPE, archs, {a: True for a in archs})
    assert [p["arch"] for p in points] == ["vit_small_patch16_224", "resnet50", "efficientnet_b0"]
    assert all(p["arch"] in archs for p in points)
    # efficientnet_b0 is in no paddy recipe: the task's default recipe at its largest size
    assert points[2]["image_size_efficientnet_b0"] == 224 and points[2]["scale_min"] == 0.75
    # a recipe's size is moved to the nearest allowed one
    assert points[1]["image_size_resnet50"] == 224


def test_the_portfolio_can_be_capped_and_is_mutually_different():
    archs = {a: sizes for a, sizes in paddy.ARCHS.items()}
    points = portfolio_points(paddy.PORTFOLIO, paddy.DEFAULT_RECIPE, archs, {a: True for a in archs}, limit=5)
    assert len(points) == 5
    keys = [tuple(sorted((k, str(v)) for k, v in p.items())) for p in points]
    assert len(set(keys)) == len(keys)
    assert {"convnext_small.fb_in22k", "vit_small_patch16_224"} <= {p["arch"] for p in points}


def test_an_architecture_without_weights_gets_the_scratch_learning_rate():
    archs = {"resnet50": [224]}
    point = portfolio_points(paddy.PORTFOLIO, paddy.DEFAULT_RECIPE, archs, {"resnet50": False})[0]
    assert "lr" not in point and "freeze_fraction" not in point and "pretrained" not in point
    assert LR_SCRATCH[0] <= point["lr_scratch"] <= LR_SCRATCH[1]
    with_weights = portfolio_points(paddy.PORTFOLIO, paddy.DEFAULT_RECIPE, archs, {"resnet50": True},
                                    search_pretrained=True)[0]
    assert with_weights["pretrained"] is True and with_weights["lr"] == 3e-3


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("weights", [True, False])
def test_every_task_s_space_takes_its_portfolio_as_given(name, weights):
    task = TASKS[name]
    has = {a: weights for a in task.archs}
    points = portfolio_points(task.portfolio, task.default_recipe, task.archs, has)
    assert {p["arch"] for p in points} == set(task.archs)   # every architecture is covered
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for point in points:
        study.enqueue_trial(point)
    for point in points:
        trial = study.ask()
        with warnings.catch_warnings():
            warnings.simplefilter("error")   # a fixed value out of its range warns: fail on it
            constants = task.define_search_space(trial, archs=task.archs, pretrained=has)
        assert {k: trial.params[k] for k in point} == point
        assert constants["pretrained"] is weights
        study.tell(trial, 0.5)
