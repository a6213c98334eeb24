"""python -m searchspace.run TASK: hyperparameter search, then cross-fit, into one experiment.

Checks the data before any trial starts, writes the experiment's index, runs
Ray Tune (Optuna TPE sampling, ASHA early stopping; one trial = one config on
fold 0), and writes trials.parquet and each trial's holdout predictions as a
candidate. docs/design.md describes the experiment contract.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pyarrow as pa

from searchspace.data import SkippedFiles, build_index
from searchspace.tasks import TASKS, get_task
from trainer import storage
from trainer.cache import default_cache_dir, fingerprint
from trainer.errors import BadInput
from trainer.images import scan
from trainer.metrics import METRICS
from trainer.model import check_arch
from trainer import weights as weights_mod
from trainer.weights import MODES as PRETRAINED_MODES

DEFAULT_RUNS = "runs"
STUDY_FILE = "optuna_journal.log"


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
    p.add_argument("--max-concurrent", type=int, default=0, help="at most this many trials at once (0: as resources allow)")
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
    p.add_argument("--crossfit-only", action="store_true",
                   help="only cross-fit an existing experiment (--experiment); finished folds are kept")
    p.add_argument("--experiment", help="an existing experiment folder or URI, for --crossfit-only")
    p.add_argument("--no-tta", action="store_true", help="predict the test set without horizontal-flip TTA")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted search --name (Tuner.restore keeps the Optuna state), then cross-fit")
    return p.parse_args(argv)


# --- options -----------------------------------------------------------------

def check_options(args) -> None:
    """Numeric options that the budget does not cover, checked before anything starts."""
    for name, low, strict in (("cpus_per_trial", 0, True), ("gpus_per_trial", 0, False),
                              ("max_concurrent", 0, False), ("max_failures", 0, False)):
        value = getattr(args, name)
        if value < low or (strict and value == low):
            raise BadInput(f"--{name.replace('_', '-')} {value}: must be {'more than' if strict else 'at least'} {low}")


def budget(task, args) -> dict:
    b = dict(task.BUDGET)
    for key in ("trials", "max_epochs", "grace_period", "reduction_factor", "folds", "crossfit_top"):
        if getattr(args, key) is not None:
            b[key] = getattr(args, key)
    for key, low in (("trials", 1), ("max_epochs", 1), ("grace_period", 1), ("reduction_factor", 2), ("folds", 2),
                     ("crossfit_top", 0)):
        if b[key] < low:
            raise BadInput(f"--{key.replace('_', '-')} {b[key]}: must be at least {low}")
    b["grace_period"] = min(b["grace_period"], b["max_epochs"])
    return b


def architectures(task, args) -> dict[str, list[int]]:
    """The task's {arch: sizes}, narrowed or replaced by --archs / --image-sizes."""
    sizes = None
    if args.image_sizes:
        try:
            sizes = sorted({int(s) for s in args.image_sizes.split(",") if s.strip()})
        except ValueError:
            raise BadInput(f"--image-sizes {args.image_sizes!r}: give integers such as 128,224") from None
        if not sizes or min(sizes) < 8:
            raise BadInput(f"--image-sizes {args.image_sizes!r}: sizes must be 8 px or more")
    names = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else list(task.ARCHS)
    for name in names:
        check_arch(name)
    fallback = sorted({s for v in task.ARCHS.values() for s in v})
    return {name: sizes or task.ARCHS.get(name, fallback) for name in names}


# --- data --------------------------------------------------------------------

def prepare(task, args, b: dict, experiment: str, archs: dict | None = None) -> dict:
    """Load and check the data and the weights, write folds/test/experiment.json; returns the trial context."""
    data = args.data
    if data is None:
        if not hasattr(task, "default_data"):
            raise BadInput(f"task {args.task!r} needs --data (a folder or URI with the images)")
        data = task.default_data(args.cache_dir)
    data = storage.absolute(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedFiles)
        dataset = task.load(data)
    for w in caught:
        print(f"warning: {w.message}", flush=True)
    if dataset.test is not None and dataset.test.empty:
        print("the test folder holds no images: no test set, so no test predictions and no submission", flush=True)
        dataset.test = None

    train_paths = dataset.train["path"].tolist()
    test_paths = dataset.test["path"].tolist() if dataset.test is not None else []
    print(f"checking {len(train_paths) + len(test_paths)} images in {data} ...", flush=True)
    sizes, bad = scan(train_paths + test_paths)
    if bad and not args.skip_unreadable:
        listed = "\n".join(f"  {path}: {why}" for path, why in bad.items())
        raise BadInput(f"{len(bad)} unreadable image(s); fix or remove them, or pass --skip-unreadable:\n{listed}")
    if bad:
        print(f"leaving out {len(bad)} unreadable image(s) (--skip-unreadable); listed in experiment.json")
    keep = [p not in bad for p in train_paths]
    train = dataset.train[keep]
    index, classes = build_index(train.reset_index(drop=True), b["folds"], args.seed)
    size_of = dict(zip(train_paths + test_paths, sizes))
    weights = resolve_weights(task, args, archs or architectures(task, args), experiment)
    storage.write_parquet(storage.join(experiment, "folds.parquet"), pa.Table.from_pandas(index, preserve_index=False))

    test_key = None
    if dataset.test is not None:
        test = dataset.test[[p not in bad for p in test_paths]].reset_index(drop=True)
        if dataset.submission_order is not None:
            rank = {s: i for i, s in enumerate(dataset.submission_order)}
            test = test.sort_values("sample_id", key=lambda s: s.map(rank).fillna(len(rank))).reset_index(drop=True)
        storage.write_parquet(storage.join(experiment, "test.parquet"),
                              pa.Table.from_pandas(test[["sample_id", "path"]], preserve_index=False))
        test_key = fingerprint(test["path"].tolist(), [size_of[p] for p in test["path"]])

    ctx = dict(
        experiment=experiment, cache_dir=os.path.abspath(args.cache_dir), metric=task.METRIC,
        data_key=fingerprint(index["path"].tolist(), [size_of[p] for p in index["path"]]),
        test_key=test_key, num_classes=len(classes), max_epochs=b["max_epochs"],
        aug_backend=args.aug_backend, weights=weights, search_pretrained=args.search_pretrained,
        tta=getattr(task, "FLIP_TTA", True) and not args.no_tta,
        cpus_per_trial=args.cpus_per_trial, seed=args.seed)
    storage.write_json(storage.join(experiment, "experiment.json"), dict(
        task=args.task, data=data, options=vars(args), budget=b, class_names=classes, folds=b["folds"],
        seed=args.seed, metric=task.METRIC, mode=mode_of(task.METRIC),
        id_column=dataset.id_column, label_column=dataset.label_column,
        skipped_unreadable=bad, context=ctx, versions=versions(),
        created=datetime.datetime.now().isoformat(timespec="seconds")))
    print(f"{len(index)} training images in {len(classes)} classes, {b['folds']} folds"
          + (f", {len(test)} test images" if dataset.test is not None else ", no test set"), flush=True)
    return ctx


def resolve_weights(task, args, archs: dict, experiment: str) -> dict[str, str | None]:
    """{arch: weights location or None}, found before any trial; one line per architecture.

    Trials get a file to load and never go to the hub themselves. When the
    experiment lives in a bucket, each file is copied into it once
    (``weights/<arch><suffix>``), so that every node of a cluster can read it.
    """
    mode = args.pretrained or getattr(task, "PRETRAINED", "auto")
    resolved = weights_mod.resolve(list(archs), args.weights_dir, mode)
    out = {}
    for arch, r in resolved.items():
        if mode != "no":
            print(weights_mod.describe(r), flush=True)
        location = r.file
        if location and storage.is_uri(experiment):
            location = storage.join(experiment, "weights", arch + os.path.splitext(r.file)[1])
            with open(r.file, "rb") as f:
                storage.write_bytes(location, f.read())
        out[arch] = location
    return out


def mode_of(metric: str) -> str:
    return "max" if METRICS[metric][1] else "min"


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("ray", "optuna", "torch", "timm", "kornia", "albumentations", "pyarrow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


# --- search ------------------------------------------------------------------

def build_tuner(task, args, ctx: dict, b: dict, archs: dict, experiment: str):
    """The Tuner, OptunaSearch and ASHAScheduler, built together in one place."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter

    from searchspace.progress import Progress
    from searchspace.searcher import TruthfulOptunaSearch

    metric, mode = task.METRIC, mode_of(task.METRIC)
    fs, root = storage.resolve(experiment)
    parent, name = root.rsplit("/", 1)
    # OptunaSearch needs metric and mode itself with a define-by-run space;
    # ASHA takes them from TuneConfig (giving them to it too is an error).
    # The study lives in a journal file that optuna-dashboard opens.
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(study_file(experiment, args)))
    # ASHA-stopped trials are told PRUNED, not COMPLETE with an early score.
    has_weights = {arch: ctx["weights"].get(arch) is not None for arch in archs}
    searcher = TruthfulOptunaSearch(
        space=functools.partial(task.define_search_space, archs=archs, pretrained=has_weights,
                                search_pretrained=ctx.get("search_pretrained", False)),
        metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=args.seed),
        study_name=name, storage=journal, max_t=b["max_epochs"])
    # The limiter also sets how many trials Tune samples ahead; without it
    # Tune keeps one pending trial and a second slot idles while actors start.
    searcher = ConcurrencyLimiter(searcher, max_concurrent=args.max_concurrent or concurrency(args))
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=b["max_epochs"],
                              grace_period=b["grace_period"], reduction_factor=b["reduction_factor"])
    return tune.Tuner(
        trainable(args, ctx),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=searcher, scheduler=scheduler,
                                    num_samples=b["trials"], reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=parent, storage_filesystem=fs, verbose=0,
            callbacks=[Progress(metric, mode, b["max_epochs"], b["trials"])],
            # The latest checkpoint only: a retry resumes from it, a trial's candidate is its
            # final epoch (never an epoch picked on the holdout), and a completed trial's
            # final checkpoint is fold 0 of its cross-fit.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=args.max_failures)))


def trainable(args, ctx: dict, crossfit: bool = False):
    from ray import tune

    from trainer.fit import crossfit_fold, train_trial
    return tune.with_resources(tune.with_parameters(crossfit_fold if crossfit else train_trial, ctx=ctx),
                               {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial})


def study_file(experiment: str, args) -> str:
    """The Optuna journal: in the experiment when local, else on this disk until the search ends."""
    if not storage.is_uri(experiment):
        os.makedirs(experiment, exist_ok=True)
        return os.path.join(experiment, STUDY_FILE)
    os.makedirs(os.path.join(args.cache_dir, "studies"), exist_ok=True)
    return os.path.join(args.cache_dir, "studies", storage.resolve(experiment)[1].rsplit("/", 1)[-1] + ".log")


def concurrency(args) -> int:
    """Trials that fit the cluster now; 8 when it has none yet (an autoscaler will add nodes)."""
    import ray
    free = ray.cluster_resources()
    slots = free.get("CPU", 0) / max(args.cpus_per_trial, 1e-9)
    if args.gpus_per_trial:
        slots = min(slots, free.get("GPU", 0) / args.gpus_per_trial)
    return int(slots) if slots >= 1 else 8


def collect(results, task, experiment: str, max_epochs: int) -> pd.DataFrame:
    """trials.parquet and candidates/<trial_id>/ from a ResultGrid.

    ``score`` is the metric at a trial's last epoch and its candidate is that
    epoch's holdout prediction: choosing the best epoch by the holdout score
    and then ensembling those same predictions would be optimistic.
    ``best_score``/``best_epoch`` are kept to show the learning curve's peak.
    ``completed``: the trial ran its whole schedule (ASHA did not stop it).
    """
    metric, mode = task.METRIC, mode_of(task.METRIC)
    rows = []
    for result in results:
        config = {k: v for k, v in (result.config or {}).items() if not k.startswith("image_size_")}
        history = result.metrics_dataframe
        row = {"trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path), **config,
               "metric": metric, "score": None, "best_score": None, "best_epoch": None, "epochs_run": 0,
               "completed": False, "stopped_early": False, "seconds": (result.metrics or {}).get("time_total_s"),
               "status": "error" if result.error else "ok",
               "error": str(result.error).strip().splitlines()[-1][:500] if result.error else None,
               "checkpoint": None}
        if history is not None and metric in history and len(history):
            history = history.drop_duplicates("epoch", keep="last")   # a retried trial repeats epochs
            best = history[metric].idxmax() if mode == "max" else history[metric].idxmin()
            last = history["epoch"].idxmax()
            row.update(score=float(history[metric][last]), best_score=float(history[metric][best]),
                       best_epoch=int(history["epoch"][best]), epochs_run=int(history["epoch"][last]))
            row["completed"] = row["epochs_run"] >= max_epochs and not result.error
            row["stopped_early"] = row["epochs_run"] < max_epochs and not result.error
        if result.checkpoint is not None and row["score"] is not None:
            uri = checkpoint_uri(experiment, result.checkpoint.path)
            row["checkpoint"] = uri
            write_candidate(experiment, row["trial_id"], [dict(checkpoint=uri, fold=0)],
                            storage.read_parquet(storage.join(uri, "holdout.parquet")), config)
        rows.append(row)
    trials = pd.DataFrame(rows)
    storage.write_parquet(storage.join(experiment, "trials.parquet"), pa.Table.from_pandas(trials, preserve_index=False))
    return trials


def ranked(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Trials best first: those that ran their whole schedule, then by final score."""
    ok = trials[trials["score"].notna()]
    return ok.sort_values(["completed", "score"], ascending=[False, mode == "min"], kind="stable")


def checkpoint_uri(experiment: str, path_in_fs: str) -> str:
    """A checkpoint's path inside the storage filesystem -> a location under the experiment."""
    _, root = storage.resolve(experiment)
    return storage.join(experiment, path_in_fs[len(root):]) if path_in_fs.startswith(root) else path_in_fs


def write_candidate(experiment: str, cid: str, members: list[dict], oof: pa.Table, config: dict,
                    test: pa.Table | None = None) -> None:
    base = storage.join(experiment, "candidates", cid)
    storage.write_parquet(storage.join(base, "oof.parquet"), oof.select(["sample_id", "probs"]))
    if test is not None:
        storage.write_parquet(storage.join(base, "test.parquet"), test)
    storage.write_json(storage.join(base, "members.json"), dict(candidate=cid, config=config, members=members))


def leaderboard(trials: pd.DataFrame, metric: str, mode: str, top: int = 15) -> str:
    ok = ranked(trials, mode)
    cols = ["trial_id", "arch", "image_size", "pretrained", "optimizer", "lr", "batch_size", "score", "best_epoch",
            "epochs_run", "stopped_early", "seconds"]
    table = ok[[c for c in cols if c in ok]].head(top).rename(columns={"score": metric})
    failed = trials[trials["status"] == "error"]
    text = table.to_string(index=False, float_format=lambda v: f"{v:.4g}")
    if len(failed):
        text += "\n" + "\n".join(f"failed {r.trial_id}: {r.error}" for r in failed.itertuples())
    return text


# --- cross-fit -----------------------------------------------------------------

def crossfit_jobs(trials: pd.DataFrame, experiment: str, top: int, folds: int, mode: str) -> tuple[list[str], list[dict]]:
    """The top configs' candidate ids, and a job for every fold not yet done.

    Only trials that ran their whole schedule are cross-fitted, each at that
    schedule's length: every fold then trains exactly the recipe whose fold-0
    score the search saw. Fold 0 is that trial's final checkpoint.
    """
    done = ranked(trials, mode)
    done = done[done["completed"] & done["checkpoint"].notna()].head(top)
    cids, jobs = [], []
    for row in done.itertuples():
        cid = f"cv-{row.trial_id}"
        cids.append(cid)
        config = storage.read_json(storage.join(experiment, "candidates", row.trial_id, "members.json"))["config"]
        for fold in range(folds):
            if storage.exists(storage.join(experiment, "candidates", cid, "folds", str(fold), "done.json")):
                continue
            job = {**config, "fold": fold, "epochs": int(row.epochs_run), "candidate": cid}
            if fold == 0:
                job["from_checkpoint"] = row.checkpoint
            jobs.append(job)
    return cids, jobs


def build_crossfit_tuner(args, ctx: dict, jobs: list[dict], experiment: str):
    """Every fold job as one Tune trial (no early stopping), spread like the search."""
    from ray import tune

    fs, root = storage.resolve(experiment)
    return tune.Tuner(
        trainable(args, ctx, crossfit=True), param_space={"job": tune.grid_search(jobs)},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=args.max_concurrent or None),
        run_config=tune.RunConfig(
            name=f"crossfit-{datetime.datetime.now():%Y%m%d-%H%M%S}", storage_path=root, storage_filesystem=fs,
            verbose=0, checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=args.max_failures)))


def assemble(experiment: str, cid: str, index: pd.DataFrame, folds: int) -> bool:
    """candidates/<cid>/{oof,test}.parquet and members.json from its finished folds."""
    base = storage.join(experiment, "candidates", cid)
    done = [storage.join(base, "folds", str(k)) for k in range(folds)]
    if not all(storage.exists(storage.join(d, "done.json")) for d in done):
        return False
    oof = pa.concat_tables([storage.read_parquet(storage.join(d, "holdout.parquet")) for d in done])
    ids = oof.column("sample_id").to_pylist()
    if sorted(ids) != sorted(index["sample_id"]):
        raise RuntimeError(f"{cid}: out-of-fold predictions do not cover every training sample exactly once")
    test = None
    if storage.exists(storage.join(done[0], "test.parquet")):
        parts = [storage.read_parquet(storage.join(d, "test.parquet")) for d in done]
        mean = np.mean([storage.probs_array(t) for t in parts], axis=0)
        test = storage.probs_table(parts[0].column("sample_id").to_pylist(), mean)
    members = [storage.read_json(storage.join(d, "done.json")) for d in done]
    source = storage.read_json(storage.join(experiment, "candidates", cid.removeprefix("cv-"), "members.json"))
    write_candidate(experiment, cid, members, oof, source["config"], test)
    return True


def crossfit(args, experiment: str) -> int:
    meta = storage.read_json(storage.join(experiment, "experiment.json"))
    trials = storage.read_parquet(storage.join(experiment, "trials.parquet")).to_pandas()
    index = storage.read_parquet(storage.join(experiment, "folds.parquet")).to_pandas()
    top = args.crossfit_top if args.crossfit_top is not None else meta["budget"].get("crossfit_top", 0)
    if top <= 0:
        return 0
    # The experiment may have moved (a synced bucket, a renamed folder): use where it is now.
    ctx = {**meta["context"], "experiment": experiment, "cpus_per_trial": args.cpus_per_trial}
    ctx["tta"] = ctx.get("tta", True) and not args.no_tta
    cids, jobs = crossfit_jobs(trials, experiment, top, meta["folds"], meta["mode"])
    if not cids:
        print("cross-fit: no trial ran its whole schedule; nothing to cross-fit")
        return 0
    print(f"\ncross-fit: {len(cids)} config(s) x {meta['folds']} folds; {len(jobs)} fold job(s) to run "
          f"({len(cids) * meta['folds'] - len(jobs)} already done)", flush=True)
    if jobs:
        start = time.time()
        results = build_crossfit_tuner(args, ctx, jobs, experiment).fit()
        failed = [r for r in results if r.error]
        print(f"cross-fit ran {len(jobs)} job(s) in {time.time() - start:.0f} s"
              + (f", {len(failed)} failed (run --crossfit-only again to retry them)" if failed else ""))
    # Assemble what this pass changed or never assembled; leave finished candidates as they are.
    ran = {job["candidate"] for job in jobs}
    complete = [cid for cid in cids
                if (cid not in ran and storage.exists(storage.join(experiment, "candidates", cid, "members.json")))
                or assemble(experiment, cid, index, meta["folds"])]
    for cid in complete:
        oof = storage.read_parquet(storage.join(experiment, "candidates", cid, "oof.parquet"))
        probs = storage.probs_array(oof)
        y = index.set_index("sample_id").loc[oof.column("sample_id").to_pylist(), "label"].to_numpy()
        score = METRICS[meta["metric"]][0](y, probs)
        print(f"  {cid}: out-of-fold {meta['metric']} {score:.4f} over {len(y)} images")
    print(f"cross-fit: {len(complete)}/{len(cids)} config(s) complete in {storage.join(experiment, 'candidates')}")
    return 0 if len(complete) == len(cids) else 1


# --- entry point -------------------------------------------------------------

def start_ray() -> None:
    # Short trials checkpoint every few seconds by design; Ray warns about that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}}, log_to_driver=True)


def run(args: argparse.Namespace) -> int:
    task = get_task(args.task)
    check_options(args)
    if args.crossfit_only:
        if not args.experiment:
            raise BadInput("--crossfit-only needs --experiment (the experiment folder or URI)")
        experiment = storage.absolute(args.experiment)
        if not storage.exists(storage.join(experiment, "trials.parquet")):
            raise BadInput(f"{experiment}: no trials.parquet; run the search first")
        start_ray()
        return crossfit(args, experiment)
    b = budget(task, args)
    archs = architectures(task, args)
    storage_root = storage.absolute(args.storage)
    if args.resume:
        if not args.name:
            raise BadInput("--resume needs --name (the experiment to continue) and the same --storage")
        return resume(task, args, storage.join(storage_root, args.name))
    name = args.name or f"{args.task}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    experiment = storage.join(storage_root, name)
    if storage.exists(storage.join(experiment, "experiment.json")):
        raise BadInput(f"{experiment}: already exists; pass --resume to continue it, or choose another --name")
    ctx = prepare(task, args, b, experiment, archs)

    start_ray()
    print(f"experiment {experiment}: {b['trials']} trials, {', '.join(archs)}; "
          f"ASHA max {b['max_epochs']} epochs, grace {b['grace_period']}, reduction {b['reduction_factor']}",
          flush=True)
    start = time.time()
    results = build_tuner(task, args, ctx, b, archs, experiment).fit()
    return finish(task, args, experiment, results, b["max_epochs"], start)


def resume(task, args, experiment: str) -> int:
    """Continue an interrupted search: finished trials stay, unfinished ones resume from checkpoints."""
    from ray import tune

    if not storage.exists(storage.join(experiment, "experiment.json")):
        raise BadInput(f"{experiment}: no experiment to resume; check --name and --storage")
    meta = storage.read_json(storage.join(experiment, "experiment.json"))
    if meta["task"] != args.task:
        raise BadInput(f"{experiment}: is a {meta['task']!r} experiment, not {args.task!r}")
    if storage.exists(storage.join(experiment, "trials.parquet")):
        print(f"{experiment}: the search had finished; going on with the cross-fit")
        start_ray()
        return crossfit(args, experiment)
    fs, root = storage.resolve(experiment)
    if not tune.Tuner.can_restore(root, storage_filesystem=fs):
        raise BadInput(f"{experiment}: the search never started (no Ray Tune state); start it again without --resume")
    start_ray()
    print(f"resuming {experiment}", flush=True)
    start = time.time()
    tuner = tune.Tuner.restore(root, trainable(args, {**meta["context"], "experiment": experiment}), resume_unfinished=True,
                               resume_errored=True, storage_filesystem=fs)
    return finish(task, args, experiment, tuner.fit(), meta["budget"]["max_epochs"], start)


def close_orphan_trials(experiment: str, args) -> None:
    """Mark Optuna trials still RUNNING as failed once the search is over.

    A driver killed between the searcher's ask and Tune's next snapshot leaves
    a trial in the journal that Tune never ran; the dashboard would show it
    running for ever.
    """
    import optuna
    path = study_file(experiment, args)
    if not os.path.exists(path):
        return
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
    for summary in optuna.get_all_study_summaries(journal):
        study = optuna.load_study(study_name=summary.study_name, storage=journal)
        for t in study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING]):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def finish(task, args, experiment: str, results, max_epochs: int, start: float) -> int:
    """After the search: trials.parquet, candidates, the leaderboard, then the cross-fit."""
    close_orphan_trials(experiment, args)
    trials = collect(results, task, experiment, max_epochs)
    if trials["checkpoint"].isna().all():
        print(f"\nevery trial failed; nothing to cross-fit. First error: {trials['error'].dropna().iloc[0] if trials['error'].notna().any() else 'unknown'}",
              file=sys.stderr)
        return 1
    if storage.is_uri(experiment) and os.path.exists(study_file(experiment, args)):
        with open(study_file(experiment, args), "rb") as f:
            storage.write_bytes(storage.join(experiment, STUDY_FILE), f.read())
    print(f"\nsearch finished in {time.time() - start:.0f} s; leaderboard ({task.METRIC} on fold 0):")
    print(leaderboard(trials, task.METRIC, mode_of(task.METRIC)))
    print(f"\nwrote {storage.join(experiment, 'trials.parquet')} and "
          f"{int(trials['checkpoint'].notna().sum())} candidates")
    return crossfit(args, experiment)


def main(argv=None) -> int:
    try:
        return run(parse_args(argv))
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
