"""The shipped ensemble's members on new images: each fold model of each member, blended by the weights.

The only module of the package that loads torch (through the trainer); the
selection itself (``ensemble_builder.ensemble``) is numpy only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core import storage
from core.errors import BadInput
from core.experiment import CONFIG_FILE, MEMBER_FILE, MODEL_FILE, Checkpoint, Experiment
from ensemble_builder.stacking import stacked_proba
from trainer.cache import cached_images, default_cache_dir, fingerprint
from trainer.classical import KINDS, features_of, from_bytes
from trainer.classical import predict as classical_predict
from trainer.fit import weights_file
from trainer.images import IMAGE_SUFFIXES, scan
from trainer.inference import load_model, predict_probs


def predict(experiment: str, images: str, tta: bool = True, cache_dir: str | None = None,
            model: str = "ensemble") -> pd.DataFrame:
    """The ensemble's members (every fold model) on a folder of images: image, label, p_<class>...;
    ``model="student"``: the distilled student alone."""
    exp = Experiment(storage.absolute(experiment))
    if not exp.has_ensemble():
        raise BadInput(f"{exp.location}: no ensemble/ensemble.json; run `python -m ensemble_builder select` first")
    meta, record = exp.meta(), exp.ensemble()
    if model == "student":
        if not record.get("student"):
            raise BadInput(f"{exp.location}: no student; run `python -m ensemble_builder distill` first")
        record = dict(members=[dict(candidate=record["student"]["candidate"], weight=1.0)])
    members = [(m["candidate"], m["weight"]) for m in record["members"]]
    for cid, _ in members:
        check_member(exp, cid)

    images = storage.absolute(images)
    if not storage.is_dir(images):
        raise BadInput(f"{images}: folder not found; check --images")
    files = [f for f, _ in storage.list_files(images) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise BadInput(f"{images}: no image files found; give a folder of .jpg/.png images")
    paths = [storage.join(images, f) for f in files]
    cache_dir = cache_dir or default_cache_dir()
    sizes, bad = scan(paths, cache_dir=cache_dir)
    if bad:
        raise BadInput(f"{len(bad)} unreadable image(s), first {next(iter(bad))}: {next(iter(bad.values()))}; "
                       "remove them and predict again")
    key = fingerprint(paths, sizes)
    names = meta["class_names"]
    tta = meta.get("context", {}).get("tta", True) and tta   # the task's choice, e.g. none for digits
    probs = {cid: member_probs(exp, cid, paths, key, cache_dir, tta) for cid, _ in members}
    if record.get("stacking"):
        blend = stacked_proba(record["stacking"], probs).astype(np.float32)
    else:
        blend = np.zeros((len(paths), len(names)), np.float32)
        for cid, weight in members:
            blend += weight * probs[cid]
    out = pd.DataFrame({"image": files, "label": [names[i] for i in blend.argmax(1)]})
    for j, name in enumerate(names):
        out[f"p_{name}"] = blend[:, j]
    out.attrs["models"] = sum(len(exp.candidate(cid).members()["members"]) for cid, _ in members)
    return out


def check_member(exp: Experiment, cid: str) -> None:
    """Every fold model of candidate ``cid`` is where its members.json says; BadInput names what is missing."""
    record = exp.candidate(cid).members()
    files = (MEMBER_FILE,) if record["config"].get("kind") in KINDS else (CONFIG_FILE, MODEL_FILE)
    for fm in record["members"]:
        for f in files:
            if not Checkpoint(fm["checkpoint"]).has(f):
                raise BadInput(f"{storage.join(fm['checkpoint'], f)}: member checkpoint missing "
                               f"(candidate {cid}, fold {fm.get('fold')}); re-run the cross-fit or select again")


def member_probs(exp: Experiment, cid: str, paths: list[str], key: str, cache_dir: str, tta: bool) -> np.ndarray:
    """Candidate ``cid`` on the images: the mean of its fold models, each as it was trained (a network,
    or a classical member on the same features)."""
    record = exp.candidate(cid).members()
    config = record["config"]
    fold_probs = []
    if config.get("kind") in KINDS:
        weights = weights_file(exp.meta().get("context", {}).get("weights", {}).get(config.get("arch")), cache_dir)
        X = features_of(config, paths, key, cache_dir, weights)
        Xf = features_of(config, paths, key, cache_dir, weights, flip=True) if tta else None
        for fm in record["members"]:
            params = from_bytes(storage.read_bytes(Checkpoint(fm["checkpoint"]).member_model))
            P = classical_predict(config["kind"], params, X)
            fold_probs.append((P + classical_predict(config["kind"], params, Xf)) / 2 if tta else P)
        return np.mean(fold_probs, axis=0)
    for fm in record["members"]:
        model, cfg = load_model(fm["checkpoint"])
        pixels = cached_images(paths, key, cfg["image_size"], cfg.get("resize_mode", "squish"), cache_dir)
        fold_probs.append(predict_probs(model, pixels, tta=tta))
    return np.mean(fold_probs, axis=0)
