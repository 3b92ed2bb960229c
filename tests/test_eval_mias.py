"""benchmarks/eval_mias.py, the nested protocol, end to end on real mini-MIAS at 64x32 (one fold):
the choice is made on inner validation women only, the out-of-fold rows are held-out women
scored once, and a rerun resumes instead of retraining."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.shared_data


def _eval_mias():
    spec = importlib.util.spec_from_file_location("eval_mias", REPO_ROOT / "benchmarks" / "eval_mias.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _configs(folder: Path) -> tuple[Path, Path]:
    from cvae_mammo.models.classifier_config import ClassifierConfig
    from cvae_mammo.models.cvae import CVAEConfig

    cvae = folder / "cvae.yaml"
    CVAEConfig.small(image_size=(64, 32), filters=(8, 16), latent_channels=2, epochs=1,
                     batch_size=16, augment=None, recon_every=100, bilateral=True,
                     lesion_steps=20, lesion_batch_size=8, lesion_filters=(8, 16),
                     lesion_learning_rate=2e-3, lesion_seeds=2, lesion_snapshots=2).save(cvae)
    classifier = folder / "classifier.yaml"
    # weights: eval_mias sets each fold's own run folder, as for the shipped config
    ClassifierConfig(backbone="LesionSegmenter", weights="runs/cvae", image_size=(64, 32),
                     epochs=2, freeze_epochs=1, batch_size=8, augment=None,
                     early_stopping_patience=2).save(classifier)
    return cvae, classifier


def _argv(mias_dir: Path, folder: Path) -> list[str]:
    """One outer fold of three at 64x32, two declared rule weights, with the classifier."""
    return ["--mias", str(mias_dir), "--out", str(folder / "eval"), "--config",
            str(folder / "cvae.yaml"), "--size", "64x32", "--folds", "3", "--folds-to-run", "0",
            "--segmenter-only", "--rule-weights", "0", "0.5", "--gamma-tta", "0.8", "1", "1.25",
            "--classifier", str(folder / "classifier.yaml")]


@pytest.fixture(scope="module")
def evaluation(mias_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval_nested")
    _configs(out)
    assert _eval_mias().main(_argv(mias_dir, out)) == 0
    return out / "eval"


def test_the_choice_is_the_best_candidate_on_inner_validation(evaluation: Path) -> None:
    summary = json.loads((evaluation / "summary.json").read_text())
    validation = {row["score"]: row["auc"] for row in summary["validation"]}
    candidates = ["ensemble w=0", "ensemble w=0.5"]
    assert summary["chosen"] == max(candidates, key=validation.get)
    assert summary["default"] == "ensemble w=0"
    # each seed's own segmenter is reported next to the ensemble, never chosen
    # and so is the --gamma-tta variant
    assert {"seed 0 w=0", "seed 1 w=0", "ensemble gamma w=0", "rule", "classifier"
            } <= set(validation)
    assert summary["chosen"] != "ensemble gamma w=0"
    for split in ("validation", "out_of_fold"):  # its paired difference to the default
        aucs = {row["score"]: row["auc"] for row in summary[split]}
        assert summary["gamma_minus_default"][split]["difference"] == pytest.approx(
            aucs["ensemble gamma w=0"] - aucs["ensemble w=0"])
    oof = {row["score"] for row in summary["out_of_fold"]}
    assert {summary["chosen"], "ensemble w=0", "seed 0 w=0", "seed 1 w=0", "ensemble gamma w=0",
            "rule", "classifier"} <= oof
    assert summary["seed_spread"] >= 0


def test_select_score_is_the_commands_choice_on_the_folds_validation(evaluation: Path) -> None:
    """The select-score row is what `calibrate --select-score` picks on the fold's val women:
    one of its candidates, never worse there than the default (itself a candidate)."""
    from cvae_mammo.inference.scoring import (
        INTENSITY_SCORE,
        SELECTABLE,
        scoring_candidates,
        segmenter_scoring,
    )

    summary = json.loads((evaluation / "summary.json").read_text())
    every_candidate = scoring_candidates(segmenter_scoring(), [*SELECTABLE, INTENSITY_SCORE])
    assert summary["select_score_choices"]["0"] in every_candidate
    validation = {row["score"]: row["auc"] for row in summary["validation"]}
    assert validation["select-score"] >= validation["ensemble w=0"] - 1e-12
    assert "select-score" in {row["score"] for row in summary["out_of_fold"]}


def test_out_of_fold_rows_are_held_out_women_scored_once(evaluation: Path) -> None:
    from cvae_mammo.evaluation.metrics import roc_auc

    scores = pd.read_csv(evaluation / "scores.csv", dtype={"image_id": str, "patient_id": str})
    test, val = scores[scores["split"] == "test"], scores[scores["split"] == "val"]
    assert test["image_id"].is_unique and len(test) > 0 and len(val) > 0
    assert not set(test["patient_id"]) & set(val["patient_id"])
    trained_on = pd.read_csv(evaluation / "fold0" / "data" / "splits.csv", dtype=str)
    train_women = set(trained_on.loc[trained_on["split"] == "train", "patient_id"])
    assert not set(test["patient_id"]) & train_women
    summary = json.loads((evaluation / "summary.json").read_text())
    chosen = next(row for row in summary["out_of_fold"] if row["score"] == summary["chosen"])
    assert chosen["n"] == len(test)
    assert chosen["auc"] == pytest.approx(roc_auc(test["label"], test[summary["chosen"]]))
    assert scores["classifier"].notna().all()


def test_a_rerun_resumes_without_retraining(evaluation: Path, mias_dir: Path) -> None:
    fold = evaluation / "fold0"
    trained = [fold / "run" / "model.keras", fold / "run" / "lesion_segmenter.keras",
               fold / "classifier" / "model.keras"]
    stamps = [path.stat().st_mtime_ns for path in trained]
    before = json.loads((evaluation / "summary.json").read_text())
    assert _eval_mias().main(_argv(mias_dir, evaluation.parent)) == 0
    assert [path.stat().st_mtime_ns for path in trained] == stamps
    after = json.loads((evaluation / "summary.json").read_text())
    assert after["chosen"] == before["chosen"] and after["out_of_fold"] == before["out_of_fold"]


def test_gamma_tta_needs_the_default_weight(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without w = 0 there is no default to report the gamma variant next to: refused up front."""
    with pytest.raises(SystemExit) as refused:
        _eval_mias().main(["--out", str(tmp_path / "eval"), "--config", "unused.yaml",
                           "--rule-weights", "0.5", "--gamma-tta", "0.8", "1"])
    assert refused.value.code == 2
    assert "--rule-weights needs 0" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()
