"""Ray start-up, in one place: the driver (searchspace.api, searchspace.prepare) and the benchmarks use it."""
from __future__ import annotations

import os

# Every Ray worker imports albumentations (through the trainer); without this it calls home on each import.
WORKER_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1"}


def start_ray(num_cpus: int | None = None, temp_dir: str | None = None, env: dict | None = None,
              include_dashboard: bool | None = None) -> None:
    """Connect to Ray (RAY_ADDRESS, a running local one) or start it, unless this process already has.

    ``num_cpus``, ``temp_dir`` and ``include_dashboard`` are for a private
    local Ray (benchmarks, tests); ``env`` adds to the workers' environment.
    """
    # Short trials checkpoint every few seconds by design; Ray warns about that.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray

    if ray.is_initialized():
        return
    kwargs = {k: v for k, v in (("num_cpus", num_cpus), ("_temp_dir", temp_dir),
                                ("include_dashboard", include_dashboard)) if v is not None}
    ray.init(runtime_env={"env_vars": {**WORKER_ENV, **(env or {})}}, log_to_driver=True, **kwargs)
