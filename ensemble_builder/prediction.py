"""The shipped ensemble's members on new images: each fold model of each member, blended by the weights.

The only module of the package that loads torch (through the trainer); the
selection itself (``ensemble_builder.ensemble``) is numpy only.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core import storage
from core.errors import BadInput
from core.experiment import CONFIG_FILE, MODEL_FILE, Checkpoint, Experiment
from trainer.cache import cached_images, default_cache_dir, fingerprint
from trainer.images import IMAGE_SUFFIXES, scan
from trainer.inference import load_model, predict_probs


def predict(experiment: str, images: str, tta: bool = True, cache_dir: str | None = None) -> pd.DataFrame:
    """The ensemble's members (every fold model) on a folder of images: image, label, p_<class>..."""
    exp = Experiment(storage.absolute(experiment))
    if not exp.has_ensemble():
        raise BadInput(f"{exp.location}: no ensemble/ensemble.json; run `python -m ensemble_builder select` first")
    meta = exp.meta()
    members = []
    for m in exp.ensemble()["members"]:
        folds = exp.candidate(m["candidate"]).members()["members"]
        for fm in folds:
            for f in (CONFIG_FILE, MODEL_FILE):
                if not Checkpoint(fm["checkpoint"]).has(f):
                    raise BadInput(f"{storage.join(fm['checkpoint'], f)}: member checkpoint missing "
                                   f"(candidate {m['candidate']}, fold {fm.get('fold')}); "
                                   "re-run the cross-fit or select again")
        members.append((m["weight"], [fm["checkpoint"] for fm in folds]))

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
    blend = np.zeros((len(paths), len(names)), np.float32)
    for weight, checkpoints in members:
        fold_probs = []
        for ckpt in checkpoints:
            model, config = load_model(ckpt)
            pixels = cached_images(paths, key, config["image_size"], config.get("resize_mode", "squish"), cache_dir)
            fold_probs.append(predict_probs(model, pixels, tta=tta))
        blend += weight * np.mean(fold_probs, axis=0)
    out = pd.DataFrame({"image": files, "label": [names[i] for i in blend.argmax(1)]})
    for j, name in enumerate(names):
        out[f"p_{name}"] = blend[:, j]
    out.attrs["models"] = sum(len(c) for _, c in members)
    return out
