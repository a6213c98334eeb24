"""Ensemble building from candidate models' out-of-fold probabilities.

``ensemble_builder.select(experiment, top=5)`` fits (cross-validated) and
writes the ensemble; ``ensemble_builder.predict(experiment, images)`` returns a
DataFrame of predictions; ``ensemble_builder.distill(experiment)`` trains one
student network on the ensemble's soft targets. All are imported on first use: ``select`` needs only
numpy, ``predict`` loads torch when it runs.
"""


def select(experiment: str | None = None, top: int = 5, **options):
    from ensemble_builder.ensemble import select as _select
    return _select(experiment, top, **options)


def predict(experiment: str, images: str, tta: bool = True, cache_dir: str | None = None, model: str = "ensemble"):
    from ensemble_builder.prediction import predict as _predict
    return _predict(experiment, images, tta=tta, cache_dir=cache_dir, model=model)


def distill(experiment: str, student: str | None = None, image_size: int | None = None, epochs: int | None = None,
            **options):
    """The shipped ensemble distilled into one student (``searchspace.distill.distill``); its record."""
    from searchspace.distill import distill as _distill
    return _distill(experiment, student, image_size, epochs, **options)
