"""Benchmark: every fault test, repeated in a row while a CPU hog keeps every core busy.

A user's cluster is a busy machine, and a test that passes only on an idle one hides a bug. Each fault test
runs ``--repeat`` times in its own pytest process, while one busy loop per core runs at the same priority;
reported: its passes out of its runs, the wall time of each, and the first line of each failure.

    python bench/faults.py                         # every fault test, 10 times each, under load
    python bench/faults.py --only lost_node --repeat 3
    python bench/faults.py --no-load --repeat 1    # the same on an idle machine
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

OUT = os.path.join(harness.RESULTS, "faults.json")
DIST = "tests/test_distributed.py::"
FAULTS = {   # the fault -> the test that injects it and checks what survives
    "lost_node": DIST + "test_a_lost_node_s_trial_continues_elsewhere_from_its_checkpoint",
    "killed_worker": DIST + "test_a_killed_worker_s_trial_continues_from_its_checkpoint",
    "killed_driver_resume": DIST + "test_a_killed_driver_resumes_without_rerunning_finished_or_failed_trials",
    "killed_budgeted_search": DIST + "test_a_killed_budgeted_search_resumes_its_clock_and_restarts_lost_trials",
    "failing_trial": DIST + "test_a_config_that_always_fails_is_recorded_and_the_search_completes",
    "killed_cache_build": "tests/trainer/test_cache.py::test_a_build_killed_half_way_resumes_and_equals_a_clean_build",
    "interrupted_crossfit": "tests/searchspace/test_crossfit.py::test_crossfit_only_finishes_an_interrupted_crossfit",
    "killed_distillation": "tests/searchspace/test_distill.py::test_a_killed_distillation_resumes_where_it_was",
}


def _spin() -> None:
    while True:
        pass


def run_once(node: str, log: str) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", node],
                             cwd=harness.REPO, stdout=f, stderr=subprocess.STDOUT)
    text = open(log, errors="replace").read()
    first = next((line for line in text.splitlines() if line.startswith("E ")), "")
    return dict(passed=rc == 0, seconds=round(time.perf_counter() - t0, 1), error=first[:300])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(FAULTS), help="comma-separated among: " + ", ".join(FAULTS))
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-load", action="store_true", help="run on an idle machine (no CPU hog)")
    a = ap.parse_args()
    hogs = [] if a.no_load else [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count())]
    for h in hogs:
        h.start()
    results = json.load(open(OUT)) if os.path.exists(OUT) else {}
    os.makedirs(os.path.join(harness.RESULTS, "faults"), exist_ok=True)
    try:
        for name in a.only.split(","):
            runs = []
            for i in range(a.repeat):
                runs.append(run_once(FAULTS[name], os.path.join(harness.RESULTS, "faults", f"{name}-{i}.log")))
                print(f"{name} {i + 1}/{a.repeat}: {'pass' if runs[-1]['passed'] else 'FAIL ' + runs[-1]['error']} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)
            results[name] = dict(test=FAULTS[name], load=not a.no_load, runs=runs)
            harness.save_json(OUT, results)
    finally:
        for h in hogs:
            h.terminate()
    lines = [[name, r["test"].split("::")[-1], "busy loop on every core" if r["load"] else "idle",
              f"{sum(x['passed'] for x in r['runs'])}/{len(r['runs'])}",
              f"{sum(x['seconds'] for x in r['runs']) / len(r['runs']):.0f}",
              "; ".join(sorted({x['error'] for x in r['runs'] if not x['passed']}))[:300]]
             for name, r in results.items()]
    harness.report("faults", "Fault tests repeated under load",
                   harness.md_table(["fault", "test", "load", "passed", "mean s", "failures"], lines))


if __name__ == "__main__":
    main()
