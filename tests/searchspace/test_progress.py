"""searchspace.progress.Progress: the best value per direction, early stops, finished and failed counts, throttling.

The callback is driven directly, the way Tune's controller calls it, with
real ``ray.tune.experiment.Trial`` objects (``stub=True``: no registered
trainable, no running Ray); ``status`` and ``last_result`` change as Tune
changes them (``set_status``; ``update_last_result`` after the callbacks).
The one exception is the failed trial handed to ``on_trial_error``: a real
Trial's ``error_file`` needs a trial folder, which only a running Ray session
provides, so that trial is a plain object with exactly the attributes the
callback reads (``trial_id``, ``config``, ``status``, ``last_result``,
``error_file``).
"""
from __future__ import annotations

import re
import types

from ray.tune.experiment import Trial

from searchspace.progress import Progress


def trial(trial_id: str, status: str = Trial.RUNNING, arch: str = "test_resnet", size: int = 16) -> Trial:
    t = Trial("train_one", config={"arch": arch, "image_size": size}, trial_id=trial_id, stub=True)
    t.set_status(status)
    return t


def report(progress: Progress, trials: list, t: Trial, **result) -> None:
    """One result, as Tune's controller delivers it: the callbacks first, then the trial's last_result."""
    result = dict(result, trial_id=t.trial_id)
    progress.on_trial_result(iteration=1, trials=trials, trial=t, result=result)
    t.update_last_result(result)


def summary(out: str) -> str:
    """The last progress line printed."""
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines, out
    return lines[-1]


def counts(line: str) -> tuple[int, int, int, int, int]:
    """(running, finished, total, stopped early, failed) from a progress line."""
    m = re.search(r"\] (\d+) running, (\d+)/(\d+) finished \((\d+) stopped early\), (\d+) failed \|", line)
    assert m, line
    return tuple(int(g) for g in m.groups())


# --- the best value ------------------------------------------------------------

def test_best_follows_the_maximum_in_mode_max(capsys):
    trials = [trial("a"), trial("b", size=24)]
    progress = Progress("accuracy", "max", max_epochs=3, total=2, every_s=0)
    report(progress, trials, trials[0], accuracy=0.5, epoch=1)
    report(progress, trials, trials[1], accuracy=0.8, epoch=1)
    report(progress, trials, trials[0], accuracy=0.6, epoch=2)  # better for a, not overall
    assert progress.best == (0.8, "b test_resnet@24 epoch 1")
    assert "best accuracy 0.8000 (b test_resnet@24 epoch 1)" in summary(capsys.readouterr().out)


def test_best_follows_the_minimum_in_mode_min(capsys):
    trials = [trial("a"), trial("b")]
    progress = Progress("loss", "min", max_epochs=3, total=2, every_s=0)
    report(progress, trials, trials[0], loss=0.9, epoch=1)
    report(progress, trials, trials[1], loss=1.5, epoch=1)
    report(progress, trials, trials[0], loss=0.4, epoch=2)
    report(progress, trials, trials[1], loss=0.7, epoch=2)
    assert progress.best == (0.4, "a test_resnet@16 epoch 2")
    assert "best loss 0.4000 (a test_resnet@16 epoch 2)" in summary(capsys.readouterr().out)


def test_a_result_without_the_metric_leaves_no_best(capsys):
    trials = [trial("a")]
    progress = Progress("accuracy", "max", max_epochs=3, total=1, every_s=0)
    report(progress, trials, trials[0], loss=0.3, epoch=1)
    assert progress.best is None
    assert summary(capsys.readouterr().out).endswith("| no result yet")


# --- completed trials ----------------------------------------------------------

def test_a_trial_completing_before_max_epochs_was_stopped_early(capsys):
    trials = [trial("a"), trial("b")]
    progress = Progress("accuracy", "max", max_epochs=4, total=2, every_s=3600)
    report(progress, trials, trials[0], accuracy=0.7, epoch=1)
    capsys.readouterr()
    progress.on_trial_complete(iteration=2, trials=trials, trial=trials[0])
    out = capsys.readouterr().out
    assert "trial a stopped early by ASHA after 1 epoch(s): accuracy 0.7000" in out
    assert counts(summary(out)) == (1, 1, 2, 1, 0)


def test_a_trial_that_ran_max_epochs_is_not_stopped_early(capsys):
    trials = [trial("a"), trial("b")]
    progress = Progress("accuracy", "max", max_epochs=3, total=2, every_s=3600)
    report(progress, trials, trials[0], accuracy=0.9, epoch=3)
    capsys.readouterr()
    progress.on_trial_complete(iteration=2, trials=trials, trial=trials[0])
    out = capsys.readouterr().out
    assert "trial a ran all 3 epochs: accuracy 0.9000" in out
    assert "stopped early by ASHA" not in out
    assert counts(summary(out)) == (1, 1, 2, 0, 0)


def test_a_completed_trial_counts_once_before_and_after_it_is_terminated(capsys):
    trials = [trial("a"), trial("b"), trial("c")]
    progress = Progress("accuracy", "max", max_epochs=2, total=3, every_s=0)
    report(progress, trials, trials[0], accuracy=0.5, epoch=2)
    report(progress, trials, trials[1], accuracy=0.6, epoch=1)
    capsys.readouterr()

    # Tune calls on_trial_complete while the trial is still RUNNING.
    progress.on_trial_complete(iteration=3, trials=trials, trial=trials[0])
    assert counts(summary(capsys.readouterr().out)) == (2, 1, 3, 0, 0)

    trials[0].set_status(Trial.TERMINATED)
    progress.on_trial_complete(iteration=4, trials=trials, trial=trials[1])
    assert counts(summary(capsys.readouterr().out)) == (1, 2, 3, 1, 0)

    trials[1].set_status(Trial.TERMINATED)
    report(progress, trials, trials[2], accuracy=0.1, epoch=1)  # the periodic line, both TERMINATED
    assert counts(summary(capsys.readouterr().out)) == (1, 2, 3, 1, 0)


def test_a_trial_terminated_before_the_callback_saw_it_counts_as_finished(capsys):
    trials = [trial("a", Trial.TERMINATED), trial("b")]
    progress = Progress("accuracy", "max", max_epochs=2, total=2, every_s=0)
    report(progress, trials, trials[1], accuracy=0.5, epoch=1)
    assert counts(summary(capsys.readouterr().out)) == (1, 1, 2, 0, 0)


def test_a_completed_trial_without_results_reports_nan(capsys):
    trials = [trial("a")]
    progress = Progress("accuracy", "max", max_epochs=2, total=1)
    progress.on_trial_complete(iteration=1, trials=trials, trial=trials[0])
    out = capsys.readouterr().out
    assert "trial a stopped early by ASHA after 0 epoch(s): accuracy nan" in out
    assert counts(summary(out)) == (0, 1, 1, 1, 0)


# --- failures ------------------------------------------------------------------

def failed(trial_id: str, error_file: str | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(trial_id=trial_id, config={"arch": "test_resnet", "image_size": 16},
                                 status=Trial.ERROR, last_result={}, error_file=error_file)


def test_errors_are_counted_and_name_the_error_file(capsys):
    bad = failed("b", "/runs/exp/b/error.txt")
    trials = [trial("a"), bad, trial("c", Trial.PENDING)]
    progress = Progress("accuracy", "max", max_epochs=2, total=3)
    progress.on_trial_error(iteration=1, trials=trials, trial=bad)
    out = capsys.readouterr().out
    assert "trial b failed: /runs/exp/b/error.txt" in out
    assert counts(summary(out)) == (1, 0, 3, 0, 1)

    worse = failed("c", None)
    trials[2] = worse
    progress.on_trial_error(iteration=2, trials=trials, trial=worse)
    out = capsys.readouterr().out
    assert "trial c failed: see its folder" in out
    assert counts(summary(out)) == (1, 0, 3, 0, 2)


# --- throttling ----------------------------------------------------------------

def test_the_periodic_line_waits_every_s(capsys):
    trials = [trial("a")]
    progress = Progress("accuracy", "max", max_epochs=3, total=1, every_s=3600)
    report(progress, trials, trials[0], accuracy=0.1, epoch=1)
    assert summary(capsys.readouterr().out)  # the first result prints
    report(progress, trials, trials[0], accuracy=0.2, epoch=2)
    assert capsys.readouterr().out == ""
    assert progress.best[0] == 0.2  # still tracked while quiet


def test_every_s_zero_prints_every_result(capsys):
    trials = [trial("a")]
    progress = Progress("accuracy", "max", max_epochs=3, total=1, every_s=0)
    report(progress, trials, trials[0], accuracy=0.1, epoch=1)
    report(progress, trials, trials[0], accuracy=0.2, epoch=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(lines) == 2
    assert "best accuracy 0.2000" in lines[1]


# --- the estimate ----------------------------------------------------------------

def test_the_line_printed_on_the_first_epoch_already_shows_the_estimate(capsys, tmp_path):
    # Tune calls the callbacks before it makes the result the trial's last_result; a search whose
    # first epoch was also its last (a loaded machine, a short share of the budget) showed no estimate.
    import time

    from searchspace.progress import Forecast
    from searchspace.time_budget import Clock

    clock = Clock.start(str(tmp_path / "exp"), 100, started=time.time() - 10)
    forecast = Forecast(clock, slots=1, trials=None, search_until_s=40, final_s=lambda epoch_s: 10 * epoch_s,
                        after_s=5)
    trials = [trial("a")]
    progress = Progress("accuracy", "max", max_epochs=3, total=None, every_s=0, forecast=forecast)
    report(progress, trials, trials[0], accuracy=0.5, epoch=1, time_total_s=2.0)
    line = summary(capsys.readouterr().out)
    assert "search ends ~" in line and "(in 30s)" in line, line


def test_without_a_budget_the_search_ends_when_the_remaining_trials_have_run(tmp_path):
    # 4 trials; "a" finished after 3 epochs, "b" is at its first: 3 x 3 - 1 = 8 epochs to go, 2 s each, 1 slot
    import time

    from searchspace.progress import Forecast
    from searchspace.time_budget import Clock

    clock = Clock.start(str(tmp_path / "exp"), None, started=time.time() - 10)
    forecast = Forecast(clock, slots=1, trials=4, search_until_s=None, final_s=lambda epoch_s: 0)
    a, b = trial("a"), trial("b")
    a.update_last_result({"epoch": 3, "time_total_s": 6.0})
    line = forecast.line([a, b], {"a"}, {"b": {"epoch": 1, "time_total_s": 2.0}})
    assert line is not None and "(in 16s)" in line, line
