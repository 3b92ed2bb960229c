"""Dataset folders with their splits: :class:`MammoDataset`.

:class:`MammoDataset` opens a dataset folder (``manifest.csv`` + ``splits.csv``),
checks early that the two files agree and that the images exist, and hands out
subsets as DataFrames; :func:`cvae_mammo.data.pipeline.build_pipeline` turns a
subset into batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cvae_mammo.data.metadata import MetadataEncoder, normalise_metadata
from cvae_mammo.data.splits import SPLIT_COLUMNS, SPLIT_NAMES
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike

LOGGER = logging.getLogger(__name__)
MANIFEST_NAME = "manifest.csv"
SPLITS_NAME = "splits.csv"
_ID_DTYPES = {"image_id": str, "patient_id": str, "prediction_id": str}


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: {what} not found")
    try:
        return pd.read_csv(path, dtype=_ID_DTYPES, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: cannot read {what} ({error})") from error


def resolve_splits_path(dataset_dir: PathLike, splits: PathLike = SPLITS_NAME) -> Path:
    """Where a split file is: ``splits`` itself when absolute, else inside ``dataset_dir``.

    The one place a split file name is resolved; the result is absolute, so
    resolving it again gives the same file.
    """
    path = Path(splits)
    return (path if path.is_absolute() else Path(dataset_dir) / path).absolute()


def _examples(values: Sequence[Any], limit: int = 3) -> str:
    shown = ", ".join(str(v) for v in list(values)[:limit])
    return shown + (f" ... ({len(values)} in all)" if len(values) > limit else "")


@dataclass
class MammoDataset:
    """A dataset folder: its normalised manifest joined with one split file.

    ``frame`` holds one row per image with the manifest's columns (normalised
    by :func:`cvae_mammo.data.metadata.normalise_metadata`) plus ``split`` and
    ``fold`` when a split file was read.
    """

    root: Path
    frame: pd.DataFrame
    manifest_path: Path
    splits_path: Path | None

    @classmethod
    def open(
        cls,
        dataset_dir: PathLike,
        splits: PathLike | None = SPLITS_NAME,
        *,
        fold: int | None = None,
        label_column: str = "label",
        check_images: bool = True,
    ) -> MammoDataset:
        """Open ``dataset_dir/manifest.csv`` with a split file and validate them.

        ``splits`` is relative to the folder unless absolute; None opens the
        manifest alone. With ``fold=k`` (K-fold split files) the training rows
        of fold ``k`` become ``val``. Raises :class:`InputError` naming the file
        when the manifest and split file disagree or images are missing.
        """
        root = Path(dataset_dir)
        if not root.is_dir():
            raise InputError(f"{root}: dataset folder not found")
        manifest_path = root / MANIFEST_NAME
        frame = normalise_metadata(_read_csv(manifest_path, "manifest"), label_column)
        split_file = None
        if splits is not None:
            split_file = resolve_splits_path(root, splits)
            if not split_file.is_file():
                raise InputError(f"{split_file}: split file not found "
                                 f"(run `cvae-mammo split {root}` first)")
            frame = _join_splits(frame, _read_csv(split_file, "split file"), split_file, fold)
        if check_images and "path" in frame.columns:
            _check_images(root, frame, manifest_path)
        return cls(root=root, frame=frame.reset_index(drop=True), manifest_path=manifest_path,
                   splits_path=split_file)

    def subset(self, split: str | Sequence[str] | None = None,
               label: int | str | None = None) -> pd.DataFrame:
        """Rows of one split (or several) and one label: 0, 1 or ``"unknown"``; None means all."""
        rows = self.frame
        if split is not None:
            if "split" not in rows.columns:
                raise InputError(f"{self.manifest_path}: opened without a split file; "
                                 "cannot select a split")
            wanted = [split] if isinstance(split, str) else list(split)
            unknown = sorted(set(wanted) - set(SPLIT_NAMES))
            if unknown:
                raise InputError(f"split {', '.join(unknown)} unknown; use {', '.join(SPLIT_NAMES)}")
            rows = rows[rows["split"].isin(wanted)]
        if label is not None:
            if label == "unknown":
                rows = rows[rows["label"].isna()]
            elif label in (0, 1):
                rows = rows[rows["label"] == float(label)]
            else:
                raise InputError(f"label {label!r}: use 0, 1 or 'unknown'")
        return rows.copy()

    def counts(self) -> pd.DataFrame:
        """Images, patients, breasts, positives, negatives and unknown labels per split (+ total)."""
        frame = self.frame if "split" in self.frame.columns else self.frame.assign(split="all")

        def summary(rows: pd.DataFrame) -> dict[str, int]:
            return {
                "images": len(rows),
                "patients": rows["patient_id"].nunique(),
                "breasts": rows["prediction_id"].nunique(),
                "positives": int((rows["label"] == 1).sum()),
                "negatives": int((rows["label"] == 0).sum()),
                "unknown": int(rows["label"].isna().sum()),
            }

        order = [s for s in (*SPLIT_NAMES, "all") if s in set(frame["split"])]
        table = {name: summary(frame[frame["split"] == name]) for name in order}
        if len(order) > 1:
            table["total"] = summary(frame)
        return pd.DataFrame.from_dict(table, orient="index")

    def encoder(self, columns: Sequence[str], numeric: Sequence[str] | None = None) -> MetadataEncoder:
        """A :class:`MetadataEncoder` for ``columns`` fitted on the train split only."""
        return MetadataEncoder(columns, numeric).fit(self.subset(split="train"))


def _join_splits(frame: pd.DataFrame, splits: pd.DataFrame, path: Path,
                 fold: int | None) -> pd.DataFrame:
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    splits = splits[list(SPLIT_COLUMNS)].copy()
    splits["image_id"] = splits["image_id"].astype(str)
    splits["patient_id"] = splits["patient_id"].astype(str)
    if splits["image_id"].duplicated().any():
        raise InputError(f"{path}: image {splits.loc[splits['image_id'].duplicated(), 'image_id'].iloc[0]}"
                         " is listed twice")
    bad_split = sorted(set(splits["split"].astype(str)) - set(SPLIT_NAMES))
    if bad_split:
        raise InputError(f"{path}: unknown split name(s) {', '.join(bad_split)}")
    extra = sorted(set(splits["image_id"]) - set(frame["image_id"]))
    if extra:
        raise InputError(f"{path}: {len(extra)} image(s) not in the manifest: {_examples(extra)} "
                         "(split file from another dataset? rerun `cvae-mammo split`)")
    absent = sorted(set(frame["image_id"]) - set(splits["image_id"]))
    if absent:
        raise InputError(f"{path}: {len(absent)} manifest image(s) have no split: {_examples(absent)} "
                         "(rerun `cvae-mammo split`)")
    joined = frame.merge(splits, on="image_id", how="left", suffixes=("", "_split"))
    mismatch = joined["patient_id"] != joined["patient_id_split"]
    if mismatch.any():
        first = joined[mismatch].iloc[0]
        raise InputError(f"{path}: image {first['image_id']} belongs to patient {first['patient_id']} "
                         f"in the manifest but {first['patient_id_split']} in the split file")
    per_patient = joined.groupby("patient_id")["split"].nunique()
    if (per_patient > 1).any():
        leaking = per_patient[per_patient > 1].index
        raise InputError(f"{path}: patient(s) in more than one split: {_examples(list(leaking))}")
    joined = joined.drop(columns="patient_id_split")
    joined["fold"] = pd.to_numeric(joined["fold"], errors="coerce").fillna(-1).astype("int64")
    if fold is not None:
        folds = sorted(set(joined["fold"]) - {-1})
        if fold not in folds:
            raise InputError(f"{path}: fold {fold} not in the split file (folds: {folds or 'none'})")
        joined.loc[(joined["split"] == "train") & (joined["fold"] == fold), "split"] = "val"
    return joined


def _check_images(root: Path, frame: pd.DataFrame, manifest_path: Path) -> None:
    paths = frame["path"]
    if paths.isna().any():
        raise InputError(f"{manifest_path}: image {frame.loc[paths.isna(), 'image_id'].iloc[0]} "
                         "has no path")
    missing = [p for p in paths.astype(str) if not (root / p).is_file()]
    if missing:
        raise InputError(f"{manifest_path}: {len(missing)} image file(s) listed but not found under "
                         f"{root}: {_examples(missing)}")


