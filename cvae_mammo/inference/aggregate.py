"""Per-breast aggregation of image scores to ``prediction_id`` (patient_laterality).

Screening is scored per breast: the images of one breast (CC, MLO, extra
views) are pooled into one score, and the breast is positive when any of its
images is. Works on any model's scores; nothing here imports TensorFlow.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

LOGGER = logging.getLogger(__name__)

#: Pooling rules: ``soft-or`` is ``1 - (1 - mean(p^2))^n`` over the ``n`` images
#: of a breast (needs scores in [0, 1]); ``mean`` and ``max`` work on any scale.
AGGREGATIONS: tuple[str, ...] = ("mean", "max", "soft-or")


def check_aggregation(method: str) -> str:
    """Return ``method`` if it is a known aggregation, else raise a ValueError naming the choices."""
    if method not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {method!r}; choose one of {', '.join(AGGREGATIONS)}")
    return method


def breast_ids(frame: pd.DataFrame, id_column: str = "prediction_id") -> pd.Series:
    """The breast id of each row; rows without one count as a breast of their own (image_id)."""
    ids = frame[id_column].astype("string") if id_column in frame else None
    if ids is None:
        raise ValueError(f"no {id_column!r} column to aggregate by")
    missing = ids.isna() | (ids.str.strip() == "")
    if missing.any():
        if "image_id" not in frame:
            raise ValueError(f"{int(missing.sum())} rows have no {id_column} and no image_id")
        LOGGER.warning("%d images have no %s; each counts as a breast of its own",
                       int(missing.sum()), id_column)
        ids = ids.where(~missing, frame["image_id"].astype("string"))
    return ids


def aggregate_breasts(frame: pd.DataFrame, method: str = "mean", score_column: str = "score",
                      label_column: str = "label",
                      id_column: str = "prediction_id") -> pd.DataFrame:
    """Pool image rows into one row per breast.

    Returns columns ``prediction_id``, ``patient_id`` (when the input has it),
    ``score`` (pooled ``score_column``), ``label`` (the maximum known label of
    the breast's images, NaN when none is known; only when the input has
    ``label_column``) and ``n_images``, sorted by ``prediction_id``.
    """
    check_aggregation(method)
    if score_column not in frame:
        raise ValueError(f"no {score_column!r} column to aggregate")
    scores = pd.to_numeric(frame[score_column], errors="coerce").to_numpy(dtype=float)
    if not np.isfinite(scores).all():
        raise ValueError(f"column {score_column!r} has missing or non-finite scores")
    if method == "soft-or" and (scores.min() < 0.0 or scores.max() > 1.0):
        raise ValueError("aggregation 'soft-or' needs scores in [0, 1] (probabilities or "
                         f"normalised scores); {score_column!r} spans "
                         f"[{scores.min():.4g}, {scores.max():.4g}]")
    work = pd.DataFrame({"prediction_id": breast_ids(frame, id_column).to_numpy(),
                         "score": scores})
    if "patient_id" in frame:
        work["patient_id"] = frame["patient_id"].astype("string").to_numpy()
    if label_column in frame:
        work["label"] = pd.to_numeric(frame[label_column], errors="coerce").to_numpy()
    work["squared"] = scores**2
    grouped = work.groupby("prediction_id", sort=True)
    n_images = grouped.size()
    if method == "mean":
        pooled = grouped["score"].mean()
    elif method == "max":
        pooled = grouped["score"].max()
    else:
        pooled = 1.0 - (1.0 - grouped["squared"].mean()) ** n_images
    result = pd.DataFrame({"score": pooled, "n_images": n_images})
    if "patient_id" in work:
        patients = grouped["patient_id"].nunique(dropna=False)
        if (patients > 1).any():
            bad = patients[patients > 1].index[0]
            raise ValueError(f"breast {bad!r} has images of several patients")
        result["patient_id"] = grouped["patient_id"].first()
    if "label" in work:
        result["label"] = grouped["label"].max()
    result = result.reset_index()
    order = [c for c in ("prediction_id", "patient_id", "score", "label", "n_images")
             if c in result]
    return result[order]
