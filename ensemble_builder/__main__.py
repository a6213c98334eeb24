"""python -m ensemble_builder {select,predict}: greedy ensembles from an experiment's candidates."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix

from ensemble_builder import candidates as cands
from ensemble_builder.selection import EnsembleSelection
from trainer import storage
from trainer.errors import BadInput
from trainer.metrics import METRICS

DEFAULT_RUNS = "runs"


def scores(y: np.ndarray, P: np.ndarray) -> dict:
    return {name: float(fn(y, P)) for name, (fn, _) in METRICS.items()
            if name != "roc_auc" or len(np.unique(y)) > 1}


def select(args) -> int:
    if args.top < 1:
        raise BadInput(f"--top {args.top}: must be at least 1 (the most distinct members to keep)")
    experiment = storage.absolute(args.experiment) if args.experiment else cands.newest_experiment(
        storage.absolute(args.runs))
    c = cands.load(experiment)
    metric = args.metric or c.meta["metric"]
    greater = METRICS[metric][1]
    m = len(c.ids)
    print(f"experiment {experiment}\n{m} candidate(s), "
          + ("cross-fitted: out-of-fold over all" if c.full_coverage else "holdout fold only:")
          + f" {len(c.y)} training images" + (f" ({len(c.left_out)} with another sample set left out)" if c.left_out else ""))
    top = args.top
    if top > m:
        print(f"--top {top} is more than the {m} candidate(s); using them all")
        top = m

    selector = EnsembleSelection(ensemble_size=args.steps, metric=metric, n_init=min(args.init, top),
                                 max_members=top, bags=args.bags, random_state=args.seed).fit(c.P, c.y)
    single = np.array([METRICS[metric][0](c.y, p) for p in c.P])
    ranked = np.argsort(-single if greater else single, kind="stable")
    best = int(ranked[0])
    blend = selector.predict_proba(c.P)
    uniform = c.P[ranked[:top]].mean(axis=0)
    result = {"ensemble": scores(c.y, blend), "best_single": scores(c.y, c.P[best]),
              f"uniform_top{top}": scores(c.y, uniform)}

    members = [(c.ids[i], float(selector.weights_[i])) for i in np.argsort(-selector.weights_) if selector.weights_[i] > 0]
    table = pd.DataFrame([{"candidate": cid, "weight": w, "arch": c.configs[cid].get("arch"),
                           "image_size": c.configs[cid].get("image_size"),
                           metric: single[c.ids.index(cid)]} for cid, w in members])
    print("\nmembers:\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nout-of-fold scores ({len(c.y)} images):")
    print(pd.DataFrame(result).T[[k for k in ("accuracy", "log_loss", "f1_macro", "roc_auc") if k in result["ensemble"]]]
          .to_string(float_format=lambda v: f"{v:.4f}"))
    gain = result["ensemble"][metric] - result["best_single"][metric]
    print(f"gain over the best single candidate ({c.ids[best]}): {gain:+.4f} {metric}")
    names = c.meta["class_names"]
    pred = blend.argmax(1)
    print("\nper-class report (ensemble, out of fold):")
    print(classification_report(c.y, pred, labels=range(len(names)), target_names=names, digits=3, zero_division=0))
    print("confusion matrix (rows: true, columns: predicted):")
    print(pd.DataFrame(confusion_matrix(c.y, pred, labels=range(len(names))), index=names, columns=names).to_string())

    # Everything is computed and checked before anything is written.
    test = cands.test_matrix(c, [cid for cid, _ in members])
    report = dict(experiment=experiment, metric=metric, full_coverage=c.full_coverage,
                  members=[dict(candidate=cid, weight=w) for cid, w in members],
                  scores=result, trajectory=selector.trajectory_, best_step=selector.best_step_,
                  picks=[c.ids[i] for i in selector.indices_], candidates=c.ids, top=top, steps=args.steps,
                  bags=args.bags, best_single=c.ids[best])
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
                                   f"(candidate {m['candidate']}, fold {fm.get('fold')}); re-run the cross-fit or select again")
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
    s.add_argument("--metric", choices=sorted(METRICS), help="objective (default: the task's metric); ties break on log loss")
    s.add_argument("--steps", type=int, default=50, help="greedy steps, picks with replacement (default: 50)")
    s.add_argument("--init", type=int, default=1, help="start from the best N candidates (sorted initialisation)")
    s.add_argument("--bags", type=int, default=0, help="bag the selection over this many random halves (default: off)")
    s.add_argument("--seed", type=int, default=0)
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
