"""searchspace.report on a real tiny experiment: figures, links, leaderboard, Optuna study, bucket, browser.

The experiment is the session's ``tiny_experiment`` (a real search and
cross-fit), copied so that ``ensemble_builder select`` and the report never
write into the shared one.
"""
from __future__ import annotations

import contextlib
import functools
import html
import http.server
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import threading
from pathlib import Path

import pandas as pd
import pytest
from helpers import parse

from ensemble_builder.__main__ import main as ensemble_main
from searchspace.report import main

FIGURES = ["learning_curves.png", "hyperparameters.png", "importances.png", "arch_size_grid.png",
           "ensemble_trajectory.png", "confusion_matrix.png", "per_class_recall.png", "time_per_trial.png",
           "error_overlap.png"]
CHROMIUM = Path("/usr/bin/chromium")


def copy_experiment(src: Path, dst: Path) -> Path:
    # Checkpoints are the bulk of an experiment and the report never reads them.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoint_*", "report"))
    return dst


@pytest.fixture(scope="module")
def experiment(tiny_experiment, tmp_path_factory) -> Path:
    """A copy of the tiny experiment with an ensemble selected."""
    exp = copy_experiment(tiny_experiment.experiment, tmp_path_factory.mktemp("report") / "tiny")
    with contextlib.redirect_stdout(io.StringIO()):
        assert ensemble_main(["select", "--experiment", str(exp), "--top", "2"]) == 0
    return exp


@pytest.fixture(scope="module")
def report(experiment) -> Path:
    assert main(["--experiment", str(experiment)]) == 0
    return experiment / "report"


def expected_figures(experiment: Path) -> list[str]:
    """Every figure, less the importances when the study's trials all share one score (nothing to explain).

    A tiny search often ties: three 2-epoch trials on 10 holdout images.
    """
    import optuna

    journal = experiment / "optuna_journal.log"
    if journal.exists():
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
        values = [t.value for s in optuna.get_all_study_names(storage)
                  for t in optuna.load_study(study_name=s, storage=storage).trials if t.value is not None]
    else:
        values = pd.read_parquet(experiment / "trials.parquet")["best_score"].dropna().tolist()
    return FIGURES if len(set(values)) > 1 else [f for f in FIGURES if f != "importances.png"]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path.name}: no IHDR chunk first"
    return struct.unpack(">II", data[16:24])


# --- the report itself ----------------------------------------------------------

def test_every_figure_is_a_sensible_png(report, experiment):
    figures = expected_figures(experiment)
    if "importances.png" not in figures:
        assert "No hyperparameter importances: every finished trial has the same score" in \
            (report / "index.html").read_text()
    for name in figures:
        path = report / name
        assert path.is_file(), f"{name} missing; report has {sorted(p.name for p in report.iterdir())}"
        assert path.stat().st_size > 2048, f"{name} is only {path.stat().st_size} bytes"
        w, h = png_size(path)
        assert 200 <= w <= 4000 and 200 <= h <= 4000, f"{name} is {w}x{h} px"


def test_html_references_only_files_that_exist(report, experiment):
    page = parse(report / "index.html")
    assert sorted(page.images) == sorted(expected_figures(experiment))
    assert page.scripts == 0
    for link in page.links:
        assert "://" not in link and not link.startswith("/"), f"not a relative link: {link}"
        assert (report / link).is_file(), f"index.html links to {link}, which does not exist"


def test_leaderboard_lists_every_trial(report, experiment):
    trials = pd.read_parquet(experiment / "trials.parquet")
    leaderboard = parse(report / "index.html").tables[0]
    header, rows = leaderboard[0], leaderboard[1:]
    assert header[:3] == ["trial", "arch", "image size"]
    assert {"best epoch", "epochs run", "stopped early", "seconds", "status"} <= set(header)
    assert sorted(r[0] for r in rows) == sorted(trials["trial_id"])
    # Best first: the top row holds the best score.
    score = header.index(f"best {trials['metric'].iloc[0]}")
    assert float(rows[0][score]) == pytest.approx(trials["best_score"].max(), rel=1e-3)


def test_the_report_shows_each_trial_s_ensemble_gain_and_why_each_config_was_cross_fitted(report, experiment):
    trials = pd.read_parquet(experiment / "trials.parquet")
    page = (report / "index.html").read_text()
    header = parse(report / "index.html").tables[0][0]
    assert {"ensemble gain", "cross-fit", f"final {trials['metric'].iloc[0]}"} <= set(header)
    assert "Cross-fit: which configs, and why" in page
    chosen = trials[trials["crossfit_rank"].notna()]
    assert len(chosen) >= 1
    for row in chosen.itertuples():
        assert row.trial_id in page and html.escape(row.crossfit_reason, quote=True) in page


def test_ensemble_and_asha_numbers(report, experiment):
    text = (report / "index.html").read_text()
    ens = json.loads((experiment / "ensemble" / "ensemble.json").read_text())
    for m in ens["members"]:
        assert m["candidate"] in text
    trials = pd.read_parquet(experiment / "trials.parquet")
    meta = json.loads((experiment / "experiment.json").read_text())
    full = len(trials) * meta["budget"]["max_epochs"]
    saved = full - int(trials["epochs_run"].sum())
    asha = next(t for t in parse(report / "index.html").tables if t[0][:2] == ["", "run"])
    assert asha[1][:4] == ["trial-epochs", str(full - saved), str(full), str(saved)]


def test_the_candidates_table_and_their_error_overlap(report, experiment):
    """Each candidate the selection chose among: kind, out-of-fold score, cost and weight, and the share of
    images each pair gets wrong together, checked against a direct computation from the files."""
    import numpy as np

    from core.experiment import Experiment as Contract
    from core.experiment import aligned
    from searchspace.report.load import candidate_pool, load

    ens = json.loads((experiment / "ensemble" / "ensemble.json").read_text())
    pool, overlap = candidate_pool(load(str(experiment)))
    assert pool["candidate"].tolist() == ens["candidates"] and (pool["kind"] == "network").all()
    store = Contract(str(experiment))
    index = store.folds()
    wrong = []
    for row in pool.itertuples():
        P = aligned(store.candidate(row.candidate).oof(), index["sample_id"].tolist())
        hit = P.argmax(1) == index["label"].to_numpy()
        assert row.score == pytest.approx(hit.mean()) and row.images == len(index)
        assert row.weight == pytest.approx(sum(m["weight"] for m in ens["members"] if m["candidate"] == row.candidate))
        assert row.seconds > 0   # every fold job's seconds (fold 0: its search trial's)
        wrong.append(~hit)
    W = np.array(wrong, float)
    assert np.allclose(overlap, W @ W.T / len(index)) and np.allclose(np.diag(overlap), 1 - pool["score"])
    table = next(t for t in parse(report / "index.html").tables if t[0][:2] == ["candidate", "kind"])
    assert [r[0] for r in table[1:]] == pool["candidate"].tolist()


def test_importances_come_from_the_search_study(experiment, tmp_path):
    """Importances from the search's optuna_journal.log when there is one, else from trials.parquet.

    The tiny search's trials often tie, so each source is given distinct
    scores here (a study written as the search writes it; best scores edited
    in trials.parquet) to make the importances computable.
    """
    import optuna

    exp = copy_experiment(experiment, tmp_path / "tiny")
    trials = pd.read_parquet(exp / "trials.parquet")
    journal = exp / "optuna_journal.log"
    journal.unlink(missing_ok=True)
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    study = optuna.create_study(storage=storage, study_name="tiny", direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)
    size = optuna.distributions.CategoricalDistribution(sorted(trials["image_size"].unique().tolist()))
    for i, row in enumerate(trials.itertuples()):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": row.lr, "image_size_test_resnet": int(row.image_size)},
            distributions={"lr": lr, "image_size_test_resnet": size}, value=0.2 * i + 0.1 * (row.image_size > 16)))
    before = journal.read_bytes()
    assert main(["--experiment", str(exp)]) == 0
    text = (exp / "report" / "index.html").read_text()
    assert "the search's own Optuna study (<code>optuna_journal.log</code>" in text
    assert "optuna-dashboard " + str(exp / "optuna_journal.log") in text
    assert png_size(exp / "report" / "importances.png")[0] >= 200
    assert journal.read_bytes() == before, "the report changed the search's study file"

    journal.unlink()
    (exp / "report" / "importances.png").unlink()
    trials["best_score"] = [0.3 + 0.2 * i for i in range(len(trials))]
    trials.to_parquet(exp / "trials.parquet", index=False)
    assert main(["--experiment", str(exp)]) == 0
    text = (exp / "report" / "index.html").read_text()
    assert "a study rebuilt from trials.parquet" in text and "optuna-dashboard" not in text
    assert png_size(exp / "report" / "importances.png")[0] >= 200


def test_without_an_ensemble_the_page_says_what_to_run(experiment, tmp_path):
    exp = copy_experiment(experiment, tmp_path / "tiny")
    shutil.rmtree(exp / "ensemble")
    # The newest experiment under --runs, as the default does.
    assert main(["--runs", str(tmp_path)]) == 0
    text = (exp / "report" / "index.html").read_text()
    assert "python -m ensemble_builder select" in text
    assert not (exp / "report" / "ensemble_trajectory.png").exists()
    # Until then the confusion matrix shows the best single trial.
    assert (exp / "report" / "confusion_matrix.png").is_file()


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["--experiment", str(tmp_path / "nowhere")]) == 2
    assert main(["--runs", str(tmp_path)]) == 2
    half = tmp_path / "half"
    half.mkdir()
    (half / "experiment.json").write_text(json.dumps({"task": "digits"}))
    assert main(["--experiment", str(half)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines)
    assert "no experiment.json" in lines[0] and "no experiment found" in lines[1] and "no trials.parquet" in lines[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_report_into_a_bucket(experiment, tmp_path, monkeypatch):
    """The same report through an S3 API (moto's server): read from the bucket and written back to it."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        s3 = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               access_key="testing", secret_key="testing", allow_bucket_creation=True)
        s3.create_dir("reports")
        local = copy_experiment(experiment, tmp_path / "tiny")
        pafs.copy_files(str(local), "reports/runs/tiny", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=s3)
        uri = f"s3://reports/runs/tiny?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        assert main(["--experiment", uri]) == 0
        written = {i.base_name for i in s3.get_file_info(pafs.FileSelector("reports/runs/tiny/report"))}
        assert written == {"index.html", *expected_figures(local)}
    finally:
        server.stop()


# --- the page in a browser -----------------------------------------------------------

CHECK_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>check</title></head><body>
<iframe id="report" src="index.html" style="width:1280px;height:3000px"></iframe>
<script>
// The parent's load event waits for the iframe, whose load waits for its images.
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.getElementById("report").contentDocument.images);
  var result = images.map(function (i) {
    return {src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth};
  });
  var pre = document.createElement("pre");
  pre.id = "result";
  pre.textContent = JSON.stringify(result);
  document.body.appendChild(pre);
});
</script></body></html>
"""


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """The folder over HTTP on 127.0.0.1 (file:// iframes are cross-origin in Chromium)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def chromium(url: str, profile: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--virtual-time-budget=5000", *flags, url],
        capture_output=True, text=True, timeout=120)


def test_every_image_loads_in_chromium(report, experiment, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found; install Debian's chromium package (apt-get install chromium)")
    site = tmp_path / "site"
    shutil.copytree(report, site)
    (site / "check.html").write_text(CHECK_PAGE)
    with serve(site) as base:
        run = chromium(f"{base}/check.html", tmp_path / "profile", "--dump-dom")
    found = re.search(r'<pre id="result">(.*?)</pre>', run.stdout, re.S)
    assert found, f"no result in the dumped DOM; chromium said:\n{run.stderr[-2000:]}"
    images = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert sorted(i["src"] for i in images) == sorted(expected_figures(experiment))
    for i in images:
        assert i["complete"] and i["width"] == png_size(site / i["src"])[0], f"{i['src']} did not load: {i}"
