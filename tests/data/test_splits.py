"""Patient-grouped stratified splits on the real RSNA metadata (54,706 rows) and on small frames."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.data.metadata import normalise_metadata
from cvae_mammo.data.splits import make_splits, split_summary, write_splits
from cvae_mammo.errors import InputError

#: Stated tolerance: each split's image-level positive rate within this RELATIVE distance of the
#: overall rate (RSNA: 2.1% overall, so +-0.32 percentage points), patients' share within 1%.
RATE_TOLERANCE = 0.15


@pytest.fixture(scope="module")
def rsna(rsna_train_csv) -> pd.DataFrame:
    return normalise_metadata(pd.read_csv(rsna_train_csv))


def _patient_splits(splits: pd.DataFrame) -> pd.Series:
    return splits.groupby("patient_id")["split"].nunique()


@pytest.mark.shared_data
def test_rsna_splits_patient_disjoint_and_stratified(rsna):
    splits = make_splits(rsna, val=0.15, test=0.15, seed=3)
    assert len(splits) == len(rsna) == 54_706
    assert (_patient_splits(splits) == 1).all()
    overall = rsna["label"].mean()
    summary = split_summary(rsna, splits)
    for name in ("train", "val", "test"):
        rate = summary.loc[name, "positive_rate"]
        assert abs(rate - overall) <= RATE_TOLERANCE * overall, (name, rate, overall)
    share = summary["patients"] / rsna["patient_id"].nunique()
    assert abs(share["val"] - 0.15) < 0.01 and abs(share["test"] - 0.15) < 0.01
    # positive patients are split in the same proportions (systematic sampling, +-1 per stratum)
    positive_patients = set(rsna.loc[rsna["label"] == 1, "patient_id"])
    per_split = splits[splits["patient_id"].isin(positive_patients)].groupby("split")["patient_id"].nunique()
    assert abs(per_split["val"] - 0.15 * len(positive_patients)) <= 1


@pytest.mark.shared_data
def test_rsna_splits_deterministic_per_seed(rsna):
    first = make_splits(rsna, seed=11)
    again = make_splits(rsna, seed=11)
    other = make_splits(rsna, seed=12)
    pd.testing.assert_frame_equal(first, again)
    changed = (first["split"] != other["split"]).mean()
    assert changed > 0.2  # a different seed moves a good share of the images


@pytest.mark.shared_data
def test_rsna_stratify_on_site_and_kfold(rsna):
    splits = make_splits(rsna, folds=5, test=0.1, seed=0, stratify=["site_id"])
    assert (_patient_splits(splits) == 1).all()
    assert set(splits.loc[splits["split"] == "train", "fold"]) == {0, 1, 2, 3, 4}
    assert (splits.loc[splits["split"] == "test", "fold"] == -1).all()
    merged = splits.merge(rsna[["image_id", "label", "site_id"]], on="image_id")
    overall_site = rsna["site_id"].value_counts(normalize=True)
    overall = rsna["label"].mean()
    for fold, rows in merged[merged["split"] == "train"].groupby("fold"):
        assert abs(rows["label"].mean() - overall) <= 0.25 * overall, fold
        site_share = rows["site_id"].value_counts(normalize=True)
        assert np.allclose(site_share.reindex(overall_site.index), overall_site, atol=0.02)
        patients = rows.groupby("patient_id").ngroups
        assert 0.16 < patients / rsna["patient_id"].nunique() < 0.2


def _toy(n_patients: int, positives: int, images_per_patient: int = 2) -> pd.DataFrame:
    rows = []
    for p in range(n_patients):
        for i in range(images_per_patient):
            rows.append({"image_id": f"p{p}_{i}", "patient_id": f"p{p}",
                         "label": int(p < positives and i == 0)})
    return pd.DataFrame(rows)


def test_heldout_splits_always_get_a_positive():
    # 3 positive patients among 40: expected 0.45 per held-out split, yet each must get one
    for seed in range(10):
        splits = make_splits(_toy(40, 3), val=0.15, test=0.15, seed=seed)
        positive = splits.merge(_toy(40, 3), on=["image_id", "patient_id"]).query("label == 1")
        assert set(positive["split"]) == {"train", "val", "test"}, seed


def test_too_few_positives_is_a_clear_error():
    with pytest.raises(InputError, match="only 2 positive patient"):
        make_splits(_toy(40, 2), val=0.15, test=0.15, seed=0)
    with pytest.raises(InputError, match="fold"):
        make_splits(_toy(40, 3), folds=5, test=0.0, seed=0)


def test_unlabelled_data_splits_without_error():
    frame = _toy(30, 0).assign(label=np.nan)
    splits = make_splits(frame, seed=0)
    assert set(splits["split"]) == {"train", "val", "test"}


def test_bad_options_and_columns():
    with pytest.raises(InputError, match="stratify column 'site'"):
        make_splits(_toy(20, 5), stratify=["site"])
    with pytest.raises(InputError, match="fractions"):
        make_splits(_toy(20, 5), val=0.6, test=0.5)
    with pytest.raises(InputError, match="is not 0, 1 or blank"):
        make_splits(_toy(20, 5).assign(label="maybe"))


def test_write_splits_atomic_csv(tmp_path):
    splits = make_splits(_toy(20, 5), seed=1)
    path = write_splits(splits, tmp_path / "splits.csv")
    back = pd.read_csv(path, dtype={"image_id": str, "patient_id": str})
    assert list(back.columns) == ["image_id", "patient_id", "split", "fold"]
    pd.testing.assert_frame_equal(back, splits, check_dtype=False)
    assert [p.name for p in tmp_path.iterdir()] == ["splits.csv"]  # no temporary left behind


def test_split_cli_with_a_relative_dataset_path(tmp_path, monkeypatch, capsys):
    from cvae_mammo.cli import main

    (tmp_path / "ds").mkdir()
    _toy(20, 4).to_csv(tmp_path / "ds" / "manifest.csv", index=False)
    monkeypatch.chdir(tmp_path)
    assert main(["split", "ds", "--val", "0.2", "--test", "0.2"]) == 0, capsys.readouterr().err
    assert "total" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "ds" / "splits.csv")) == 40
    assert main(["split", "ds", "--val", "0.2", "--test", "0.2", "--out", "other.csv"]) == 0
    assert (tmp_path / "ds" / "other.csv").is_file() and not (tmp_path / "ds" / "ds").exists()
