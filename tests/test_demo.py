"""`cvae-mammo demo --quick`: every stage end to end on tiny phantoms, through the real CLI."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from cvae_mammo.cli import main
from cvae_mammo.demo import detector_size


def test_detector_size_keeps_hologic_aspect_and_room_to_crop():
    height, width = detector_size((128, 64))
    assert height >= 2 * 128 and abs(height / width - 1.23) < 0.01


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--quick", "--size", "128x64", "--seed", "1",
                   "--no-progress"])
    printed = capsys.readouterr().out
    assert status == 0
    report = out / "report" / "report.html"
    assert f"report -> {report.resolve()}" in printed
    for stage in ("phantoms", "preprocess", "split", "fit-cvae", "fit-classifier", "predict",
                  "report"):
        assert f"] {stage}" in printed
    html = report.read_text(encoding="utf-8")
    assert "CVAE" in html and "classifier" in html

    manifest = pd.read_csv(out / "dataset" / "manifest.csv")
    splits = pd.read_csv(out / "dataset" / "splits.csv")
    assert len(manifest) == len(splits) == 16 * 4
    assert splits.groupby("patient_id")["split"].nunique().max() == 1
    for run in ("cvae", "classifier"):
        run_dir = out / "runs" / run
        assert (run_dir / "model.keras").is_file() and (run_dir / "threshold.json").is_file()
        scores = pd.read_csv(run_dir / "scores_test.csv")
        assert len(scores) == int((splits["split"] == "test").sum())
        assert scores["score"].notna().all()
    summary = json.loads((out / "demo.json").read_text())
    assert set(summary["metrics"]["image"]) == {"CVAE", "classifier"}
    assert 0.0 <= summary["metrics"]["image"]["CVAE"]["roc_auc"] <= 1.0
