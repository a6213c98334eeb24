"""The time budget: the job's clock, the deadline that stops a phase, and how the budget is split.

``--time-budget T`` bounds the whole job: the data check, the search, the
final stage (the cross-fit) and the selection. The rule, and why, is in
docs/design.md ("The time budget"); in short:

- before the search, one short measurement of the first config (``calibrate``)
  says what an epoch costs; ``split`` then fixes K (fold 0 is the search's
  holdout) and the search's share, and refuses a budget that cannot train even
  one final config at the searched length on every fold;
- after the search, ``plan_final`` takes each chosen config's measured
  seconds per epoch and the slots that run at once, and trains the final
  models as long as the rest of the budget allows, up to ``LENGTH_CAP``
  times the searched length: length first, then more configs at that length
  (a config too slow to join is passed over for the next);
- every phase ends at its deadline (``Deadline``): a trial still running is
  stopped cleanly, and what finished is kept.

The clock (``Clock``) counts the seconds this job has used, across
``--resume``: what an earlier session used is kept in the experiment's
``clock.json`` and the time between a kill and the resume is not counted.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import time
from dataclasses import dataclass

from ray.tune.callback import Callback
from ray.tune.stopper import Stopper

from core.errors import BadInput
from core.experiment import Experiment

SEARCH_SHARE = 0.3     # of what is left after the data check and the reserve
LENGTH_CAP = 3         # the length the final stage aims at, in times the searched length ...
LENGTH_MAX = 6         # ... and what it stretches to when the time left holds no further config
SHORTER_FOR_BREADTH = 2 / 3   # another config joins if every config still gets this share of the first's length
STAGE_START_S = 8.0    # starting the final stage's Tune run and its first actors
PLAN_SLACK = 0.9       # the final stage plans on this share of its time: estimates err, the deadline does not
RESERVE_MIN_S = 20.0   # kept for starting the final stage, assembling the candidates and the selection ...
RESERVE_SHARE = 0.03   # ... or this share of the budget, if more
UNLIMITED_TRIALS = 100_000   # --trials under a time budget when none is given: the deadline ends the search
SAVE_EVERY_S = 10.0    # how often a running phase writes the clock (a kill loses at most this)

_CLOCKS: dict[str, Clock] = {}   # this process's clock of each experiment (a restored Deadline finds it here)


def clock_text(seconds: float) -> str:
    """90 -> '1m30s', 3725 -> '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def at(seconds_from_now: float) -> str:
    """The wall-clock time that many seconds from now, as HH:MM:SS."""
    return (datetime.datetime.now() + datetime.timedelta(seconds=seconds_from_now)).strftime("%H:%M:%S")


@dataclass
class Clock:
    """The seconds this job has used: an earlier session's (kept in clock.json) plus this one's so far."""

    location: str
    budget_s: float | None
    used_before: float = 0.0
    started: float = dataclasses.field(default_factory=time.time)
    state: dict = dataclasses.field(default_factory=dict)   # phase, deadlines, the plan: kept in clock.json
    saved: float = 0.0

    @classmethod
    def start(cls, location: str, budget_s: float | None, started: float | None = None) -> Clock:
        clock = cls(location, budget_s, started=started or time.time())
        _CLOCKS[location] = clock
        return clock

    @classmethod
    def resume(cls, experiment: Experiment) -> Clock:
        """The clock of an interrupted job: its budget and what it used, counting on from now."""
        record = experiment.clock() if experiment.has_clock() else {}
        clock = cls(experiment.location, record.get("budget_s"), float(record.get("used_s", 0.0)),
                    state=dict(record.get("state", {})))
        _CLOCKS[experiment.location] = clock
        return clock

    @classmethod
    def of(cls, location: str) -> Clock | None:
        return _CLOCKS.get(location)

    def used(self) -> float:
        return self.used_before + time.time() - self.started

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.used()

    def save(self, **state) -> None:
        """Write clock.json (the budget, the seconds used, ``state`` merged into the kept state)."""
        self.state.update(state)
        Experiment(self.location).write_clock(dict(budget_s=self.budget_s, used_s=round(self.used(), 1),
                                                   state=self.state))
        self.saved = time.time()


class Deadline(Stopper, Callback):
    """A Ray Tune stopper: stops every trial once the job's clock reaches ``until_s`` (job seconds).

    Ray pickles it with the experiment; a resumed search finds this process's
    clock of the experiment (``Clock.of``), so the deadline counts on where the
    killed session left off. A trial it stops keeps its last registered checkpoint.
    It is also a Tune callback (``callbacks=[deadline]``), to hear of registered checkpoints.
    """

    first_checkpoint = checkpointed = False   # (a deadline pickled by an older version has neither)

    def __init__(self, location: str, until_s: float, unless=None, first_checkpoint: bool = False):
        """``unless()``: while it returns True the deadline waits (the final stage's first config is not
        complete yet: a job that ran over its budget still ends with a submission). Checked every few seconds.
        ``first_checkpoint``: the deadline also waits until Tune has registered some trial's checkpoint (the
        search: the final stage needs a candidate), though never past the whole budget. A reported epoch is
        not enough: Tune registers its checkpoint one round trip to the trial later, and a trial stopped in
        between has none (on a loaded machine the search then ended with no candidate at all)."""
        self.location, self.until_s, self.unless = location, until_s, unless
        self.first_checkpoint = first_checkpoint
        self.reached = False
        self.overrun = False
        self.checkpointed = False
        self._checked, self._waiting = 0.0, False

    def __call__(self, trial_id, result) -> bool:
        return False

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self.checkpointed = True

    def stop_all(self) -> bool:
        clock = Clock.of(self.location)
        if clock is None:
            return False
        if time.time() - clock.saved >= SAVE_EVERY_S:
            clock.save()
        if self.reached or clock.used() < self.until_s:
            return self.reached
        waiting = self.first_checkpoint and not self.checkpointed
        if waiting and (clock.budget_s is None or clock.used() < clock.budget_s):
            self.overrun = True
            return False
        if self.unless is not None:
            if time.time() - self._checked >= 2.0:
                self._checked, self._waiting = time.time(), bool(self.unless())
            if self._waiting:
                self.overrun = True
                return False
        self.reached = True
        return True


# --- the split, before the search ------------------------------------------------------

@dataclass(frozen=True)
class Cost:
    """What one config costs on one fold: seconds per epoch, and once per job (start-up, test predictions)."""

    epoch_s: float
    job_s: float


EPOCH_OVERHEAD_S = 0.2   # a checkpoint and a report to Tune per epoch, beyond the training and the holdout


@dataclass(frozen=True)
class Measured:
    """One config measured on one node before the search (``trainer.fit.measure``)."""

    train_s_per_image: float
    predict_s_per_image: float
    setup_s: float

    def on_fold(self, n_images: int, folds: int, n_test: int, tta: bool) -> Cost:
        """A fold job's cost: training on (K-1)/K of the images, the holdout, then the test set once."""
        epoch = (n_images * (folds - 1) / folds * self.train_s_per_image + n_images / folds * self.predict_s_per_image
                 + EPOCH_OVERHEAD_S)
        return Cost(epoch, self.setup_s + n_test * self.predict_s_per_image * (2 if tta else 1))


class TooSmall(BadInput):
    """The budget cannot hold one final config of the space measured; ``enough_s`` would."""

    def __init__(self, message: str, enough_s: float):
        super().__init__(message)
        self.enough_s = enough_s


@dataclass(frozen=True)
class Split:
    folds: int
    search_s: float          # the search's share, seconds
    final_s: float           # the final stage's share, seconds (the reserve excluded)
    reserve_s: float
    search_until_s: float    # job seconds at which the search stops


def reserve(budget_s: float) -> float:
    return max(RESERVE_MIN_S, RESERVE_SHARE * budget_s)


def makespan(durations: list[float], slots: int) -> float:
    """Seconds to run jobs of these durations on ``slots`` at once, in the given order (each takes the
    first free slot, as Tune's queue does)."""
    loads = [0.0] * max(1, slots)
    for d in durations:
        i = loads.index(min(loads))
        loads[i] += d
    return max(loads) if durations else 0.0


def split(budget_s: float, used_s: float, measured: Measured, n_images: int, n_test: int, tta: bool,
          searched_epochs: int, slots: int, folds: int | None, max_folds: int) -> Split:
    """K and the search's share; ``TooSmall`` when one config cannot train at the searched length on every fold.

    K is the largest number of folds (from ``max_folds`` down to 2) with which
    one config trains at the length cap on every fold within the final share;
    when none does, 2 (the most epochs per model for the time). A K given by
    the user stands.
    """
    res = reserve(budget_s)
    left = budget_s - used_s - res
    search = SEARCH_SHARE * left
    final = left - search
    candidates = [folds] if folds else list(range(max_folds, 1, -1))

    def one_config(k: int, epochs: int) -> float:
        c = measured.on_fold(n_images, k, n_test, tta)
        return makespan([c.job_s + epochs * c.epoch_s] * k, slots)

    k = next((k for k in candidates if one_config(k, LENGTH_CAP * searched_epochs) <= final), candidates[-1])
    need = one_config(k, searched_epochs)
    if need > final:
        # the budget at which the final share holds one config at the searched length
        base = used_s + need / (1 - SEARCH_SHARE)
        enough = math.ceil(max(base + RESERVE_MIN_S, base / (1 - RESERVE_SHARE)) / 60) * 60
        raise TooSmall(
            f"--time-budget {clock_text(budget_s)}: too small for even one final config: {k} folds x "
            f"{searched_epochs} epochs (the searched length) take about {clock_text(need)} on {slots} slot(s), "
            f"and the final stage's share is {clock_text(max(0.0, final))} (the data check took "
            f"{clock_text(used_s)}); give at least --time-budget {clock_text(enough)}, or fewer --max-epochs",
            enough)
    return Split(k, search, final, res, used_s + search)


# --- the final stage's plan, after the search -----------------------------------------

@dataclass(frozen=True)
class Plan:
    """The final stage: these configs (in order), each on every fold, at ``epochs`` each."""

    configs: list[str]
    epochs: int
    folds: int
    slots: int
    seconds: float           # the estimated makespan
    searched_epochs: int
    available_s: float
    passed_over: list[str] = dataclasses.field(default_factory=list)   # ranked before a chosen one, too slow

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        longer = "" if self.epochs == self.searched_epochs else f" (the search ran {self.searched_epochs})"
        return (f"{len(self.configs)} config(s) x {self.folds} folds at {self.epochs} epochs{longer}: about "
                f"{clock_text(self.seconds)} on {self.slots} slot(s), of the {clock_text(self.available_s)} left "
                f"for it; ends about {at(self.seconds)}")


def plan_final(costs: dict[str, Cost], available_s: float, folds: int, slots: int, searched_epochs: int,
               top: int | None = None) -> Plan:
    """Which of the ranked configs (``costs``, best first) the final stage trains, and for how long.

    Length first: the first config gets the most epochs that fit, up to
    ``LENGTH_CAP`` times the searched length; the next configs join, in their
    order, while every config still gets ``SHORTER_FOR_BREADTH`` of that
    length; one that would cut them below it (a slow config) is passed over
    and the one after it is tried. Then all train at the longest length that
    fits them, up to ``LENGTH_MAX`` times the searched length (time that holds
    no further config is not left idle). ``top`` fixes the number of configs
    (the first ``top``). Never shorter than 1 epoch; ``epochs`` below the
    searched length means the search overran its share (said by the caller).
    """
    ids = list(costs)
    cap = LENGTH_CAP * searched_epochs
    total_s, available_s = available_s, PLAN_SLACK * available_s - STAGE_START_S

    def longest(chosen: list[str], cap: int = cap) -> int:
        """The most epochs (<= cap) at which these configs fit, 0 if they do not at one."""
        lo, hi = 0, cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if seconds(chosen, mid) <= available_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def seconds(chosen: list[str], epochs: int) -> float:
        jobs = [costs[c].job_s + epochs * costs[c].epoch_s for c in chosen for _ in range(folds)]
        return makespan(jobs, slots)

    if top is not None:
        chosen = ids[:max(1, min(top, len(ids)))]
    else:
        chosen = ids[:1]
        target = min(cap, longest(chosen))
        for c in ids[1:]:
            if target > 0 and longest(chosen + [c]) >= SHORTER_FOR_BREADTH * target:
                chosen.append(c)
    passed_over = [c for c in ids[:ids.index(chosen[-1])] if c not in chosen]
    epochs = max(1, longest(chosen, LENGTH_MAX * searched_epochs))
    return Plan(chosen, epochs, folds, slots, STAGE_START_S + seconds(chosen, epochs), searched_epochs, total_s,
                passed_over)
