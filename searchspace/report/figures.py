"""Every figure of the report, each a PNG (bytes) or None when the experiment has nothing to draw.

A bare matplotlib Figure renders with Agg: no pyplot state, no display.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from searchspace.report.html import plural
from searchspace.report.load import LOG_SCALE, Experiment, cv_score, is_categorical, python_value, sort_key

DPI = 100
SAVED = "#2f7ed8"      # full-length trials
STOPPED = "#f28e2b"    # stopped early by ASHA
FAILED = "#d62728"


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


def fig_error_overlap(overlap: np.ndarray, ids: list[str], kinds: list[str]) -> bytes | None:
    """The share of images each pair of candidates gets wrong together (the diagonal: each one's error rate)."""
    n = len(ids)
    if n < 2:
        return None
    side = min(12.0, max(4.2, 0.45 * n + 2.2))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(overlap, cmap="Reds", vmin=0, vmax=max(float(overlap.max()), 1e-9))
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{overlap[i, j]:.2f}", ha="center", va="center", fontsize=7 if n <= 10 else 5,
                        color="white" if overlap[i, j] > 0.6 * overlap.max() else "black")
    names = [f"{c} ({k})" for c, k in zip(ids, kinds)]
    ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_title("share of images both get wrong (diagonal: each one's error)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the images")
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
