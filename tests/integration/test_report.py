"""Run reports (app/report.py), comparisons (app/compare.py), TensorBoard logging and traffic counts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.reporting import compare, report
from app.runtime.local_grid import run_inprocess
from tasks.metrics import binary_metrics

pytestmark = pytest.mark.slow  # real runs and a headless browser; the full suite runs them

BROWSER = shutil.which("chromium-headless-shell") or shutil.which("chromium")


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dp") / "run"
    run_inprocess(["task=medical", "num_rounds=3", "privacy=dpsgd", "strategy.robust=median",
                   "faults.byzantine_fraction=0.25", "audit=false"], out)
    return out


def test_resampled_metrics_equal_the_metrics_of_the_resampled_arrays() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 2000)
    scores = np.round(rng.random(2000) * 0.8 + 0.2 * y, 2)  # many ties
    for _ in range(3):
        idx = rng.integers(0, 2000, 2000)
        fast = report.resampled_metrics(y, scores, np.bincount(idx, minlength=2000)[None])
        ref = binary_metrics(y[idx], scores[idx], 0.0)
        for k in report.BOOTSTRAP_METRICS:
            assert fast[k][0] == pytest.approx(ref[k], abs=1e-12), k


def test_report_has_every_section_and_is_self_contained(dp_run: Path) -> None:
    md, page = report.write(dp_run, n_boot=200)
    text, doc = md.read_text(), page.read_text()
    for title in report.SECTIONS:
        assert f"## {title}" in text and f">{title}</h2>" in doc
    assert "<script" not in doc and not re.search(r"(src|href)=\"(https?:|//|file:)", doc)
    assert doc.count("data:image/png;base64,") == 2  # metrics and epsilon per site
    assert (dp_run / "report_epsilon.png").is_file() and "![report_metrics](report_metrics.png)" in text
    results = json.loads((dp_run / "results.json").read_text())
    auc = results["final"]["auc"]
    m = re.search(r"\| auc \| ([0-9.]+) \| ([0-9.]+) - ([0-9.]+) \|", text)
    assert m and float(m[1]) == pytest.approx(auc, abs=1e-4) and float(m[2]) < auc < float(m[3])
    for site in ("cleveland", "hungarian", "switzerland", "va"):  # data per site and epsilon per site
        assert text.count(f"| {site} |") == 2
    assert "each sampled site's full model update" in text and "example-level (epsilon, delta)-DP" in text


def test_report_renders_in_headless_chromium(dp_run: Path, tmp_path: Path) -> None:
    from PIL import Image

    assert BROWSER is not None, "README's test command installs chromium-headless-shell (apt-get)"
    _, page = report.write(dp_run, n_boot=100)
    shot = tmp_path / "report.png"
    proc = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1200,1800", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1800, 1200)
    assert pixels.std() > 20 and (pixels < 128).mean() > 0.01  # text, tables and plots, not a blank page


def test_compare_names_runs_by_what_differs_and_reads_a_multirun_folder(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    for i, extra in enumerate(([], ["strategy=fedprox"], ["privacy=dpsgd"])):
        run_inprocess(["task=medical", "num_rounds=2", *extra], sweep / str(i))
    runs = compare.find_runs([sweep])
    assert [r.name for r in runs] == ["(defaults)", "strategy=fedprox", "privacy=dpsgd"]
    proc = subprocess.run([sys.executable, "-m", "app.cli", "compare", str(sweep), "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = (tmp_path / "cmp" / "compare.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("run,status,rounds,auc")
    finals = [json.loads((sweep / str(i) / "results.json").read_text())["final"]["auc"] for i in range(3)]
    assert sorted(float(r.split(",")[3]) for r in rows[1:]) == pytest.approx(sorted(finals), abs=1e-4)
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "app.cli", "compare", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_tensorboard_logger_writes_every_round(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_inprocess(["task=medical", "num_rounds=3", "logger=tensorboard", "privacy=dpsgd"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"test/auc", "train/train_loss", "epsilon/va", "traffic/bytes_to_sites"} <= set(tags)
    aucs = [e.value for e in events.Scalars("test/auc")]
    assert aucs == pytest.approx([h["server"]["auc"] for h in res["history"]], abs=1e-6)


def test_traffic_per_round_counts_the_model_both_ways(tmp_path: Path) -> None:
    res = run_inprocess(["task=medical", "num_rounds=1", "strategy.fraction_evaluate=0"], tmp_path)
    t = res["history"][0]["traffic"]
    model_bytes = sum(v.numel() * v.element_size() for v in __import__("torch").load(tmp_path / "model.pt").values())
    assert t["messages_to_sites"] == t["replies"] == 4
    assert 4 * model_bytes <= t["bytes_to_sites"] < 4 * model_bytes + 4 * 2000  # the model plus small config
    assert 4 * model_bytes <= t["bytes_from_sites"] < 4 * model_bytes + 4 * 2000


def test_a_report_that_cannot_be_made_is_a_message_not_a_failure(dp_run: Path, tmp_path: Path) -> None:
    """report.ensure, which the ServerApp, `fedsilo` and `fedsilo deploy` all use: an existing page is
    kept unless asked to rewrite; a run folder it cannot report on gives the retry command, never raises."""
    page = dp_run / report.REPORT_HTML
    before = page.stat().st_mtime_ns
    assert report.ensure(dp_run) == (page, "") and page.stat().st_mtime_ns == before
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    got, why = report.ensure(broken)
    assert got is None and "JSONDecodeError" in why and f"fedsilo report {broken}" in why
