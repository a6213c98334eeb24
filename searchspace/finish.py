"""The end of a job: the final stage (the cross-fit), within what is left of a time budget, then the selection."""
from __future__ import annotations

from core.errors import BadInput
from core.experiment import Experiment, TrialContext
from searchspace import members, time_budget
from searchspace.config import SearchConfig
from searchspace.crossfit import crossfit
from searchspace.ray_start import start_ray
from searchspace.time_budget import Clock, clock_text


def final_stage(experiment: Experiment, config: SearchConfig, clock: Clock) -> int:
    """The cross-fit; under a time budget, within what is left of it, and then the selection."""
    b, opts, res = config.budget, config.options, config.resources
    fit_missing_members(experiment, res)
    if clock.budget_s is None:
        return crossfit(experiment, res, b.crossfit_top, opts.tta, opts.crossfit_by)
    until = clock.budget_s - time_budget.reserve(clock.budget_s)
    start = clock.used()
    code = crossfit(experiment, res, b.crossfit_top, opts.tta, opts.crossfit_by, clock=clock, until_s=until)
    clock.save(phase="selection", final_stage_s=round(clock.used() - start, 1))
    if any(c.startswith("cv-") for c in experiment.candidate_ids()):
        code = select_within_budget(experiment) or code
    used = clock.used()
    print(f"\njob: {clock_text(used)} of the {clock_text(clock.budget_s)} time budget "
          f"({'within it' if used <= clock.budget_s else f'{clock_text(used - clock.budget_s)} over'})", flush=True)
    clock.save(phase="done")
    return code


def select_within_budget(experiment: Experiment) -> int:
    """``ensemble_builder select`` with its defaults, as the last step of a budgeted job; a few lines of it."""
    from ensemble_builder.ensemble import select

    try:
        sel = select(experiment.location)
    except BadInput as e:
        print(f"selection: {e}", flush=True)
        return 1
    members = ", ".join(f"{cid} {w:.2f}" for cid, w in sel.members)
    task = experiment.meta()["metric"]
    est = {k: v["scores"] for k, v in sel.estimate.items()}
    also = (f"; {task} {est['ensemble'][task]:.4f} against {est['best_single'][task]:.4f}"
            if task != sel.metric and task in est["ensemble"] else "")
    print(f"\nselection ({sel.chosen['name']}): {members}; cross-validated gain over the best single "
          f"candidate {sel.cv_gain:+.4f} {sel.metric}{also}", flush=True)
    record = experiment.ensemble()
    print(f"wrote {experiment.ensemble_file()}" + (f" and {record['submission']}" if record.get("submission")
                                                    else " (no test set: no submission)"), flush=True)
    return 0


def fit_missing_members(experiment: Experiment, res) -> None:
    """The classical members the run asked for that are not there yet (a job resumed after a kill)."""
    wanted = members.missing(experiment, experiment.meta().get("members", []))
    if wanted:
        start_ray()
        meta = experiment.meta()
        ctx = TrialContext.from_dict({**meta["context"], "experiment": experiment.location})
        members.gather(members.launch(wanted, ctx, res))
