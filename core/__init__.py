"""The torch-free ground floor that every package stands on.

- ``core.experiment``: the experiment contract (its layout, its tables, the trial context);
- ``core.storage``: reads and writes of local paths and URIs through pyarrow.fs;
- ``core.metrics``: the metrics, each a ``Metric`` with its direction;
- ``core.errors``: ``BadInput``, the one exception for bad input.

Only numpy, pandas and pyarrow are imported here: the ensemble selector, the
trainer and the driver all read an experiment the same way.
"""
