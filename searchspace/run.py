"""python -m searchspace.run TASK: hyperparameter search, then cross-fit, into one experiment.

This module is the command line only: it parses the options and hands them
to ``searchspace.api``. The pieces are ``searchspace.prepare`` (budget,
architectures, data check, index, weights), ``searchspace.tuner`` (Ray Tune
with Optuna and ASHA), ``searchspace.crossfit`` and ``searchspace.resume``;
docs/design.md describes the experiment they write.
"""
from __future__ import annotations

import argparse
import sys

from searchspace import api
from searchspace.tasks import TASKS
from trainer.cache import default_cache_dir
from trainer.errors import BadInput
from trainer.experiment import DEFAULT_RUNS
from trainer.weights import MODES as PRETRAINED_MODES


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m searchspace.run",
        description="Search timm image classifiers with Ray Tune (Optuna + ASHA), then cross-fit the best.")
    p.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data", help="data folder or URI (s3://, gs://); digits needs none")
    p.add_argument("--trials", type=int, help="number of trials (default: the task's budget)")
    p.add_argument("--max-epochs", type=int, help="epochs of a trial that is never stopped early")
    p.add_argument("--grace-period", type=int, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=int, help="ASHA: keep 1/this of the trials at each rung")
    p.add_argument("--folds", type=int, help="K for the stratified K folds")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0,
                   help="fraction allowed: 0.25 packs four small trials on one GPU")
    p.add_argument("--max-concurrent", type=int, default=0,
                   help="at most this many trials at once (0: as resources allow)")
    p.add_argument("--storage", default=DEFAULT_RUNS, help="folder or URI that holds experiments (default: ./runs)")
    p.add_argument("--name", help="experiment name (default: TASK-date-time)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=default_cache_dir(), help="this node's image cache (default: %(default)s)")
    p.add_argument("--archs", help="comma-separated timm model names that replace the task's architectures")
    p.add_argument("--image-sizes", help="comma-separated image sizes that replace the task's sizes")
    p.add_argument("--aug-backend", choices=["kornia", "albumentations"],
                   help="force the augmentation backend (default: kornia on GPU, albumentations on CPU)")
    p.add_argument("--weights-dir", help="folder of local pretrained weights, <arch>.safetensors or <arch>.pth")
    p.add_argument("--pretrained", choices=PRETRAINED_MODES,
                   help="auto: fine-tune where weights resolve offline (weights dir, HF cache, the hub if it answers "
                        "in seconds), train the rest from scratch; yes: stop if any architecture lacks weights; "
                        "no: all from scratch (default: auto; digits: no)")
    p.add_argument("--search-pretrained", action="store_true",
                   help="make pretrained-or-scratch a searched choice for architectures that have weights")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="leave unreadable images out (recorded in experiment.json) instead of stopping")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial, from its last checkpoint")
    p.add_argument("--crossfit-top", type=int,
                   help="cross-fit this many of the best configs over all K folds (default: the task's; 0: skip)")
    p.add_argument("--objective", choices=["own", "ensemble"], default="own",
                   help="what the searcher optimises: each trial's own metric (default), or its ensemble_gain "
                        "(how much it raises the greedy ensemble of the trials finished so far); ASHA always "
                        "stops trials on their own metric")
    p.add_argument("--no-portfolio", action="store_true",
                   help="do not start with the task's portfolio of known-good configs (TPE from the first trial)")
    p.add_argument("--crossfit-by", choices=["complementarity", "score"],
                   help="which configs to cross-fit: those the greedy ensemble of the fold-0 predictions picks "
                        "(default), or the top M by their own fold-0 score")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep every checkpoint file (default: drop optimiser states once the search is over, the "
                        "weights of trials ASHA stopped, and the cross-fit jobs' own copies)")
    p.add_argument("--crossfit-only", action="store_true",
                   help="only cross-fit an existing experiment (--experiment); finished folds are kept")
    p.add_argument("--experiment", help="an existing experiment folder or URI, for --crossfit-only")
    p.add_argument("--no-tta", action="store_true", help="predict the test set without horizontal-flip TTA")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search --name (Tuner.restore keeps the Optuna state), then cross-fit")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    options = vars(args).copy()
    task = options.pop("task")
    if options.pop("crossfit_only"):
        return api.crossfit_only(task, options.pop("experiment"), **api.crossfit_options(options))
    options.pop("experiment")
    if options.pop("resume"):
        return api.resume_search(task, **api.resume_options(options))
    options["tta"] = not options.pop("no_tta")
    options["portfolio"] = not options.pop("no_portfolio")
    return api.run_search(task, **options)[0]


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
