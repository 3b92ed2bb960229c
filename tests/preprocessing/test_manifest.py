"""Metadata join and ids: reversible file-name-safe ids, the column allow-list, conflicts."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from cvae_mammo.errors import InputError
from cvae_mammo.preprocessing.manifest import (
    PASSTHROUGH_COLUMNS,
    load_metadata,
    original_id,
    safe_id,
)


def test_safe_ids_are_distinct_reversible_and_stay_in_their_folder() -> None:
    texts = ["a/b", "a_b", "a b", "a%2Fb", "乳腺1", "乳房1", "..", ".hidden", "mdb001", "1.2.840"]
    ids = [safe_id(text) for text in texts]
    assert len(set(ids)) == len(texts)
    assert [original_id(i) for i in ids] == texts
    assert ids[1] == "a_b" and ids[-2:] == ["mdb001", "1.2.840"]  # plain ids unchanged
    for encoded in ids:
        assert "/" not in encoded and not encoded.startswith(".")


def test_only_allowed_columns_are_copied_and_dropped_names_are_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    csv = tmp_path / "meta.csv"
    pd.DataFrame({
        "image_id": ["1", "2"], "patient_id": ["p", "p"], "cancer": ["0", "1"],
        "site_id": ["2", "2"], "age": ["61", "61"], "scanner_note": ["a", "b"],
        "dob": ["1960-01-02", "1960-01-02"], "name": ["Jane Doe", "Jane Doe"],
        "Patient Name": ["Doe^Jane", "Doe^Jane"], "patient_birth_date": ["19600102"] * 2,
    }).to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING):
        meta = load_metadata(csv)
    assert meta.passthrough == ["cancer", "site_id", "age"]
    assert set(meta.frame.columns) == {"image_id", "patient_id", "cancer", "site_id", "age"}
    warning = caplog.text
    for column in ("scanner_note", "dob", "name", "Patient Name", "patient_birth_date"):
        assert column in warning
    for value in ("1960", "Jane", "Doe"):
        assert value not in warning
    kept = load_metadata(csv, keep_columns=["scanner_note"])
    assert "scanner_note" in kept.passthrough and "dob" not in kept.frame.columns
    # A named label column is read by the pipeline, so it is kept too.
    assert "site_id" in load_metadata(csv, label_column="site_id").frame.columns
    assert set(PASSTHROUGH_COLUMNS) >= {"BIRADS", "density", "implant", "machine_id"}


def test_one_image_with_two_patients_is_an_error_naming_it(tmp_path: Path) -> None:
    frame = pd.DataFrame({"image_id": ["7", "7", "8", "8"], "patient_id": ["p1", "p2", "p3", "p3"],
                          "label": ["0", "1", "0", "0"]})
    with pytest.raises(InputError, match=r"image 7 is listed with patient_id 'p1' and 'p2'"):
        load_metadata(frame)
    # Several rows that agree (one per finding) are fine: label = maximum.
    agreeing = frame.assign(patient_id=["p1", "p1", "p3", ""])
    assert load_metadata(agreeing).labels == {"7": 1, "8": 0}
    with pytest.raises(InputError, match="image 8 is listed with laterality 'L' and 'R'"):
        load_metadata(agreeing.assign(laterality=["L", "L", "L", "R"]))


def test_metadata_without_patient_id_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_metadata(pd.DataFrame({"image_id": ["1", "2"], "label": ["0", "1"]}))
    assert "no patient_id column" in caplog.text and "its own patient" in caplog.text
