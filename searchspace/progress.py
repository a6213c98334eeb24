"""One progress line for the user: trials running, finished, stopped early, failed, and the best so far."""
from __future__ import annotations

import time

from ray.tune import Callback


class Progress(Callback):
    def __init__(self, metric: str, mode: str, max_epochs: int, total: int, every_s: float = 15.0):
        self.metric, self.mode, self.max_epochs, self.total = metric, mode, max_epochs, total
        self.every_s, self.start, self.last = every_s, time.time(), 0.0
        self.best: tuple[float, str] | None = None
        self.early: set[str] = set()
        self.finished: set[str] = set()

    def _better(self, value: float) -> bool:
        return self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])

    def on_trial_result(self, iteration, trials, trial, result, **info):
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
        print(f"[{time.time() - self.start:5.0f}s] {running} running, {done}/{self.total} finished "
              f"({len(self.early)} stopped early), {status.count('ERROR')} failed | {best}", flush=True)
