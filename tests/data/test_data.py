"""MammoDataset and build_pipeline on the real mini-MIAS PNGs (tiny 128x64 dataset folder)."""

from __future__ import annotations

import logging
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.data.pipeline import build_pipeline, read_image
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import atomic_write_csv

pytestmark = pytest.mark.shared_data
SIZE = (128, 64)


@pytest.fixture(scope="module")
def dataset(mias_dataset) -> MammoDataset:
    return MammoDataset.open(mias_dataset)


def _all(pipeline) -> dict[str, np.ndarray]:
    batches = list(pipeline.as_numpy_iterator())
    return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}


def test_open_counts_and_subsets(dataset):
    counts = dataset.counts()
    assert counts.loc["total", "images"] == 196
    assert counts.loc["total", "patients"] == 98
    assert counts.loc["total", "positives"] == 71  # 39 benign-only + 32 malignant
    assert counts.loc[["train", "val", "test"], "images"].sum() == 196
    assert (counts.loc[["val", "test"], "positives"] > 0).all()
    normals = dataset.subset(split="train", label=0)
    assert len(normals) == counts.loc["train", "negatives"]
    assert set(normals["label"]) == {0.0}
    patients = [set(dataset.subset(split=s)["patient_id"]) for s in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])


def test_batches_shapes_dtypes_ranges(dataset):
    frame = dataset.subset(split="val")
    encoder = dataset.encoder(["background_tissue", "view"])
    out = _all(build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=8,
                              conditioning=encoder, include_ids=True))
    assert out["image"].shape == (len(frame), *SIZE, 1) and out["image"].dtype == np.float32
    assert out["image"].min() >= 0.0 and out["image"].max() <= 1.0 and out["image"].max() > 0.5
    assert out["condition"].shape == (len(frame), encoder.dim) and out["condition"].dtype == np.float32
    assert out["label"].dtype == np.float32
    ids = [i.decode() for i in out["image_id"]]
    assert ids == list(frame["image_id"])  # no shuffle: manifest order
    np.testing.assert_array_equal(out["label"], frame["label"].to_numpy(np.float32))
    # conditioning: one-hot tissue matching the manifest, plus view=MLO always on
    tissue = frame["background_tissue"].to_numpy()
    for k, name in enumerate(encoder.feature_names_):
        column, value = name.split("=")
        expected = (tissue == value) if column == "background_tissue" else np.ones(len(frame), bool)
        np.testing.assert_array_equal(out["condition"][:, k], expected.astype(np.float32))
    # pixel values are the PNG's, scaled by 1/255
    first = cv2.imread(str(dataset.root / frame["path"].iloc[0]), cv2.IMREAD_UNCHANGED)
    np.testing.assert_allclose(out["image"][0, ..., 0], first / 255.0, atol=1e-6)


def test_sixteen_bit_png_and_resize(tmp_path, dataset):
    source = cv2.imread(str(dataset.root / dataset.frame["path"].iloc[0]), cv2.IMREAD_UNCHANGED)
    wide = (source.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "x16.png"), wide)
    image = read_image(str(tmp_path / "x16.png"), SIZE)
    np.testing.assert_allclose(image[..., 0], source / 255.0, atol=1e-6)
    smaller = read_image(str(tmp_path / "x16.png"), (64, 32))
    assert smaller.shape == (64, 32, 1) and smaller.dtype == np.float32


def test_shuffle_deterministic_per_seed(dataset):
    frame = dataset.subset(split="train")

    def ids(seed: int) -> list[bytes]:
        p = build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=16, shuffle=True,
                           seed=seed, include_ids=True)
        return list(_all(p)["image_id"])

    first = ids(5)
    assert first == ids(5)
    assert first != ids(6)
    assert sorted(first) == sorted(frame["image_id"].str.encode("ascii"))


def test_positive_oversampling_and_negative_downsampling(dataset):
    frame = dataset.subset(split="train")
    n_neg = int((frame["label"] == 0).sum())
    over = _all(build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=10,
                               positive_fraction=0.5, seed=2, include_ids=True))
    assert len(over["label"]) == 2 * n_neg  # an epoch = all negatives at a 50 % positive share
    assert 0.4 < over["label"].mean() < 0.6  # overall share of positives in train is ~0.36
    down = build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=10,
                          negative_fraction=0.2, seed=2, repeat=True, include_ids=True)
    n_pos = int((frame["label"] == 1).sum())
    epoch = n_pos + round(0.2 * n_neg)
    batches = list(down.unbatch().take(2 * epoch).batch(epoch).as_numpy_iterator())
    for batch in batches:
        assert batch["label"].sum() == n_pos
    negatives = [set(b["image_id"][b["label"] == 0]) for b in batches]
    assert negatives[0] != negatives[1]  # negatives redrawn per epoch


def test_missing_image_is_skipped_and_logged_once(tmp_path, dataset, caplog):
    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    opened = MammoDataset.open(copy)
    frame = opened.subset(split="val")
    victim = copy / frame["path"].iloc[1]
    victim.unlink()
    caplog.set_level(logging.WARNING, logger="cvae_mammo.data.dataset")
    pipeline = build_pipeline(frame, copy, image_size=SIZE, batch_size=4, include_ids=True,
                              repeat=True)
    ids = [i.decode() for i in pipeline.unbatch().take(3 * (len(frame) - 1)).map(
        lambda e: e["image_id"]).as_numpy_iterator()]
    assert frame["image_id"].iloc[1] not in ids and len(ids) == 3 * (len(frame) - 1)
    messages = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert len(messages) == 1, messages
    # opening the folder now fails early, naming the manifest and the missing file
    with pytest.raises(InputError, match=r"manifest\.csv: 1 image file\(s\) listed but not found"):
        MammoDataset.open(copy)


def test_unreadable_image_is_skipped(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    frame = MammoDataset.open(copy).subset(split="test")
    (copy / frame["path"].iloc[0]).write_bytes(b"not a png")
    out = _all(build_pipeline(frame, copy, image_size=SIZE, batch_size=8, include_ids=True))
    assert len(out["image_id"]) == len(frame) - 1


def test_manifest_and_split_mismatch_fail_early(tmp_path, dataset):
    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    splits = pd.read_csv(copy / "splits.csv", dtype=str)
    atomic_write_csv(copy / "splits.csv", splits.iloc[1:])
    with pytest.raises(InputError, match=r"splits\.csv: 1 manifest image\(s\) have no split"):
        MammoDataset.open(copy)
    leaky = splits.copy()
    patient = leaky["patient_id"].iloc[0]
    rows = leaky.index[leaky["patient_id"] == patient]
    leaky.loc[rows[0], "split"] = "train"
    leaky.loc[rows[1], "split"] = "test"
    atomic_write_csv(copy / "splits.csv", leaky)
    with pytest.raises(InputError, match="more than one split"):
        MammoDataset.open(copy)
    foreign = splits.assign(image_id=splits["image_id"] + "x")
    atomic_write_csv(copy / "splits.csv", foreign)
    with pytest.raises(InputError, match="not in the manifest"):
        MammoDataset.open(copy)
    with pytest.raises(InputError, match="split file not found"):
        MammoDataset.open(copy, splits="nope.csv")


def test_encoder_round_trip_through_run_config(tmp_path, dataset):
    encoder = dataset.encoder(["background_tissue"])
    encoder.save(tmp_path / "encoder.json")
    again = MetadataEncoder.load(tmp_path / "encoder.json")
    frame = dataset.subset(split="test")
    np.testing.assert_array_equal(again.transform(frame), encoder.transform(frame))


def test_sixteen_bit_folder_through_the_pipeline(tmp_path, dataset):
    frame = dataset.subset(split="val").head(6)
    for path in frame["path"]:
        pixels = cv2.imread(str(dataset.root / path), cv2.IMREAD_UNCHANGED)
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / path), pixels.astype(np.uint16) * 257)
    eight = _all(build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=3))
    sixteen = _all(build_pipeline(frame, tmp_path, image_size=SIZE, batch_size=3))
    np.testing.assert_allclose(sixteen["image"], eight["image"], atol=1e-6)
    augmented = _all(build_pipeline(frame, tmp_path, image_size=SIZE, batch_size=3,
                                    augment="classifier", seed=1))
    assert augmented["image"].dtype == np.float32 and augmented["image"].shape == eight["image"].shape
    assert augmented["image"].min() >= 0 and augmented["image"].max() <= 1
    assert not np.array_equal(augmented["image"], sixteen["image"])


@pytest.mark.parametrize("cache", [True, "file"])
def test_cache_gives_the_same_batches(tmp_path, dataset, cache):
    frame = dataset.subset(split="test")
    cache = str(tmp_path / "cache") if cache == "file" else cache
    kwargs = {"image_size": SIZE, "batch_size": 8, "shuffle": True, "seed": 3, "repeat": True,
              "augment": "cvae", "include_ids": True}
    plain = build_pipeline(frame, dataset.root, **kwargs).take(12)
    cached = build_pipeline(frame, dataset.root, cache=cache, **kwargs).take(12)
    for a, b in zip(plain.as_numpy_iterator(), cached.as_numpy_iterator()):
        np.testing.assert_array_equal(a["image_id"], b["image_id"])
        np.testing.assert_array_equal(a["image"], b["image"])
    if isinstance(cache, str):
        assert any(p.name.startswith("cache_all") for p in tmp_path.iterdir())


def test_kfold_split_file_and_fold_selection(tmp_path, dataset):
    from cvae_mammo.cli import main

    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    assert main(["split", str(copy), "--folds", "3", "--seed", "4", "--stratify",
                 "background_tissue"]) == 0
    splits = pd.read_csv(copy / "splits.csv")
    assert set(splits["split"]) == {"train"} and set(splits["fold"]) == {0, 1, 2}
    opened = MammoDataset.open(copy, fold=1)
    val = opened.subset(split="val")
    assert set(val["image_id"]) == set(splits.loc[splits["fold"] == 1, "image_id"])
    assert not set(val["patient_id"]) & set(opened.subset(split="train")["patient_id"])
    assert (opened.counts().loc[["train", "val"], "positives"] > 0).all()
    with pytest.raises(InputError, match="fold 5 not in the split file"):
        MammoDataset.open(copy, fold=5)


def test_split_cli_prints_counts_and_rejects_bad_options(tmp_path, dataset, capsys):
    from cvae_mammo.cli import main

    copy = tmp_path / "ds"
    shutil.copytree(dataset.root, copy)
    (copy / "splits.csv").unlink()
    assert main(["split", str(copy), "--val", "0.2", "--test", "0.2", "--seed", "9"]) == 0
    printed = capsys.readouterr().out
    assert "positives" in printed and "total" in printed and "196" in printed
    first = (copy / "splits.csv").read_text()
    assert main(["split", str(copy), "--val", "0.2", "--test", "0.2", "--seed", "9"]) == 0
    assert (copy / "splits.csv").read_text() == first  # same seed, same file
    assert main(["split", str(copy), "--folds", "3", "--val", "0.2"]) == 2
    assert "exclude each other" in capsys.readouterr().err
    assert main(["split", str(tmp_path / "nowhere")]) == 2


def test_partner_batches_are_aligned_augmented_alike_and_zero_when_missing(mias_dataset):
    """The bilateral pipeline: partner image in [0, 1], same augmentation, exact zeros if none."""
    from cvae_mammo.data.pairing import with_partners

    frame = with_partners(MammoDataset.open(mias_dataset).subset(split="train"))
    frame = frame[frame["has_partner"] == 1].head(3).reset_index(drop=True)
    frame.loc[1, "partner_path"] = frame.loc[1, "path"]  # its own partner: must match exactly
    frame.loc[2, "partner_path"] = ""  # this one has no partner
    size = (128, 64)
    plain = next(iter(build_pipeline(frame, mias_dataset, image_size=size, batch_size=3,
                                     partners=True)))
    expected = read_image(str(mias_dataset / frame.loc[0, "partner_path"]), size)
    np.testing.assert_allclose(plain["partner"][0].numpy(), expected, atol=1e-6)
    augmented = next(iter(build_pipeline(frame, mias_dataset, image_size=size, batch_size=3,
                                         partners=True, augment="cvae", seed=5)))
    np.testing.assert_array_equal(augmented["partner"][1].numpy(), augmented["image"][1].numpy())
    assert not np.allclose(augmented["image"][1].numpy(), plain["image"][1].numpy())
    assert not augmented["partner"][2].numpy().any()  # missing partner: exactly zero
    assert float(augmented["partner"].numpy().min()) >= 0.0
    assert float(augmented["partner"].numpy().max()) <= 1.0
