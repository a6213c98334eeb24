"""One progress line for the user: trials running, finished, stopped early, failed, the best so far, and,
once epochs have been timed, when the search and the whole job are expected to end."""
from __future__ import annotations

import time
from dataclasses import dataclass

from ray.tune import Callback

from searchspace.time_budget import Clock, at, clock_text


@dataclass
class Forecast:
    """When the search and the job should end, from the epochs timed so far.

    With a time budget the search ends at its deadline (``search_until_s``,
    job seconds), or sooner when ``trials`` is set and they all finish; the job
    ends when the final stage ``final_s(epoch_s)`` and the reserve are done.
    Without one, the search ends when the remaining trials have run as many
    epochs, on average, as the finished ones did, ``slots`` at a time.
    """

    clock: Clock
    slots: int
    trials: int | None                 # None: as many as the time allows
    search_until_s: float | None       # the search's deadline on the job's clock
    final_s: object                    # seconds per epoch -> the final stage's estimated seconds
    after_s: float = 0.0               # after the final stage: the reserve (selection)

    def line(self, trials: list, finished: set[str], latest: dict | None = None) -> str | None:
        """``latest``: {trial id: its newest result}, where Tune has not made it the trial's last_result yet
        (a callback's on_trial_result comes first: without it, a search whose first epoch is also its last
        one, on a loaded machine, never showed an estimate)."""
        newest = {t.trial_id: (latest or {}).get(t.trial_id) or t.last_result or {} for t in trials}
        epochs, seconds, done_epochs = 0, 0.0, []
        for t in trials:
            r = newest[t.trial_id]
            if r.get("epoch") and r.get("time_total_s"):
                epochs += int(r["epoch"])
                seconds += float(r["time_total_s"])
                if t.trial_id in finished:
                    done_epochs.append(int(r["epoch"]))
        if not epochs:
            return None
        epoch_s = seconds / epochs
        search_left = None
        if self.trials is not None:
            per_trial = sum(done_epochs) / len(done_epochs) if done_epochs else None
            if per_trial is not None:
                running = [int(r.get("epoch", 0)) for tid, r in newest.items() if tid not in finished]
                to_go = max(0.0, (self.trials - len(finished)) * per_trial - sum(running))
                search_left = to_go * epoch_s / max(1, self.slots)
        if self.search_until_s is not None:
            deadline = self.search_until_s - self.clock.used()
            search_left = deadline if search_left is None else min(search_left, deadline)
        if search_left is None:
            return None
        search_left = max(0.0, search_left)
        job_left = search_left + float(self.final_s(epoch_s)) + self.after_s
        return (f"search ends ~{at(search_left)} (in {clock_text(search_left)}), "
                f"job ~{at(job_left)} (in {clock_text(job_left)})")


class Progress(Callback):
    def __init__(self, metric: str, mode: str, max_epochs: int, total: int | None, every_s: float = 15.0,
                 forecast: Forecast | None = None):
        self.metric, self.mode, self.max_epochs, self.total = metric, mode, max_epochs, total
        self.every_s, self.start, self.last = every_s, time.time(), 0.0
        self.forecast = forecast
        self.best: tuple[float, str] | None = None
        self.early: set[str] = set()
        self.finished: set[str] = set()
        self.latest: dict[str, dict] = {}   # trial id -> its newest result

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = {k: result.get(k) for k in ("epoch", "time_total_s")}
        value = result.get(self.metric)
        if value is not None and self._better(value):
            cfg = trial.config
            where = f"{cfg.get('arch')}@{cfg.get('image_size')} epoch {result.get('epoch')}"
            self.best = (value, f"{trial.trial_id} {where}")
        if time.time() - self.last > self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # Called before Tune marks the trial terminated: count it ourselves.
        self.finished.add(trial.trial_id)
        epochs = (trial.last_result or {}).get("epoch", 0)
        if epochs < self.max_epochs:
            self.early.add(trial.trial_id)
        how = (f"stopped early by ASHA after {epochs} epoch(s)" if epochs < self.max_epochs
               else f"ran all {epochs} epochs")
        value = (trial.last_result or {}).get(self.metric, float("nan"))
        print(f"  trial {trial.trial_id} {how}: {self.metric} {value:.4f}",
              flush=True)
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  trial {trial.trial_id} failed: {trial.error_file or 'see its folder'}", flush=True)
        self._print(trials)

    def _print(self, trials) -> None:
        self.last = time.time()
        status = [t.status for t in trials]
        done = len(self.finished | {t.trial_id for t in trials if t.status == "TERMINATED"})
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        running = sum(t.status == "RUNNING" and t.trial_id not in self.finished for t in trials)
        total = f"/{self.total}" if self.total is not None else ""
        eta = self.forecast.line(trials, self.finished, self.latest) if self.forecast and self.best else None
        print(f"[{time.time() - self.start:5.0f}s] {running} running, {done}{total} finished "
              f"({len(self.early)} stopped early), {status.count('ERROR')} failed | {best}"
              + (f" | {eta}" if eta else ""), flush=True)


class FoldProgress(Callback):
    """The final stage's progress line: fold jobs running, done and failed, epochs trained of the planned
    total, and when the stage should end at the rate seen so far (every job trains ``epochs`` of its own)."""

    def __init__(self, jobs: list[dict], every_s: float = 15.0):
        self.total_epochs = sum(int(j["epochs"]) for j in jobs)
        self.jobs, self.every_s = len(jobs), every_s
        self.start, self.last = time.time(), time.time()
        self.done: set[str] = set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if time.time() - self.last > self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done.add(trial.trial_id)
        self._print(trials)

    def _print(self, trials) -> None:
        self.last = time.time()
        epochs = sum(int(t.config["job"]["epochs"]) if t.trial_id in self.done
                     else int((t.last_result or {}).get("epoch", 0) or 0) for t in trials)
        elapsed = time.time() - self.start
        running = sum(t.status == "RUNNING" and t.trial_id not in self.done for t in trials)
        failed = sum(t.status == "ERROR" for t in trials)
        eta = ""
        if 0 < epochs < self.total_epochs:
            left = (self.total_epochs - epochs) * elapsed / epochs
            eta = f" | ends ~{at(left)} (in {clock_text(left)})"
        print(f"[{elapsed:5.0f}s] final stage: {running} running, {len(self.done)}/{self.jobs} fold jobs done, "
              f"{failed} failed | {epochs}/{self.total_epochs} epochs{eta}", flush=True)
