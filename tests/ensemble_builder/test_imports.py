"""``ensemble_builder select`` is numpy work: it must not load torch, timm or OpenCV.

Runs a real ``select`` in a fresh interpreter on a hand-made experiment and
reads that interpreter's ``sys.modules`` afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, pandas as pd
    from core.experiment import Experiment, probs_table
    exp = Experiment(sys.argv[1])
    rng = np.random.default_rng(0)
    n, ids = 40, [f"s{i}" for i in range(40)]
    y = rng.integers(0, 3, n)
    exp.write_meta(dict(task="imagefolder", metric="accuracy", mode="max", class_names=["a", "b", "c"],
                        folds=2, created="2026-01-01T00:00:00", budget={}, context={}))
    exp.write_folds(pd.DataFrame({"sample_id": ids, "path": "", "label": y, "fold": np.arange(n) % 2}))
    for c in range(3):
        P = rng.dirichlet(np.ones(3), n).astype(np.float32)
        P[np.arange(n), y] += 0.5 * (c + 1)
        exp.candidate(f"cv-{c}").write([], probs_table(ids, P / P.sum(1, keepdims=True)), {"arch": "x"})
    from ensemble_builder.__main__ import main
    code = main(["select", "--experiment", sys.argv[1], "--top", "2"])
    heavy = sorted(m for m in ("torch", "timm", "cv2", "kornia", "albumentations", "ray") if m in sys.modules)
    print(json.dumps({"code": code, "heavy": heavy}))
""")


def test_select_loads_neither_torch_nor_timm_nor_opencv(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO, "NO_ALBUMENTATIONS_UPDATE": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "exp")], capture_output=True, text=True,
                         env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, out.stdout
    assert (tmp_path / "exp" / "ensemble" / "ensemble.json").exists()
