"""python -m ensemble_builder {select,predict}: greedy ensembles from an experiment's candidates."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from core import storage
from core.errors import BadInput
from core.experiment import DEFAULT_RUNS, newest
from core.metrics import METRICS
from ensemble_builder import ensemble
from ensemble_builder.crossval import STEPS_GRID


def score_table(rows: dict, metric: str, std: dict | None = None) -> str:
    """Predictors by metric, the task metric first (and its std over folds when given)."""
    table = pd.DataFrame(rows).T
    cols = [metric] + [k for k in ("accuracy", "log_loss", "f1_macro", "roc_auc") if k in table and k != metric]
    table = table[cols]
    if std is not None:
        table.insert(1, "± std", pd.Series(std))
    return table.to_string(float_format=lambda v: f"{v:.4f}")


def select(args) -> int:
    auto = not args.no_auto
    ensemble.check_numbers(args.top, args.steps, args.init, args.bags, args.seed)
    sel = ensemble.fit(args.experiment, args.top, metric=args.metric, steps=args.steps, init=args.init, bags=args.bags,
                  seed=args.seed, auto=auto, runs=args.runs)
    c, metric, top, cv, chosen = sel.candidates, sel.metric, sel.top, sel.cv, sel.chosen
    greater = METRICS[metric].greater_is_better
    print(f"experiment {sel.experiment}\n{len(c.ids)} candidate(s), "
          + ("cross-fitted: out-of-fold over all" if c.full_coverage else "holdout fold only:")
          + f" {len(c.y)} training images"
          + (f" ({len(c.left_out)} with another sample set left out)" if c.left_out else ""))
    if args.top > len(c.ids):
        print(f"--top {args.top} is more than the {len(c.ids)} candidate(s); using them all")

    # The headline: every predictor chosen without the samples it is scored on.
    est = sel.estimate
    print(f"\ncross-validated {metric} ({sel.how}: the selection, its choice of setting included, re-run "
          f"without each, scored on the held-out images, pooled over all {len(c.y)}; ± std over folds):")
    label = {"ensemble": f"ensemble ({'= best single' if cv.fallback_ else chosen['name']})",
             "best_single": "best single", f"uniform_top{top}": f"uniform top {top}",
             "nested_blend": "the selection, nested (not shipped)"}
    print(score_table({label[k]: v["scores"] for k, v in est.items()}, metric,
                      {label[k]: v["std"] for k, v in est.items()}))
    gains = np.array(cv.gain_folds_)
    better = "" if greater else " (a reduction: lower is better)"
    gain_std = gains.std(ddof=1) if len(gains) > 1 else 0.0
    whose = "of the selection " if "nested_blend" in est else ""
    print(f"CV gain {whose}over the best single candidate: {cv.gain_:+.4f} {metric}{better} (per fold "
          f"{gains.mean():+.4f} ± {gain_std:.4f}; better in {int((gains > 0).sum())} of {len(gains)} folds)")
    tried = ", ".join(f"{s['name']} {s['scores'][metric]:.4f}" for s in cv.settings_)
    if cv.shipped_single_:
        print(f"shipped the best single candidate ({sel.best_single}): the blend the selection chose has a nested "
              f"CV gain of {cv.gain_:+.4f}, not positive (CV {metric}: {tried})")
    elif cv.fallback_:
        print(f"fell back to the best single candidate ({sel.best_single}): no blend beat it under "
              f"cross-validation (CV {metric}: {tried})")
    elif not auto:
        print(f"settings as given (--no-auto): {chosen['name']}")
    else:
        print(f"chose {chosen['name']}" + (" (--steps)" if args.steps else "") + f" by CV {metric} ({tried}; "
              "ties go to the lower CV log loss, then the simpler setting)")
    if cv.nested_choices_:
        print("without each fold, the selection chose: "
              + ", ".join(f"fold {f}: {name}" for f, name in cv.nested_choices_.items()))

    single = {cid: METRICS[metric].fn(c.y, c.P[i]) for i, cid in enumerate(c.ids)}
    table = pd.DataFrame([{"candidate": cid, "kind": c.configs[cid].get("kind", "network"), "weight": w,
                           "arch": c.configs[cid].get("arch"), "image_size": c.configs[cid].get("image_size"),
                           metric: single[cid]} for cid, w in sel.members])
    if sel.stacking is not None:
        print("\nstacking: a logistic regression on these candidates' log-probabilities; weight = each one's share "
              "of its coefficients")
    print("\nmembers:\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nin-sample out-of-fold scores, optimistic: the weights were chosen on these same {len(c.y)} images")
    print(score_table({label[k]: v for k, v in sel.scores.items()}, metric))
    gain = (1 if greater else -1) * (sel.scores["ensemble"][metric] - sel.scores["best_single"][metric])
    print(f"in-sample gain over the best single candidate ({sel.best_single}): {gain:+.4f} {metric}{better} "
          "(optimistic; the CV gain above is the honest one)")
    names = c.meta["class_names"]
    pred = sel.blend().argmax(1)
    print("\nper-class report (ensemble, in-sample out of fold):")
    print(classification_report(c.y, pred, labels=range(len(names)), target_names=names, digits=3, zero_division=0))
    print("confusion matrix (rows: true, columns: predicted):")
    print(pd.DataFrame(confusion_matrix(c.y, pred, labels=range(len(names))), index=names, columns=names).to_string())

    ens_file, sub_file = ensemble.write(sel, auto)
    print(f"\nwrote {ens_file}" + (f" and {sub_file} ({len(sel.test[0])} rows)" if sub_file
                                  else " (no submission: not every member has test predictions; "
                                       "cross-fit to get them)"))
    return 0


def predict(args) -> int:
    from ensemble_builder.prediction import predict as run_members  # loads torch: only when predicting

    out = run_members(args.experiment, args.images, tta=not args.no_tta, cache_dir=args.cache_dir, model=args.model)
    storage.write_bytes(storage.absolute(args.out), out.to_csv(index=False, float_format="%.6f").encode())
    print(f"predicted {len(out)} image(s) with {out.attrs['models']} model(s); wrote {args.out}")
    return 0


def distill(args) -> int:
    from searchspace.config import Resources
    from searchspace.distill import distill as run  # loads torch and Ray: only when distilling

    res = Resources(cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial).check()
    experiment = args.experiment or newest(storage.absolute(args.runs))
    run(experiment, args.student, args.image_size, args.epochs, args.temperature, args.alpha, res)
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ensemble_builder",
                                description="Greedy ensemble selection (Caruana et al., 2004) over an experiment's "
                                            "out-of-fold predictions, and prediction with the chosen ensemble.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("select", help="pick complementary candidates, report, write ensemble.json and submission.csv")
    s.add_argument("--experiment", help="experiment folder or URI (default: the newest under --runs)")
    s.add_argument("--runs", default=DEFAULT_RUNS, help="where to look for the newest experiment (default: ./runs)")
    s.add_argument("--top", type=int, default=5, help="keep at most this many distinct members (default: 5)")
    s.add_argument("--metric", choices=sorted(METRICS),
                   help="the selection's objective (default: log_loss, whatever the task's metric: a proper "
                        "scoring rule, steadier than accuracy on a few thousand images; every metric is reported)")
    s.add_argument("--steps", type=int, help="greedy steps, picks with replacement (default: chosen by "
                   f"cross-validation from {', '.join(map(str, STEPS_GRID))})")
    s.add_argument("--init", type=int, default=1, help="start from the best N candidates (sorted initialisation)")
    s.add_argument("--bags", type=int, default=0,
                   help="also try the selection bagged over this many random halves; the cross-validated estimate "
                   "turns bagging on or off (default: off; with --no-auto: on)")
    s.add_argument("--seed", type=int, default=0, help="random seed of bagging and of the random splits")
    s.add_argument("--no-auto", action="store_true",
                   help=f"select with --steps (default {ensemble.DEFAULT_STEPS}) and --bags as given: no choice of the "
                        "step count and no fallback to the best single candidate by cross-validation")
    s.set_defaults(handler=select)
    r = sub.add_parser("predict", help="run the ensemble's members on new images and write a CSV")
    r.add_argument("--experiment", required=True, help="experiment folder or URI with ensemble/ensemble.json")
    r.add_argument("--images", required=True, help="folder (or URI) of images to classify")
    r.add_argument("--out", required=True, help="CSV to write: image, label, one probability per class")
    r.add_argument("--no-tta", action="store_true", help="no horizontal-flip test-time augmentation")
    r.add_argument("--cache-dir", help="image cache folder (default: the node cache)")
    r.add_argument("--model", choices=("ensemble", "student"), default="ensemble",
                   help="the shipped ensemble (default), or the distilled student alone (after distill)")
    r.set_defaults(handler=predict)
    d = sub.add_parser("distill", help="train one student network on the ensemble's soft targets: one model to "
                                       "deploy, with its size, speed and an honest score")
    d.add_argument("--experiment", help="experiment folder or URI with an ensemble (default: the newest under --runs)")
    d.add_argument("--runs", default=DEFAULT_RUNS, help="where to look for the newest experiment (default: ./runs)")
    d.add_argument("--student", help="timm architecture of the student (default: the experiment's architecture "
                                     "with the fewest parameters)")
    d.add_argument("--image-size", type=int, help="the student's image size (default: the best network's, or the "
                                                  "student architecture's largest searched size)")
    d.add_argument("--epochs", type=int, help="training length (default: the final models' length)")
    d.add_argument("--temperature", type=float, default=2.0, help="softens the ensemble's probabilities (default: 2)")
    d.add_argument("--alpha", type=float, default=0.7,
                   help="weight of the soft targets against the hard labels, 0 to 1 (default: 0.7)")
    d.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per student job (default: 1)")
    d.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per student job (default: 0)")
    d.set_defaults(handler=distill)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
