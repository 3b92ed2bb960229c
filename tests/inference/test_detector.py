"""Detector: a run scores raw DICOM exams exactly as its dataset path does, pairs breasts by tags.

A tiny bilateral CVAE is trained on phantom DICOMs (real DICOM files with PatientID,
ImageLaterality and ViewPosition tags) preprocessed into a dataset folder; the same
raw DICOMs are then scored with :class:`Detector` and through ``predict --data``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE = (64, 32)


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(DICOM folder, dataset folder, calibrated run folder) of 10 phantom women."""
    from cvae_mammo.data.splits import make_splits, write_splits
    from cvae_mammo.evaluation.run_calibration import calibrate_run
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig
    from cvae_mammo.synthetic.dataset import make_phantom_dataset
    from cvae_mammo.training.cvae import fit_cvae

    root = tmp_path_factory.mktemp("detector")
    phantoms = make_phantom_dataset(root / "phantoms", n_patients=10, positive_fraction=0.4,
                                    size=(192, 156), seed=2, progress=False)
    data = root / "dataset"
    preprocess_dataset(phantoms.dicom_dir, data, PreprocessConfig(image_size=SIZE),
                       metadata=phantoms.metadata_csv, workers=1, progress=False)
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    write_splits(make_splits(manifest, val=0.3, test=0.3, seed=1), data / "splits.csv")
    config = CVAEConfig.small(image_size=SIZE, filters=(8, 16), latent_channels=2, epochs=1,
                              batch_size=8, augment=None, recon_every=100, bilateral=True,
                              likelihood_scale="learned", lesion_steps=0)
    run = fit_cvae(data, root / "run", config=config, seed=0, xla=False, command=["test"])
    calibrate_run(run, data, "val", method="youden")
    return phantoms.dicom_dir, data, run


def _test_files(dicoms: Path, data: Path) -> list[Path]:
    splits = pd.read_csv(data / "splits.csv", dtype={"image_id": str, "patient_id": str})
    test = splits[splits["split"] == "test"]
    return sorted(dicoms / patient / f"{image}.dcm"
                  for image, patient in zip(test["image_id"], test["patient_id"]))


def test_raw_dicoms_score_as_the_same_files_preprocessed_into_the_dataset(phantom_run) -> None:
    from cvae_mammo.fileio import read_json
    from cvae_mammo.inference.detector import Detector
    from cvae_mammo.inference.predict import predict_split

    dicoms, data, run = phantom_run
    files = _test_files(dicoms, data)
    assert all(path.is_file() for path in files) and len(files) >= 8
    recorded = read_json(run / "config.json")["preprocessing"]  # written at fit time
    assert recorded == read_json(data / "preprocess.json")["config"]
    detector = Detector.load(run)
    assert detector.preprocessing.image_size == SIZE
    raw = detector.predict(files).to_frame().set_index("image_id")
    dataset = predict_split(run, data, "test", write=False).set_index("image_id")
    assert sorted(raw.index) == sorted(dataset.index)
    np.testing.assert_allclose(raw.loc[dataset.index, "score"], dataset["score"],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(raw.loc[dataset.index, "pred_label"], dataset["pred_label"])
    assert (raw.loc[dataset.index, "prediction_id"] == dataset["prediction_id"]).all()


def test_breasts_pair_by_dicom_tags_and_a_lone_image_is_scored_and_flagged(phantom_run) -> None:
    import pydicom

    from cvae_mammo.inference.detector import Detector

    dicoms, data, run = phantom_run
    files = _test_files(dicoms, data)
    detector = Detector.load(run)
    results = detector.predict(files)
    scores = results.scores.set_index("image_id")
    tags = {path.stem: pydicom.dcmread(path, stop_before_pixels=True) for path in files}
    for image_id, row in scores.iterrows():
        partner = tags[row["partner_id"]]
        own = tags[image_id]
        assert partner.PatientID == own.PatientID and partner.ViewPosition == own.ViewPosition
        assert partner.ImageLaterality != own.ImageLaterality
    assert scores["has_partner"].all()
    breasts = results.breasts()
    assert len(breasts) == len(files) // 2  # two views per breast
    assert set(breasts.columns) >= {"prediction_id", "score", "score_normalised", "pred_label"}

    alone = detector.predict([files[0]])
    assert len(alone.images) == 1 and not alone.images[0].has_partner
    assert np.isfinite(alone.images[0].score)


def test_an_unreadable_file_is_reported_and_the_others_are_scored(phantom_run,
                                                                  tmp_path: Path) -> None:
    from cvae_mammo.inference.detector import Detector

    dicoms, data, run = phantom_run
    good = _test_files(dicoms, data)[:2]
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(good[0].read_bytes()[:600])
    results = Detector.load(run).predict([*good, bad])
    assert [r.image_id for r in results.images] == [p.stem for p in good]
    assert results.failures["source"].tolist() == [str(bad)]
    assert results.failures["reason"].iloc[0]


def test_predict_cli_on_raw_exams_writes_image_and_breast_scores_and_overlays(
        phantom_run, tmp_path: Path, capsys) -> None:
    from cvae_mammo.cli import main

    dicoms, data, run = phantom_run
    files = [str(p) for p in _test_files(dicoms, data)]
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run), *files, "--out", str(out), "--maps"]) == 0
    scores = pd.read_csv(out / "scores.csv", dtype={"image_id": str})
    assert len(scores) == len(files)
    assert {"breast_score", "breast_pred_label", "has_partner", "source"} <= set(scores.columns)
    assert scores.groupby("prediction_id")["breast_score"].nunique().eq(1).all()
    assert len(list((out / "maps").glob("*.png"))) == len(files)
    assert f"{len(files)} images scored" in capsys.readouterr().out
    assert main(["predict", "--run", str(run), *files]) == 2  # raw inputs need --out


def test_a_run_without_a_usable_model_gives_one_clear_error(phantom_run, tmp_path: Path) -> None:
    import shutil

    from cvae_mammo.errors import InputError
    from cvae_mammo.inference.detector import Detector

    _, _, run = phantom_run
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    (broken / "model.keras").write_bytes((run / "model.keras").read_bytes()[:1000])
    with pytest.raises((InputError, FileNotFoundError), match=r"model\.keras"):
        Detector.load(broken)
    (broken / "model.keras").unlink()
    with pytest.raises((InputError, FileNotFoundError), match=r"model\.keras"):
        Detector.load(broken)
