"""--objective ensemble: the searcher optimises each trial's ensemble_gain while ASHA stops on the
trial's own metric; the study's states and values are what Tune did with each trial."""
from __future__ import annotations

import contextlib
import io

import optuna
import pandas as pd
import pytest
from helpers import make_paddy

from core.experiment import STUDY_FILE, Experiment, open_journal
from searchspace.run import main


def test_the_study_records_ensemble_gains_and_asha_stops_on_accuracy(tmp_path, ray_session):
    data = make_paddy(tmp_path / "data", classes=3, per_class=8, test=0)
    argv = ["paddy", "--data", str(data), "--storage", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
            "--name", "ens", "--archs", "test_resnet,test_efficientnet", "--image-sizes", "16", "--trials", "6",
            "--max-epochs", "3", "--grace-period", "1", "--reduction-factor", "2", "--folds", "2",
            "--crossfit-top", "0", "--pretrained", "no", "--objective", "ensemble", "--max-failures", "0",
            # one trial at a time: the order in which ASHA saw the results is the trials' order
            "--max-concurrent", "1"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, out.getvalue()
    exp = Experiment(str(tmp_path / "runs" / "ens"))
    trials = exp.trials()
    assert (trials["status"] == "ok").all() and trials["ensemble_gain"].notna().all()
    # every search trial that ran its whole schedule joined the pool, and only those
    assert sorted(exp.pool_ids()) == sorted(trials.loc[trials["completed"], "trial_id"])

    study = optuna.load_study(study_name="ens", storage=open_journal(str(tmp_path / "runs" / "ens" / STUDY_FILE)))
    # keyed by architecture and learning rate: the portfolio's default recipes share their lr
    by_lr = {(t.params["arch"], t.params.get("lr", t.params.get("lr_scratch"))): t for t in study.trials}
    for row in trials.itertuples():
        t = by_lr[(row.arch, row.lr)]
        if row.completed:
            # the value Optuna got is the ensemble gain, not the accuracy
            assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(row.ensemble_gain)
        else:
            assert row.stopped_early and t.state == optuna.trial.TrialState.PRUNED
            assert max(t.intermediate_values) == row.epochs_run
    # Results carry both metrics, and later trials saw earlier ones' predictions
    results = {p.parent.name: pd.read_json(p, lines=True)
               for p in (tmp_path / "runs" / "ens").glob("train_trial_*/result.json")}
    curves = pd.concat(results.values())
    assert {"accuracy", "ensemble_gain", "pool_size", "ensemble_gain_s"} <= set(curves.columns)
    assert curves["pool_size"].max() >= 1

    # ASHA ranked on accuracy: Ray's own bracket, replayed on the accuracies in the order the
    # trials ran, stops exactly the trials ASHA stopped, at the same epochs.
    order = sorted(results, key=lambda name: int(name.split("_")[3]))   # train_trial_<id>_<n>_...
    observed = {results[n]["trial_id"].iloc[0]: int(results[n]["epoch"].max()) for n in order}
    assert sum(e < 3 for e in observed.values()) >= 2, observed   # the replay has decisions to get right
    assert replay(results, order, "accuracy") == observed


def replay(results: dict, order: list[str], metric: str) -> dict[str, int]:
    """{trial_id: epochs run} as ASHA (grace 1, reduction 2, max 3) would decide on ``metric``."""
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.schedulers.async_hyperband import _Bracket

    bracket, out = _Bracket(min_t=1, max_t=3, reduction_factor=2, s=0), {}
    for name in order:
        curve = results[name].drop_duplicates("epoch").sort_values("epoch")
        trial = SimpleNamespace(trial_id=curve["trial_id"].iloc[0])
        for epoch, value in zip(curve["epoch"], curve[metric]):
            out[trial.trial_id] = int(epoch)
            if bracket.on_result(trial, int(epoch), float(value)) == TrialScheduler.STOP:
                break
    return out
