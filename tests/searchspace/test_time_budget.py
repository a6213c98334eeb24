"""--time-budget: the split of the budget, the final stage's plan, the clock, and budgeted runs on real images.

The rules (searchspace.time_budget) are checked on numbers chosen by hand; the
budgeted runs are real searches on tiny images written to disk: they end
within the budget and a stated margin with a submission, the final stage
trains every fold at the planned length, and a budget too small for one
final config is refused before any trial. A budgeted search killed and
resumed is in tests/test_distributed.py, with the other kills.
"""
from __future__ import annotations

import contextlib
import io
import json
import time

import pandas as pd
import pytest
from helpers import make_paddy

from core.errors import BadInput
from core.experiment import Experiment
from searchspace import time_budget as tb
from searchspace.crossfit import ANCHOR_REASON
from searchspace.run import main
from searchspace.tasks import get_task
from searchspace.tuner import NOT_STARTED

# --- the rules ---------------------------------------------------------------------------

def test_makespan_fills_the_first_free_slot_in_order():
    assert tb.makespan([], 2) == 0
    assert tb.makespan([10, 10, 10], 2) == 20     # three equal jobs on two slots: two rounds
    assert tb.makespan([10, 10, 10, 10], 2) == 20
    assert tb.makespan([30, 10, 10, 10], 2) == 30
    assert tb.makespan([5, 5], 4) == 5


MEASURED = tb.Measured(train_s_per_image=0.001, predict_s_per_image=0.0002, setup_s=2.0)


def test_a_fold_job_costs_its_share_of_the_images():
    c = MEASURED.on_fold(n_images=1000, folds=4, n_test=500, tta=True)
    assert c.epoch_s == pytest.approx(750 * 0.001 + 250 * 0.0002 + tb.EPOCH_OVERHEAD_S)
    assert c.job_s == pytest.approx(2.0 + 500 * 0.0002 * 2)


def test_split_takes_the_most_folds_whose_one_config_reaches_the_length_cap():
    # 1000 images, 10 searched epochs, 2 slots: one epoch on a K-fold costs about (K-1)/K s
    big = tb.split(3600, 30, MEASURED, 1000, 0, False, 10, 2, folds=None, max_folds=5)
    assert big.folds == 5
    assert big.search_s == pytest.approx(tb.SEARCH_SHARE * (3600 - 30 - big.reserve_s))
    assert big.search_until_s == pytest.approx(30 + big.search_s)
    # 150 s: 70 s for the final stage; at 30 epochs 5 folds take 3 rounds of 33 s, 4 folds 2 rounds of 32 s
    small = tb.split(150, 30, MEASURED, 1000, 0, False, 10, 2, folds=None, max_folds=5)
    assert small.folds == 4
    # a K the user gave stands
    assert tb.split(3600, 30, MEASURED, 1000, 0, False, 10, 2, folds=3, max_folds=5).folds == 3


def test_a_budget_too_small_for_one_final_config_is_refused_with_the_budget_that_would_do():
    with pytest.raises(BadInput) as e:
        tb.split(60, 30, MEASURED, 100_000, 0, False, 10, 2, folds=None, max_folds=5)
    text = str(e.value)
    assert text.startswith("--time-budget 1m00s: too small for even one final config")
    assert "give at least --time-budget" in text and "\n" not in text
    # the budget it names is enough
    suggested = text.split("give at least --time-budget ")[1].split(",")[0]
    tb.split(tb_seconds(suggested), 30, MEASURED, 100_000, 0, False, 10, 2, folds=None, max_folds=5)


@pytest.mark.parametrize("task, options", [("paddy", dict(archs="resnet50")), ("paddy", dict(image_sizes="224")),
                                           ("digits", {})])
def test_no_fallback_for_architectures_or_sizes_the_user_chose_nor_for_a_task_without_a_small_space(task, options):
    from searchspace.api import Prepared, fall_back
    from searchspace.config import SearchConfig

    refused = tb.TooSmall("--time-budget 1m00s: too small for even one final config", 3600)
    config = SearchConfig.from_kwargs(**options)
    with pytest.raises(tb.TooSmall) as e:
        fall_back(Prepared(get_task(task), config, {"resnet50": [224]}, None, None, config), None, refused)
    assert e.value is refused      # the refusal stands, before any measurement


def tb_seconds(text: str) -> float:
    from searchspace.config import duration
    return duration(text)


def room(seconds: float) -> float:
    """The time to give the final stage so that ``seconds`` remain for its jobs after the start and the slack."""
    return (seconds + tb.STAGE_START_S) / tb.PLAN_SLACK + 1e-6


def costs(n: int, epoch_s: float = 1.0, job_s: float = 0.0) -> dict:
    return {f"c{i}": tb.Cost(epoch_s, job_s) for i in range(n)}


def test_the_final_stage_trains_one_config_longer_before_it_trains_more():
    # 2 folds on 2 slots: a config's epochs cost 1 s of wall time each
    plan = tb.plan_final(costs(3), room(20), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs) == (["c0"], 20)          # below the cap: all on length
    plan = tb.plan_final(costs(3), room(35), folds=2, slots=2, searched_epochs=10)
    # past the cap (3 x 10): two would get 17 < 2/3 x 30, so one config, stretched over the time left
    assert (plan.configs, plan.epochs) == (["c0"], 35)
    plan = tb.plan_final(costs(3), room(60), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs) == (["c0", "c1", "c2"], 20)   # three keep 2/3 of the cap
    plan = tb.plan_final(costs(3), room(1000), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs) == (["c0", "c1", "c2"], 60)   # never more than 6 x the searched length
    assert plan.seconds <= room(1000)


def test_another_config_joins_when_every_config_keeps_two_thirds_of_the_length():
    # the cap is 30 epochs: two configs at 20 (2/3 of it) fit in 40 s, one config alone gets 30
    plan = tb.plan_final(costs(2), room(40), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs) == (["c0", "c1"], 20)
    plan = tb.plan_final(costs(2), room(39), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs) == (["c0"], 39)


def test_a_config_too_slow_to_join_is_passed_over_for_a_cheaper_one_after_it():
    # c1's epochs cost ten times c0's: beside c0 it would get 3 epochs of the 30 (the cap); c2, as cheap as c0,
    # keeps 20 (2/3 of the cap), so c2 joins in c1's place instead of c0 training alone for 40
    ranked = {"c0": tb.Cost(1.0, 0.0), "c1": tb.Cost(10.0, 0.0), "c2": tb.Cost(1.0, 0.0)}
    plan = tb.plan_final(ranked, room(40), folds=2, slots=2, searched_epochs=10)
    assert (plan.configs, plan.epochs, plan.passed_over) == (["c0", "c2"], 20, ["c1"])
    # with the time for it, the slow one joins in its rank
    plan = tb.plan_final(ranked, room(500), folds=2, slots=2, searched_epochs=10)
    assert plan.configs == ["c0", "c1", "c2"] and plan.epochs >= 20 and plan.passed_over == []


def test_a_given_number_of_configs_gets_the_length_that_fits_them():
    plan = tb.plan_final(costs(3, job_s=5), room(65), folds=2, slots=2, searched_epochs=10, top=3)
    assert plan.configs == ["c0", "c1", "c2"] and plan.epochs == 16   # 3 rounds of (5 + 16) on 2 slots


def test_a_plan_never_goes_below_one_epoch_and_says_it_ran_short():
    plan = tb.plan_final(costs(1, epoch_s=100), 10, folds=2, slots=2, searched_epochs=10)
    assert plan.epochs == 1 and plan.epochs < plan.searched_epochs


def test_the_clock_counts_on_from_what_an_earlier_session_used(tmp_path):
    exp = Experiment(str(tmp_path / "exp"))
    clock = tb.Clock.start(exp.location, 600, started=time.time() - 100)
    clock.save(phase="search", search_until_s=300)
    assert exp.clock()["used_s"] == pytest.approx(100, abs=1)
    later = tb.Clock.resume(exp)               # a new session: the time since the save is not counted
    assert later.budget_s == 600 and later.state["search_until_s"] == 300
    assert later.used() == pytest.approx(100, abs=1) and later.left() == pytest.approx(500, abs=1)
    assert tb.Clock.of(exp.location) is later


def test_a_deadline_waits_for_what_must_finish(tmp_path):
    location = str(tmp_path / "exp")
    tb.Clock.start(location, 100, started=time.time() - 50)
    first_config_done = []
    deadline = tb.Deadline(location, 40, unless=lambda: not first_config_done)
    assert not deadline.stop_all() and deadline.overrun    # past its second, but nothing is complete yet
    first_config_done.append(True)
    deadline._checked = 0                                  # (it looks again every 2 s)
    assert deadline.stop_all() and deadline.reached


def test_the_search_s_deadline_waits_for_a_registered_checkpoint_but_not_past_the_budget(tmp_path):
    location = str(tmp_path / "exp")
    clock = tb.Clock.start(location, 100, started=time.time() - 50)
    deadline = tb.Deadline(location, 40, first_checkpoint=True)
    assert not deadline.stop_all() and deadline.overrun     # past its second, but no trial has reported yet
    assert deadline("t1", {"training_iteration": 1}) is False
    assert not deadline.stop_all()                          # reported, but Tune has not registered its checkpoint
    deadline.on_checkpoint(1, [], None, None)
    assert deadline.stop_all() and deadline.reached
    clock.used_before = 60                                  # 110 s of a 100 s budget, and still no checkpoint
    assert tb.Deadline(location, 40, first_checkpoint=True).stop_all()


def test_a_deadline_stops_at_its_second_of_the_job_clock(tmp_path):
    location = str(tmp_path / "exp")
    clock = tb.Clock.start(location, 100, started=time.time() - 50)
    assert not tb.Deadline(location, 60).stop_all()
    assert tb.Deadline(location, 40).stop_all()
    clock.used_before = 20                     # resumed: 20 s before + 50 s now
    assert tb.Deadline(location, 60).stop_all()
    assert tb.Deadline(str(tmp_path / "no clock"), 0).stop_all() is False


def test_a_trial_the_search_ended_before_it_started_keeps_its_id_and_config(tmp_path, ray_session):
    """When the search's share of the budget ends, trials Tune had queued never run an epoch; trials.parquet
    records each under its own id with its config, as not started (it had the folder's name and no config)."""
    from ray import tune
    from ray.tune.stopper import Stopper

    from searchspace.tuner import collect

    class AfterTheFirstResult(Stopper):   # the search's deadline, reached at its first result
        def __init__(self):
            self.reached = False

        def __call__(self, trial_id, result):
            self.reached = True
            return False

        def stop_all(self):
            return self.reached

    def trainable(config):
        tune.report({"accuracy": config["lr"], "epoch": 1})

    # each trial takes both CPUs of the session's Ray: one runs, Tune queues the other two
    grid = tune.Tuner(tune.with_resources(trainable, {"cpu": 2}),
                      param_space={"lr": tune.grid_search([0.1, 0.2, 0.3]), "arch": "test_resnet"},
                      run_config=tune.RunConfig(name="ended", storage_path=str(tmp_path), verbose=0,
                                                stop=AfterTheFirstResult())).fit()
    trials = collect(grid, "accuracy", Experiment(str(tmp_path / "exp")), max_epochs=1).set_index("trial_id")
    assert len(trials) == 3 and trials.index.is_unique, trials
    ran, queued = trials[trials["epochs_run"] == 1], trials[trials["stop_reason"] == NOT_STARTED]
    assert len(ran) >= 1 and len(queued) >= 1 and len(ran) + len(queued) == 3, trials[["epochs_run", "stop_reason"]]
    assert set(trials.index) == {t.trial_id for t in grid._experiment_analysis.trials}
    assert (trials["arch"] == "test_resnet").all() and sorted(trials["lr"]) == [0.1, 0.2, 0.3], trials
    assert queued["score"].isna().all() and (queued["status"] == "ok").all()


def test_a_trial_whose_checkpoint_a_kill_took_keeps_its_scores_without_a_candidate(tiny_experiment, tmp_path, capsys):
    """A resumed search whose share ends before a lost trial (its checkpoint went at the kill) makes another
    checkpoint: trials.parquet keeps the trial's scores as checkpoint lost, with no checkpoint and no candidate,
    and the other trials are collected as before (it read the missing checkpoint and the job died)."""
    import shutil

    from ray.tune import ExperimentAnalysis, ResultGrid

    from searchspace.tuner import CHECKPOINT_LOST, collect

    copy = tmp_path / "exp"
    shutil.copytree(tiny_experiment.experiment, copy)
    shutil.rmtree(copy / "candidates")
    grid = ResultGrid(ExperimentAnalysis(str(copy)))
    lost = grid[0]
    shutil.rmtree(lost.checkpoint.path)
    trials = collect(grid, "accuracy", Experiment(str(copy)), tiny_experiment.max_epochs).set_index("trial_id")
    t = lost.metrics["trial_id"]
    assert trials.loc[t, "stop_reason"] == CHECKPOINT_LOST and pd.isna(trials.loc[t, "checkpoint"]), trials.loc[t]
    assert trials.loc[t, "score"] == lost.metrics["accuracy"] and trials.loc[t, "status"] == "ok"
    assert f"trial {t}: its checkpoint" in capsys.readouterr().out
    exp = Experiment(str(copy))
    assert not exp.candidate(t).exists()
    others = trials.drop(t)
    assert len(others) == tiny_experiment.trials - 1 and others["checkpoint"].notna().all(), others
    assert (others["stop_reason"] != CHECKPOINT_LOST).all() and all(exp.candidate(o).has_oof() for o in others.index)


# --- budgeted runs ------------------------------------------------------------------------

SMALL = ("--archs", "test_resnet,test_efficientnet", "--image-sizes", "16", "--max-epochs", "3")


def _argv(data, tmp_path, budget: str, *extra: str, space: tuple = SMALL) -> list[str]:
    return ["paddy", "--data", str(data), "--storage", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "tb", *space, "--grace-period", "1", "--pretrained", "no", "--time-budget", budget, *extra]


MARGIN_S = 20   # stated in the README: a budgeted run ends within its budget plus this


@pytest.mark.slow
@pytest.mark.exclusive   # under xdist no second test shares its 100 s (conftest.py)
def test_a_budgeted_run_falls_back_to_the_small_space_ends_within_its_budget_with_a_submission_and_trains_the_plan(
        tmp_path, ray_session):
    # paddy's own space (convnext_small at 224 px first) cannot train one final config of 12 epochs on 2 folds
    # in 100 seconds on CPU cores: with no --archs or --image-sizes given, the run searches the task's small
    # fallback space instead, says so, and still ends within its budget with a submission (100 s and no more:
    # the run fills its budget, and every second of it is CI's)
    data = make_paddy(tmp_path / "data", classes=3, per_class=12, test=6)
    out = io.StringIO()
    start = time.time()
    with contextlib.redirect_stdout(out):
        code = main(_argv(data, tmp_path, "100s", space=("--max-epochs", "12")))
    took = time.time() - start
    text = out.getvalue()
    assert code == 0, text
    assert took <= 100 + MARGIN_S, (took, text)
    fallback = get_task("paddy").budget_fallback
    assert ("time budget 1m40s: one final config of the paddy task's own architectures needs at least "
            "--time-budget ") in text, text
    assert f"searching the small space that fits instead: {', '.join(fallback)} at 32-48 px" in text
    order = [text.find(said) for said in ("searching the small space", "used by the data check", "search ends ~")]
    assert -1 not in order and order == sorted(order), text
    exp = Experiment(str(tmp_path / "runs" / "tb"))
    clock = exp.clock()
    assert clock["budget_s"] == 100 and clock["used_s"] <= 100 + MARGIN_S and clock["state"]["phase"] == "done"
    # the split was said before the search, the plan before the final stage, the estimate while it ran
    assert "final stage planned:" in text and "search ends ~" in text
    assert text.index("time budget 1m40s: ") < text.index("search finished") < text.index("final stage planned:")
    # the search ran in the small space, which experiment.json records for a resumed job
    assert exp.meta()["options"]["archs"] == fallback
    assert set(exp.trials()["arch"]) <= set(fallback)   # a trial the deadline kept from starting too
    assert set(exp.meta()["context"]["weights"]) == set(fallback)
    # a submission, from the ensemble of what the final stage finished
    sub = pd.read_csv(exp.submission_file)
    assert len(sub) == 6 and "job: " in text and "within it" in text
    # the final stage trained every fold of the planned configs at the planned length, fold 0 included; the
    # first config always (the deadline waits for it), a later one unless the deadline came first (a loaded
    # machine is slower than the search measured), and then the output names it as skipped
    plan = exp.meta()["final_plan"]
    assert plan["configs"] and plan["epochs"] >= 1 and plan["folds"] == exp.meta()["folds"]
    for rank, tid in enumerate(plan["configs"]):
        candidate = exp.candidate(f"cv-{tid}")
        if rank > 0 and not candidate.exists():
            assert "the time budget ended the final stage: skipped" in text and f"cv-{tid}" in text, text
            continue
        for k in range(plan["folds"]):
            fold = candidate.fold(k)
            assert fold.done() and fold.record()["epochs"] == plan["epochs"], (tid, k)
            assert fold.record()["checkpoint"] == fold.location or plan["epochs"] == plan["searched_epochs"]
    assert exp.candidate(f"cv-{plan['configs'][0]}").exists()
    # trials stopped by the search's deadline are recorded as such, in trials.parquet and the study
    trials = exp.trials()
    # the task's default recipe (the search's first trial: the portfolio's first point) leads the final stage
    first = trials.set_index("trial_id").loc[plan["configs"][0]]
    assert first["crossfit_reason"] == ANCHOR_REASON, trials[["trial_id", "crossfit_rank", "crossfit_reason"]]
    assert first["arch"] == next(iter(fallback)) and "1. " + plan["configs"][0] in text
    assert set(trials["stop_reason"]) <= {"completed", "asha", "time budget", NOT_STARTED, "error"}, trials
    assert (trials.loc[trials["stop_reason"] == NOT_STARTED, "epochs_run"] == 0).all()


@pytest.mark.slow
def test_a_budget_too_small_for_one_config_is_refused_before_any_trial(tmp_path, ray_session, capsys):
    data = make_paddy(tmp_path / "data", classes=3, per_class=12, test=6)
    code = main(_argv(data, tmp_path, "25s", "--max-epochs", "200"))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("error: --time-budget 25s: too small for even one final config")
    assert not (tmp_path / "runs" / "tb").exists()   # nothing ran: the same --name can be used again
    json.dumps(lines)
