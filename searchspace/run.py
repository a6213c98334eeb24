"""python -m searchspace.run TASK: hyperparameter search, then cross-fit, into one experiment.

This module is the command line only: its options are generated from
``searchspace.config`` and handed to ``searchspace.api`` as one checked
config. The pieces are ``searchspace.prepare`` (architectures, data check,
index, weights), ``searchspace.tuner`` (Ray Tune with Optuna and ASHA),
``searchspace.crossfit`` and ``searchspace.resume``; docs/design.md
describes the experiment they write.
"""
from __future__ import annotations

import argparse
import sys

from core.errors import BadInput
from searchspace import api
from searchspace.config import SearchConfig, add_arguments
from searchspace.tasks import TASKS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m searchspace.run",
        description="Search timm image classifiers with Ray Tune (Optuna + ASHA), then cross-fit the best.")
    p.add_argument("task", help=f"one of: {', '.join(TASKS)}")
    p.add_argument("--data", help="data folder or URI (s3://, gs://); digits needs none")
    add_arguments(p)
    mode = p.add_argument_group("instead of a new search")
    mode.add_argument("--crossfit-only", action="store_true",
                      help="only cross-fit an existing experiment (--experiment); finished folds are kept")
    mode.add_argument("--experiment", help="an existing experiment folder or URI, for --crossfit-only")
    mode.add_argument("--resume", action="store_true",
                      help="continue the interrupted search --name (Tuner.restore keeps the Optuna state), then "
                           "cross-fit")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    config = SearchConfig.from_args(args)
    if args.crossfit_only:
        return api.crossfit_only(args.task, args.experiment, config)
    if args.resume:
        return api.resume_search(args.task, config)
    return api.run_search(args.task, args.data, config)[0]


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
