"""One search config: the budget, the resources and the options, each a frozen dataclass.

Built once, from the command line (``SearchConfig.from_args``) or from keyword
arguments (``SearchConfig.from_kwargs``), validated once (every bad value, a
choice included, is ``BadInput``), then passed down whole. The command line
is generated from the fields (``add_arguments``): a field's metadata holds its
flag, its help and its checks, so an option cannot exist in one and not the
other.

A budget field left at None takes the task's value (``Budget.over``).
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field, fields

from core.errors import BadInput
from core.experiment import DEFAULT_RUNS
from trainer.augment import BACKENDS
from trainer.weights import MODES as PRETRAINED_MODES

OBJECTIVES = ("own", "ensemble")
CROSSFIT_BY = ("complementarity", "score")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text) -> float:
    """'90m', '8h', '1h30m', '45s', '2.5h' or plain seconds ('3600') -> seconds; BadInput otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower()
        parts = re.fullmatch(r"((\d+(\.\d+)?)\s*[smhd]\s*)+|\d+(\.\d+)?", s)
        if not parts:
            raise BadInput(f"--time-budget {text!r}: give a duration such as 90m, 8h, 1h30m or 3600 (seconds)")
        if re.fullmatch(r"\d+(\.\d+)?", s):
            seconds = float(s)
        else:
            seconds = sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", s))
    if not seconds > 0:
        raise BadInput(f"--time-budget {text!r}: must be more than 0 seconds")
    return seconds


def members(text) -> str:
    """--members: comma-separated kinds among probe, knn, pixels, or none; BadInput otherwise."""
    from trainer.classical import parse_kinds
    try:
        parse_kinds(text)
    except ValueError as e:
        raise BadInput(f"--members {text!r}: {e}; choose among probe, knn, pixels, or none") from None
    return str(text)


def option(default, help: str, *, minimum: float | None = None, strict: bool = False, choices=None,
           kind=None, flag: str | None = None, metavar: str | None = None):
    """A config field with what the command line and the checks need to know of it.

    ``minimum``/``strict``: the smallest value (``strict``: it must be more);
    ``choices``: the allowed values; ``kind``: int, float, str, duration or
    bool (a switch; a True default gives ``--no-<name>``); ``flag``: the
    option's name when it is not ``--<field-name>``.
    """
    kind = kind or (bool if isinstance(default, bool) else type(default) if default is not None else str)
    return field(default=default, metadata=dict(help=help, minimum=minimum, strict=strict, choices=choices,
                                                kind=kind, flag=flag, metavar=metavar))


def flag_of(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    if f.metadata.get("kind") is bool and f.default is True:
        return "--no-" + f.name.replace("_", "-")
    return "--" + f.name.replace("_", "-")


class _Checked:
    """Checks every field against its metadata: the type, the minimum, the choices."""

    def check(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None:
                continue
            flag = flag_of(f).replace("--no-", "--")
            kind = meta.get("kind")
            if kind is bool and not isinstance(value, bool):
                raise BadInput(f"{flag} {value!r}: must be True or False")
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                         or (kind is int and value != int(value))):
                raise BadInput(f"{flag} {value!r}: must be {'a whole number' if kind is int else 'a number'}")
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise BadInput(f"{flag} {value!r}: choose one of {', '.join(meta['choices'])}")
            low = meta.get("minimum")
            if low is not None and (value < low or (meta.get("strict") and value == low)):
                raise BadInput(f"{flag} {value}: must be {'more than' if meta.get('strict') else 'at least'} {low}")
        return self


@dataclass(frozen=True)
class Budget(_Checked):
    """How much the run may do (an option left unset takes the task's value)."""

    trials: int | None = option(None, "number of trials (default: the task's budget; with --time-budget: as many "
                                      "as the search's share of the time allows)", minimum=1, kind=int)
    max_epochs: int | None = option(None, "epochs of a search trial that is never stopped early", minimum=1, kind=int)
    grace_period: int | None = option(None, "ASHA: epochs before a trial can be stopped", minimum=1, kind=int)
    reduction_factor: int | None = option(None, "ASHA: keep 1/this of the trials at each rung", minimum=2, kind=int)
    folds: int | None = option(None, "K for the stratified K folds", minimum=2, kind=int)
    crossfit_top: int | None = option(None, "cross-fit this many of the best configs over all K folds "
                                            "(default: the task's, or what --time-budget allows; 0: skip)",
                                      minimum=0, kind=int)
    time_budget: float | None = option(None, "bound the whole job (data check, search, final training, selection) "
                                             "to this wall time: 90m, 8h, 3600 (seconds); the run splits it "
                                             "between the search and the final models", kind=duration,
                                       metavar="DURATION")

    def over(self, base: Budget) -> Budget:
        """These values where given, ``base``'s elsewhere; the grace period never exceeds the max epochs."""
        merged = dataclasses.replace(base, **{f.name: getattr(self, f.name) for f in fields(self)
                                              if getattr(self, f.name) is not None}).check()
        return dataclasses.replace(merged, grace_period=min(merged.grace_period, merged.max_epochs))

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Resources(_Checked):
    """What each trial asks Ray for, and how the run treats failures."""

    cpus_per_trial: float = option(1.0, "CPUs per trial", minimum=0, strict=True, kind=float)
    gpus_per_trial: float = option(0.0, "GPUs per trial; fraction allowed: 0.25 packs four small trials on one GPU",
                                   minimum=0, kind=float)
    max_concurrent: int = option(0, "at most this many trials at once (0: as resources allow)", minimum=0, kind=int)
    max_failures: int = option(2, "retries of a failed trial, from its last checkpoint", minimum=0, kind=int)


@dataclass(frozen=True)
class Options(_Checked):
    """Where the experiment goes, what is searched and how."""

    storage: str = option(DEFAULT_RUNS, "folder or URI that holds experiments (default: ./runs)")
    name: str | None = option(None, "experiment name (default: TASK-date-time)")
    seed: int = option(0, "seeds the folds, the sampler and the trials", minimum=0, kind=int)
    cache_dir: str | None = option(None, "this node's image cache (default: ~/.cache/searchspace; a node's "
                                         "SEARCHSPACE_CACHE_DIR wins)")
    archs: str | None = option(None, "comma-separated timm model names that replace the task's architectures")
    image_sizes: str | None = option(None, "comma-separated image sizes that replace the task's sizes")
    aug_backend: str | None = option(None, "force the augmentation backend (default: kornia on GPU, albumentations "
                                           "on CPU)", choices=BACKENDS)
    weights_dir: str | None = option(None, "folder of local pretrained weights, <arch>.safetensors or <arch>.pth")
    pretrained: str | None = option(None, "auto: fine-tune where weights resolve offline (weights dir, HF cache, "
                                          "the hub if it answers in seconds), train the rest from scratch; yes: "
                                          "stop if any architecture lacks weights; no: all from scratch (default: "
                                          "auto; digits: no)", choices=PRETRAINED_MODES)
    search_pretrained: bool = option(False, "make pretrained-or-scratch a searched choice for architectures that "
                                            "have weights")
    skip_unreadable: bool = option(False, "leave unreadable images out (recorded in experiment.json) instead of "
                                          "stopping")
    objective: str = option("own", "what the searcher optimises: each trial's own metric (default), or its "
                                   "ensemble_gain (how much it raises the greedy ensemble of the trials finished so "
                                   "far); ASHA always stops trials on their own metric", choices=OBJECTIVES)
    portfolio: bool = option(True, "do not start with the task's portfolio of known-good configs (TPE from the "
                                   "first trial)")
    crossfit_by: str | None = option(None, "which configs to cross-fit: those the greedy ensemble of the fold-0 "
                                           "predictions picks (default), or the top M by their own fold-0 score",
                                     choices=CROSSFIT_BY)
    keep_checkpoints: bool = option(False, "keep every checkpoint file (default: drop optimiser states once the "
                                           "search is over, the weights of trials ASHA stopped, and the cross-fit "
                                           "jobs' own copies)")
    tta: bool = option(True, "predict the test set without horizontal-flip TTA")
    gpu_path_on_cpu: bool = option(False, "train through the GPU code path on a CPU: kornia augmentation on the "
                                          "tensor's device, bfloat16 autocast, channels_last (to test that path "
                                          "where there is no GPU; slower than the default CPU path)")
    members: str | None = option(None, "classical ensemble members fitted on the same folds: comma-separated among "
                                       "probe (logistic regression on a pretrained backbone's frozen features), knn "
                                       "(nearest neighbours on them), pixels (a kernel model on HOG and a colour "
                                       "thumbnail), or none (default: those available: probe and knn for every "
                                       "architecture with pretrained weights, and pixels)", kind=members,
                                 metavar="KINDS")


PARTS = {"budget": Budget, "resources": Resources, "options": Options}


@dataclass(frozen=True)
class SearchConfig:
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    options: Options = field(default_factory=Options)

    @classmethod
    def from_kwargs(cls, **kwargs) -> SearchConfig:
        """``search()``'s keyword arguments (the CLI's options with underscores) -> a checked config.

        An unknown keyword is a TypeError (a mistake in the calling code); a bad
        value is BadInput, as on the command line.
        """
        parts = {name: {} for name in PARTS}
        owner = {f.name: name for name, part in PARTS.items() for f in fields(part)}
        unknown = sorted(set(kwargs) - set(owner))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(owner))}")
        for key, value in kwargs.items():
            parts[owner[key]][key] = value
        for part in PARTS.values():   # values the command line would parse (a duration, a list of kinds)
            for f in fields(part):
                kind, values = f.metadata.get("kind"), parts[owner[f.name]]
                if kind not in (int, float, str, bool) and values.get(f.name) is not None:
                    values[f.name] = kind(values[f.name])
        return cls(**{name: PARTS[name](**values).check() for name, values in parts.items()})

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SearchConfig:
        """The parsed command line (``add_arguments``) -> a checked config."""
        values = {f.name: getattr(args, f.name) for part in PARTS.values() for f in fields(part)}
        return cls(**{name: part(**{f.name: values[f.name] for f in fields(part)}).check()
                      for name, part in PARTS.items()})

    def flat(self) -> dict:
        """Every option by its field name (what experiment.json records)."""
        parts = (self.budget, self.resources, self.options)
        return {k: v for part in parts for k, v in dataclasses.asdict(part).items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line option per field of Budget, Resources and Options."""
    for part in PARTS.values():
        group = parser.add_argument_group(part.__doc__.splitlines()[0].rstrip("."))
        for f in fields(part):
            meta, flag = f.metadata, flag_of(f)
            kind = meta["kind"]
            if kind is bool:
                group.add_argument(flag, dest=f.name, action="store_false" if f.default else "store_true",
                                   help=meta["help"])
                continue
            group.add_argument(flag, dest=f.name, type=kind, default=f.default, choices=meta["choices"],
                               metavar=meta["metavar"], help=meta["help"])
