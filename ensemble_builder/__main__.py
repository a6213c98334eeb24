"""python -m ensemble_builder {select,predict}: greedy ensembles from an experiment's candidates."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from ensemble_builder import candidates as cands
from ensemble_builder.crossval import STEPS_GRID, SelectionCV, metric_scores, random_folds, rank_candidates
from trainer import storage
from trainer.errors import BadInput
from trainer.experiment import DEFAULT_RUNS
from trainer.metrics import METRICS

DEFAULT_STEPS = 50   # with --no-auto and no --steps


def check_numbers(args) -> None:
    """Out-of-range numeric flags are bad input, caught before anything is read."""
    for flag, value, low, meaning in (("--top", args.top, 1, "the most distinct members to keep"),
                                      ("--steps", args.steps, 1, "greedy picks"),
                                      ("--init", args.init, 0, "how many best candidates start the ensemble"),
                                      ("--bags", args.bags, 0, "random halves to bag over; 0 is off"),
                                      ("--seed", args.seed, 0, "a random seed")):
        if value is not None and value < low:
            raise BadInput(f"{flag} {value}: must be at least {low} ({meaning})")


def score_table(rows: dict, metric: str, std: dict | None = None) -> str:
    """Predictors by metric, the task metric first (and its std over folds when given)."""
    table = pd.DataFrame(rows).T
    cols = [metric] + [k for k in ("accuracy", "log_loss", "f1_macro", "roc_auc") if k in table and k != metric]
    table = table[cols]
    if std is not None:
        table.insert(1, "± std", pd.Series(std))
    return table.to_string(float_format=lambda v: f"{v:.4f}")


def select(args) -> int:
    check_numbers(args)
    experiment = storage.absolute(args.experiment) if args.experiment else cands.newest_experiment(
        storage.absolute(args.runs))
    c = cands.load(experiment)
    metric = args.metric or c.meta["metric"]
    greater = METRICS[metric][1]
    m = len(c.ids)
    print(f"experiment {experiment}\n{m} candidate(s), "
          + ("cross-fitted: out-of-fold over all" if c.full_coverage else "holdout fold only:")
          + f" {len(c.y)} training images"
          + (f" ({len(c.left_out)} with another sample set left out)" if c.left_out else ""))
    top = args.top
    if top > m:
        print(f"--top {top} is more than the {m} candidate(s); using them all")
        top = m
    n_init = min(args.init, top)
    # The greedy step count is chosen by cross-validation unless given (or --no-auto).
    if args.steps or args.no_auto:
        steps = [args.steps or DEFAULT_STEPS]
    else:
        steps = [s for s in STEPS_GRID if s >= n_init]
    if not steps or n_init > max(steps):
        raise BadInput(f"--init {args.init}: more than the {max(steps or STEPS_GRID)} greedy steps; "
                       "lower --init or raise --steps")

    # Each fold's samples are held out in turn; candidates that cover the holdout
    # fold only have one fold, so random stratified splits of it stand in.
    if len(np.unique(c.folds)) > 1:
        folds, splits = c.folds, "experiment folds"
        how = f"the experiment's {len(np.unique(folds))} folds"
    elif len(c.y) > 1:
        folds, splits = random_folds(c.y, seed=args.seed), "random stratified"
        how = (f"{len(np.unique(folds))} random stratified splits of these {len(c.y)} images "
               "(the candidates cover one fold only)")
    else:
        raise BadInput(f"{experiment}: predictions for only one training image; nothing to select on")
    t0 = time.perf_counter()
    cv = SelectionCV(metric, steps=steps, bags=args.bags, n_init=n_init, max_members=top, top=top,
                     fallback=not args.no_auto, random_state=args.seed).fit(c.P, c.y, folds)
    cv_seconds = time.perf_counter() - t0
    selector, chosen = cv.selector_, cv.settings_[cv.chosen_]

    ranked = rank_candidates(c.P, c.y, metric)
    best = int(ranked[0])
    single = np.array([METRICS[metric][0](c.y, p) for p in c.P])
    blend = selector.predict_proba(c.P)
    uniform = c.P[ranked[:top]].mean(axis=0)
    result = {"ensemble": metric_scores(c.y, blend), "best_single": metric_scores(c.y, c.P[best]),
              f"uniform_top{top}": metric_scores(c.y, uniform)}

    # The headline: every predictor chosen without the samples it is scored on.
    est = cv.estimate_
    print(f"\ncross-validated {metric} ({how}: the selection re-run without each, scored on the held-out "
          f"images, pooled over all {len(c.y)}; ± std over folds):")
    label = {"ensemble": f"ensemble ({'= best single' if cv.fallback_ else chosen['name']})",
             "best_single": "best single", f"uniform_top{top}": f"uniform top {top}"}
    print(score_table({label[k]: v["scores"] for k, v in est.items()}, metric,
                      {label[k]: v["std"] for k, v in est.items()}))
    gains = np.array(cv.gain_folds_)
    better = "" if greater else " (a reduction: lower is better)"
    gain_std = gains.std(ddof=1) if len(gains) > 1 else 0.0
    print(f"CV gain over the best single candidate: {cv.gain_:+.4f} {metric}{better} (per fold "
          f"{gains.mean():+.4f} ± {gain_std:.4f}; better in {int((gains > 0).sum())} of {len(gains)} folds)")
    tried = ", ".join(f"{s['name']} {s['scores'][metric]:.4f}" for s in cv.settings_)
    if cv.fallback_:
        print(f"fell back to the best single candidate ({c.ids[best]}): no blend beat it under cross-validation "
              f"(CV {metric}: {tried})")
    elif args.no_auto:
        print(f"settings as given (--no-auto): {chosen['name']}")
    else:
        print(f"chose {chosen['name']}" + (" (--steps)" if args.steps else "") + f" by CV {metric} ({tried}; "
              "ties go to the lower CV log loss, then the simpler setting)")

    members = [(c.ids[i], float(selector.weights_[i])) for i in np.argsort(-selector.weights_)
               if selector.weights_[i] > 0]
    table = pd.DataFrame([{"candidate": cid, "weight": w, "arch": c.configs[cid].get("arch"),
                           "image_size": c.configs[cid].get("image_size"),
                           metric: single[c.ids.index(cid)]} for cid, w in members])
    print("\nmembers:\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nin-sample out-of-fold scores, optimistic: the weights were chosen on these same {len(c.y)} images")
    print(score_table({label[k]: v for k, v in result.items()}, metric))
    gain = (1 if greater else -1) * (result["ensemble"][metric] - result["best_single"][metric])  # > 0: better
    print(f"in-sample gain over the best single candidate ({c.ids[best]}): {gain:+.4f} {metric}{better} "
          "(optimistic; the CV gain above is the honest one)")
    names = c.meta["class_names"]
    pred = blend.argmax(1)
    print("\nper-class report (ensemble, in-sample out of fold):")
    print(classification_report(c.y, pred, labels=range(len(names)), target_names=names, digits=3, zero_division=0))
    print("confusion matrix (rows: true, columns: predicted):")
    print(pd.DataFrame(confusion_matrix(c.y, pred, labels=range(len(names))), index=names, columns=names).to_string())

    # Everything is computed and checked before anything is written.
    test = cands.test_matrix(c, [cid for cid, _ in members])
    report = dict(experiment=experiment, metric=metric, full_coverage=c.full_coverage,
                  members=[dict(candidate=cid, weight=w) for cid, w in members],
                  scores=result, trajectory=selector.trajectory_, best_step=selector.best_step_,
                  picks=[c.ids[i] for i in selector.indices_], candidates=c.ids, top=top, steps=chosen["steps"],
                  bags=chosen["bags"], best_single=c.ids[best],
                  cv=dict(splits=splits,
                          fold_sizes=np.unique(folds, return_counts=True)[1].tolist(), estimate=est, gain=cv.gain_,
                          gain_folds=cv.gain_folds_, chosen={k: chosen[k] for k in ("name", "steps", "bags")},
                          settings=cv.settings_, fallback=cv.fallback_,
                          auto=not args.no_auto, seconds=cv_seconds))
    out = storage.join(experiment, "ensemble")
    if test is not None:
        test_ids, T = test
        weights = np.array([w for _, w in members], np.float32)
        labels = np.tensordot(weights, T, axes=1).argmax(1)
        sub = pd.DataFrame({c.meta.get("id_column", "image_id"): test_ids,
                            c.meta.get("label_column", "label"): [names[i] for i in labels]})
        storage.write_bytes(storage.join(out, "submission.csv"), sub.to_csv(index=False).encode())
        report["submission"] = storage.join(out, "submission.csv")
    storage.write_json(storage.join(out, "ensemble.json"), report)
    print(f"\nwrote {storage.join(out, 'ensemble.json')}"
          + (f" and {report['submission']} ({len(test[0])} rows)" if test is not None
             else " (no submission: not every member has test predictions; cross-fit to get them)"))
    return 0


def predict(args) -> int:
    from trainer.cache import cached_images, default_cache_dir, fingerprint
    from trainer.images import IMAGE_SUFFIXES, scan
    from trainer.inference import load_model, predict_probs

    experiment = storage.absolute(args.experiment)
    ens_path = storage.join(experiment, "ensemble", "ensemble.json")
    if not storage.exists(ens_path):
        raise BadInput(f"{experiment}: no ensemble/ensemble.json; run `python -m ensemble_builder select` first")
    ensemble = storage.read_json(ens_path)
    meta = storage.read_json(storage.join(experiment, "experiment.json"))
    members = []
    for m in ensemble["members"]:
        info = storage.read_json(storage.join(experiment, "candidates", m["candidate"], "members.json"))
        for fm in info["members"]:
            for f in ("config.json", "model.pt"):
                if not storage.exists(storage.join(fm["checkpoint"], f)):
                    raise BadInput(f"{storage.join(fm['checkpoint'], f)}: member checkpoint missing "
                                   f"(candidate {m['candidate']}, fold {fm.get('fold')}); "
                                   "re-run the cross-fit or select again")
        members.append((m["weight"], [fm["checkpoint"] for fm in info["members"]]))

    images = storage.absolute(args.images)
    if not storage.is_dir(images):
        raise BadInput(f"{images}: folder not found; check --images")
    files = [f for f, _ in storage.list_files(images) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise BadInput(f"{images}: no image files found; give a folder of .jpg/.png images")
    paths = [storage.join(images, f) for f in files]
    sizes, bad = scan(paths)
    if bad:
        raise BadInput(f"{len(bad)} unreadable image(s), first {next(iter(bad))}: {next(iter(bad.values()))}; "
                       "remove them and predict again")
    key = fingerprint(paths, sizes)
    names = meta["class_names"]
    tta = meta.get("context", {}).get("tta", True) and not args.no_tta   # the task's choice, e.g. none for digits
    blend = np.zeros((len(paths), len(names)), np.float32)
    for weight, checkpoints in members:
        fold_probs = []
        for ckpt in checkpoints:
            model, config = load_model(ckpt)
            pixels = cached_images(paths, key, config["image_size"], config.get("resize_mode", "squish"),
                                   args.cache_dir or default_cache_dir())
            fold_probs.append(predict_probs(model, pixels, tta=tta))
        blend += weight * np.mean(fold_probs, axis=0)
    out = pd.DataFrame({"image": files, "label": [names[i] for i in blend.argmax(1)]})
    for j, name in enumerate(names):
        out[f"p_{name}"] = blend[:, j]
    storage.write_bytes(storage.absolute(args.out), out.to_csv(index=False, float_format="%.6f").encode())
    print(f"predicted {len(files)} image(s) with {sum(len(c) for _, c in members)} model(s); wrote {args.out}")
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
                   help="objective (default: the task's metric); ties break on log loss")
    s.add_argument("--steps", type=int, help="greedy steps, picks with replacement (default: chosen by "
                   f"cross-validation from {', '.join(map(str, STEPS_GRID))})")
    s.add_argument("--init", type=int, default=1, help="start from the best N candidates (sorted initialisation)")
    s.add_argument("--bags", type=int, default=0, help="bag the selection over this many random halves (default: off)")
    s.add_argument("--seed", type=int, default=0, help="random seed of bagging and of the random splits")
    s.add_argument("--no-auto", action="store_true",
                   help=f"select with --steps (default {DEFAULT_STEPS}) and --bags as given: no choice of the "
                        "step count and no fallback to the best single candidate by cross-validation")
    s.set_defaults(handler=select)
    r = sub.add_parser("predict", help="run the ensemble's members on new images and write a CSV")
    r.add_argument("--experiment", required=True, help="experiment folder or URI with ensemble/ensemble.json")
    r.add_argument("--images", required=True, help="folder (or URI) of images to classify")
    r.add_argument("--out", required=True, help="CSV to write: image, label, one probability per class")
    r.add_argument("--no-tta", action="store_true", help="no horizontal-flip test-time augmentation")
    r.add_argument("--cache-dir", help="image cache folder (default: the node cache)")
    r.set_defaults(handler=predict)
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
