"""Metadata normalisation and the conditioning encoder, on the real RSNA train.csv."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.data.metadata import (
    MetadataEncoder,
    impute_from_train,
    normalise_density,
    normalise_laterality,
    normalise_metadata,
    normalise_view,
)
from cvae_mammo.data.splits import make_splits
from cvae_mammo.errors import InputError


@pytest.fixture(scope="module")
def raw(rsna_train_csv) -> pd.DataFrame:
    return pd.read_csv(rsna_train_csv)


@pytest.fixture(scope="module")
def rsna(raw) -> pd.DataFrame:
    return normalise_metadata(raw)


@pytest.fixture(scope="module")
def rsna_split(rsna) -> pd.DataFrame:
    splits = make_splits(rsna, seed=0)
    return rsna.merge(splits[["image_id", "split"]], on="image_id")


@pytest.mark.shared_data
def test_prediction_ids_are_breasts(raw, rsna):
    breasts = raw.groupby(["patient_id", "laterality"]).ngroups
    assert rsna["prediction_id"].nunique() == breasts
    first = raw.iloc[0]
    assert rsna["prediction_id"].iloc[0] == f"{first.patient_id}_{first.laterality}"
    # ids are strings without float artefacts
    assert rsna["patient_id"].iloc[0] == str(first.patient_id)


@pytest.mark.shared_data
def test_rsna_columns_normalised(raw, rsna):
    assert set(rsna["laterality"]) == {"L", "R"}
    np.testing.assert_array_equal(rsna["label"], raw["cancer"].astype(float))
    rare = rsna[rsna["view_rare"]]
    assert set(rare["view"]) == set(raw["view"]) - {"CC", "MLO"}  # AT, LM, ML, LMO kept
    assert len(rare) == int((~raw["view"].isin(["CC", "MLO"])).sum())
    assert set(rsna["density"]) == {"A", "B", "C", "D", "unknown"}
    assert (rsna["density"] == "unknown").sum() == raw["density"].isna().sum()
    assert set(rsna["implant"]) == {0, 1}
    assert rsna["age_missing"].sum() == raw["age"].isna().sum() > 0


@pytest.mark.shared_data
def test_age_imputed_from_train_split_only(rsna_split):
    train = rsna_split[rsna_split["split"] == "train"]
    filled, value = impute_from_train(rsna_split, train)
    assert value == train["age"].median()
    # held-out ages have no influence: shift them and the imputed value stays the same
    shifted = rsna_split.assign(age=rsna_split["age"].where(rsna_split["split"] == "train",
                                                            rsna_split["age"] + 30))
    assert impute_from_train(shifted, shifted[shifted["split"] == "train"])[1] == value
    assert impute_from_train(shifted, shifted)[1] != value
    assert not filled["age"].isna().any()
    assert (filled.loc[filled["age_missing"], "age"] == value).all()
    encoder = MetadataEncoder(["age"]).fit(train)
    assert encoder.fill_["age"] == value  # recorded in the encoder's JSON
    missing_rows = rsna_split[rsna_split["age"].isna()]
    vectors = encoder.transform(missing_rows)
    expected = (value - encoder.mean_["age"]) / encoder.scale_["age"]
    np.testing.assert_allclose(vectors[:, 0], expected, rtol=1e-6)


@pytest.mark.shared_data
def test_encoder_on_rsna_columns(rsna_split, tmp_path):
    train = rsna_split[rsna_split["split"] == "train"]
    encoder = MetadataEncoder(["view", "laterality", "density", "age", "implant", "site_id"])
    vectors = encoder.fit_transform(train)
    names = encoder.feature_names_
    assert vectors.shape == (len(train), encoder.dim) and vectors.dtype == np.float32
    assert names[:2] == ["view=AT", "view=CC"]
    assert {"laterality=L", "laterality=R", "density=unknown", "age", "site_id=1"} <= set(names)
    assert np.isfinite(vectors).all()
    one_hot = [i for i, n in enumerate(names) if n.startswith("density=")]
    np.testing.assert_array_equal(vectors[:, one_hot].sum(axis=1), 1.0)
    age = vectors[:, names.index("age")]
    assert abs(age.mean()) < 1e-3 and abs(age.std() - 1) < 1e-3  # standardised on train
    encoder.save(tmp_path / "encoder.json")
    stored = json.loads((tmp_path / "encoder.json").read_text())
    assert stored["fill"]["age"] == train["age"].median()
    again = MetadataEncoder.load(tmp_path / "encoder.json")
    test = rsna_split[rsna_split["split"] == "test"]
    np.testing.assert_array_equal(again.transform(test), encoder.transform(test))


def test_unseen_category_encodes_as_zeros():
    train = pd.DataFrame({"view": ["CC", "MLO", "CC"]})
    encoder = MetadataEncoder(["view"]).fit(train)
    vectors = encoder.transform(pd.DataFrame({"view": ["MLO", "XCCL", None]}))
    np.testing.assert_array_equal(vectors, [[0, 1], [0, 0], [0, 0]])
    with pytest.raises(InputError, match="conditioning column"):
        encoder.transform(pd.DataFrame({"density": ["A"]}))


def test_value_spellings():
    assert list(normalise_laterality(pd.Series(["l", "Right", None, "B"]))) == ["L", "R", "", ""]
    assert list(normalise_view(pd.Series(["mlo", " cc", "XCCL", "Mediolateral oblique"]))) == [
        "MLO", "CC", "XCCL", "MLO"]
    assert list(normalise_density(pd.Series(["a", 2, "3.0", None, "E"]))) == [
        "A", "B", "C", "unknown", "unknown"]


def test_generic_manifest_without_laterality_or_labels():
    frame = pd.DataFrame({"image_id": ["a", "b"], "patient_id": [7.0, 7.0]})
    out = normalise_metadata(frame)
    assert list(out["patient_id"]) == ["7", "7"]
    assert list(out["prediction_id"]) == ["7_a", "7_b"]  # no laterality: each image its own breast
    assert out["label"].isna().all()
    assert not out["view_rare"].any()
    given = frame.assign(prediction_id=["7_", "7_left"])  # "7_": made from a blank laterality
    assert list(normalise_metadata(given)["prediction_id"]) == ["7_a", "7_left"]


def test_bad_metadata_is_named():
    with pytest.raises(InputError, match="no 'patient_id' column"):
        normalise_metadata(pd.DataFrame({"image_id": ["a"]}))
    with pytest.raises(InputError, match="appears twice"):
        normalise_metadata(pd.DataFrame({"image_id": ["a", "a"], "patient_id": [1, 2]}))
    with pytest.raises(InputError, match="'implant'"):
        normalise_metadata(pd.DataFrame({"image_id": ["a"], "patient_id": [1], "implant": ["x"]}))
    with pytest.raises(InputError, match="label '2' is not 0, 1 or blank"):
        normalise_metadata(pd.DataFrame({"image_id": ["a"], "patient_id": [1], "label": [2]}))
