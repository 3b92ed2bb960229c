"""fit-cvae end to end on mini-MIAS: negatives only, run folder, resume, refusal to overwrite, NaN guard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from cvae_mammo.cli import main  # noqa: E402
from cvae_mammo.data.dataset import MammoDataset  # noqa: E402
from cvae_mammo.errors import TrainingDivergedError  # noqa: E402
from cvae_mammo.fileio import file_sha256, read_json  # noqa: E402
from cvae_mammo.models.cvae import CVAEConfig, build_cvae  # noqa: E402
from cvae_mammo.training.common import resume_point, standard_callbacks  # noqa: E402
from cvae_mammo.training.cvae import cvae_pipelines, fit_cvae, training_frames  # noqa: E402
from cvae_mammo.training.runs import load_run_encoder, load_run_model, read_run_config  # noqa: E402

pytestmark = pytest.mark.shared_data

TINY = CVAEConfig.small(image_size=(64, 32), filters=(8, 16, 16), batch_size=16,
                        recon_every=1, recon_images=2, early_stopping_patience=5,
                        lesion_steps=0)


def test_no_positive_image_ever_reaches_a_training_batch(mias_dataset):
    dataset = MammoDataset.open(mias_dataset)
    train_all = dataset.subset(split="train")
    assert (train_all["label"] == 1).any(), "the fixture's train split should hold positives"
    train, val = training_frames(dataset)
    assert set(train["label"]) == {0.0} and set(val["label"]) == {0.0}
    assert set(val["split"]) == {"val"} and set(train["split"]) == {"train"}
    data = cvae_pipelines(dataset, TINY, None)
    labels = np.concatenate([batch["label"].numpy() for batch in data.train])
    assert len(train) == int((train_all["label"] == 0).sum())
    assert len(labels) == len(train) // TINY.batch_size * TINY.batch_size  # full batches
    assert data.steps == len(train) // TINY.batch_size  # one pass per epoch
    assert data.validation_steps == -(-len(val) // TINY.batch_size)
    assert (labels == 0).all()


def test_fit_writes_a_run_folder_resumes_from_the_saved_epoch_and_refuses_to_overwrite(
        mias_dataset, tmp_path, capsys, recwarn):
    run = tmp_path / "run"
    fit_cvae(mias_dataset, run, config=TINY, epochs=1, seed=1, conditioning=["background_tissue"])
    # the datasets are sized (repeated, steps per epoch): Keras never runs out of data
    assert not [w for w in recwarn if "ran out of data" in str(w.message)]
    config = read_run_config(run)
    assert config["model_type"] == "cvae" and config["image_size"] == [64, 32]
    assert config["conditioning"]["columns"] == ["background_tissue"]
    metadata = read_json(run / "metadata.json")
    assert metadata["manifest_sha256"] == file_sha256(mias_dataset / "manifest.csv")
    assert metadata["splits_sha256"] == file_sha256(mias_dataset / "splits.csv")
    assert metadata["seed"] == 1 and metadata["package_versions"]["keras"]
    for name in ("model.keras", "history.csv", "validation.json", "reconstructions/final.png",
                 "reconstructions/epoch_001.png", "checkpoints/last.keras", "logs"):
        assert (run / name).exists(), name
    assert resume_point(run).epoch == 1
    first = keras.models.load_model(run / "checkpoints" / "last.keras")
    steps = int(first.optimizer.iterations.numpy())
    assert steps > 0

    fit_cvae(mias_dataset, run, config=TINY, epochs=2, seed=1, resume=True,
             conditioning=["background_tissue"])
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == [1, 2]
    assert resume_point(run).epoch == 2
    resumed = keras.models.load_model(run / "checkpoints" / "last.keras")
    assert int(resumed.optimizer.iterations.numpy()) == 2 * steps  # optimiser state carried on

    model = load_run_model(run)
    encoder = load_run_encoder(run)
    frame = MammoDataset.open(mias_dataset).subset(split="val", label=0).head(2)
    images = np.random.default_rng(0).random((2, 64, 32, 1), dtype=np.float32)
    assert model.reconstruct(images, encoder.transform(frame)).shape == images.shape
    assert 0.0 < read_json(run / "validation.json")["ssim_breast_mean"] <= 1.0

    status = main(["fit-cvae", "--data", str(mias_dataset), "--out", str(run), "--config",
                   "small", "--image-size", "64x32", "--epochs", "1"])
    assert status == 2
    assert "already holds a run" in capsys.readouterr().err


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model = build_cvae(TINY)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), run_eagerly=True)
    images = np.random.default_rng(0).random((8, 64, 32, 1), dtype=np.float32)
    model.fit(images, batch_size=4, epochs=1, verbose=0,
              callbacks=standard_callbacks(tmp_path, 4, 2, 3, patience=None, monitor="loss",
                                           tensorboard=False))
    good = keras.models.load_model(tmp_path / "checkpoints" / "last.keras").get_weights()
    poisoned = images.copy()
    poisoned[5, 10, 10, 0] = np.nan
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, batch 2.*last\.keras.*epoch 1"):
        model.fit(poisoned, batch_size=4, epochs=3, initial_epoch=1, verbose=0, shuffle=False,
                  callbacks=standard_callbacks(tmp_path, 4, 2, 3, initial_epoch=1,
                                               patience=None, monitor="loss",
                                               tensorboard=False))
    assert resume_point(tmp_path).epoch == 1
    kept = keras.models.load_model(tmp_path / "checkpoints" / "last.keras").get_weights()
    for before, after in zip(good, kept):
        np.testing.assert_array_equal(before, after)
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1


def test_bilateral_fit_pairs_normal_breasts_only_and_writes_the_feature_density(mias_dataset,
                                                                                 tmp_path):
    from cvae_mammo.models.density import DENSITY_FILE, FeatureDensity

    dataset = MammoDataset.open(mias_dataset)
    train, _ = training_frames(dataset, bilateral=True)
    everything = dataset.frame.set_index("image_id")
    paired = train[train["has_partner"] == 1]
    assert len(paired) > 0 and (train["has_partner"] == 0).any()
    for _, row in paired.iterrows():
        partner = everything.loc[row["partner_id"]]
        assert partner["label"] == 0 and partner["patient_id"] == row["patient_id"]
        assert partner["split"] == "train"
    # a normal breast whose other breast is abnormal trains the single-image path
    abnormal_women = set(everything.loc[everything["label"] == 1, "patient_id"])
    assert (train.loc[train["patient_id"].isin(abnormal_women), "has_partner"] == 0).all()
    batch = next(iter(cvae_pipelines(dataset, TINY.replace(bilateral=True), None).train))
    assert batch["partner"].shape == batch["image"].shape

    config = TINY.replace(bilateral=True, likelihood_scale="learned", epochs=1)
    run = fit_cvae(mias_dataset, tmp_path / "run", config=config, seed=0)
    density = FeatureDensity.load(run / DENSITY_FILE)
    assert density.mean_.shape == (config.filters[-1],) and density.count_ > len(train)
    assert read_run_config(run)["model"]["bilateral"] is True
