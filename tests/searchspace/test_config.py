"""One search config: the command line is generated from it, and every value is checked once, the same way
from the command line and from ``searchspace.search()``'s keyword arguments."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

import searchspace
from core.errors import BadInput
from searchspace.config import PARTS, Budget, SearchConfig, add_arguments, duration, flag_of
from searchspace.run import parse_args

FIELDS = [f for part in PARTS.values() for f in dataclasses.fields(part)]
CHOICE_FIELDS = [f for f in FIELDS if f.metadata["choices"]]


def test_every_field_is_one_command_line_option_and_every_option_a_field():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(options) == {f.name for f in FIELDS}
    for f in FIELDS:
        assert options[f.name].option_strings == [flag_of(f)]
        if f.metadata["choices"]:
            assert list(options[f.name].choices) == list(f.metadata["choices"])
    # the run's own command line holds them all, beside the task, --data and the modes
    extra = set(vars(parse_args(["digits"]))) - {f.name for f in FIELDS}
    assert extra == {"task", "data", "crossfit_only", "experiment", "resume"}


def test_the_defaults_from_the_command_line_are_the_dataclasses_defaults():
    assert SearchConfig.from_args(parse_args(["digits"])) == SearchConfig()
    assert SearchConfig.from_kwargs() == SearchConfig()


@pytest.mark.parametrize("f", CHOICE_FIELDS, ids=lambda f: f.name)
def test_every_keyword_restricted_to_choices_is_checked(f, tmp_path):
    """search(aug_backend="Kornia") once trained with no augmentation at all; now every choice is checked."""
    bad = str(f.metadata["choices"][0]).upper() + "x"
    with pytest.raises(BadInput, match=flag_of(f).replace("--no-", "--")):
        searchspace.search("digits", storage=str(tmp_path), **{f.name: bad})
    assert not list(tmp_path.iterdir())   # nothing was written


@pytest.mark.parametrize("name, value, words", [
    ("trials", 0, "--trials 0: must be at least 1"),
    ("reduction_factor", 1, "--reduction-factor 1: must be at least 2"),
    ("folds", 1, "--folds 1: must be at least 2"),
    ("cpus_per_trial", 0, "--cpus-per-trial 0: must be more than 0"),
    ("max_concurrent", -1, "--max-concurrent -1: must be at least 0"),
    ("trials", 2.5, "--trials 2.5: must be a whole number"),
    ("search_pretrained", "yes", "--search-pretrained 'yes': must be True or False"),
    ("time_budget", "ten minutes", "--time-budget 'ten minutes': give a duration"),
    ("time_budget", 0, "--time-budget 0: must be more than 0"),
])
def test_bad_numbers_are_bad_input(name, value, words):
    with pytest.raises(BadInput) as e:
        SearchConfig.from_kwargs(**{name: value})
    assert words in str(e.value)


def test_the_command_line_checks_the_same_values(capsys):
    from searchspace.run import main
    assert main(["digits", "--folds", "1"]) == 2
    assert "--folds 1: must be at least 2" in capsys.readouterr().err
    assert main(["digits", "--time-budget", "5 parsecs"]) == 2
    err = capsys.readouterr().err
    assert "--time-budget '5 parsecs'" in err and "Traceback" not in err


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("8h", 28800), ("3600", 3600), ("1h30m", 5400),
                                           ("45s", 45), ("2.5h", 9000), (600, 600), ("1d", 86400)])
def test_durations(text, seconds):
    assert duration(text) == seconds


def test_an_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="trails"):
        SearchConfig.from_kwargs(trails=3)


def test_a_budget_over_the_task_s_fills_what_is_unset():
    base = Budget(trials=16, max_epochs=9, grace_period=1, reduction_factor=4, folds=5, crossfit_top=4)
    b = Budget(trials=3, grace_period=20, time_budget=600).over(base)
    assert (b.trials, b.max_epochs, b.grace_period, b.folds, b.time_budget) == (3, 9, 9, 5, 600)
