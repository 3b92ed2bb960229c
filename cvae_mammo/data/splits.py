"""Patient-grouped, stratified, seeded train/val/test splits and K folds.

Every patient goes to exactly one split. Patients are stratified by their
label (positive if any image is positive, negative, or unknown when none is
labelled) and optionally by other columns (the patient's most frequent value).
Within each stratum the patients are shuffled with the seed and assigned by
systematic sampling from a random start, so each split receives its share of
every stratum to within one patient.

The result is a frame ``image_id, patient_id, split, fold``: with
``folds=K`` the non-test patients are ``train`` with ``fold`` 0..K-1 (use one
fold as validation); otherwise ``fold`` is -1.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cvae_mammo.data.metadata import normalise_label
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_csv

SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "split", "fold")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def _patient_table(frame: pd.DataFrame, label_column: str, stratify: Sequence[str]) -> pd.DataFrame:
    """One row per patient: its stratum key (label class + extra columns)."""
    grouped = frame.groupby("patient_id", sort=True)
    patients = pd.DataFrame(index=grouped.size().index)
    if label_column in frame.columns:
        labels = normalise_label(frame[label_column], label_column)
        per_patient = labels.groupby(frame["patient_id"]).max()
        patients["label_class"] = per_patient.map(
            lambda v: "unknown" if pd.isna(v) else ("pos" if v == 1 else "neg"))
    else:
        patients["label_class"] = "unknown"
    key = patients["label_class"].astype(str)
    for column in stratify:
        if column not in frame.columns:
            raise InputError(f"stratify column {column!r} is not in the manifest "
                             f"(columns: {', '.join(map(str, frame.columns))})")
        text = frame[column].astype(str).where(frame[column].notna(), "")
        mode = text.groupby(frame["patient_id"]).agg(lambda v: v.value_counts().index[0])
        key = key + "|" + mode.reindex(patients.index).astype(str)
    patients["stratum"] = key
    return patients


def _systematic(n: int, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Bucket index for ``n`` shuffled items so bucket ``k`` gets ``fractions[k]`` of them (+-1)."""
    edges = np.cumsum(fractions)
    positions = (np.arange(n) + rng.random()) / n
    return np.minimum(np.searchsorted(edges, positions, side="right"), len(fractions) - 1)


def make_splits(
    frame: pd.DataFrame,
    *,
    val: float = 0.15,
    test: float = 0.15,
    folds: int | None = None,
    seed: int = 0,
    stratify: Sequence[str] = (),
    label_column: str = "label",
) -> pd.DataFrame:
    """Assign every image's patient to one split; see the module docstring.

    ``val``/``test`` are patient fractions (``val`` is ignored with ``folds``).
    Raises :class:`InputError` when the data has positive labels but too few
    positive patients to give every held-out split (or fold) at least one.
    """
    for required in ("image_id", "patient_id"):
        if required not in frame.columns:
            raise InputError(f"manifest has no {required!r} column")
    if frame.empty:
        raise InputError("manifest has no rows to split")
    if folds is not None:
        if folds < 2:
            raise InputError(f"--folds {folds}: need at least 2 folds")
        val = 0.0
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise InputError(f"split fractions val={val}, test={test}: each in [0, 1) and sum below 1")
    ids = frame[["image_id", "patient_id"]].astype(str)
    work = frame.assign(image_id=ids["image_id"], patient_id=ids["patient_id"])
    patients = _patient_table(work, label_column, stratify)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(patients))
    patients = patients.iloc[order]

    buckets = ["train", "val", "test"]
    fractions = [1.0 - val - test, val, test]
    patients["split"] = "train"
    patients["fold"] = -1
    for _stratum, members in patients.groupby("stratum", sort=True):
        chosen = _systematic(len(members), fractions, rng)
        patients.loc[members.index, "split"] = [buckets[i] for i in chosen]
        if folds is not None:
            train = members.index[chosen == 0]
            fold = (np.arange(len(train)) + rng.integers(folds)) % folds
            patients.loc[train, "fold"] = fold

    _ensure_positives(patients, val=val, test=test, folds=folds, rng=rng)
    splits = work[["image_id", "patient_id"]].copy()
    splits["split"] = splits["patient_id"].map(patients["split"])
    splits["fold"] = splits["patient_id"].map(patients["fold"]).astype("int64")
    return splits.reset_index(drop=True)[list(SPLIT_COLUMNS)]


def _ensure_positives(patients: pd.DataFrame, *, val: float, test: float, folds: int | None,
                      rng: np.random.Generator) -> None:
    """Give every held-out split / fold a positive patient, or fail with a clear message."""
    positive = patients["label_class"] == "pos"
    n_positive = int(positive.sum())
    if n_positive == 0:
        return
    groups: list[tuple[str, int]] = [(name, -1) for name, f in (("val", val), ("test", test)) if f > 0]
    if folds is not None:
        groups += [("train", k) for k in range(folds)]
    needed = len(groups) + (0 if folds is not None else 1)
    if n_positive < needed:
        wanted = " and ".join(
            f"fold {k}" if k >= 0 else name for name, k in groups) or "the held-out splits"
        raise InputError(
            f"only {n_positive} positive patient(s): cannot give {wanted} a positive patient each "
            f"and keep one for training (need {needed}); use fewer folds, smaller held-out "
            "splits or more positive data")
    for name, k in groups:
        in_group = (patients["split"] == name) & (patients["fold"] == k)
        if (in_group & positive).any():
            continue
        # take a positive from the group that has the most, keeping train's share first
        donors = patients[positive & ~in_group]
        counts = donors.groupby(["split", "fold"]).size()
        richest = counts.idxmax()
        if counts.max() < 2:
            raise InputError(f"only {n_positive} positive patient(s): cannot give "
                             f"{'fold ' + str(k) if k >= 0 else name} a positive patient")
        pool = donors[(donors["split"] == richest[0]) & (donors["fold"] == richest[1])].index
        moved = pool[rng.integers(len(pool))]
        patients.loc[moved, ["split", "fold"]] = [name, k]


def write_splits(splits: pd.DataFrame, path: PathLike) -> Path:
    """Write ``splits.csv`` atomically; returns the path written."""
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise InputError(f"splits frame lacks column(s) {', '.join(missing)}")
    path = Path(path)
    atomic_write_csv(path, splits[list(SPLIT_COLUMNS)])
    return path


def split_summary(frame: pd.DataFrame, splits: pd.DataFrame, label_column: str = "label") -> pd.DataFrame:
    """Images, patients, positives and positive rate per split (and fold, when folds are used)."""
    merged = splits.merge(frame[["image_id"] + ([label_column] if label_column in frame else [])]
                          .astype({"image_id": str}), on="image_id", how="left")
    keys = ["split", "fold"] if (merged["fold"] >= 0).any() else ["split"]
    labels = (normalise_label(merged[label_column], label_column) if label_column in merged
              else pd.Series(np.nan, index=merged.index))
    merged = merged.assign(_pos=(labels == 1).astype(int), _known=labels.notna().astype(int))
    table = merged.groupby(keys).agg(images=("image_id", "size"), patients=("patient_id", "nunique"),
                                     positives=("_pos", "sum"), labelled=("_known", "sum"))
    table["positive_rate"] = (table["positives"] / table["labelled"].where(table["labelled"] > 0)).round(4)
    return table
