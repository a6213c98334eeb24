"""Read an experiment's candidates: out-of-fold probabilities aligned by sample_id."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import BadInput
from core.experiment import STUDENT_PREFIX, Experiment, newest, probs_array

FLOAT16_ABOVE = 2**31   # bytes: a float32 P larger than this is held as float16 (1000 x 100k x 10 is 4 GB)


@dataclass
class Candidates:
    experiment: str
    meta: dict                 # experiment.json
    ids: list[str]             # candidate ids, in the order of P's first axis
    sample_ids: list[str]      # the samples every candidate predicted, in P's second axis
    y: np.ndarray              # (n,) true labels
    P: np.ndarray              # (m, n, C) out-of-fold probabilities, float32 (float16 when large; see load)
    full_coverage: bool        # cross-fitted (every training sample) or holdout fold only
    configs: dict[str, dict]   # candidate id -> its config (members.json)
    left_out: list[str]        # candidates whose sample set differs from the one used
    folds: np.ndarray          # (n,) the fold of each sample (folds.parquet); one value for holdout-only candidates


def newest_experiment(runs: str) -> str:
    """The most recently created experiment under a runs folder (core.experiment.newest)."""
    return newest(runs)


def probs_matrix(table, location: str) -> np.ndarray:
    """The probs column as an (n, C) float32 array, checked for NaN and rows summing to 1."""
    P = probs_array(table)
    if not np.isfinite(P).all():
        raise BadInput(f"{location}: probabilities contain NaN or infinity; re-run this candidate or delete it")
    sums = P.sum(axis=1)
    if len(P) and np.abs(sums - 1).max() > 1e-3:
        worst = int(np.abs(sums - 1).argmax())
        raise BadInput(f"{location}: probability rows must sum to 1 (row {worst} sums to {sums[worst]:.4f}); "
                       "re-run this candidate or delete it")
    return P


def load(experiment: str, dtype=None, only: list[str] | None = None) -> Candidates:
    """The experiment's candidates (``only``: these of them); ``P`` is float32, or float16 when float32 would
    pass ``FLOAT16_ABOVE`` bytes.

    ``dtype`` overrides that choice. Each candidate's rows are written straight
    into the matrix of its sample set, so the whole is never held twice.
    """
    exp = Experiment(experiment)
    if not exp.exists():
        raise BadInput(f"{experiment}: not an experiment (no experiment.json); check --experiment")
    meta = exp.meta()
    n_classes = len(meta["class_names"])
    index = exp.folds()
    # A student learned from the ensemble's own predictions: blending it back in would be circular.
    names = [n for n in exp.candidate_ids() if not n.startswith(STUDENT_PREFIX)]
    if only is not None:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise BadInput(f"{experiment}: no candidate {', '.join(unknown)}; its candidates are {', '.join(names)}")
        names = [n for n in names if n in set(only)]
    if not names:
        raise BadInput(f"{experiment}: no candidates (candidates/*/oof.parquet); run the search to completion first")
    if dtype is None:   # from the index's size: an upper bound for holdout-only candidates
        dtype = np.float16 if len(names) * len(index) * n_classes * 4 > FLOAT16_ABOVE else np.float32

    # Candidates are grouped by sample set; a set's matrix holds its rows in the
    # index's order. np.empty only reserves it: a row costs memory once written.
    groups: dict[frozenset, tuple[list[str], np.ndarray, list[str]]] = {}   # set -> (order, matrix, ids)
    layouts: dict[tuple, tuple[frozenset, np.ndarray]] = {}   # a sample_id column -> (its set, rows in set order)
    for cid in names:
        candidate = exp.candidate(cid)
        table, location = candidate.oof(), candidate.oof_file
        P = probs_matrix(table, location)
        if P.shape[1] != n_classes:
            raise BadInput(f"{location}: {P.shape[1]} classes, but the experiment has {n_classes} "
                           f"({', '.join(meta['class_names'])}); this candidate belongs to another task")
        layout = tuple(table.column("sample_id").to_pylist())
        if layout not in layouts:
            ids = frozenset(layout)
            if len(ids) < len(layout):
                raise BadInput(f"{location}: a sample_id appears twice; re-run this candidate or delete it")
            if ids not in groups:
                order = [s for s in index["sample_id"] if s in ids]
                groups[ids] = (order, np.empty((len(names), len(order), n_classes), dtype), [])
            layouts[layout] = ids, pd.Index(layout).get_indexer(groups[ids][0])
        ids, rows = layouts[layout]
        _, matrix, members = groups[ids]
        matrix[len(members)] = P[rows]
        members.append(cid)

    # Never mix sample sets: the full-coverage (cross-fitted) candidates when
    # there are any, else the largest group sharing one holdout set.
    everything = frozenset(index["sample_id"])
    full = everything in groups
    order, P, chosen = groups[everything] if full else max(groups.values(), key=lambda g: len(g[2]))
    rows = index.set_index("sample_id").loc[order]
    y, folds = rows["label"].to_numpy(), rows["fold"].to_numpy(np.int64)
    configs = {cid: exp.candidate(cid).config() for cid in chosen}
    return Candidates(experiment, meta, chosen, order, y, P[:len(chosen)], full, configs,
                      [c for c in names if c not in chosen], folds)


def test_matrix(c: Candidates, ids: list[str]) -> tuple[list[str], np.ndarray] | None:
    """(test sample ids, (m, n_test, C)) when every given candidate has test predictions."""
    exp = Experiment(c.experiment)
    if not exp.has_test():
        return None
    order = exp.test()["sample_id"].tolist()
    out = []
    for cid in ids:
        candidate = exp.candidate(cid)
        if not candidate.has_test():
            return None
        table = candidate.test()
        out.append(pd.DataFrame(probs_matrix(table, candidate.test_file),
                                index=table.column("sample_id").to_pylist()).loc[order].to_numpy())
    return order, np.stack(out).astype(np.float32)
