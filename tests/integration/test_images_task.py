"""task=images: sites' own image folders (BreastMNIST written out as PNG files), normalised with
federated channel statistics, pooled test metrics, bad images named; the model scores a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from app.cli import predict
from app.runtime.local_grid import run_inprocess
from tasks.base import PartitionConfig, TaskConfig
from tasks.images import ImagesTask, write_breastmnist_folders
from tasks.tabular.table import SiteInputError
from tests.conftest import DATA_DIR

CLASSES = "task.classes=[benign,malignant]"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("breast")
    write_breastmnist_folders(DATA_DIR, out, sites=3)
    return out


def task_for(data: Path) -> ImagesTask:
    return ImagesTask(TaskConfig(name="images", data=str(data), classes=["benign", "malignant"], model="cnn"), DATA_DIR)


@pytest.mark.slow
def test_png_folders_train_and_pool_their_test_metrics(folders: Path, tmp_path: Path) -> None:
    assert sorted(p.name for p in folders.iterdir()) == ["site-0", "site-1", "site-2"]
    results = run_inprocess(["task=images", f"task.data={folders}", "partition=natural", CLASSES, "num_rounds=3",
                             "task.local_epochs=2"], tmp_path / "run")
    final = results["final"]
    assert results["status"] == "completed" and final["test_sites"] == 3 and final["auc"] > 0.7
    assert final["num_examples"] == pytest.approx(0.2 * 780, abs=3)  # each site's stratified 20 %
    # the channel statistics are the pooled pixels' (training and validation images of every site)
    pred = predict.predictor(tmp_path / "run")
    task = task_for(folders)
    sites = [task.raw_site(PartitionConfig(name="natural"), 3, 0, k) for k in range(3)]
    pixels = np.concatenate([t.pixels.astype(np.float64).ravel() for s in sites for t in s.fit_rows])
    (mean, std), = pred.prep.stats()
    assert abs(mean - pixels.mean()) < 1e-9 * pixels.mean() and abs(std ** 2 - pixels.var()) < 1e-9 * pixels.var()
    scored = tmp_path / "scores.csv"
    assert predict.main([str(tmp_path / "run"), str(folders / "site-1" / "malignant"), "--out", str(scored)]) == 0
    import pandas as pd

    frame = pd.read_csv(scored)
    assert list(frame.columns) == ["file", "score"] and frame["score"].between(0, 1).all()


def test_bad_images_and_folders_are_named(folders: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "benign").mkdir(parents=True)
    (site / "benign" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SiteInputError, match=r"broken\.png cannot be read as an image"):
        task_for(site).read_site(site)
    (site / "benign" / "broken.png").unlink()
    (site / "tumour").mkdir()
    with pytest.raises(SiteInputError, match=r"sub-folder\(s\) \['tumour'\] are not among task.classes"):
        task_for(site).read_site(site)
    (site / "tumour").rmdir()
    with pytest.raises(SiteInputError, match="holds no images"):
        task_for(site).read_site(site)
    (site / "labels.csv").write_text("file,label\nbenign/a.png,cyst\n")
    with pytest.raises(SiteInputError, match=r"'cyst' at row 2, which is not one of task.classes"):
        task_for(site).read_site(site)
