"""The notebook API as the README shows it: searchspace.search(), ensemble_builder.select() and .predict(),
on a tiny imagefolder dataset."""
from __future__ import annotations

import pytest
from helpers import make_imagefolder

import ensemble_builder
import searchspace
from core.errors import BadInput
from core.experiment import Experiment, probs_array


def test_the_readme_notebook_example_runs(tmp_path, ray_session):
    data = make_imagefolder(tmp_path / "my-images", classes=3, per_class=6, test=True)
    exp = searchspace.search("imagefolder", data=str(data), archs="test_resnet,test_efficientnet",
                             image_sizes="16", trials=3, max_epochs=2, folds=2, crossfit_top=2,
                             storage=str(tmp_path / "runs"), name="nb", cache_dir=str(tmp_path / "cache"),
                             pretrained="no")
    assert isinstance(exp, Experiment) and exp.location == str(tmp_path / "runs" / "nb")
    trials = exp.trials()
    assert len(trials) == 3 and (trials["status"] == "ok").all()
    cids = exp.candidate_ids()
    assert sum(c.startswith("cv-") for c in cids) == 2
    oof = exp.candidate([c for c in cids if c.startswith("cv-")][0]).oof()
    assert probs_array(oof).shape == (18, 3)
    sel = ensemble_builder.select(exp.location, top=2)
    assert sel.experiment == exp.location and sel.members and sel.cv_gain == exp.ensemble()["cv"]["gain"]
    # the selection's own nested estimate is kept beside them when the best single ships but folds chose blends
    assert set(sel.estimate) - {"nested_blend"} == {"ensemble", "best_single", "uniform_top2"}
    assert "nested_blend" not in sel.estimate or exp.ensemble()["cv"]["fallback"]
    preds = ensemble_builder.predict(exp.location, str(data / "test"))
    assert list(preds.columns[:2]) == ["image", "label"] and len(preds) == 3
    assert set(preds["label"]) <= {"class_a", "class_b", "class_c"}
    meta = exp.meta()
    assert meta["budget"]["trials"] == 3
    assert meta["options"]["archs"] == {"test_resnet": [16], "test_efficientnet": [16]}


def test_an_unknown_option_is_a_type_error_and_bad_input_is_bad_input(tmp_path):
    with pytest.raises(TypeError, match="unknown option"):
        searchspace.search("digits", trails=3)
    with pytest.raises(BadInput, match="--max-concurrent -1"):
        searchspace.search("digits", max_concurrent=-1, storage=str(tmp_path))
