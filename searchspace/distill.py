"""One deployable model: the shipped ensemble distilled into a single student network.

``distill(experiment, ...)`` (``python -m ensemble_builder distill``):

1. The teacher: the shipped ensemble's out-of-fold probabilities on every
   training image (``ensemble_builder.ensemble.shipped_oof``), kept as the
   candidate's ``teacher.parquet``.
2. Two students of one recipe, run as Ray Tune jobs with a trial's resources
   (``trainer.distill.distill_job``), side by side when there are slots: one
   trained without the last fold, whose score on that fold is honest, and one
   trained on every training image, which ships. Each keeps its training state
   in the experiment after every epoch; running ``distill`` again after a kill
   continues both where they were.
3. The candidate ``student-<arch>-<size>`` (kind ``student``): its holdout-fold
   predictions as ``oof.parquet``, the shipped student's test predictions, its
   members.json. ``select`` never takes it as an input (it learned from the
   ensemble); ``predict --model student`` uses it alone.
4. What it buys: its size (parameters, MB), its images per second against the
   whole ensemble's, measured side by side on the same images, and its score
   against the ensemble and the best single candidate on the held-out fold;
   printed, kept in ensemble.json (``student``), and a submission-student.csv.

The recipe: the best network candidate's (its optimiser, schedule, loss and
augmentation), with the student's architecture and size; pretrained when the
experiment resolved weights for it. Its length: the final models' planned
length, or the searched one.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from core import storage
from core.errors import BadInput
from core.experiment import STUDENT_PREFIX, Experiment, TrialContext, aligned, probs_array, probs_table
from core.metrics import METRICS, accuracy, log_loss
from searchspace.config import Resources
from searchspace.tasks._space import LR_FINETUNE, LR_SCRATCH

TEMPERATURE, ALPHA = 2.0, 0.7   # Hinton et al.'s usual softening, and the soft loss's share


@dataclasses.dataclass(frozen=True)
class Student:
    arch: str
    image_size: int
    epochs: int
    temperature: float = TEMPERATURE
    alpha: float = ALPHA

    @property
    def candidate(self) -> str:
        return f"{STUDENT_PREFIX}{self.arch}-{self.image_size}"


def network_candidates(exp: Experiment) -> list[str]:
    """The cross-fitted networks, best first by their out-of-fold score (ensemble.json's ranking)."""
    record = exp.ensemble()
    kinds = record.get("kinds", {})
    ids = [c for c in record.get("candidates", []) if kinds.get(c, "network") == "network"]
    if not ids:
        raise BadInput(f"{exp.location}: the ensemble has no network candidate to take a recipe from; "
                       "run the search and the cross-fit first")
    index = exp.folds().set_index("sample_id")["label"]
    metric = METRICS[exp.meta()["metric"]]

    def score(cid: str) -> float:
        oof = exp.candidate(cid).oof()
        return metric.sign * metric.fn(index.loc[oof.column("sample_id").to_pylist()].to_numpy(), probs_array(oof))
    return sorted(ids, key=score, reverse=True)


def cheapest_arch(archs: list[str], num_classes: int) -> str:
    """The architecture with the fewest parameters (timm models built without weights)."""
    from trainer.model import create

    return min(archs, key=lambda a: sum(p.numel() for p in create(a, num_classes, 32).parameters()))


def plan(exp: Experiment, arch: str | None, image_size: int | None, epochs: int | None,
         temperature: float, alpha: float) -> tuple[Student, dict]:
    """The student and its recipe, from the options and the experiment."""
    meta = exp.meta()
    base = exp.candidate(network_candidates(exp)[0]).config()
    archs = meta["options"].get("archs") or {}
    arch = arch or cheapest_arch(sorted(archs) or [base["arch"]], len(meta["class_names"]))
    size = image_size or (int(base["image_size"]) if arch == base["arch"]
                          else max(archs.get(arch, [base["image_size"]])))
    length = epochs or (meta.get("final_plan") or {}).get("epochs") or meta["budget"]["max_epochs"]
    for name, value, low in (("--epochs", length, 1), ("--image-size", size, 8)):
        if int(value) < low:
            raise BadInput(f"{name} {value}: must be at least {low}")
    if not 0 < temperature <= 20 or not 0 <= alpha <= 1:
        raise BadInput(f"--temperature {temperature} / --alpha {alpha}: need 0 < T <= 20 and 0 <= alpha <= 1")
    pretrained = bool(meta["context"].get("weights", {}).get(arch))
    recipe = {**base, "arch": arch, "image_size": int(size), "pretrained": pretrained}
    if pretrained != bool(base.get("pretrained")):   # fine-tuning wants a tenth of a scratch learning rate
        lr = base["lr"] / 10 if pretrained else base["lr"] * 10
        recipe["lr"] = float(np.clip(lr, *(LR_FINETUNE if pretrained else LR_SCRATCH)))
    if not pretrained:
        recipe["freeze_fraction"] = 0.0
    return Student(arch, int(size), int(length), temperature, alpha), recipe


def jobs(exp: Experiment, student: Student, recipe: dict, teacher_file: str, holdout: int) -> list[dict]:
    """The two students not yet done: without the holdout fold (scored on it), and on every image (shipped)."""
    out = []
    for part, fold in (("holdout", holdout), ("all", None)):
        if not exp.candidate(student.candidate).fold(part).done():
            out.append(dict(candidate=student.candidate, part=part, fold=fold, epochs=student.epochs, recipe=recipe,
                            teacher=teacher_file, temperature=student.temperature, alpha=student.alpha))
    return out


def run_jobs(ctx: TrialContext, todo: list[dict], res: Resources) -> list:
    from ray import tune

    from searchspace.tuner import restartable
    from trainer.distill import distill_job

    fs, root = storage.resolve(ctx.experiment)
    tuner = tune.Tuner(
        tune.with_resources(restartable(tune.with_parameters(distill_job, ctx=ctx)),
                            {"cpu": res.cpus_per_trial, "gpu": res.gpus_per_trial}),
        param_space={"job": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(max_concurrent_trials=res.max_concurrent or None),
        run_config=tune.RunConfig(name=f"distill-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=root,
                                  storage_filesystem=fs, verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=res.max_failures)))
    return [r.error for r in tuner.fit() if r.error]


def distill(experiment: str, student: str | None = None, image_size: int | None = None, epochs: int | None = None,
            temperature: float = TEMPERATURE, alpha: float = ALPHA, resources: Resources | None = None,
            measure_images: int = 512) -> dict:
    """Distil the shipped ensemble into one student; returns (and keeps in ensemble.json) its record."""
    from ensemble_builder.ensemble import shipped_oof
    from searchspace.ray_start import start_ray

    exp = Experiment(storage.absolute(experiment))
    if not exp.exists():
        raise BadInput(f"{experiment}: not an experiment (no experiment.json); check --experiment")
    res = resources or Resources()
    order, teacher = shipped_oof(exp.location)
    spec, recipe = plan(exp, student, image_size, epochs, temperature, alpha)
    meta = exp.meta()
    holdout = int(meta["folds"]) - 1
    candidate = exp.candidate(spec.candidate)
    teacher_file = candidate.file("teacher.parquet")
    if not storage.exists(teacher_file):
        storage.write_parquet(teacher_file, probs_table(order, teacher))
    ctx = dataclasses.replace(TrialContext.from_dict(meta["context"]), experiment=exp.location,
                              cpus_per_trial=res.cpus_per_trial)
    todo = jobs(exp, spec, recipe, teacher_file, holdout)
    print(f"distil: {spec.arch}@{spec.image_size}, {spec.epochs} epochs, T={spec.temperature:g}, "
          f"alpha={spec.alpha:g}, from the ensemble's out-of-fold probabilities on {len(order)} images; "
          f"{len(todo)} student job(s) to run (one without fold {holdout} to score it, one on every image to ship)",
          flush=True)
    if todo:
        start_ray()
        errors = run_jobs(ctx, todo, res)
        if errors:
            raise RuntimeError(f"{len(errors)} student job(s) failed: {errors[0]}; run distill again to continue")
    record = assemble(exp, spec, recipe, holdout, order, teacher, measure_images)
    report(record)
    return record


def assemble(exp: Experiment, spec: Student, recipe: dict, holdout: int, order: list[str], teacher: np.ndarray,
             measure_images: int) -> dict:
    """The student's candidate, its scores on the held-out fold, size and speed; ensemble.json and the
    student's submission."""
    candidate = exp.candidate(spec.candidate)
    held, full = candidate.fold("holdout"), candidate.fold("all")
    seconds = held.record()["seconds"] + full.record()["seconds"]
    config = {**recipe, "kind": "student", "holdout_fold": holdout, "temperature": spec.temperature,
              "alpha": spec.alpha, "epochs": spec.epochs, "seconds": seconds}
    candidate.write([full.record()], held.holdout(), config, full.test() if full.has("test.parquet") else None)

    index = exp.folds().set_index("sample_id")
    fold_ids = index.index[index["fold"] == holdout].tolist()
    y = index.loc[fold_ids, "label"].to_numpy()
    record = exp.ensemble()
    best = record["best_single"]
    scores = {name: dict(accuracy=accuracy(y, P), log_loss=log_loss(y, P)) for name, P in (
        ("student", aligned(held.holdout(), fold_ids)),
        ("best_single", aligned(exp.candidate(best).oof(), fold_ids)),
        ("ensemble_in_sample", teacher[[order.index(s) for s in fold_ids]]))}
    nested = (record.get("cv") or {}).get("estimate", {}).get("ensemble", {}).get("folds")
    speed = measure_speed(exp, spec, record, measure_images)
    out = dict(candidate=spec.candidate, arch=spec.arch, image_size=spec.image_size, epochs=spec.epochs,
               temperature=spec.temperature, alpha=spec.alpha, holdout_fold=holdout, images=len(fold_ids),
               scores=scores, ensemble_nested_fold=dict(metric=record.get("metric"), score=nested[holdout])
               if nested and len(nested) > holdout else None,
               seconds=config["seconds"], **speed)
    if full.has("test.parquet"):
        names, meta = exp.meta()["class_names"], exp.meta()
        test = full.test()
        sub = pd.DataFrame({meta.get("id_column", "image_id"): test.column("sample_id").to_pylist(),
                            meta.get("label_column", "label"): [names[i] for i in probs_array(test).argmax(1)]})
        target = exp.ensemble_file("submission-student.csv")
        storage.write_bytes(target, sub.to_csv(index=False).encode())
        out["submission"] = target
    record["student"] = out
    storage.write_json(exp.ensemble_file(), record)
    return out


def model_size(checkpoint: str) -> tuple[int, float]:
    """(parameters, MB of the weights file) of one network checkpoint."""
    from trainer.inference import load_model

    model, _ = load_model(checkpoint)
    mb = len(storage.read_bytes(storage.join(checkpoint, "model.pt"))) / 1e6
    return sum(p.numel() for p in model.parameters()), mb


def measure_speed(exp: Experiment, spec: Student, record: dict, n: int) -> dict:
    """Sizes, and images per second of the student and of the whole ensemble (every fold model of every member,
    the task's TTA) on the same images, side by side: each warmed up once, then the best of two passes."""
    from ensemble_builder.prediction import member_probs
    from trainer.cache import default_cache_dir, fingerprint
    from trainer.images import scan

    frame = exp.test() if exp.has_test() else exp.folds()
    paths = frame["path"].tolist()[:n]
    cache_dir = exp.meta().get("context", {}).get("cache_dir") or default_cache_dir()
    sizes, _ = scan(paths, cache_dir=cache_dir)
    key = fingerprint(paths, sizes)
    tta = exp.meta().get("context", {}).get("tta", True)

    def rate(fn) -> float:
        fn()
        best = min(_timed(fn) for _ in range(2))
        return len(paths) / best

    members = [m["candidate"] for m in record["members"]]
    student_rate = rate(lambda: member_probs(exp, spec.candidate, paths, key, cache_dir, tta))
    ensemble_rate = rate(lambda: [member_probs(exp, c, paths, key, cache_dir, tta) for c in members])
    params, mb = model_size(exp.candidate(spec.candidate).fold("all").location)
    ens_params, ens_mb, models = 0, 0.0, 0
    for c in members:
        for fm in exp.candidate(c).members()["members"]:
            models += 1
            folder = fm["checkpoint"]
            if storage.exists(storage.join(folder, "model.pt")):
                p, m = model_size(folder)
                ens_params, ens_mb = ens_params + p, ens_mb + m
            else:   # a classical member's arrays
                ens_mb += len(storage.read_bytes(storage.join(folder, "model.npz"))) / 1e6
    return dict(params=params, mb=round(mb, 3), images_per_s=round(student_rate, 1), ensemble_models=models,
                ensemble_params=ens_params, ensemble_mb=round(ens_mb, 3), ensemble_images_per_s=round(ensemble_rate, 1),
                speedup=round(student_rate / ensemble_rate, 2), speed_images=len(paths))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def report(r: dict) -> None:
    s = r["scores"]
    print(f"\nstudent {r['candidate']}: {r['params']:,} parameters ({r['mb']:.2f} MB) against the ensemble's "
          f"{r['ensemble_models']} models ({r['ensemble_params']:,} parameters, {r['ensemble_mb']:.2f} MB)")
    print(f"speed on {r['speed_images']} images, side by side: student {r['images_per_s']:.0f} images/s, ensemble "
          f"{r['ensemble_images_per_s']:.0f} images/s ({r['speedup']:.1f}x)")
    print(f"on fold {r['holdout_fold']} ({r['images']} images), which the scored student never trained on:")
    for name, label in (("student", "student"), ("best_single", "best single candidate (out of fold)"),
                        ("ensemble_in_sample", "ensemble (its weights saw these images: optimistic)")):
        print(f"  {label:55s} accuracy {s[name]['accuracy']:.4f}  log loss {s[name]['log_loss']:.4f}")
    if r.get("ensemble_nested_fold"):
        n = r["ensemble_nested_fold"]
        print(f"  {'ensemble, nested CV on this fold (honest)':55s} {n['metric']} {n['score']:.4f}")
    print(f"training the students took {r['seconds']:.0f} s" + (f"; wrote {r['submission']}" if r.get("submission")
                                                                 else ""), flush=True)
