"""helpers.machine_share, the lock that lets an ``exclusive`` test run alone under pytest-xdist.

Threads stand in for the xdist workers: flock locks belong to open files, so two opens in one
process conflict as two processes would. Every wait is on an event, none on time.
"""
from __future__ import annotations

import fcntl
import threading

from helpers import machine_share


def _hold(folder, exclusive: bool, name: str, log: list, release: threading.Event) -> threading.Thread:
    def run():
        with machine_share(folder, exclusive):
            log.append(f"{name} in")
            release.wait(60)
            log.append(f"{name} out")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _turnstile_taken(folder) -> bool:
    with open(folder / "turnstile.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _until(condition, what: str) -> None:
    done = threading.Event()
    for _ in range(6000):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_shared_holders_run_together_and_an_exclusive_one_runs_alone_before_later_shared_ones(tmp_path):
    log: list[str] = []
    go_a, go_b, go_x, go_c = (threading.Event() for _ in range(4))
    a = _hold(tmp_path, False, "a", log, go_a)
    b = _hold(tmp_path, False, "b", log, go_b)
    _until(lambda: {"a in", "b in"} <= set(log), "two shared holders at once")

    # an exclusive holder waits for both, holding the turnstile while it waits ...
    x = _hold(tmp_path, True, "x", log, go_x)
    _until(lambda: _turnstile_taken(tmp_path), "the exclusive holder at the turnstile")
    # ... so a shared holder that comes after it waits for it, though the lock is held shared right now
    c = _hold(tmp_path, False, "c", log, go_c)
    go_a.set()
    a.join(60)
    assert "x in" not in log and "c in" not in log, log   # b still holds the lock shared
    go_b.set()
    b.join(60)
    _until(lambda: "x in" in log, "the exclusive holder")
    assert "c in" not in log, log
    go_x.set()
    x.join(60)
    _until(lambda: "c in" in log, "the later shared holder")
    go_c.set()
    c.join(60)
    assert log.index("x out") < log.index("c in"), log
    assert log.index("b out") < log.index("x in") and log.index("a out") < log.index("x in"), log
