"""Hyperparameter search for image classification on Ray Tune; ``searchspace.search`` is the notebook API."""


def search(task: str, data: str | None = None, **options):
    """Search and cross-fit ``task`` on ``data``; returns the ``core.experiment.Experiment``.

    The options are ``python -m searchspace.run``'s, with underscores
    (``trials=20, archs="convnext_small.fb_in22k", weights_dir=...``).
    Imported on first use: ``import searchspace`` stays light.
    """
    from searchspace.api import search as _search
    return _search(task, data, **options)
