"""fit_classifier end to end on the real mini-MIAS images (abnormal vs normal) at 128x64."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.cli import main as cli_main
from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.pipeline import read_image
from cvae_mammo.fileio import read_json
from cvae_mammo.models.classifier import backbone_of, predict_proba
from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.training.classifier import MONITOR_KEY, fit_classifier
from cvae_mammo.training.runs import load_run_model

SIZE = (128, 64)


def _config(**changes) -> ClassifierConfig:
    values = {"backbone": "EfficientNetB0", "weights": None, "image_size": SIZE, "epochs": 2,
              "freeze_epochs": 1, "batch_size": 8, "positive_fraction": 0.3,
              "early_stopping_patience": 3}
    values.update(changes)
    return ClassifierConfig(**values)


@pytest.fixture(scope="module")
def trained_run(mias_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two eager epochs (one frozen, one fine-tuning) of EfficientNetB0 on mini-MIAS; the
    datasets are sized (repeated, steps per epoch), so Keras never runs out of data."""
    out = tmp_path_factory.mktemp("clf") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = fit_classifier(mias_dataset, out, config=_config(), seed=3, run_eagerly=True,
                             command=["test"])
    assert not [w for w in caught if "ran out of data" in str(w.message)]
    return run


def test_run_folder_layout_and_history(trained_run: Path) -> None:
    for name in ("model.keras", "config.json", "metadata.json", "history.csv",
                 "predictions_val.csv", "validation.json", "checkpoints/last.keras",
                 "checkpoints/state.json"):
        assert (trained_run / name).is_file(), name
    assert (trained_run / "logs").is_dir()
    config = read_json(trained_run / "config.json")
    assert config["model_type"] == "classifier"
    assert config["model"]["backbone"] == "EfficientNetB0" and config["image_size"] == [128, 64]
    assert config["training"]["freeze_epochs"] == 1
    assert read_json(trained_run / "metadata.json")["splits_sha256"]
    history = pd.read_csv(trained_run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    for column in ("loss", "val_loss", "auc", "val_auc", "val_pf1", MONITOR_KEY):
        assert column in history.columns and history[column].notna().all(), column
    np.testing.assert_allclose(history[MONITOR_KEY], 1.0 - history["val_auc"], atol=1e-6)
    validation = read_json(trained_run / "validation.json")
    assert 0.0 <= validation["roc_auc"] <= 1.0 and validation["positives"] > 0


def test_reloaded_model_predicts_identically_from_image_files(trained_run: Path,
                                                              mias_dataset: Path) -> None:
    """Training-time validation pass (tf.data pipeline) == inference on PNGs read from disk."""
    saved = pd.read_csv(trained_run / "predictions_val.csv", dtype={"image_id": str})
    dataset = MammoDataset.open(mias_dataset)
    rows = dataset.subset(split="val").set_index("image_id").loc[saved["image_id"]]
    images = np.stack([read_image(str(mias_dataset / p), SIZE) for p in rows["path"]])
    model = load_run_model(trained_run)
    probabilities = predict_proba(model, images)
    np.testing.assert_allclose(probabilities, saved["probability"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(saved["label"], rows["label"].astype(int))
    # Feeding 0-255 (the earlier bug) is refused, not silently mis-scored.
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict_proba(model, images * 255.0)


def test_resume_continues_and_existing_run_is_protected(trained_run: Path, tmp_path: Path,
                                                        mias_dataset: Path) -> None:
    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    with pytest.raises(FileExistsError, match="already holds a run"):
        fit_classifier(mias_dataset, run, config=_config(), seed=3, run_eagerly=True)
    fit_classifier(mias_dataset, run, config=_config(epochs=3), seed=3, resume=True,
                   run_eagerly=True)
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    original = pd.read_csv(trained_run / "history.csv")
    pd.testing.assert_frame_equal(history.iloc[:2][original.columns], original)
    assert read_json(run / "checkpoints" / "state.json")["epoch"] == 3


def test_frozen_phase_leaves_the_backbone_untouched(mias_dataset: Path, tmp_path: Path) -> None:
    """One frozen epoch: backbone weights (and batch-norm statistics) stay as initialised."""
    run = fit_classifier(mias_dataset, tmp_path / "frozen",
                         config=_config(epochs=1, freeze_epochs=1, pooling="max"),
                         seed=5, run_eagerly=True)
    from cvae_mammo.models.classifier import build_classifier
    from cvae_mammo.training.common import set_global_seed

    set_global_seed(5)
    initial = backbone_of(build_classifier(_config(pooling="max")))
    trained = backbone_of(load_run_model(run))
    for before, after in zip(initial.get_weights(), trained.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_aux_head_and_tabular_branch_through_the_pipeline(mias_dataset: Path,
                                                          tmp_path: Path) -> None:
    """Aux target 'density' (a proxy from MIAS background tissue F/G/D) and tabular 'view'."""
    data = tmp_path / "data"
    shutil.copytree(mias_dataset, data)
    manifest = pd.read_csv(data / "manifest.csv", dtype=str)
    manifest["density"] = manifest["background_tissue"].map({"F": "A", "G": "B", "D": "D"})
    manifest.to_csv(data / "manifest.csv", index=False)
    shutil.copy(mias_dataset / "splits.csv", data / "splits.csv")
    config = _config(epochs=1, aux_targets={"density": 0.3}, tabular_features=("view",),
                     loss="bce", pos_weight=3.0, positive_fraction=None)
    run = fit_classifier(data, tmp_path / "aux", config=config, seed=1, run_eagerly=True)
    history = pd.read_csv(run / "history.csv")
    assert {"density_loss", "label_loss", "val_density_loss", "val_label_auc",
            MONITOR_KEY} <= set(history.columns)
    assert np.isfinite(history[["density_loss", "label_loss"]].to_numpy()).all()
    saved = read_json(run / "config.json")
    assert saved["conditioning"]["columns"] == ["view"] and saved["model"]["tabular_dim"] >= 1


@pytest.mark.slow
def test_cli_graph_mode_training(mias_dataset: Path, tmp_path: Path, capsys) -> None:
    """The one graph-mode (compiled) training run: the CLI with a frozen backbone."""
    out = tmp_path / "cli"
    status = cli_main(["fit-classifier", "--data", str(mias_dataset), "--out", str(out),
                       "--backbone", "EfficientNetB0", "--weights", "none", "--epochs", "1",
                       "--freeze-epochs", "1", "--batch-size", "8", "--image-size", "128x64",
                       "--seed", "2", "--loss", "focal", "--precision", "float32"])
    assert status == 0 and capsys.readouterr().out.strip() == str(out)
    assert (out / "model.keras").is_file()
    assert cli_main(["fit-classifier", "--data", str(mias_dataset), "--out", str(tmp_path / "x"),
                     "--weights", str(tmp_path / "missing.weights.h5"), "--epochs", "1",
                     "--image-size", "128x64"]) == 2
    assert "missing.weights.h5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any run folder is written


def test_predictor_scores_a_split_through_the_shared_predict_code(trained_run: Path,
                                                                  mias_dataset: Path,
                                                                  tmp_path: Path) -> None:
    """cvae_mammo.inference.predict scores a classifier run (scores_val.csv + Grad-CAM overlays)."""
    from cvae_mammo.inference.classifier_predict import ClassifierPredictor
    from cvae_mammo.inference.predict import load_predictor, predict_split

    assert isinstance(load_predictor(trained_run), ClassifierPredictor)
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    scored = predict_split(run, mias_dataset, split="val", maps_dir=tmp_path / "maps")
    saved = pd.read_csv(run / "predictions_val.csv", dtype={"image_id": str})
    merged = scored.merge(saved, on="image_id", suffixes=("", "_saved"))
    assert len(merged) == len(saved)
    np.testing.assert_allclose(merged["score"], merged["probability_saved"], rtol=1e-4, atol=1e-5)
    assert (run / "scores_val.csv").is_file()
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(saved)


def test_detector_serves_a_classifier_run_from_raw_files(trained_run: Path, mias_dataset: Path,
                                                         mias_dir: Path) -> None:
    """The same Detector object scores raw mini-MIAS files with a classifier run (+ Grad-CAM)."""
    from cvae_mammo.inference.detector import Detector

    detector = Detector.load(trained_run)
    assert detector.model_type == "classifier"
    saved = pd.read_csv(trained_run / "predictions_val.csv", dtype={"image_id": str}).head(3)
    files = [mias_dir / "images" / f"{image_id}.png" for image_id in saved["image_id"]]
    results = detector.predict(files, maps=True)
    np.testing.assert_allclose([r.score for r in results.images], saved["probability"],
                               rtol=1e-4, atol=1e-5)
    assert results.images[0].anomaly_map.shape == SIZE
    assert results.to_frame()["image_id"].tolist() == saved["image_id"].tolist()
