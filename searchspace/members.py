"""The classical ensemble members: which kinds a run fits, as Ray tasks beside the search.

``--members`` chooses among ``trainer.classical.KINDS`` (probe, knn, pixels),
or ``none``. By default a run fits the cheap ones that are available: a probe
and a kNN on each architecture whose pretrained weights resolved offline (at
its largest searched size), and the pixel model, which needs no weights. Each
is one Ray task with a trial's resources (``fit_member``: every fold, then its
candidate); the driver starts them before the search, so that they take
cores as the scheduler frees them, and gathers them after it. A member that
fails says so in one line and the job goes on without it.
"""
from __future__ import annotations

from core.experiment import Experiment, TrialContext
from searchspace.config import Resources
from trainer.classical import FEATURE_KINDS, KINDS

PIXEL_SIZE = 32   # the pixel model reads the images at this size (trainer.features.PIXEL_SIZE)


def specs(kinds: tuple[str, ...] | None, archs: dict[str, list[int]], ctx: TrialContext) -> list[dict]:
    """The members to fit: kind, candidate id, arch, image size, resize mode."""
    wanted = KINDS if kinds is None else kinds
    out = []
    for kind in wanted:
        if kind in FEATURE_KINDS:
            for arch, sizes in archs.items():
                if ctx.weights.get(arch):
                    size = max(sizes)
                    out.append(dict(kind=kind, candidate=f"{kind}-{arch}-{size}", arch=arch, image_size=size,
                                    resize_mode="squish"))
        else:
            out.append(dict(kind=kind, candidate=f"{kind}-{PIXEL_SIZE}", arch=None, image_size=PIXEL_SIZE,
                            resize_mode="squish"))
    return out


def missing(experiment: Experiment, wanted: list[dict]) -> list[dict]:
    return [s for s in wanted if not experiment.candidate(s["candidate"]).exists()]


def launch(wanted: list[dict], ctx: TrialContext, res: Resources) -> list:
    """One Ray task per member, with a trial's CPUs; returns (spec, object ref) pairs."""
    import ray

    from trainer.classical import fit_member

    task = ray.remote(num_cpus=res.cpus_per_trial)(fit_member)
    return [(spec, task.remote(spec, ctx)) for spec in wanted]


def gather(launched: list) -> list[dict]:
    """Wait for the members; one line each (its cost and settings, or why it failed)."""
    import ray

    done = []
    for spec, ref in launched:
        try:
            result = ray.get(ref)
        except Exception as e:   # a member is optional: the networks make the ensemble without it
            print(f"member {spec['candidate']} failed: {str(e).strip().splitlines()[-1][:300]}", flush=True)
            continue
        settings = ", ".join(f"{k}={v:g}" for s in result["settings"] for k, v in s.items())
        print(f"member {result['candidate']}: fitted on every fold in {result['seconds']:.1f} s ({settings})",
              flush=True)
        done.append(result)
    return done
