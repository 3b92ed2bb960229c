"""The other breast of the same woman: pairing images for bilateral models and scores.

Radiologists read a woman's two breasts side by side; the bilateral CVAE and the
contralateral scores do the same. An image's *partner* is an image of the same
``patient_id``, of the other ``laterality`` and of the same ``view``. When a
laterality is unknown (blank), any other-laterality-unknown image of the patient
with the same view can be the partner (mini-MIAS pairs: two MLO images per woman).
When a breast has several images of that view (RSNA repeats), the partner is the
first of them by ``image_id``, so pairing is deterministic.

Preprocessing orients every breast with the chest wall on the left, so the two
images of a pair are already mirrored onto each other; their crops to the breast
and the common output size give a coarse (box) alignment.

An image without a partner keeps an empty partner: models fall back to the
unconditional path and outputs flag it (``has_partner`` = 0). This module never
imports TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cvae_mammo.errors import InputError


def _text(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series("", index=frame.index)
    return frame[column].fillna("").astype(str).str.strip().str.upper()


def partner_candidates(frame: pd.DataFrame) -> dict[object, list[object]]:
    """Row index -> indices of every image that can be its partner (sorted by ``image_id``).

    Needs ``patient_id`` and ``image_id``; ``laterality`` and ``view`` are used when present.
    """
    for column in ("patient_id", "image_id"):
        if column not in frame.columns:
            raise InputError(f"pairing needs a {column!r} column (columns: "
                             f"{', '.join(map(str, frame.columns))})")
    side = _text(frame, "laterality")
    view = _text(frame, "view")
    ordered = frame.assign(_side=side, _view=view).sort_values("image_id", kind="stable")
    candidates: dict[object, list[object]] = {index: [] for index in frame.index}
    for _, group in ordered.groupby(["patient_id", "_view"], sort=False):
        for index, own_side in zip(group.index, group["_side"]):
            candidates[index] = [
                other for other, other_side in zip(group.index, group["_side"])
                if other != index and (other_side != own_side or own_side == "")
            ]
    return candidates


def partner_index(frame: pd.DataFrame) -> pd.Series:
    """Row index -> the index of its partner row, or -1 when the image has none."""
    candidates = partner_candidates(frame)
    return pd.Series([candidates[i][0] if candidates[i] else -1 for i in frame.index],
                     index=frame.index, dtype=object)


def with_partners(frame: pd.DataFrame, within: pd.DataFrame | None = None) -> pd.DataFrame:
    """``frame`` plus ``partner_id``, ``partner_path`` (blank when none) and ``has_partner`` (0/1).

    Partners are looked up in ``within`` (default: ``frame`` itself), so a training
    image can be paired with its partner even when that partner is not in ``frame``
    (for instance a normal breast whose partner is abnormal: the partner is still
    a valid condition, only the target must be normal).
    """
    pool = frame if within is None else within
    if within is not None:
        pool = pd.concat([frame, within[~within["image_id"].isin(frame["image_id"])]])
    pool = pool.reset_index(drop=True)
    found = partner_index(pool)
    by_id = dict(zip(pool["image_id"].astype(str), found))
    out = frame.copy()
    partner_rows = [by_id.get(str(image_id), -1) for image_id in frame["image_id"]]
    out["partner_id"] = [str(pool.at[i, "image_id"]) if i != -1 else "" for i in partner_rows]
    if "path" in pool.columns:
        out["partner_path"] = [str(pool.at[i, "path"]) if i != -1 else "" for i in partner_rows]
    out["has_partner"] = np.asarray([int(i != -1) for i in partner_rows], dtype=np.int64)
    return out
