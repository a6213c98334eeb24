"""Read an experiment's candidates: out-of-fold probabilities aligned by sample_id."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from trainer.errors import BadInput
from trainer.experiment import Experiment, newest, probs_array


@dataclass
class Candidates:
    experiment: str
    meta: dict                 # experiment.json
    ids: list[str]             # candidate ids, in the order of P's first axis
    sample_ids: list[str]      # the samples every candidate predicted, in P's second axis
    y: np.ndarray              # (n,) true labels
    P: np.ndarray              # (m, n, C) out-of-fold probabilities
    full_coverage: bool        # cross-fitted (every training sample) or holdout fold only
    configs: dict[str, dict]   # candidate id -> its config (members.json)
    left_out: list[str]        # candidates whose sample set differs from the one used
    folds: np.ndarray          # (n,) the fold of each sample (folds.parquet); one value for holdout-only candidates


def newest_experiment(runs: str) -> str:
    """The most recently created experiment under a runs folder (trainer.experiment.newest)."""
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


def load(experiment: str) -> Candidates:
    exp = Experiment(experiment)
    if not exp.exists():
        raise BadInput(f"{experiment}: not an experiment (no experiment.json); check --experiment")
    meta = exp.meta()
    n_classes = len(meta["class_names"])
    index = exp.folds()
    names = exp.candidate_ids()
    if not names:
        raise BadInput(f"{experiment}: no candidates (candidates/*/oof.parquet); run the search to completion first")

    tables = {}
    for cid in names:
        candidate = exp.candidate(cid)
        table, location = candidate.oof(), candidate.oof_file
        P = probs_matrix(table, location)
        if P.shape[1] != n_classes:
            raise BadInput(f"{location}: {P.shape[1]} classes, but the experiment has {n_classes} "
                           f"({', '.join(meta['class_names'])}); this candidate belongs to another task")
        tables[cid] = (table.column("sample_id").to_pylist(), P)

    # Never mix sample sets: the full-coverage (cross-fitted) candidates when
    # there are any, else the largest group sharing one holdout set.
    everything = frozenset(index["sample_id"])
    sets = {cid: frozenset(ids) for cid, (ids, _) in tables.items()}
    full = [cid for cid in names if sets[cid] == everything]
    chosen = full or [cid for cid in names if sets[cid] == Counter(sets.values()).most_common(1)[0][0]]
    order = [s for s in index["sample_id"] if s in sets[chosen[0]]]   # the index's order
    P = np.stack([pd.DataFrame(tables[c][1], index=tables[c][0]).loc[order].to_numpy() for c in chosen])
    rows = index.set_index("sample_id").loc[order]
    y, folds = rows["label"].to_numpy(), rows["fold"].to_numpy(np.int64)
    configs = {cid: exp.candidate(cid).config() for cid in chosen}
    return Candidates(experiment, meta, chosen, order, y, P.astype(np.float32), bool(full), configs,
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
