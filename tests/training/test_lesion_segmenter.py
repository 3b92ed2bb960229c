"""The bilateral lesion segmenter trained in a real CVAE run on mini-MIAS: files, score, pairs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SIZE = (64, 32)

pytestmark = pytest.mark.shared_data


def _config(**changes):
    from cvae_mammo.models.cvae import CVAEConfig

    values = {"image_size": SIZE, "filters": (8, 16), "latent_channels": 2, "epochs": 1,
              "batch_size": 16, "augment": None, "recon_every": 100, "bilateral": True,
              "lesion_steps": 150, "lesion_batch_size": 8, "lesion_filters": (8, 16),
              "lesion_learning_rate": 2e-3, "lesion_seeds": 1}
    values.update(changes)
    return CVAEConfig.small(**values)


@pytest.fixture(scope="module")
def dataset(mias_dataset_factory) -> Path:
    return mias_dataset_factory(size=SIZE)


@pytest.fixture(scope="module")
def segmenter_run(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fit_cvae with lesion_steps > 0, then calibrate on val (the README recipe, tiny)."""
    from cvae_mammo.evaluation.run_calibration import calibrate_run
    from cvae_mammo.training.cvae import fit_cvae

    run = fit_cvae(dataset, tmp_path_factory.mktemp("runs") / "cvae", config=_config(), seed=0,
                   xla=False, command=["test"])
    calibrate_run(run, dataset, "val", method="youden")
    return run


def test_fit_cvae_trains_the_segmenter_and_its_score_becomes_the_runs(segmenter_run: Path
                                                                      ) -> None:
    from cvae_mammo.fileio import read_json
    from cvae_mammo.models.lesion_segmenter import SEGMENTER_FILE, load_lesion_segmenter

    assert (segmenter_run / SEGMENTER_FILE).is_file() and (segmenter_run / "model.keras").is_file()
    scoring = read_json(segmenter_run / "scoring.json")
    assert scoring["weights"] == {"lesion_topk": 1.0} and scoring["contralateral_weight"] == 1.0
    assert "lesion_topk" in scoring["reference"]  # standardised on the val normals by calibrate
    report = read_json(segmenter_run / "lesion_validation.json")
    assert report["steps"] == 150 and len(report["loss_every_50"]) == 3
    assert report["snapshots"] == [75, 112, 150]  # the saved model averages these three
    assert load_lesion_segmenter(segmenter_run).output.shape[-1] == 3
    assert report["loss_every_50"][-1] < report["loss_every_50"][0]
    # after 150 steps on 64x32 images, pasted lesions in unseen (val) breasts stand out (0.68)
    assert report["synthetic_lesion_pixel_roc_auc"] > 0.6


def test_snapshots_are_spread_over_the_second_half_of_training() -> None:
    from cvae_mammo.training.lesion_segmenter import snapshot_steps

    assert snapshot_steps(1600, 3) == [800, 1200, 1600]
    assert snapshot_steps(1000, 5) == [500, 625, 750, 875, 1000]
    assert snapshot_steps(800, 1) == [800]
    assert snapshot_steps(3, 3) == [2, 3] and snapshot_steps(1, 3) == [1]  # too short to tell apart


def test_scores_are_the_lesion_map_minus_the_other_breast(segmenter_run: Path,
                                                          dataset: Path) -> None:
    from cvae_mammo.inference.predict import predict_split

    scores = predict_split(segmenter_run, dataset, "test", write=False)
    assert scores["lesion_topk"].nunique() == len(scores)
    assert scores["has_partner"].all()
    by_id = scores.set_index("image_id")
    pair_sums = [by_id.at[i, "score"] + by_id.at[p, "score"]
                 for i, p in zip(scores["image_id"], scores["partner_id"])]
    np.testing.assert_allclose(pair_sums, 0.0, atol=1e-9)  # own - other, both ways
    assert scores["score"].std() > 0


def test_an_image_without_its_other_breast_is_scored_alone_and_flagged(segmenter_run: Path,
                                                                       dataset: Path) -> None:
    from cvae_mammo.data.pipeline import read_image
    from cvae_mammo.inference.detector import Detector

    splits = pd.read_csv(dataset / "splits.csv", dtype={"image_id": str, "patient_id": str})
    manifest = pd.read_csv(dataset / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    test = manifest[manifest["image_id"].isin(splits.loc[splits.split == "test", "image_id"])]
    pair = test[test["patient_id"] == test["patient_id"].iloc[0]]
    images = np.stack([read_image(str(dataset / p), SIZE) for p in pair["path"]])
    detector = Detector.load(segmenter_run)
    both = detector.predict(list(images), metadata=pair[["patient_id", "laterality", "view"]]
                            .assign(image_id=[f"image_{i}" for i in range(len(pair))]))
    alone = detector.predict([images[0]])
    assert [r.has_partner for r in both.images] == [True, True]
    assert not alone.images[0].has_partner and np.isfinite(alone.images[0].score)
    assert alone.images[0].score != both.images[0].score


def test_a_diverging_segmenter_stops_and_saves_nothing(segmenter_run: Path, dataset: Path,
                                                       tmp_path: Path) -> None:
    from cvae_mammo.errors import TrainingDivergedError
    from cvae_mammo.models.lesion_segmenter import SEGMENTER_FILE
    from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter

    run = tmp_path / "run"
    shutil.copytree(segmenter_run, run)
    (run / SEGMENTER_FILE).unlink()
    with pytest.raises(TrainingDivergedError, match=r"lesion segmenter \(seed 0, shapes\) loss is"):
        fit_lesion_segmenter(run, dataset, _config(lesion_learning_rate=1e30, lesion_steps=40))
    assert not (run / SEGMENTER_FILE).exists()


def test_a_segmenter_added_to_a_calibrated_run_resets_its_score_and_threshold(
        segmenter_run: Path, dataset: Path, tmp_path: Path) -> None:
    from cvae_mammo.fileio import read_json
    from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter

    run = tmp_path / "run"
    shutil.copytree(segmenter_run, run)
    assert (run / "threshold.json").is_file() and read_json(run / "scoring.json")["reference"]
    fit_lesion_segmenter(run, dataset, _config(lesion_steps=3))
    assert not (run / "threshold.json").exists()  # it was set for the previous score
    assert read_json(run / "scoring.json")["reference"] == {}
    assert read_json(run / "lesion_validation.json")["steps"] == 3


def test_a_seed_ensemble_averages_the_snapshots_of_every_seed(segmenter_run: Path, dataset: Path,
                                                              tmp_path: Path) -> None:
    from cvae_mammo.fileio import atomic_write_json, read_json
    from cvae_mammo.models.lesion_segmenter import ensemble_members, load_lesion_segmenter
    from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter, segmenter_done

    run = tmp_path / "run"
    shutil.copytree(segmenter_run, run)
    config = _config(lesion_steps=6, lesion_seeds=2, seed=5)
    fit_lesion_segmenter(run, dataset, config)
    members = ensemble_members(load_lesion_segmenter(run))
    assert [m.name for m in members] == [f"lesion_segmenter_seed_{seed}_step_{step}"
                                         for seed in (5, 6) for step in (3, 4, 6)]
    first, second = members[2].get_weights(), members[5].get_weights()  # last step of each seed
    assert any(not np.array_equal(a, b) for a, b in zip(first, second))
    report = read_json(run / "lesion_validation.json")
    assert report["seeds"] == [5, 6] and set(report["loss_every_50_per_seed"]) == {"5", "6"}
    assert segmenter_done(run, config) and not segmenter_done(run, config.replace(lesion_seeds=1))
    assert report["style"] == "shapes"
    assert not segmenter_done(run, config.replace(lesion_style="tissue"))
    del report["style"]  # a run saved before lesion styles had the shapes style
    atomic_write_json(run / "lesion_validation.json", report)
    assert segmenter_done(run, config)


def test_a_mixed_ensemble_alternates_styles_and_keeps_the_seeds_it_already_has(
        segmenter_run: Path, dataset: Path, tmp_path: Path) -> None:
    """lesion_style mixed: seeds S, S+1, S+2 learn from shapes, tissue, shapes. Adding a seed
    trains only that one; another split file retrains them all."""
    from cvae_mammo.fileio import read_json
    from cvae_mammo.models.lesion_segmenter import load_lesion_segmenter, members_of_seed
    from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter, seed_styles

    run = tmp_path / "run"
    shutil.copytree(segmenter_run, run)
    config = _config(lesion_steps=4, lesion_seeds=2, seed=5, lesion_style="mixed")
    assert seed_styles(config.replace(lesion_seeds=3)) == {5: "shapes", 6: "tissue", 7: "shapes"}
    fit_lesion_segmenter(run, dataset, config)
    report = read_json(run / "lesion_validation.json")
    assert report["styles"] == {"5": "shapes", "6": "tissue"} and report["reused_seeds"] == []
    assert set(report["synthetic_lesion_pixel_roc_auc_per_style"]) == {"shapes", "tissue"}
    before = {seed: [m.get_weights() for m in members_of_seed(load_lesion_segmenter(run), seed)]
              for seed in (5, 6)}

    fit_lesion_segmenter(run, dataset, config.replace(lesion_seeds=3))
    report = read_json(run / "lesion_validation.json")
    assert report["reused_seeds"] == [5, 6] and report["seeds"] == [5, 6, 7]
    assert set(report["loss_every_50_per_seed"]) == {"5", "6", "7"}
    saved = load_lesion_segmenter(run)
    assert saved.output.shape[-1] == 9
    for seed, weights in before.items():
        kept = [m.get_weights() for m in members_of_seed(saved, seed)]
        assert all(np.array_equal(a, b) for old, new in zip(weights, kept)
                   for a, b in zip(old, new))

    other = tmp_path / "other_splits"
    shutil.copytree(dataset, other, symlinks=True)
    splits = pd.read_csv(other / "splits.csv", dtype=str, keep_default_na=False)
    moved = splits.loc[splits["split"] == "train", "patient_id"].iloc[0]
    splits.loc[splits["patient_id"] == moved, "split"] = "val"  # one woman moves to val
    splits.to_csv(other / "splits.csv", index=False)
    fit_lesion_segmenter(run, other, config.replace(lesion_seeds=3))
    assert read_json(run / "lesion_validation.json")["reused_seeds"] == []


def test_only_seeds_trained_with_the_same_settings_style_and_splits_are_reused() -> None:
    """Switching mixed -> tissue keeps the tissue seed only; other steps or another split file
    keep none."""
    from cvae_mammo.training.lesion_segmenter import reusable_seeds, segmenter_settings

    mixed = _config(lesion_steps=4, lesion_seeds=2, seed=5, lesion_style="mixed")
    recorded = {**segmenter_settings(mixed), "splits_sha256": "abc"}
    assert reusable_seeds(recorded, mixed, "abc") == [5, 6]
    assert reusable_seeds(recorded, mixed.replace(lesion_style="tissue"), "abc") == [6]
    assert reusable_seeds(recorded, mixed.replace(lesion_steps=6), "abc") == []
    assert reusable_seeds(recorded, mixed, "def") == []
    assert reusable_seeds(None, mixed, "abc") == []


def test_a_classifier_fine_tuned_from_the_segmenter_scores_pairs_and_maps(
        segmenter_run: Path, dataset: Path, tmp_path: Path) -> None:
    """fit-classifier --backbone LesionSegmenter --weights RUN: a frozen epoch (head only), one
    fine-tuning epoch (the segmenter's convolutions move, its batch-norm statistics do not),
    the better epoch on val kept as model.keras, then the shared predict code scores the same pairs as training did, with lesion maps."""
    from cvae_mammo.inference.predict import predict_split
    from cvae_mammo.models.classifier import backbone_of
    from cvae_mammo.models.classifier_config import ClassifierConfig
    from cvae_mammo.models.lesion_segmenter import load_lesion_segmenter
    from cvae_mammo.training.classifier import fit_classifier
    from cvae_mammo.training.runs import load_run_model

    config = ClassifierConfig(backbone="LesionSegmenter", weights=str(segmenter_run),
                              image_size=SIZE, epochs=2, freeze_epochs=1, batch_size=8,
                              positive_fraction=0.3, early_stopping_patience=None)
    run = fit_classifier(dataset, tmp_path / "clf", config=config, seed=0, run_eagerly=True,
                         command=["test"])
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and np.isfinite(history["loss"]).all()
    before = load_lesion_segmenter(segmenter_run)
    after = backbone_of(load_run_model(run, run / "checkpoints" / "last.keras"))  # after epoch 2
    moved = {w.path: not np.array_equal(a.numpy(), b.numpy())
             for w, a, b in zip(before.weights, before.weights, after.weights)}
    assert any(changed for path, changed in moved.items() if path.endswith("kernel"))
    assert not any(changed for path, changed in moved.items() if "moving" in path)

    scored = predict_split(run, dataset, split="val", maps_dir=tmp_path / "maps")
    saved = pd.read_csv(run / "predictions_val.csv", dtype={"image_id": str})
    merged = scored.merge(saved, on="image_id", suffixes=("", "_saved"))
    assert len(merged) == len(saved) and scored["has_partner"].sum() > 0
    np.testing.assert_allclose(merged["score"], merged["probability_saved"], rtol=1e-4, atol=1e-5)
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(saved)


def test_the_cli_refuses_a_segmenter_classifier_without_a_segmenter(dataset: Path,
                                                                    tmp_path: Path,
                                                                    capsys) -> None:
    from cvae_mammo.cli import main as cli_main

    empty = tmp_path / "run_without_segmenter"
    empty.mkdir()
    status = cli_main(["fit-classifier", "--data", str(dataset), "--out", str(tmp_path / "x"),
                       "--backbone", "LesionSegmenter", "--weights", str(empty),
                       "--image-size", "64x32"])
    assert status == 2 and "run_without_segmenter" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
