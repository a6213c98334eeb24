"""The page: one function per section, each returning its HTML, and build(), which writes them with the figures."""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core import storage
from searchspace.report import figures
from searchspace.report.html import document, duration, esc, figure, fmt, lines, plural, table
from searchspace.report.importances import Study, param_importance, study_importances
from searchspace.report.load import (
    RESULT_COLUMNS,
    Experiment,
    asha_savings,
    blended_oof,
    candidate_pool,
    cv_score,
    hyperparameters,
    is_text,
    load,
    python_value,
    search_wall_seconds,
)

# Leaderboard hyperparameters shown before the most important others.
KEY_PARAMS = ["optimizer", "lr", "batch_size"]


def build(location: str) -> list[str]:
    """Write report/index.html and its figures into the experiment; returns the files written (relative)."""
    exp = load(location)
    # The study first: its importances also order the other hyperparameter views.
    page = Page(exp, study_importances(exp), figures.arch_colours(exp.trials))
    shown, saved = predictions(exp), asha_savings(exp)
    page.files["index.html"] = document(
        f"{exp.name}: experiment report",
        header(exp, len(shown.names)), summary_cards(exp, saved), leaderboard_section(page), crossfit_section(page),
        learning_curves_section(page), hyperparameters_section(page), ensemble_section(page, shown),
        time_section(page, saved), further_section(exp, page.study),
        f"<p class='muted'>Built by <code>python -m searchspace.report</code> on "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}.</p>").encode()
    out = storage.join(location, "report")
    for name, data in page.files.items():
        storage.write_bytes(storage.join(out, name), data)
    return sorted(page.files)


@dataclass
class Page:
    """What the sections share: the experiment, its study's importances, and the files drawn so far."""

    exp: Experiment
    study: Study
    colours: dict                                   # arch -> colour, the same in every figure
    files: dict[str, bytes] = field(default_factory=dict)

    def figure(self, name: str, data: bytes | None, caption: str, alt: str) -> str:
        """Keep a drawn figure to write and return its <figure>; "" when there was nothing to draw."""
        if data is None:
            return ""
        self.files[name] = data
        return figure(name, caption, alt)


@dataclass
class Predictions:
    """Out-of-fold predictions the page shows per class: the ensemble's or, before `select`, the best trial's."""

    subject: str
    names: list[str]                    # class names
    members: list[dict] | None = None   # None: no candidate has out-of-fold predictions
    cm: np.ndarray | None = None        # confusion matrix, true class x predicted class
    images: int = 0


def predictions(exp: Experiment) -> Predictions:
    ens, names = exp.ensemble, [str(n) for n in exp.meta.get("class_names", [])]
    members = ens["members"] if ens and ens.get("members") else None
    subject = "the ensemble"
    if members is None:
        have = set(exp.store.candidate_ids())
        best = [tid for tid in exp.ranked()["trial_id"] if str(tid) in have]
        if best:
            members, subject = [dict(candidate=best[0], weight=1.0)], f"the best trial ({best[0]}, holdout fold)"
    if not members:
        return Predictions(subject, names)
    y, P = blended_oof(exp, members, (ens or {}).get("stacking"))
    if not names:
        names = [str(i) for i in range(P.shape[1])]
    cm = np.zeros((len(names), len(names)), int)
    np.add.at(cm, (y, P.argmax(1)), 1)
    return Predictions(subject, names, members, cm, len(y))


# --- the sections, in page order ------------------------------------------------------

def header(exp: Experiment, classes: int) -> str:
    return lines(f"<h1>Experiment {esc(exp.name)}</h1>",
                 f"<p class='muted'>task <b>{esc(exp.meta.get('task', '?'))}</b> · metric <b>{esc(exp.metric)}</b> "
                 f"({'higher' if exp.maximize else 'lower'} is better) · {classes} classes · "
                 f"{esc(exp.meta.get('folds', '?'))} folds · created {esc(exp.meta.get('created', ''))} · "
                 f"<code>{esc(exp.location)}</code></p>")


def summary_cards(exp: Experiment, saved: dict) -> str:
    t, ranked = exp.trials, exp.ranked()
    best = ranked.iloc[0] if len(ranked) else None
    cards = [(f"best trial {exp.metric}", fmt(best["best_score"]) if best is not None else "–",
              f"{best['trial_id']}, {best.get('arch', '')} at {best.get('image_size', '?')} px"
              if best is not None else "no finished trial")]
    if exp.ensemble:
        cards.append(ensemble_card(exp.ensemble, exp.metric))
    n_err = int((t["status"] == "error").sum())
    cards.append(("trials", f"{len(t)}", f"{saved['stopped']} stopped early by ASHA, {n_err} failed"))
    share = saved["epochs_saved"] / saved["epochs_full"] if saved["epochs_full"] else 0.0
    cards.append(("ASHA saved", f"{100 * share:.0f} % of trial-epochs",
                  f"{saved['epochs_saved']} of {saved['epochs_full']}, about {duration(saved['seconds_saved'])}"))
    cards.append(("search time", duration(search_wall_seconds(exp.curves)),
                  f"{duration(saved['seconds_run'])} of trial time in total"))
    return ("<div class='cards'>"
            + "".join(f"<div class='card'><span>{esc(a)}</span><b>{esc(b)}</b><span>{esc(c)}</span></div>"
                      for a, b, c in cards) + "</div>")


def ensemble_card(ens: dict, metric: str) -> tuple[str, str, str]:
    """The headline is the cross-validated score when ensemble.json has one; in-sample only as a footnote."""
    metric = ens.get("metric", metric)
    in_sample = fmt(ens.get("scores", {}).get("ensemble", {}).get(metric))
    members = f"{len(ens.get('members', []))} member(s)"
    honest = cv_score(ens, "ensemble")
    if honest is None:
        return f"ensemble {metric}", in_sample, f"{members}, in-sample out of fold (optimistic)"
    cv = ens["cv"]
    how = ("fell back to the best single candidate" if cv.get("fallback") else
           f"{members}, {cv.get('gain', 0):+.4f} over the best single")
    return (f"ensemble {metric}, cross-validated", f"{fmt(honest[0])} ± {fmt(honest[1])}",
            f"{how}; in-sample {in_sample} (optimistic)")


def leaderboard_section(page: Page) -> str:
    return lines("<h2>Leaderboard</h2>",
                 f"<p class='muted'>Every trial of the search, best first: its best {esc(page.exp.metric)} on the "
                 "holdout fold (fold 0), the epoch it reached it, and how long it ran. A trial that ASHA stopped "
                 "early is judged on fewer epochs than one that ran to the end.</p>",
                 leaderboard(page.exp, page.study.importances))


def crossfit_section(page: Page) -> str:
    """Which configs were cross-fitted, in the order chosen, and why (trials.parquet's crossfit_* columns)."""
    t = page.exp.trials
    if "crossfit_rank" not in t or t["crossfit_rank"].isna().all():
        return ""
    chosen = t[t["crossfit_rank"].notna()].sort_values("crossfit_rank")
    rows = [{"rank": int(r["crossfit_rank"]), "trial": r["trial_id"], "arch": r.get("arch"),
             "image size": r.get("image_size"), f"final {page.exp.metric}": r.get("score"),
             "gain when added": r["crossfit_gain"], "why": r["crossfit_reason"]} for _, r in chosen.iterrows()]
    how = page.exp.meta.get("crossfit_by", "complementarity")
    return lines("<h2>Cross-fit: which configs, and why</h2>",
                 f"<p class='muted'>Chosen by {esc(how)}: "
                 + ("greedy ensemble selection on the trials' fold-0 holdout predictions; the gain is how much "
                    "the greedy ensemble's holdout score rose at the step the config joined it."
                    if how == "complementarity" else "the top configs by their own fold-0 score.") + "</p>",
                 table(rows, left={"trial", "arch", "why"}))


def learning_curves_section(page: Page) -> str:
    exp = page.exp
    return lines("<h2>Learning curves</h2>",
                 page.figure("learning_curves.png", figures.fig_learning_curves(exp, page.colours),
                             f"Every trial's {esc(exp.metric)} per epoch, coloured by architecture. A cross marks the "
                             "last epoch of a trial that ASHA stopped; dotted lines are the epochs at which ASHA "
                             "compares trials.", "learning curves")
                 or "<p class='note'>No Ray trial folders with result.json were found in the experiment.</p>")


def hyperparameters_section(page: Page) -> str:
    exp, imp = page.exp, page.study.importances
    params = sorted(hyperparameters(exp.scored()), key=lambda p: -param_importance(imp, p))
    return lines("<h2>Hyperparameters</h2><div class='row'>", importances_figure(page),
                 page.figure("arch_size_grid.png", figures.fig_grid(exp),
                             "Best score of each architecture at each image size it was tried at.", "grid"),
                 "</div>",
                 page.figure("hyperparameters.png", figures.fig_hyperparameters(exp, params, page.colours),
                             f"Best {esc(exp.metric)} of each trial against each hyperparameter that varied, most "
                             "important first; hollow points are trials that ASHA stopped early.", "hyperparameters"))


def importances_figure(page: Page) -> str:
    study = page.study
    src = ("the search's own Optuna study (<code>" + esc(study.source) + "</code>; a trial's value is the last "
           "score it reported)") if study.from_storage else \
        "a study rebuilt from trials.parquet (a trial's value is its best score)"
    return (page.figure("importances.png", figures.fig_importances(study.importances, study.evaluator, study.finished),
                        f"How much of the variation in {esc(page.exp.metric)} each hyperparameter explains, "
                        f"from {src}. With few trials, read this as a hint.", "importances")
            or f"<p class='note'>No hyperparameter importances: {esc(study.evaluator)}.</p>")


def ensemble_section(page: Page, shown: Predictions) -> str:
    exp = page.exp
    if exp.ensemble:
        selection = selection_part(page)
    else:
        selection = ("<p class='note'>No ensemble yet: run <code>python -m ensemble_builder select --experiment "
                     f"{esc(exp.location)}</code>, then build this report again."
                     + (f" Until then the figures below show {esc(shown.subject)}." if shown.members else "") + "</p>")
    return lines("<h2>Ensemble</h2>", selection, candidates_part(page), student_part(page),
                 per_class_part(page, shown))


def selection_part(page: Page) -> str:
    """What ``select`` chose: the cross-validated estimate, the greedy trajectory, the members and scores."""
    ens = page.exp.ensemble
    metric = ens.get("metric", page.exp.metric)
    score_rows = [{"": k.replace("_", " "), **{m: v for m, v in s.items()}} for k, s in ens.get("scores", {}).items()]
    members = [{"candidate": m["candidate"], "weight": round(float(m["weight"]), 4),
                "picks": (ens.get("picks") or []).count(m["candidate"])} for m in ens.get("members", [])]
    return lines(cv_section(ens) if ens.get("cv") else "", "<div class='row'>",
                 page.figure("ensemble_trajectory.png", figures.fig_trajectory(ens),
                             f"In-sample out-of-fold {esc(metric)} after each greedy pick (the weights are chosen "
                             "on these same predictions, so it is optimistic); the star is the step the ensemble was "
                             "cut back to" + ("; the dotted line is the cross-validated ensemble." if ens.get("cv")
                                              else "."),
                             "trajectory"),
                 "<div><h3>Members</h3>" + table(members, left={"candidate"})
                 + "<h3>In-sample out-of-fold scores (optimistic)</h3>" + table(score_rows, left={""})
                 + "<p class='muted'>"
                 + ("cross-fitted: every training image" if ens.get("full_coverage") else "holdout fold only")
                 + f"; {len(ens.get('candidates', []))} candidate(s), top {esc(ens.get('top', '?'))}, "
                 f"{esc(ens.get('steps', '?'))} steps.</p></div></div>")


def candidates_part(page: Page) -> str:
    """Every candidate the selection chose among: its kind, out-of-fold score, cost and weight, and how
    the candidates' errors overlap; "" when there are no candidates."""
    pool, overlap = candidate_pool(page.exp)
    if pool.empty:
        return ""
    metric = page.exp.metric
    rows = [{"candidate": r.candidate, "kind": r.kind, "model": r.model, f"{metric} (out of fold)": r.score,
             "images": r.images, "cost": duration(r.seconds), "weight": round(r.weight, 4)} for r in pool.itertuples()]
    stacked = (page.exp.ensemble or {}).get("stacking")
    note = (" The ensemble is a stacker (a logistic regression on the candidates' log-probabilities): a weight is "
            "each input's share of its coefficients." if stacked else "")
    return lines("<h3>Candidates</h3><div class='row'><div>" + table(rows, left={"candidate", "kind", "model"})
                 + f"<p class='muted'>Cost: seconds of training or fitting over every fold.{note}</p></div>",
                 page.figure("error_overlap.png", figures.fig_error_overlap(overlap, pool["candidate"].tolist(),
                                                                           pool["kind"].tolist()),
                             "How the candidates' errors overlap: the share of the training images (out of fold) "
                             "that both of a pair get wrong. Low values off the diagonal mean complementary "
                             "candidates.", "error overlap"),
                 "</div>")


def student_part(page: Page) -> str:
    """The distilled student (``ensemble_builder distill``) against the ensemble and the best single candidate:
    size, images per second side by side, and the scores on the fold it never trained on; "" without one."""
    r = (page.exp.ensemble or {}).get("student")
    if not r:
        return ""
    s, nested = r["scores"], r.get("ensemble_nested_fold") or {}
    rows = [{"": f"student {r['arch']}@{r['image_size']}", "accuracy": s["student"]["accuracy"],
             "log loss": s["student"]["log_loss"], "parameters": f"{r['params']:,}", "MB": r["mb"],
             "images/s": r["images_per_s"]},
            {"": "best single candidate (out of fold)", "accuracy": s["best_single"]["accuracy"],
             "log loss": s["best_single"]["log_loss"], "parameters": None, "MB": None, "images/s": None},
            {"": f"ensemble: {r['ensemble_models']} models", "accuracy": s["ensemble_in_sample"]["accuracy"],
             "log loss": s["ensemble_in_sample"]["log_loss"], "parameters": f"{r['ensemble_params']:,}",
             "MB": r["ensemble_mb"], "images/s": r["ensemble_images_per_s"]}]
    honest = (f" The ensemble's nested CV {esc(nested['metric'].replace('_', ' '))} on this fold, the honest "
              f"figure: {fmt(nested['score'])}." if nested else "")
    return ("<h3>Distilled student</h3>" + table(rows, left={""})
            + f"<p class='muted'>Scored on fold {r['holdout_fold']} ({r['images']} images), which the scored "
            "student never trained on; the student that ships trained on every image. The ensemble's scores "
            f"there are in-sample (its weights saw these images: optimistic).{honest} Images per second measured "
            f"side by side on {r['speed_images']} images: the student is {r['speedup']:g}x the ensemble. "
            f"Distilling took {duration(r['seconds'])}; <code>python -m ensemble_builder predict --model student"
            "</code> uses it alone.</p>")


def per_class_part(page: Page, shown: Predictions) -> str:
    """The confusion matrix and per-class recall of the shown predictions; "" when there are none."""
    if not shown.members:
        return ""
    cm, names = shown.cm, shown.names
    support, predicted = cm.sum(1), cm.sum(0)
    rows = [{"class": n, "images": int(support[i]),
             "recall": cm[i, i] / support[i] if support[i] else None,
             "precision": cm[i, i] / predicted[i] if predicted[i] else None} for i, n in enumerate(names)]
    title = f"confusion matrix of {shown.subject}, out of fold ({shown.images} images)"
    return lines("<div class='row'>",
                 page.figure("confusion_matrix.png", figures.fig_confusion(cm, names, title),
                             f"Counts of {esc(shown.subject)}'s predictions (columns) for each true class (rows), "
                             "out of fold; colour is the share of the row.", "confusion matrix"),
                 page.figure("per_class_recall.png", figures.fig_recall(cm, names),
                             "Share of each class's images predicted correctly; orange bars are below the mean.",
                             "per-class recall"),
                 "</div>",
                 "<details><summary>per-class numbers</summary>" + table(rows, left={"class"}) + "</details>")


def time_section(page: Page, saved: dict) -> str:
    exp = page.exp
    return lines("<h2>Time</h2><div class='row'>",
                 page.figure("time_per_trial.png", figures.fig_time(exp), "Training seconds of each trial (Ray's "
                             "time_total_s).", "time per trial"),
                 f"<div><h3>What ASHA saved</h3><p class='muted'>{saved['trials']} finished trials, at most "
                 f"{saved['max_epochs']} epochs each; a stopped trial's missing epochs are costed<br>at its own "
                 "seconds per epoch.</p>" + table(asha_rows(saved), left={""}),
                 f"<p>Cross-fit: {plural(len(exp.crossfit), 'fold job')}, "
                 f"{duration(exp.crossfit['seconds'].sum())} of training in total.</p>" if len(exp.crossfit) else "",
                 "</div></div>")


def asha_rows(saved: dict) -> list[dict]:
    """Trial-epochs and seconds: run, if every trial had run all epochs, and what ASHA saved."""
    full_s = saved["seconds_run"] + saved["seconds_saved"]
    return [
        {"": "trial-epochs", "run": saved["epochs_run"], "if every trial ran all epochs": saved["epochs_full"],
         "saved by ASHA": saved["epochs_saved"],
         "saved %": round(100 * saved["epochs_saved"] / saved["epochs_full"], 1) if saved["epochs_full"] else None},
        {"": "seconds (estimated)", "run": round(saved["seconds_run"]), "if every trial ran all epochs": round(full_s),
         "saved by ASHA": round(saved["seconds_saved"]),
         "saved %": round(100 * saved["seconds_saved"] / full_s, 1) if full_s else None}]


def further_section(exp: Experiment, study: Study) -> str:
    """The commands for TensorBoard and, when the search kept its study, optuna-dashboard."""
    rel, own = exp.location, study.from_storage
    return ("<h2>Look further</h2><p>Ray wrote TensorBoard event files into every trial folder"
            + (", and the search kept its Optuna study in <code>" + esc(study.source) + "</code>" if own else "")
            + ":</p><pre>"
            + esc(f"pip install tensorboard{' optuna-dashboard' if own else ''}\ntensorboard --logdir {rel}")
            + (esc(f"\noptuna-dashboard {storage.join(rel, study.source)}") if own else "") + "</pre>")


# --- tables ----------------------------------------------------------------------------

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
    verdict = ("The blend the selection chose had a nested CV gain that was not positive: the best single "
               "candidate ships." if cv.get("shipped_single") else
               "No blend beat the best single candidate under cross-validation: the ensemble fell back to it."
               if cv.get("fallback") else f"Chosen: {esc(cv.get('chosen', {}).get('name', '?'))}"
               + ("" if cv.get("auto", True) else " (as given, --no-auto)") + ".")
    return ("<h3>Cross-validated scores</h3>"
            f"<p class='muted'>Over {how}: each fold is held out in turn, the selection (its setting "
            "included, chosen by a cross-validation over the other folds), the best single candidate and the "
            "top-K mean are chosen on the other folds and scored on the held-out images; "
            f"scores are pooled over all {sum(folds)} images. CV gain over the best single candidate: "
            f"<b>{cv.get('gain', 0):+.4f}</b> {esc(metric)}"
            + (" (a reduction: lower is better)" if metric == "log_loss" else "") + f". {verdict}</p>"
            + table(rows, left={""})
            + ("<p class='muted'>Without each fold, the selection chose: "
               + esc(", ".join(f"fold {f}: {n}" for f, n in cv["nested_choices"].items())) + ".</p>"
               if cv.get("nested_choices") else "")
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
        if "score" in t:   # the last epoch's: what the search and the cross-fit go by
            row[f"final {exp.metric}"] = r["score"]
        if "ensemble_gain" in t:
            row["ensemble gain"] = r["ensemble_gain"]
        if "crossfit_rank" in t:
            row["cross-fit"] = "" if pd.isna(r["crossfit_rank"]) else int(r["crossfit_rank"])
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
