"""The experiment: its layout and its I/O, in one place (docs/design.md has the contract).

An experiment is a folder or bucket prefix; every file name of the contract
is spelled here and nowhere else, the way timm's registry owns its one
mapping. Other modules ask for ``Experiment(location).folds()``,
``.candidate(cid).oof()`` and so on. Only numpy, pandas and pyarrow are
imported, so the ensemble builder can read an experiment without torch.

```
<experiment>/
  experiment.json               task, data, options, budget, class names, K, seed, trial context,
                                the final stage's plan (final_plan) under a time budget
  clock.json                    the job's time budget, the seconds it has used, its phase and deadlines
  folds.parquet                 sample_id, path, label, fold
  test.parquet                  sample_id, path                        (absent without a test set)
  trials.parquet                one row per search trial
  optuna_journal.log            the Optuna study
  pool/<trial_id>.parquet       sample_id, probs: fold 0's holdout predictions of each search trial
                                that ran its whole schedule (what ensemble_gain is measured against)
  weights/<arch><suffix>        pretrained weights copied for a cluster (bucket experiments only)
  candidates/<cid>/oof.parquet  sample_id, probs (out of fold or fold 0's holdout)
  candidates/<cid>/test.parquet sample_id, probs (mean over the candidate's fold models)
  candidates/<cid>/members.json config and the checkpoint of each fold model
  candidates/<cid>/folds/<k>/   a cross-fit fold: model.pt (a network) or model.npz (a classical
                                member's arrays), config.json, holdout.parquet, test.parquet,
                                done.json (written last)
  ensemble/ensemble.json        members, weights (or the stacker's arrays), scores (ensemble_builder select)
  ensemble/submission.csv
  ensemble/test.parquet         sample_id, probs: the shipped ensemble's test probabilities
  <ray trial folders>           Ray Tune's own: the search's and crossfit-<date>/
```
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import pyarrow as pa

from core import storage
from core.errors import BadInput

DEFAULT_RUNS = "runs"
STUDY_FILE = "optuna_journal.log"
TRIALS_FILE = "trials.parquet"
TUNE_SPARE_FILE = "tune_state_spare.zip"   # the search's newest whole Tune snapshot (searchspace.searcher)
# Inside a checkpoint folder (Ray's, or a fold record).
MODEL_FILE, CONFIG_FILE, HOLDOUT_FILE, TRAIN_STATE_FILE = "model.pt", "config.json", "holdout.parquet", "train_state.pt"
STUDENT_PREFIX = "student-"   # candidates/student-<arch>-<size>/: a distilled student (never a selection input)
MEMBER_FILE = "model.npz"   # a classical member's fold model: its arrays (trainer.classical), never a pickle


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a run shares (kept in experiment.json as ``context``)."""

    experiment: str                  # where the experiment is now (a bucket copy may move)
    cache_dir: str                   # the driver's --cache-dir; a node's SEARCHSPACE_CACHE_DIR wins
    metric: str
    data_key: str                    # fingerprint of the training images (the node cache's key)
    num_classes: int
    max_epochs: int                  # a search trial's whole schedule
    seed: int = 0
    test_key: str | None = None
    aug_backend: str | None = None   # None: kornia on a GPU, albumentations on CPU
    weights: dict = field(default_factory=dict)   # arch -> resolved pretrained weights (a file or URI) or None
    search_pretrained: bool = False
    tta: bool = True
    cpus_per_trial: float = 1
    gpu_path_on_cpu: bool = False    # the trainer's accelerator branch on a CPU (trainer.device)

    @classmethod
    def from_dict(cls, d: dict) -> TrialContext:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def probs_table(sample_ids, probs: np.ndarray) -> pa.Table:
    """sample_id + probs as a fixed-size list of float32 (the experiment contract)."""
    flat = pa.array(np.ascontiguousarray(probs, np.float32).ravel(), pa.float32())
    return pa.table({"sample_id": pa.array([str(s) for s in sample_ids], pa.string()),
                     "probs": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1])})


def probs_array(table: pa.Table) -> np.ndarray:
    """The probs column back as an (n, C) float32 array, read as one flat buffer."""
    probs = table.column("probs").combine_chunks()
    if len(probs) == 0:
        return np.zeros((0, 0), np.float32)
    return probs.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(probs), probs.type.list_size)


def aligned(table: pa.Table, order: Sequence[str]) -> np.ndarray:
    """A probability table's rows in the given sample_id order (KeyError names what is missing)."""
    ids = table.column("sample_id").to_pylist()
    return pd.DataFrame(probs_array(table), index=ids).loc[list(order)].to_numpy()


def ranked(trials: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Trials best first: those that ran their whole schedule, then by final score (trials.parquet)."""
    ok = trials[trials["score"].notna()]
    return ok.sort_values(["completed", "score"], ascending=[False, mode == "min"], kind="stable")


@dataclass(frozen=True)
class Folder:
    """A folder of the experiment: its files by name, and the test predictions that several kinds hold."""

    location: str

    def file(self, name: str) -> str:
        return storage.join(self.location, name)

    def has(self, name: str) -> bool:
        return storage.exists(self.file(name))

    def has_test(self) -> bool:
        return self.has("test.parquet")

    def test(self) -> pa.Table:
        return storage.read_parquet(self.file("test.parquet"))


@dataclass(frozen=True)
class Checkpoint(Folder):
    """A folder holding one model: a Ray checkpoint of the search, or a cross-fit fold record."""

    @property
    def model(self) -> str:
        return self.file(MODEL_FILE)

    @property
    def member_model(self) -> str:
        return self.file(MEMBER_FILE)

    def config(self) -> dict:
        return storage.read_json(self.file(CONFIG_FILE))

    def holdout(self) -> pa.Table:
        return storage.read_parquet(self.file(HOLDOUT_FILE))


@dataclass(frozen=True)
class Fold(Checkpoint):
    """candidates/<cid>/folds/<k>/: a cross-fit fold's model and predictions; done.json marks it finished."""

    def done(self) -> bool:
        return self.has("done.json")

    def record(self) -> dict:
        return storage.read_json(self.file("done.json"))

    def write(self, hold: pa.Table, test: pa.Table | None, record: dict,
              model: bytes | None = None, config: dict | None = None, model_file: str = MODEL_FILE) -> None:
        """Everything but done.json first, so a reader never takes a half-written fold for a finished one."""
        if model is not None:
            storage.write_bytes(self.file(model_file), model)
            storage.write_json(self.file(CONFIG_FILE), config)
        storage.write_parquet(self.file(HOLDOUT_FILE), hold)
        if test is not None:
            storage.write_parquet(self.file("test.parquet"), test)
        storage.write_json(self.file("done.json"), record)


@dataclass(frozen=True)
class Candidate(Folder):
    """candidates/<cid>/: out-of-fold (or holdout) predictions, test predictions, members and config."""

    cid: str = ""

    def exists(self) -> bool:
        return self.has("members.json")

    @property
    def oof_file(self) -> str:
        return self.file("oof.parquet")

    @property
    def test_file(self) -> str:
        return self.file("test.parquet")

    def has_oof(self) -> bool:
        return self.has("oof.parquet")

    def oof(self) -> pa.Table:
        return storage.read_parquet(self.file("oof.parquet"))

    def members(self) -> dict:
        return storage.read_json(self.file("members.json"))

    def config(self) -> dict:
        return self.members().get("config", {}) if self.exists() else {}

    def fold(self, k: int) -> Fold:
        return Fold(storage.join(self.location, "folds", str(k)))

    def write(self, members: list[dict], oof: pa.Table, config: dict, test: pa.Table | None = None) -> None:
        storage.write_parquet(self.file("oof.parquet"), oof.select(["sample_id", "probs"]))
        if test is not None:
            storage.write_parquet(self.file("test.parquet"), test)
        storage.write_json(self.file("members.json"), dict(candidate=self.cid, config=config, members=members))


@dataclass(frozen=True)
class Experiment:
    location: str

    def file(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    # --- the index and the run's record
    def exists(self) -> bool:
        return storage.exists(self.file("experiment.json"))

    def meta(self) -> dict:
        return storage.read_json(self.file("experiment.json"))

    def write_meta(self, meta: dict) -> None:
        storage.write_json(self.file("experiment.json"), meta)

    def has_clock(self) -> bool:
        return storage.exists(self.file("clock.json"))

    def clock(self) -> dict:
        return storage.read_json(self.file("clock.json"))

    def write_clock(self, clock: dict) -> None:
        storage.write_json(self.file("clock.json"), clock)

    def folds(self) -> pd.DataFrame:
        return storage.read_parquet(self.file("folds.parquet")).to_pandas()

    def write_folds(self, index: pd.DataFrame) -> None:
        storage.write_parquet(self.file("folds.parquet"), pa.Table.from_pandas(index, preserve_index=False))

    def has_test(self) -> bool:
        return storage.exists(self.file("test.parquet"))

    def test(self) -> pd.DataFrame:
        return storage.read_parquet(self.file("test.parquet")).to_pandas()

    def write_test(self, test: pd.DataFrame) -> None:
        storage.write_parquet(self.file("test.parquet"),
                              pa.Table.from_pandas(test[["sample_id", "path"]], preserve_index=False))

    def has_trials(self) -> bool:
        return storage.exists(self.file(TRIALS_FILE))

    def trials(self) -> pd.DataFrame:
        return storage.read_parquet(self.file(TRIALS_FILE)).to_pandas()

    def write_trials(self, trials: pd.DataFrame) -> None:
        storage.write_parquet(self.file(TRIALS_FILE), pa.Table.from_pandas(trials, preserve_index=False))

    @property
    def trials_file(self) -> str:
        return self.file(TRIALS_FILE)

    # --- candidates
    @property
    def candidates_dir(self) -> str:
        return self.file("candidates")

    def candidate(self, cid: str) -> Candidate:
        return Candidate(self.file("candidates", cid), cid)

    def candidate_ids(self) -> list[str]:
        """Every candidate with out-of-fold predictions, sorted."""
        root = self.candidates_dir
        if not storage.is_dir(root):
            return []
        return sorted({rel.split("/")[0] for rel, _ in storage.list_files(root)
                       if rel.endswith("/oof.parquet") and rel.count("/") == 1})

    # --- the pool: fold-0 holdout predictions of the search trials that ran their whole schedule
    def pool_ids(self) -> list[str]:
        root = self.file("pool")
        if not storage.is_dir(root):
            return []
        return sorted(rel[: -len(".parquet")] for rel, _ in storage.list_files(root, recursive=False)
                      if rel.endswith(".parquet"))

    def pool(self, trial_id: str) -> pa.Table:
        return storage.read_parquet(self.file("pool", trial_id + ".parquet"))

    def write_pool(self, trial_id: str, table: pa.Table) -> None:
        storage.write_parquet(self.file("pool", trial_id + ".parquet"), table)

    # --- weights, the study, the ensemble
    def weights_file(self, arch: str, suffix: str) -> str:
        return self.file("weights", arch + suffix)

    @property
    def study_file(self) -> str:
        return self.file(STUDY_FILE)

    @property
    def tune_spare_file(self) -> str:
        return self.file(TUNE_SPARE_FILE)

    def ensemble_file(self, name: str = "ensemble.json") -> str:
        return self.file("ensemble", name)

    @property
    def submission_file(self) -> str:
        return self.ensemble_file("submission.csv")

    def has_ensemble(self) -> bool:
        return storage.exists(self.ensemble_file())

    def ensemble_test(self) -> pa.Table:
        """The shipped ensemble's probabilities on the test images (a probability table), as the submission's."""
        return storage.read_parquet(self.ensemble_file("test.parquet"))

    def write_ensemble_test(self, table: pa.Table) -> None:
        storage.write_parquet(self.ensemble_file("test.parquet"), table)

    def ensemble(self) -> dict:
        return storage.read_json(self.ensemble_file())


def newest(runs: str) -> str:
    """The most recently created experiment (by experiment.json) under a runs folder or URI."""
    found = []
    if storage.is_dir(runs):
        for rel, _ in storage.list_files(runs):
            parts = rel.split("/")
            if len(parts) == 2 and parts[1] == "experiment.json":
                location = storage.join(runs, parts[0])
                found.append((Experiment(location).meta().get("created", ""), location))
    if not found:
        raise BadInput(f"{runs}: no experiment found; run `python -m searchspace.run TASK` first or pass --experiment")
    return max(found)[1]


def open_journal(path: str):
    """The Optuna study's journal storage (a local file)."""
    import optuna

    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(path))
