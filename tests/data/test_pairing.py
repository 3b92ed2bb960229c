"""Pairing each image with the other breast of the same woman (same view)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cvae_mammo.data.pairing import partner_candidates, partner_index, with_partners
from cvae_mammo.errors import InputError


def _rsna_like() -> pd.DataFrame:
    """Patient 1: two L-CC repeats, L-MLO, R-CC, R-MLO; patient 2: R-CC only; 3: unknown sides."""
    return pd.DataFrame({
        "image_id": ["12", "11", "13", "14", "15", "21", "31", "32"],
        "patient_id": ["1", "1", "1", "1", "1", "2", "3", "3"],
        "laterality": ["L", "L", "L", "R", "R", "R", "", ""],
        "view": ["CC", "CC", "MLO", "CC", "mlo", "CC", "MLO", "MLO"],
        "path": [f"images/{i}.png" for i in ("12", "11", "13", "14", "15", "21", "31", "32")],
    })


def test_partner_is_the_other_side_same_view_and_the_first_repeat_by_image_id() -> None:
    frame = _rsna_like()
    candidates = partner_candidates(frame)
    ids = frame["image_id"]
    named = {ids[i]: sorted(ids[j] for j in found) for i, found in candidates.items()}
    assert named["14"] == ["11", "12"]          # R-CC against both L-CC repeats
    assert named["11"] == named["12"] == ["14"]
    assert named["13"] == ["15"] and named["15"] == ["13"]  # view compared case-insensitively
    assert named["21"] == []                    # no left breast imaged
    assert named["31"] == ["32"] and named["32"] == ["31"]  # mini-MIAS-like pair, sides unknown
    first = partner_index(frame)
    assert ids[first[3]] == "11"                # deterministic: lowest image_id of the repeats


def test_with_partners_flags_a_missing_partner_and_can_look_beyond_the_frame() -> None:
    frame = _rsna_like()
    paired = with_partners(frame).set_index("image_id")
    assert paired.loc["14", "partner_id"] == "11"
    assert paired.loc["14", "partner_path"] == "images/11.png"
    assert paired.loc["21", "has_partner"] == 0 and paired.loc["21", "partner_path"] == ""
    assert paired["has_partner"].sum() == 7
    alone = frame[frame["image_id"] == "15"]
    assert with_partners(alone).iloc[0]["has_partner"] == 0
    found = with_partners(alone, within=frame).iloc[0]
    assert (found["partner_id"], found["has_partner"]) == ("13", 1)


def test_pairing_needs_ids() -> None:
    with pytest.raises(InputError, match="patient_id"):
        partner_candidates(pd.DataFrame({"image_id": ["a"]}))


def test_real_rsna_metadata_pairs_most_breasts(rsna_train_csv: Path) -> None:
    frame = pd.read_csv(rsna_train_csv, dtype={"image_id": str, "patient_id": str})
    paired = with_partners(frame)
    share = paired["has_partner"].mean()
    assert 0.9 < share < 1.0  # a few breasts have no same-view image on the other side
    rows = paired.set_index("image_id")
    for _, row in rows[rows["has_partner"] == 1].head(200).iterrows():
        partner = rows.loc[row["partner_id"]]
        assert partner["patient_id"] == row["patient_id"]
        assert partner["laterality"] != row["laterality"] and partner["view"] == row["view"]
