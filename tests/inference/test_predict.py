"""Prediction from a real (tiny) CVAE run folder trained on mini-MIAS: CSVs, overlays, calibrate."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvae_mammo.inference.predict import SCORE_COLUMNS

SIZE = (64, 32)

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def dataset(mias_dataset_factory) -> Path:
    return mias_dataset_factory(size=SIZE)


@pytest.fixture(scope="module")
def trained_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CVAE trained for one short epoch on the train normals (real fit_cvae)."""
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.training.cvae import fit_cvae

    config = CVAEConfig.small(image_size=SIZE, filters=(8, 16), latent_channels=2, epochs=1,
                              batch_size=16, augment=None, recon_every=100, lesion_steps=0)
    out = tmp_path_factory.mktemp("runs") / "cvae"
    return fit_cvae(dataset, out, config=config, seed=0, xla=False, command=["test"])


@pytest.fixture()
def run_dir(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy of the trained run, so tests may add scoring.json / threshold.json."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def test_predict_split_writes_scores_and_a_fresh_process_gives_the_same(run_dir: Path,
                                                                        dataset: Path) -> None:
    from cvae_mammo.inference.predict import predict_split

    in_process = predict_split(run_dir, dataset, "test", write=False)
    assert list(in_process.columns[:5]) == list(SCORE_COLUMNS)
    splits = pd.read_csv(dataset / "splits.csv")
    assert sorted(in_process["image_id"]) == sorted(splits.loc[splits.split == "test", "image_id"])
    assert in_process["score"].notna().all() and in_process["score"].nunique() > 1
    assert in_process["pred_label"].isna().all()  # not calibrated yet
    for column in ("l1_mean", "nll_topk", "excess_mean", "kl_topk", "density_mean",
                   "intensity_topk", "neg_elbo"):
        assert np.isfinite(in_process[column]).all()

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", "cvae_mammo", "predict", "--run", str(run_dir),
                    "--data", str(dataset), "--split", "test"], check=True, env=env,
                   capture_output=True, text=True)
    written = pd.read_csv(run_dir / "scores_test.csv")
    merged = in_process.merge(written, on="image_id", suffixes=("", "_fresh"))
    assert len(merged) == len(in_process)
    np.testing.assert_allclose(merged["score_fresh"], merged["score"], rtol=1e-5, atol=1e-7)


def test_detector_scores_raw_mini_mias_files_and_arrays_alike(run_dir: Path, dataset: Path,
                                                              mias_dir: Path,
                                                              tmp_path: Path) -> None:
    from cvae_mammo.data.pipeline import read_image
    from cvae_mammo.errors import InputError
    from cvae_mammo.inference.detector import Detector

    detector = Detector.load(run_dir)
    assert detector.model_type == "cvae" and detector.preprocessing.image_size == SIZE
    maps = tmp_path / "maps"
    originals = [mias_dir / "images" / "mdb001.png", mias_dir / "images" / "mdb002.png"]
    metadata = pd.DataFrame({"image_id": ["mdb001", "mdb002"], "patient_id": ["mias001"] * 2,
                             "background_tissue": ["G", "G"]})
    results = detector.predict(originals, metadata=metadata, maps=True, maps_dir=maps)
    assert [r.image_id for r in results.images] == ["mdb001", "mdb002"]
    assert {r.laterality for r in results.images} == {"L", "R"}  # from the pixels
    assert all(r.has_partner for r in results.images)  # the two breasts of one woman
    assert results.images[0].anomaly_map.shape == SIZE
    assert results.images[0].provenance["crop_x1"] > results.images[0].provenance["crop_x0"]
    for source in originals:
        overlay = Image.open(maps / source.name)
        assert overlay.mode == "RGB" and overlay.size == SIZE[::-1]
    # the dataset's PNGs of the same two images, given as arrays, score the same
    manifest = pd.read_csv(dataset / "manifest.csv", dtype=str).set_index("image_id")
    arrays = [read_image(str(dataset / manifest.loc[i, "path"]), SIZE)
              for i in ("mdb001", "mdb002")]
    as_arrays = detector.predict(arrays, metadata=metadata.assign(image_id=["image_0",
                                                                            "image_1"]))
    np.testing.assert_allclose([r.score for r in as_arrays.images],
                               [r.score for r in results.images], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="values must lie"):
        detector.predict([np.full(SIZE, 3.0)])


def test_contralateral_scoring_from_scoring_json(run_dir: Path, dataset: Path) -> None:
    from cvae_mammo.inference.predict import predict_split
    from cvae_mammo.inference.scoring import ScoringConfig

    ScoringConfig(weights={"nll_topk": 1.0}, contralateral_weight=1.0).save(
        run_dir / "scoring.json")
    scored = predict_split(run_dir, dataset, "test", write=False)
    sides = scored.groupby("patient_id")["laterality"].agg(lambda v: "".join(sorted(v)))
    paired = sides[sides == "LR"].index  # a left and a right breast (from the pixels)
    assert len(paired) > 0
    rows = scored[scored.patient_id.isin(paired)]
    # own - other for the two breasts of a woman sums to zero; own = topk
    np.testing.assert_allclose(rows.groupby("patient_id")["score"].sum(), 0.0, atol=1e-9)
    first = rows[rows.patient_id == paired[0]]
    assert first["score"].iloc[0] == pytest.approx(first["nll_topk"].iloc[0]
                                                   - first["nll_topk"].iloc[1])


def test_calibrate_cli_writes_threshold_json_used_by_predict(run_dir: Path, dataset: Path) -> None:
    from cvae_mammo.cli import main
    from cvae_mammo.inference.predict import predict_split
    from cvae_mammo.inference.scoring import ScoringConfig

    ScoringConfig(weights={"nll_topk": 1.0}, contralateral_weight=0.0).save(
        run_dir / "scoring.json")
    status = main(["calibrate", "--run", str(run_dir), "--data", str(dataset),
                   "--method", "youden"])
    assert status == 0
    threshold = json.loads((run_dir / "threshold.json").read_text())
    assert threshold["method"] == "youden" and threshold["level"] == "image"
    assert threshold["counts"]["n_positive"] > 0 and threshold["counts"]["n_negative"] > 0
    assert (run_dir / "scores_val.csv").is_file()
    scoring = json.loads((run_dir / "scoring.json").read_text())
    mean, std = scoring["reference"]["nll_topk"]  # standardised on the val normals
    val = pd.read_csv(run_dir / "scores_val.csv")
    np.testing.assert_allclose(val["score"], (val["nll_topk"] - mean) / std, rtol=1e-6)
    assert abs(val.loc[val["label"] == 0, "score"].mean()) < 1e-6
    # scores_val.csv agrees with the threshold just written (no stale columns)
    np.testing.assert_array_equal(val["pred_label"],
                                  (val["score"] >= threshold["value"]).astype(int))

    scored = predict_split(run_dir, dataset, "test", write=False)
    np.testing.assert_array_equal(scored["pred_label"],
                                  (scored["score"] >= threshold["value"]).astype(int))
    above = scored["score"] >= threshold["value"]
    assert (scored.loc[above, "score_normalised"] >= 0.5).all()
    assert (scored.loc[~above, "score_normalised"] < 0.5).all()

    # calibrating again with another method rewrites scores_val.csv under the new threshold
    assert main(["calibrate", "--run", str(run_dir), "--data", str(dataset),
                 "--method", "sensitivity:1.0"]) == 0
    again = json.loads((run_dir / "threshold.json").read_text())
    assert again["value"] != threshold["value"]
    val = pd.read_csv(run_dir / "scores_val.csv")
    np.testing.assert_array_equal(val["pred_label"], (val["score"] >= again["value"]).astype(int))


def test_bad_run_folder_gives_a_clean_error(tmp_path: Path, dataset: Path) -> None:
    from cvae_mammo.cli import main

    assert main(["predict", "--run", str(tmp_path), "--data", str(dataset)]) == 2
