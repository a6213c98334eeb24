"""python -m searchspace.report: one HTML page that explains an experiment.

Reads what the search, the cross-fit and ``ensemble_builder select`` wrote
(docs/design.md has the contract) and writes ``report/index.html`` with its PNG
figures into the experiment, through trainer.storage, so a bucket works like
a local folder. The page is static (inline CSS, no script, relative image
paths): copy the folder anywhere, or sync it from the bucket, and open it.
"""
from __future__ import annotations

import argparse
import datetime
import html
import io
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from trainer import experiment as contract
from trainer import storage
from trainer.errors import BadInput
from trainer.experiment import DEFAULT_RUNS, STUDY_FILE

# Optuna storage files that the search may leave in the experiment, first found wins.
STUDY_FILES = (STUDY_FILE,)
# trials.parquet columns that are results, not hyperparameters.
RESULT_COLUMNS = {"trial_id", "metric", "best_score", "best_epoch", "epochs_run", "stopped_early",
                  "seconds", "status", "error", "checkpoint"}
LOG_SCALE = {"lr", "weight_decay"}
# Leaderboard hyperparameters shown before the most important others.
KEY_PARAMS = ["optimizer", "lr", "batch_size"]
MAX_CATEGORIES = 8     # an int column with more distinct values is numeric
DPI = 100
SAVED = "#2f7ed8"      # full-length trials
STOPPED = "#f28e2b"    # stopped early by ASHA
FAILED = "#d62728"


@dataclass
class Experiment:
    location: str
    meta: dict                  # experiment.json
    trials: pd.DataFrame        # trials.parquet
    curves: pd.DataFrame        # one row per trial and epoch, from the Ray trial folders' result.json
    crossfit: pd.DataFrame      # one row per cross-fit fold job: trial_id, seconds, epochs
    ensemble: dict | None       # ensemble/ensemble.json
    files: list[str] = field(default_factory=list)   # every file under the experiment, relative

    @property
    def name(self) -> str:
        return storage.resolve(self.location)[1].rstrip("/").rsplit("/", 1)[-1]

    @property
    def metric(self) -> str:
        return self.meta.get("metric") or str(self.trials["metric"].dropna().iloc[0])

    @property
    def maximize(self) -> bool:
        return self.meta.get("mode", "max") == "max"

    @property
    def max_epochs(self) -> int:
        return int(self.meta.get("budget", {}).get("max_epochs") or self.trials["epochs_run"].max() or 1)


# --- reading -------------------------------------------------------------------

def load(location: str) -> Experiment:
    meta_path = storage.join(location, "experiment.json")
    if not storage.exists(meta_path):
        raise BadInput(f"{location}: not an experiment (no experiment.json); check --experiment")
    trials_path = storage.join(location, "trials.parquet")
    if not storage.exists(trials_path):
        raise BadInput(f"{location}: no trials.parquet; the search has not finished "
                       "(run or resume `python -m searchspace.run` first)")
    meta = storage.read_json(meta_path)
    trials = storage.read_parquet(trials_path).to_pandas()
    if trials.empty:
        raise BadInput(f"{trials_path}: no trials; run the search again")
    files = [rel for rel, _ in storage.list_files(location)]
    curves, crossfit = read_results(location, files)
    ens_path = storage.join(location, "ensemble", "ensemble.json")
    ensemble = storage.read_json(ens_path) if storage.exists(ens_path) else None
    return Experiment(location, meta, trials, curves, crossfit, ensemble, files)


def read_results(location: str, files: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-epoch rows of the search trials, and one row per cross-fit fold job."""
    search, crossfit = [], []
    for rel in files:
        parts = rel.split("/")
        if parts[-1] != "result.json" or not parts[-2].startswith("train_trial_"):
            continue
        lines = [json.loads(line) for line in storage.read_bytes(storage.join(location, rel)).splitlines()
                 if line.strip()]
        if len(parts) == 2:
            search.extend(lines)
        elif len(parts) == 3 and parts[0].startswith("crossfit-") and lines:
            last = lines[-1]
            crossfit.append(dict(trial_id=last.get("trial_id"), seconds=last.get("time_total_s"),
                                 epochs=last.get("epoch", last.get("training_iteration"))))
    curves = pd.DataFrame(search)
    if not curves.empty and {"trial_id", "epoch"} <= set(curves):
        # A trial retried from a checkpoint reports some epochs twice: keep the latest.
        curves = (curves.drop(columns=["config"], errors="ignore")
                  .drop_duplicates(["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"]))
    else:
        curves = pd.DataFrame(columns=["trial_id", "epoch"])
    return curves.reset_index(drop=True), pd.DataFrame(crossfit, columns=["trial_id", "seconds", "epochs"])


def hyperparameters(trials: pd.DataFrame) -> list[str]:
    """Columns of trials.parquet that are hyperparameters and vary between trials."""
    return [c for c in trials if c not in RESULT_COLUMNS and trials[c].dropna().astype(str).nunique() > 1]


def is_categorical(s: pd.Series) -> bool:
    s = s.dropna()
    if s.dtype == bool or s.dtype == object or pd.api.types.is_string_dtype(s):
        return True
    return pd.api.types.is_integer_dtype(s) and s.nunique() <= MAX_CATEGORIES


def is_text(s: pd.Series) -> bool:
    return not (pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s))


def python_value(v):
    return v.item() if isinstance(v, np.generic) else v


def sort_key(v) -> tuple:
    """Numbers in numeric order, then text: choices of one column may mix both."""
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


# --- Optuna study and importances ------------------------------------------------

def study_importances(exp: Experiment) -> tuple[dict[str, float], str, int, str]:
    """(importances, evaluator or the reason there are none, finished trials, the study's source file).

    The search's own Optuna storage when the experiment has one, else a study
    rebuilt from trials.parquet. The storage file is read from a private local
    copy: that works for a bucket too and never touches the search's file.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="report-study-") as tmp:
        for name in STUDY_FILES:
            if name not in exp.files:
                continue
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(storage.read_bytes(storage.join(exp.location, name)))
            if name.endswith(".log"):
                store = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
                    path, lock_obj=optuna.storages.journal.JournalFileOpenLock(path)))
            else:
                store = f"sqlite:///{path}"
            names = optuna.get_all_study_names(store)
            if names:
                study = optuna.load_study(study_name=exp.name if exp.name in names else names[0], storage=store)
                return (*importances(study), name)
        return (*importances(study_from_trials(exp)), "trials.parquet")


def param_importance(imp: dict[str, float], param: str) -> float:
    """A trials.parquet column's importance; image_size is image_size_<arch> in the search's own study."""
    if param in imp:
        return imp[param]
    return max((v for k, v in imp.items() if k.startswith(f"{param}_")), default=-1.0)


def study_from_trials(exp: Experiment):
    """An in-memory study: one finished trial per row of trials.parquet, value = its best score."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    ok = exp.trials[(exp.trials["status"] == "ok") & exp.trials["best_score"].notna()]
    distributions = {}
    for c in hyperparameters(ok):
        values = ok[c].dropna()
        if is_categorical(values):
            distributions[c] = CategoricalDistribution(sorted({python_value(v) for v in values}, key=sort_key))
        elif pd.api.types.is_integer_dtype(values):
            distributions[c] = IntDistribution(int(values.min()), int(values.max()))
        else:
            low, high = float(values.min()), float(values.max())
            distributions[c] = FloatDistribution(low, high, log=c in LOG_SCALE and low > 0)
    study = optuna.create_study(direction="maximize" if exp.maximize else "minimize",
                                study_name=exp.name)
    for _, row in ok.iterrows():
        params = {c: python_value(row[c]) for c in distributions if pd.notna(row[c])}
        study.add_trial(optuna.trial.create_trial(
            params=params, distributions={c: distributions[c] for c in params}, value=float(row["best_score"])))
    return study


def importances(study) -> tuple[dict[str, float], str, int]:
    """(normalised importance per hyperparameter, evaluator name, finished trials).

    The dict is empty, and the name a reason, when there is nothing to measure.

    fANOVA (scikit-learn's random forest, runs offline) rather than Optuna 5's
    default PED-ANOVA: PED-ANOVA compares the top 10 % of trials with the rest,
    which is one or two trials in a search of a few dozen.
    """
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(done) < 2:
        return {}, f"needs at least 2 finished trials (has {len(done)})", len(done)
    if len({t.value for t in done}) < 2:
        return {}, "every finished trial has the same score", len(done)
    errors = []
    for evaluator in (optuna.importance.FanovaImportanceEvaluator(seed=0),
                      optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=0)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as e:  # an evaluator that cannot handle this study: try the next
            errors.append(f"{type(evaluator).__name__}: {e}")
            continue
        found = {k: float(v) for k, v in found.items() if np.isfinite(v)}
        if found:
            return found, type(evaluator).__name__.removesuffix("ImportanceEvaluator"), len(done)
    return {}, "; ".join(errors) or "no hyperparameter varies across finished trials", len(done)


# --- ensemble predictions --------------------------------------------------------

def blended_oof(exp: Experiment, members: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(labels, weighted mean probabilities) over the samples every member predicted, by sample_id."""
    experiment = contract.Experiment(exp.location)
    index = experiment.folds()
    tables, weights = [], []
    for m in members:
        candidate = experiment.candidate(m["candidate"])
        if not candidate.has_oof():
            raise BadInput(f"{candidate.file('oof.parquet')}: missing; the ensemble names a candidate that is gone "
                           "(run `python -m ensemble_builder select` again)")
        tables.append(candidate.oof())
        weights.append(float(m["weight"]))
    common = set.intersection(*(set(t.column("sample_id").to_pylist()) for t in tables))
    order = [s for s in index["sample_id"] if s in common]
    w = np.array(weights) / sum(weights)
    P = sum(wi * contract.aligned(t, order) for wi, t in zip(w, tables))
    y = index.set_index("sample_id").loc[order, "label"].to_numpy()
    return y, P


# --- figures -----------------------------------------------------------------------

def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)   # a bare Figure renders with Agg, no pyplot state
    return buf.getvalue()


def arch_colours(trials: pd.DataFrame) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    archs = sorted(trials["arch"].dropna().astype(str).unique()) if "arch" in trials else []
    return {a: cmap(i % 10) for i, a in enumerate(archs)}


def arch_legend(fig: Figure, colours: dict, extra: list | None = None, ncol: int | None = None) -> None:
    from matplotlib.lines import Line2D
    handles = [Line2D([], [], marker="o", ls="", color=c, label=a) for a, c in colours.items()] + (extra or [])
    if handles:
        fig.legend(handles=handles, loc="outside upper center", ncol=ncol or min(len(handles), 6), frameon=False)


def asha_rungs(meta: dict) -> list[int]:
    """The epochs at which ASHA compares trials (Ray's milestones below max_t)."""
    b = meta.get("budget", {})
    grace, rf, max_t = b.get("grace_period"), b.get("reduction_factor"), b.get("max_epochs")
    if not (grace and rf and max_t) or rf < 2:
        return []
    n = int(np.log(max_t / grace) / np.log(rf) + 1)
    return sorted(grace * rf ** k for k in range(n) if grace * rf ** k < max_t)


def fig_learning_curves(exp: Experiment, colours: dict) -> bytes | None:
    from matplotlib.lines import Line2D
    c = exp.curves
    if c.empty or exp.metric not in c:
        return None
    panels = [exp.metric] + (["val_loss"] if "val_loss" in c and exp.metric != "val_loss" else [])
    fig = Figure(figsize=(6.2 * len(panels), 4.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    info = exp.trials.set_index("trial_id")
    rungs = asha_rungs(exp.meta)
    for ax, key in zip(axes, panels):
        for tid, g in c.groupby("trial_id", sort=False):
            arch = str(info["arch"].get(tid, "")) if "arch" in info else ""
            col = colours.get(arch, "grey")
            stopped = bool(info["stopped_early"].get(tid, False)) if tid in info.index else False
            ax.plot(g["epoch"], g[key], "-", color=col, alpha=0.75, lw=1.4)
            ax.plot(g["epoch"].iloc[-1], g[key].iloc[-1], "X" if stopped else "o", color=col,
                    ms=8 if stopped else 5, mec="black" if stopped else col, mew=0.8)
        for r in rungs:
            ax.axvline(r, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_xlim(0.7, max(exp.max_epochs, int(c["epoch"].max())) + 0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0].set_title(f"{exp.metric} on the holdout fold (dotted: ASHA rungs)", fontsize=10)
    if len(panels) > 1:
        axes[1].set_title("validation loss", fontsize=10)
    extra = [Line2D([], [], marker="X", ls="", color="white", mec="black", ms=8, label="stopped early by ASHA"),
             Line2D([], [], marker="o", ls="", color="grey", label="ran to the end")]
    arch_legend(fig, colours, extra)
    return png(fig)


def fig_hyperparameters(exp: Experiment, params: list[str], colours: dict) -> bytes | None:
    from matplotlib.lines import Line2D
    t = exp.trials[exp.trials["best_score"].notna()]
    if t.empty or not params:
        return None
    ncol = min(4, len(params))
    nrow = -(-len(params) // ncol)
    fig = Figure(figsize=(3.1 * ncol, 2.5 * nrow + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False).ravel())
    rng = np.random.default_rng(0)
    colour = [colours.get(str(a), "grey") for a in t["arch"]] if "arch" in t else ["grey"] * len(t)
    stopped = t["stopped_early"].fillna(False).to_numpy(bool)
    for ax, p in zip(axes, params):
        v = t[p]
        y = t["best_score"].to_numpy(float)
        if is_categorical(exp.trials[p]):
            cats = sorted(exp.trials[p].dropna().map(python_value).unique(), key=sort_key)
            pos = {k: i for i, k in enumerate(cats)}
            x = np.array([pos.get(python_value(a), np.nan) for a in v], float)
            groups = [y[x == i] for i in range(len(cats))]
            ax.boxplot([g if len(g) else [np.nan] for g in groups], positions=range(len(cats)), widths=0.5,
                       showfliers=False, medianprops=dict(color="black"), boxprops=dict(color="#999999"),
                       whiskerprops=dict(color="#999999"), capprops=dict(color="#999999"))
            x = x + rng.uniform(-0.15, 0.15, len(x))
            ax.set_xticks(range(len(cats)), [str(k) for k in cats], fontsize=8,
                          rotation=30 if sum(len(str(k)) for k in cats) > 24 else 0)
        else:
            x = v.to_numpy(float)
            if p in LOG_SCALE and np.nanmin(x) > 0:
                from matplotlib.ticker import NullFormatter
                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())   # minor labels overlap on a short range
        ax.scatter(x[~stopped], y[~stopped], c=[colour[i] for i in np.flatnonzero(~stopped)], s=26, zorder=3)
        ax.scatter(x[stopped], y[stopped], facecolors="none", edgecolors=[colour[i] for i in np.flatnonzero(stopped)],
                   s=26, zorder=3, linewidths=1.2)
        ax.set_title(p, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    for ax in axes[::ncol]:
        ax.set_ylabel(f"best {exp.metric}", fontsize=9)
    extra = [Line2D([], [], marker="o", ls="", color="grey", label="ran to the end"),
             Line2D([], [], marker="o", ls="", mfc="none", mec="grey", label="stopped early")]
    arch_legend(fig, colours, extra)
    return png(fig)


def fig_importances(imp: dict[str, float], evaluator: str, n_trials: int) -> bytes | None:
    if not imp:
        return None
    items = sorted(imp.items(), key=lambda kv: kv[1])
    fig = Figure(figsize=(4.8, 1.2 + 0.22 * len(items)), layout="constrained")
    ax = fig.subplots()
    ax.barh([k for k, _ in items], [v for _, v in items], color=SAVED)
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlim(0, max(v for _, v in items) * 1.18)
    ax.set_xlabel("importance (normalised to sum 1)")
    ax.set_title(f"Optuna {evaluator} importances, {n_trials} trials", fontsize=10)
    ax.tick_params(labelsize=8)
    return png(fig)


def best_grid(exp: Experiment) -> pd.DataFrame:
    t = exp.trials[exp.trials["best_score"].notna()]
    if t.empty or "arch" not in t or "image_size" not in t:
        return pd.DataFrame()
    agg = "max" if exp.maximize else "min"
    return t.pivot_table(index="arch", columns="image_size", values="best_score", aggfunc=[agg, "count"])


def fig_grid(exp: Experiment) -> bytes | None:
    g = best_grid(exp)
    if g.empty:
        return None
    best, count = g.iloc[:, : g.shape[1] // 2], g.iloc[:, g.shape[1] // 2:]
    archs, sizes = list(best.index), [c[1] for c in best.columns]
    fig = Figure(figsize=(min(12.0, 2.6 + 1.0 * len(sizes)), max(2.4, 1.3 + 0.55 * len(archs))), layout="constrained")
    ax = fig.subplots()
    values = best.to_numpy(float)
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis" if exp.maximize else "viridis_r", aspect="auto")
    finite = values[np.isfinite(values)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(archs)):
        for j in range(len(sizes)):
            if np.isfinite(values[i, j]):
                light = (values[i, j] < mid) == exp.maximize
                label = f"{values[i, j]:.3f}\n({plural(int(count.iloc[i, j]), 'trial')})"
                ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if light else "black")
            else:
                ax.text(j, i, "not tried", ha="center", va="center", fontsize=8, color="#888888")
    ax.set_xticks(range(len(sizes)), [f"{s} px" for s in sizes])
    ax.set_yticks(range(len(archs)), archs)
    ax.set_xlabel("image size")
    ax.set_title(f"best {exp.metric} per architecture and size", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return png(fig)


def fig_trajectory(ens: dict) -> bytes | None:
    traj = ens.get("trajectory") or []
    if not traj:
        return None
    steps = np.arange(1, len(traj) + 1)
    best = int(ens.get("best_step", int(np.argmax(traj))))
    fig = Figure(figsize=(6.2, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot(steps, traj, "-o", ms=3, color=SAVED, lw=1.3, label="ensemble (in-sample)")
    ax.plot(best + 1, traj[best], "*", ms=16, color=STOPPED, mec="black", label=f"best step ({best + 1})", zorder=4)
    single = ens.get("scores", {}).get("best_single", {}).get(ens.get("metric"))
    if single is not None:
        ax.axhline(single, color="grey", ls="--", lw=1, label="best single candidate (in-sample)")
    honest = cv_score(ens, "ensemble")
    if honest is not None:   # the selection scored on images it did not see: where the curve really lands
        ax.axhline(honest[0], color=STOPPED, ls=":", lw=1.5, label="ensemble, cross-validated")
    ax.set_xlabel("greedy step (picks, with replacement)")
    ax.set_ylabel(f"in-sample out-of-fold {ens.get('metric', '')}")
    ax.set_title("Caruana selection trajectory (in-sample, optimistic)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def cv_score(ens: dict, predictor: str) -> tuple[float, float] | None:
    """(pooled cross-validated score, std over folds) of a predictor in ensemble.json, if it has one."""
    est = (ens.get("cv") or {}).get("estimate", {}).get(predictor)
    value = (est or {}).get("scores", {}).get(ens.get("metric"))
    return None if value is None else (value, est.get("std", 0.0))


def fig_confusion(cm: np.ndarray, names: list[str], title: str) -> bytes:
    n = len(names)
    side = min(12.0, max(4.2, 0.4 * n + 1.6))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8 if n <= 12 else 6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right"
                  if max(map(len, names)) > 3 else "center", fontsize=8)
    ax.set_yticks(range(n), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    return png(fig)


def fig_recall(cm: np.ndarray, names: list[str]) -> bytes:
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.zeros(len(names)), where=support > 0)
    fig = Figure(figsize=(4.8, min(12.0, max(2.5, 1.3 + 0.3 * len(names)))), layout="constrained")
    ax = fig.subplots()
    ypos = np.arange(len(names))[::-1]
    ax.barh(ypos, recall, color=[SAVED if r >= recall.mean() else STOPPED for r in recall])
    for y, r, s in zip(ypos, recall, support):
        ax.text(min(r, 1.0), y, f" {r:.3f} (n={s})", va="center", fontsize=8)
    ax.set_yticks(ypos, names, fontsize=8)
    ax.set_xlim(0, 1.3)
    ax.axvline(recall.mean(), color="grey", ls=":", lw=1)
    ax.set_xlabel("recall (dotted: mean over classes)")
    ax.set_title("per-class recall", fontsize=10)
    return png(fig)


def fig_time(exp: Experiment) -> bytes | None:
    t = exp.trials
    if "seconds" not in t or t["seconds"].isna().all():
        return None
    fig = Figure(figsize=(max(6.0, min(16.0, 2 + 0.34 * len(t))), 3.8), layout="constrained")
    ax = fig.subplots()
    colour = [FAILED if s == "error" else STOPPED if e else SAVED for s, e in zip(t["status"], t["stopped_early"])]
    x = np.arange(len(t))
    ax.bar(x, t["seconds"].fillna(0), color=colour)
    for i, (sec, ep) in enumerate(zip(t["seconds"].fillna(0), t["epochs_run"])):
        ax.text(i, sec, f"{int(ep)}", ha="center", va="bottom", fontsize=7)
    if len(t) <= 60:
        ax.set_xticks(x, t["trial_id"].astype(str), rotation=90, fontsize=7)
    ax.set_xlabel("trial (in start order; number above a bar: epochs run)")
    ax.set_ylabel("seconds")
    ax.set_title("time per trial", fontsize=10)
    from matplotlib.patches import Patch
    handles = [Patch(color=SAVED, label="ran all epochs"), Patch(color=STOPPED, label="stopped early by ASHA")]
    if (t["status"] == "error").any():
        handles.append(Patch(color=FAILED, label="failed"))
    ax.legend(handles=handles, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


# --- numbers for the page ----------------------------------------------------------

def asha_savings(exp: Experiment) -> dict:
    """Trial-epochs run against every trial running max_epochs, and the seconds that saved."""
    ok = exp.trials[(exp.trials["status"] == "ok") & (exp.trials["epochs_run"] > 0)]
    full = len(ok) * exp.max_epochs
    run = int(ok["epochs_run"].sum())
    per_epoch = ok["seconds"].fillna(0) / ok["epochs_run"]
    saved_s = float((per_epoch * (exp.max_epochs - ok["epochs_run"]).clip(lower=0)).sum())
    spent_s = float(ok["seconds"].fillna(0).sum())
    return dict(trials=len(ok), stopped=int(ok["stopped_early"].sum()), max_epochs=exp.max_epochs,
                epochs_full=full, epochs_run=run, epochs_saved=full - run,
                seconds_run=spent_s, seconds_saved=saved_s)


def search_wall_seconds(curves: pd.DataFrame) -> float | None:
    if curves.empty or not {"timestamp", "time_total_s"} <= set(curves):
        return None
    start = (curves["timestamp"] - curves["time_total_s"]).min()
    return float(curves["timestamp"].max() - start)


# --- HTML ----------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#222;margin:0;background:#f6f7f9}
main{max-width:1240px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:24px;margin:6px 0 2px} h2{font-size:19px;margin:30px 0 8px;border-bottom:2px solid #dde;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
p,li{line-height:1.45;font-size:14px} .muted{color:#667}
.note{background:#fff8e1;border-left:4px solid #f2b01e;padding:8px 12px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde;border-radius:6px;padding:10px 14px;min-width:160px;flex:1 1 auto}
.card b{display:block;font-size:22px;margin-top:2px;white-space:nowrap} .card span{font-size:12px;color:#667}
table{border-collapse:collapse;background:#fff;font-size:12px;margin:6px 0}
th,td{border:1px solid #dde;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#eef0f5;position:sticky;top:0} td.l,th.l{text-align:left}
tr.best td{background:#e6f4ea;font-weight:600} tr.stopped td{color:#555} tr.error td{background:#fdecea}
.scroll{overflow-x:auto;max-width:100%}
figure{margin:8px 0;background:#fff;border:1px solid #dde;border-radius:6px;padding:8px;display:inline-block;
max-width:calc(100% - 18px)}
figure img{max-width:100%;height:auto;display:block}
figcaption{font-size:12.5px;color:#556;margin-top:4px;width:0;min-width:100%}
.row{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
code{background:#eef0f5;padding:1px 4px;border-radius:3px;font-size:12.5px}
pre{background:#fff;border:1px solid #dde;padding:8px 12px;font-size:12.5px;overflow-x:auto}
"""


def esc(v) -> str:
    return html.escape(str(v))


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.{digits}g}"
    return str(v)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds):
        return "?"
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def table(rows: list[dict], left: set[str] = frozenset(), row_class: list[str] | None = None,
          titles: list[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>(none)</p>"
    cols = list(rows[0])
    head = "".join(f"<th class='{'l' if c in left else ''}'>{esc(c)}</th>" for c in cols)
    body = []
    for i, r in enumerate(rows):
        cls = f" class='{row_class[i]}'" if row_class and row_class[i] else ""
        title = f" title='{esc(titles[i])}'" if titles and titles[i] else ""
        cells = "".join(f"<td class='{'l' if c in left else ''}'>{esc(fmt(r[c]))}</td>" for c in cols)
        body.append(f"<tr{cls}{title}>{cells}</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>"


def figure(name: str | None, caption: str, alt: str) -> str:
    if name is None:
        return ""
    return f"<figure><img src='{esc(name)}' alt='{esc(alt)}'><figcaption>{caption}</figcaption></figure>"


def cv_section(ens: dict) -> str:
    """The cross-validated ensemble estimate (the headline), and the selection settings it chose between."""
    cv, metric = ens["cv"], ens.get("metric", "")
    rows = [{"": k.replace("_", " "), metric: e["scores"].get(metric), "± std over folds": e.get("std"),
             **{m: v for m, v in e["scores"].items() if m != metric}} for k, e in cv.get("estimate", {}).items()]
    settings = [{"setting": s["name"], f"CV {metric}": s["scores"].get(metric),
                 "CV log loss": s["scores"].get("log_loss"), "± std over folds": s.get("std")}
                for s in cv.get("settings", [])]
    chosen = [("best" if s["name"] == cv.get("chosen", {}).get("name") else "") for s in cv.get("settings", [])]
    folds = cv.get("fold_sizes", [])
    how = (f"the experiment's {len(folds)} folds" if cv.get("splits") == "experiment folds" else
           f"{len(folds)} random stratified splits of the holdout images (the candidates cover one fold only)")
    verdict = ("No blend beat the best single candidate under cross-validation: the ensemble fell back to it."
               if cv.get("fallback") else f"Chosen: {esc(cv.get('chosen', {}).get('name', '?'))}"
               + ("" if cv.get("auto", True) else " (as given, --no-auto)") + ".")
    return ("<h3>Cross-validated scores</h3>"
            f"<p class='muted'>Over {how}: each fold is held out in turn, the selection (and the best single "
            "candidate, and the top-K mean) is chosen on the other folds and scored on the held-out images; "
            f"scores are pooled over all {sum(folds)} images. CV gain over the best single candidate: "
            f"<b>{cv.get('gain', 0):+.4f}</b> {esc(metric)}"
            + (" (a reduction: lower is better)" if metric == "log_loss" else "") + f". {verdict}</p>"
            + table(rows, left={""})
            + "<details><summary>selection settings tried (ties go to the lower CV log loss, then the simpler "
              "setting)</summary>" + table(settings, left={"setting"}, row_class=chosen) + "</details>")


def leaderboard(exp: Experiment, imp: dict[str, float]) -> str:
    t = exp.trials.copy()
    t["_order"] = t["best_score"] * (-1 if exp.maximize else 1)
    t = t.sort_values("_order", na_position="last")
    varying = hyperparameters(exp.trials)
    shown = [p for p in KEY_PARAMS if p in varying]
    shown += [p for p in sorted(varying, key=lambda p: -param_importance(imp, p))
              if p not in shown and p not in ("arch", "image_size") and param_importance(imp, p) > 0][: 5 - len(shown)]
    best_id = t["trial_id"].iloc[0] if t["best_score"].notna().any() else None
    rows, classes, titles = [], [], []
    for _, r in t.iterrows():
        row = {"trial": r["trial_id"], "arch": r.get("arch"), "image size": r.get("image_size")}
        row.update({p: python_value(r[p]) for p in shown})
        row.update({f"best {exp.metric}": r["best_score"], "best epoch": r["best_epoch"],
                    "epochs run": r["epochs_run"], "stopped early": bool(r["stopped_early"]),
                    "seconds": None if pd.isna(r["seconds"]) else round(float(r["seconds"]), 1),
                    "status": r["status"]})
        rows.append(row)
        classes.append("best" if r["trial_id"] == best_id else "error" if r["status"] == "error"
                       else "stopped" if r["stopped_early"] else "")
        titles.append(r["error"] if isinstance(r.get("error"), str) else "")
    out = table(rows, left={"trial", "arch", "status", *[p for p in shown if is_text(exp.trials[p])]},
                row_class=classes, titles=titles)
    failed = t[t["status"] == "error"]
    if len(failed):
        out += "<p>Failed trials:</p><ul>" + "".join(
            f"<li><code>{esc(r.trial_id)}</code>: {esc(r.error)}</li>" for r in failed.itertuples()) + "</ul>"
    rest = [c for c in t if c not in RESULT_COLUMNS and not c.startswith("_")]
    everything = [{"trial": r["trial_id"], **{c: python_value(r[c]) for c in rest}} for _, r in t.iterrows()]
    out += ("<details><summary>every hyperparameter of every trial</summary>"
            + table(everything, left={"trial", *[c for c in rest if is_text(exp.trials[c])]}) + "</details>")
    return out


def build(location: str) -> list[str]:
    """Write report/index.html and its figures into the experiment; returns the files written (relative)."""
    exp = load(location)
    out = storage.join(location, "report")
    written: dict[str, bytes] = {}
    colours = arch_colours(exp.trials)
    metric, t = exp.metric, exp.trials
    ok = t[t["best_score"].notna()]

    def add(name: str, data: bytes | None) -> str | None:
        if data is None:
            return None
        written[name] = data
        return name

    # Search: importances first, since they also order the other hyperparameter views.
    imp, evaluator, n_done, study_source = study_importances(exp)
    params = sorted(hyperparameters(ok), key=lambda p: -param_importance(imp, p))

    curves = add("learning_curves.png", fig_learning_curves(exp, colours))
    hp = add("hyperparameters.png", fig_hyperparameters(exp, params, colours))
    importance = add("importances.png", fig_importances(imp, evaluator, n_done))
    grid = add("arch_size_grid.png", fig_grid(exp))
    timing = add("time_per_trial.png", fig_time(exp))

    # Ensemble (or, before `select`, the best single candidate).
    ens, names = exp.ensemble, [str(n) for n in exp.meta.get("class_names", [])]
    trajectory = add("ensemble_trajectory.png", fig_trajectory(ens)) if ens else None
    members = ens["members"] if ens and ens.get("members") else None
    subject = "the ensemble"
    if members is None:
        best = ok.sort_values("best_score", ascending=not exp.maximize)
        best = [tid for tid in best["trial_id"] if f"candidates/{tid}/oof.parquet" in exp.files]
        if best:
            members, subject = [dict(candidate=best[0], weight=1.0)], f"the best trial ({best[0]}, holdout fold)"
    confusion = recall = None
    class_rows = []
    if members:
        y, P = blended_oof(exp, members)
        if not names:
            names = [str(i) for i in range(P.shape[1])]
        pred = P.argmax(1)
        cm = np.zeros((len(names), len(names)), int)
        np.add.at(cm, (y, pred), 1)
        confusion = add("confusion_matrix.png",
                        fig_confusion(cm, names, f"confusion matrix of {subject}, out of fold ({len(y)} images)"))
        recall = add("per_class_recall.png", fig_recall(cm, names))
        support, predicted = cm.sum(1), cm.sum(0)
        for i, n in enumerate(names):
            class_rows.append({"class": n, "images": int(support[i]),
                               "recall": cm[i, i] / support[i] if support[i] else None,
                               "precision": cm[i, i] / predicted[i] if predicted[i] else None})

    # --- the page ---
    saved = asha_savings(exp)
    wall = search_wall_seconds(exp.curves)
    best_row = ok.sort_values("best_score", ascending=not exp.maximize).iloc[0] if len(ok) else None
    n_err = int((t["status"] == "error").sum())
    cards = [(f"best trial {metric}", fmt(best_row["best_score"]) if best_row is not None else "–",
              f"{best_row['trial_id']}, {best_row.get('arch', '')} at {best_row.get('image_size', '?')} px"
              if best_row is not None else "no finished trial")]
    if ens:
        e = ens.get("scores", {}).get("ensemble", {})
        in_sample = fmt(e.get(ens.get("metric", metric)))
        honest = cv_score(ens, "ensemble")
        if honest is not None:   # the headline is the cross-validated score; in-sample only as a footnote
            cv = ens["cv"]
            cards.append((f"ensemble {ens.get('metric', metric)}, cross-validated",
                          f"{fmt(honest[0])} ± {fmt(honest[1])}",
                          ("fell back to the best single candidate" if cv.get("fallback") else
                           f"{len(ens.get('members', []))} member(s), {cv.get('gain', 0):+.4f} over the best single")
                          + f"; in-sample {in_sample} (optimistic)"))
        else:
            cards.append((f"ensemble {ens.get('metric', metric)}", in_sample,
                          f"{len(ens.get('members', []))} member(s), in-sample out of fold (optimistic)"))
    cards.append(("trials", f"{len(t)}", f"{saved['stopped']} stopped early by ASHA, {n_err} failed"))
    share = saved["epochs_saved"] / saved["epochs_full"] if saved["epochs_full"] else 0.0
    cards.append(("ASHA saved", f"{100 * share:.0f} % of trial-epochs",
                  f"{saved['epochs_saved']} of {saved['epochs_full']}, about {duration(saved['seconds_saved'])}"))
    cards.append(("search time", duration(wall), f"{duration(saved['seconds_run'])} of trial time in total"))
    created = exp.meta.get("created", "")
    h = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
         f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
         f"<title>{esc(exp.name)}: experiment report</title><style>{CSS}</style></head><body><main>",
         f"<h1>Experiment {esc(exp.name)}</h1>",
         f"<p class='muted'>task <b>{esc(exp.meta.get('task', '?'))}</b> · metric <b>{esc(metric)}</b> "
         f"({'higher' if exp.maximize else 'lower'} is better) · {len(names)} classes · "
         f"{esc(exp.meta.get('folds', '?'))} folds · created {esc(created)} · "
         f"<code>{esc(exp.location)}</code></p>",
         "<div class='cards'>"
         + "".join(f"<div class='card'><span>{esc(a)}</span><b>{esc(b)}</b><span>{esc(c)}</span></div>"
                   for a, b, c in cards) + "</div>"]

    h.append("<h2>Leaderboard</h2>")
    h.append(f"<p class='muted'>Every trial of the search, best first: its best {esc(metric)} on the holdout "
             "fold (fold 0), the epoch it reached it, and how long it ran. A trial that ASHA stopped early is "
             "judged on fewer epochs than one that ran to the end.</p>")
    h.append(leaderboard(exp, imp))

    h.append("<h2>Learning curves</h2>")
    h.append(figure(curves, f"Every trial's {esc(metric)} per epoch, coloured by architecture. A cross marks the "
                            "last epoch of a trial that ASHA stopped; dotted lines are the epochs at which ASHA "
                            "compares trials.", "learning curves")
             or "<p class='note'>No Ray trial folders with result.json were found in the experiment.</p>")

    h.append("<h2>Hyperparameters</h2><div class='row'>")
    src = ("the search's own Optuna study (<code>" + esc(study_source) + "</code>; a trial's value is the last "
           "score it reported)") if study_source != "trials.parquet" else \
        "a study rebuilt from trials.parquet (a trial's value is its best score)"
    h.append(figure(importance, f"How much of the variation in {esc(metric)} each hyperparameter explains, "
                                f"from {src}. With few trials, read this as a hint.", "importances")
             or f"<p class='note'>No hyperparameter importances: {esc(evaluator)}.</p>")
    h.append(figure(grid, "Best score of each architecture at each image size it was tried at.", "grid"))
    h.append("</div>")
    h.append(figure(hp, f"Best {esc(metric)} of each trial against each hyperparameter that varied, most "
                        "important first; hollow points are trials that ASHA stopped early.", "hyperparameters"))

    h.append("<h2>Ensemble</h2>")
    if ens:
        sc = ens.get("scores", {})
        score_rows = [{"": k.replace("_", " "), **{m: v for m, v in s.items()}} for k, s in sc.items()]
        mtab = [{"candidate": m["candidate"], "weight": round(float(m["weight"]), 4),
                 "picks": (ens.get("picks") or []).count(m["candidate"])} for m in ens.get("members", [])]
        if ens.get("cv"):
            h.append(cv_section(ens))
        h.append("<div class='row'>")
        h.append(figure(trajectory, f"In-sample out-of-fold {esc(ens.get('metric', metric))} after each greedy "
                                    "pick (the weights are chosen on these same predictions, so it is optimistic); "
                                    "the star is the step the ensemble was cut back to"
                                    + ("; the dotted line is the cross-validated ensemble." if ens.get("cv") else "."),
                        "trajectory"))
        h.append("<div><h3>Members</h3>" + table(mtab, left={"candidate"}) +
                 "<h3>In-sample out-of-fold scores (optimistic)</h3>" + table(score_rows, left={""}) +
                 "<p class='muted'>"
                 + ("cross-fitted: every training image" if ens.get("full_coverage") else "holdout fold only")
                 +
                 f"; {len(ens.get('candidates', []))} candidate(s), top {esc(ens.get('top', '?'))}, "
                 f"{esc(ens.get('steps', '?'))} steps.</p></div></div>")
    else:
        h.append("<p class='note'>No ensemble yet: run <code>python -m ensemble_builder select --experiment "
                 f"{esc(exp.location)}</code>, then build this report again."
                 + (f" Until then the figures below show {esc(subject)}." if members else "") + "</p>")
    if members:
        h.append("<div class='row'>")
        h.append(figure(confusion, f"Counts of {esc(subject)}'s predictions (columns) for each true class (rows), "
                                   "out of fold; colour is the share of the row.", "confusion matrix"))
        h.append(figure(recall, "Share of each class's images predicted correctly; orange bars are below the "
                                "mean.", "per-class recall"))
        h.append("</div>")
        h.append("<details><summary>per-class numbers</summary>" + table(class_rows, left={"class"}) + "</details>")

    h.append("<h2>Time</h2><div class='row'>")
    h.append(figure(timing, "Training seconds of each trial (Ray's time_total_s).", "time per trial"))
    asha_rows = [
        {"": "trial-epochs", "run": saved["epochs_run"], "if every trial ran all epochs": saved["epochs_full"],
         "saved by ASHA": saved["epochs_saved"],
         "saved %": round(100 * saved["epochs_saved"] / saved["epochs_full"], 1) if saved["epochs_full"] else None},
        {"": "seconds (estimated)", "run": round(saved["seconds_run"]),
         "if every trial ran all epochs": round(saved["seconds_run"] + saved["seconds_saved"]),
         "saved by ASHA": round(saved["seconds_saved"]),
         "saved %": round(100 * saved["seconds_saved"] / (saved["seconds_run"] + saved["seconds_saved"]), 1)
         if saved["seconds_run"] + saved["seconds_saved"] else None}]
    h.append(f"<div><h3>What ASHA saved</h3><p class='muted'>{saved['trials']} finished trials, at most "
             f"{saved['max_epochs']} epochs each; a stopped trial's missing epochs are costed<br>at its own "
             "seconds per epoch.</p>" + table(asha_rows, left={""}))
    if len(exp.crossfit):
        h.append(f"<p>Cross-fit: {plural(len(exp.crossfit), 'fold job')}, "
                 f"{duration(exp.crossfit['seconds'].sum())} of training in total.</p>")
    h.append("</div></div>")

    rel = exp.location
    h.append("<h2>Look further</h2><p>Ray wrote TensorBoard event files into every trial folder"
             + (", and the search kept its Optuna study in <code>" + esc(study_source) + "</code>"
                if study_source != "trials.parquet" else "") + ":</p><pre>"
             + esc(f"pip install tensorboard{' optuna-dashboard' if study_source != 'trials.parquet' else ''}\n"
                   f"tensorboard --logdir {rel}")
             + (esc(f"\noptuna-dashboard {storage.join(rel, study_source)}") if study_source != "trials.parquet"
                else "") + "</pre>")
    h.append(f"<p class='muted'>Built by <code>python -m searchspace.report</code> on "
             f"{datetime.datetime.now().isoformat(timespec='seconds')}.</p></main></body></html>")
    written["index.html"] = "\n".join(x for x in h if x).encode()

    for name, data in written.items():
        storage.write_bytes(storage.join(out, name), data)
    return sorted(written)


# --- entry point -------------------------------------------------------------------

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


if __name__ == "__main__":
    sys.exit(main())
