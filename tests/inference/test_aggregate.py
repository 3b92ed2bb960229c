"""Per-breast aggregation: hand-computed values and the real RSNA metadata."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.inference.aggregate import aggregate_breasts


@pytest.fixture()
def images() -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": ["1", "2", "3", "4", "5", "6"],
        "patient_id": ["p1", "p1", "p1", "p1", "p2", "p2"],
        "prediction_id": ["p1_L", "p1_L", "p1_R", "p1_R", "p2_L", "p2_L"],
        "score": [0.2, 0.4, 0.1, 0.9, 0.5, 0.5],
        "label": [0, 1, 0, 0, np.nan, np.nan],
    })


def test_mean_max_and_labels(images):
    mean = aggregate_breasts(images, "mean").set_index("prediction_id")
    assert mean.loc["p1_L", "score"] == pytest.approx(0.3)
    assert mean.loc["p1_R", "score"] == pytest.approx(0.5)
    assert mean.loc["p1_L", "label"] == 1  # any positive image makes the breast positive
    assert mean.loc["p1_R", "label"] == 0
    assert np.isnan(mean.loc["p2_L", "label"])  # no known label stays unknown
    assert mean["n_images"].tolist() == [2, 2, 2]
    assert mean.loc["p2_L", "patient_id"] == "p2"
    top = aggregate_breasts(images, "max").set_index("prediction_id")
    assert top["score"].tolist() == pytest.approx([0.4, 0.9, 0.5])


def test_soft_or(images):
    result = aggregate_breasts(images, "soft-or").set_index("prediction_id")
    # p1_L: mean(p^2) = (0.04 + 0.16) / 2 = 0.1 -> 1 - 0.9^2 = 0.19
    assert result.loc["p1_L", "score"] == pytest.approx(0.19)
    # p1_R: (0.01 + 0.81) / 2 = 0.41 -> 1 - 0.59^2 = 0.6519
    assert result.loc["p1_R", "score"] == pytest.approx(0.6519)
    raw = images.assign(score=images["score"] * 10)
    with pytest.raises(ValueError, match=r"soft-or.*\[0, 1\]"):
        aggregate_breasts(raw, "soft-or")
    assert aggregate_breasts(raw, "max")["score"].max() == pytest.approx(9.0)


def test_bad_input(images):
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_breasts(images, "median")
    with pytest.raises(ValueError, match="several patients"):
        aggregate_breasts(images.assign(prediction_id="same"))
    with pytest.raises(ValueError, match="non-finite"):
        aggregate_breasts(images.assign(score=[0.1, np.nan, 0, 0, 0, 0]))
    blank = images.assign(prediction_id=["p1_L", "", "p1_R", "p1_R", None, "p2_L"])
    assert len(aggregate_breasts(blank)) == 5  # images 2 and 5 stand alone


def test_real_rsna_breasts(rsna_train_csv):
    table = pd.read_csv(rsna_train_csv)
    table["prediction_id"] = table["patient_id"].astype(str) + "_" + table["laterality"]
    rng = np.random.default_rng(0)
    table["score"] = rng.random(len(table))
    breasts = aggregate_breasts(table.rename(columns={"cancer": "label"}), "soft-or")
    pairs = table[["patient_id", "laterality"]].drop_duplicates()
    assert len(breasts) == len(pairs)
    assert breasts["n_images"].sum() == len(table)
    assert breasts["score"].between(0, 1).all()
    by_breast = table.groupby("prediction_id")["cancer"].max()
    assert breasts.set_index("prediction_id")["label"].astype(int).equals(
        by_breast.loc[breasts["prediction_id"]].astype(int).rename("label"))
    check = breasts.sample(5, random_state=0)
    for _, row in check.iterrows():
        values = table.loc[table["prediction_id"] == row["prediction_id"], "score"].to_numpy()
        assert row["score"] == pytest.approx(1 - (1 - np.mean(values**2)) ** values.size)
