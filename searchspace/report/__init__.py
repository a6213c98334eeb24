"""python -m searchspace.report: one HTML page that explains an experiment.

Reads what the search, the cross-fit and ``ensemble_builder select`` wrote
(docs/design.md has the contract) and writes ``report/index.html`` with its PNG
figures into the experiment, through core.storage, so a bucket works like
a local folder. The page is static (inline CSS, no script, relative image
paths): copy the folder anywhere, or sync it from the bucket, and open it.

- ``load``: the experiment as the report reads it;
- ``importances``: Optuna importances, from the search's study or rebuilt from trials.parquet;
- ``figures``: every matplotlib figure, as PNG bytes;
- ``html``: escaping, formats, tables, the page around the sections (CSS in ``style.css``);
- ``page``: one function per section, and ``build``, which writes the page and its figures.
"""
from __future__ import annotations

import argparse
import sys

from core import experiment as contract
from core import storage
from core.errors import BadInput
from core.experiment import DEFAULT_RUNS
from searchspace.report.figures import fig_trajectory
from searchspace.report.load import Experiment, cv_score, load
from searchspace.report.page import build, cv_section

__all__ = ["Experiment", "build", "cv_score", "cv_section", "fig_trajectory", "load", "main", "parse_args"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m searchspace.report",
                                description="Write report/index.html (leaderboard, learning curves, "
                                            "hyperparameters, ensemble, time) into an experiment.")
    p.add_argument("--experiment", help="experiment folder or URI (default: the newest under --runs)")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="where to look for the newest experiment (default: ./runs)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        experiment = (storage.absolute(args.experiment) if args.experiment
                      else contract.newest(storage.absolute(args.runs)))
        written = build(experiment)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = storage.join(experiment, "report")
    print(f"wrote {storage.join(out, 'index.html')} and {len(written) - 1} figure(s): "
          + ", ".join(w for w in written if w != "index.html"))
    return 0
