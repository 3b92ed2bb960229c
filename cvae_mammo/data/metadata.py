"""Metadata normalisation and the conditioning-vector encoder.

:func:`normalise_metadata` turns an RSNA ``train.csv`` or a generic manifest
into one vocabulary: string ids, laterality ``L``/``R``/blank, upper-case
views with rare ones (anything but CC and MLO) kept and flagged in
``view_rare``, density ``A``-``D`` or ``unknown``, ``implant`` 0/1, numeric
``age`` with ``age_missing``, a ``label`` column (RSNA ``cancer`` when no
``label`` is given) and ``prediction_id`` per breast.

:class:`MetadataEncoder` is fitted on the training split only and turns
chosen columns into a float conditioning vector: categorical columns are
one-hot over the categories seen in training (unseen or missing values give
all zeros), numeric columns are imputed with the training median (recorded
in ``fill_``) and standardised with the training mean and spread. It
round-trips through JSON; nothing is pickled.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_json, read_json

#: Views every screening exam has; anything else (AT, LM, ML, LMO, XCCL ...) is flagged rare.
STANDARD_VIEWS: tuple[str, ...] = ("CC", "MLO")
#: Density categories after normalisation.
DENSITY_CATEGORIES: tuple[str, ...] = ("A", "B", "C", "D", "unknown")
#: Columns encoded as numbers (imputed and standardised) unless told otherwise.
NUMERIC_COLUMNS: frozenset[str] = frozenset({"age"})

_LATERALITY = {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}
_VIEW_ALIASES = {"MEDIOLATERAL OBLIQUE": "MLO", "CRANIOCAUDAL": "CC", "CRANIO-CAUDAL": "CC"}
_DENSITY_ALIASES = {"1": "A", "2": "B", "3": "C", "4": "D"}
_TRUE = {"1", "1.0", "TRUE", "YES", "Y", "T"}
_FALSE = {"0", "0.0", "FALSE", "NO", "N", "F"}


def _id_text(values: pd.Series) -> pd.Series:
    """Ids as strings, with float artefacts such as ``10006.0`` removed."""

    def one(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value).strip()

    return values.map(one).astype(object)


def _blank(values: pd.Series) -> pd.Series:
    """Upper-case stripped strings with missing values as ``""``."""
    return values.map(lambda v: "" if pd.isna(v) else str(v).strip().upper()).astype(object)


def normalise_laterality(values: pd.Series) -> pd.Series:
    """``L``/``R`` for left/right in any spelling, ``""`` for missing or unknown."""
    return _blank(values).map(lambda v: _LATERALITY.get(v, "")).astype(object)


def normalise_view(values: pd.Series) -> pd.Series:
    """Upper-case view codes; spelled-out CC/MLO mapped to their codes, other views kept."""
    return _blank(values).map(lambda v: _VIEW_ALIASES.get(v, v)).astype(object)


def normalise_density(values: pd.Series) -> pd.Series:
    """BI-RADS density ``A``-``D`` (1-4 accepted), anything else ``unknown``."""

    def one(v: str) -> str:
        v = _DENSITY_ALIASES.get(v.removesuffix(".0"), v)
        return v if v in DENSITY_CATEGORIES[:4] else "unknown"

    return _blank(values).map(one).astype(object)


def normalise_flag(values: pd.Series, column: str) -> pd.Series:
    """0/1 from booleans, numbers or yes/no text; missing becomes 0. Other text is an error."""

    def one(v: str) -> int:
        if v == "" or v in _FALSE:
            return 0
        if v in _TRUE:
            return 1
        raise InputError(f"column {column!r}: cannot read {v!r} as a yes/no flag")

    return _blank(values).map(one).astype("int64")


def normalise_label(values: pd.Series, column: str = "label") -> pd.Series:
    """Float labels: 1.0 positive, 0.0 negative, NaN unknown. Other values are an error."""
    numeric = pd.to_numeric(values.map(lambda v: np.nan if pd.isna(v) or v == "" else v),
                            errors="coerce").astype("float64")
    bad = values[numeric.isna() & values.notna() & (values.astype(str).str.strip() != "")]
    if len(bad):
        raise InputError(f"column {column!r}: label {str(bad.iloc[0])!r} is not 0, 1 or blank")
    wrong = numeric[numeric.notna() & ~numeric.isin([0.0, 1.0])]
    if len(wrong):
        raise InputError(f"column {column!r}: label {str(values.loc[wrong.index[0]])!r} is not 0, 1 or blank")
    return numeric


def prediction_ids(patient_id: pd.Series, laterality: pd.Series, image_id: pd.Series) -> pd.Series:
    """``patient_id + "_" + laterality``; an image without laterality is its own breast.

    Without laterality two images of one woman cannot be assigned to a breast,
    so they are kept apart (``patient_id + "_" + image_id``) rather than merged.
    """
    known = laterality != ""
    return pd.Series(
        np.where(known, patient_id + "_" + laterality, patient_id + "_" + image_id),
        index=patient_id.index, dtype=object,
    )


def normalise_metadata(frame: pd.DataFrame, label_column: str = "label") -> pd.DataFrame:
    """Return a copy of ``frame`` in the project's metadata vocabulary (see module docstring).

    ``label_column`` names the label; when it is absent and RSNA ``cancer`` is
    present, ``cancer`` is used. The result always has a ``label`` column
    (all NaN when the data has no labels). Unknown columns pass through.
    """
    for required in ("image_id", "patient_id"):
        if required not in frame.columns:
            raise InputError(f"metadata has no {required!r} column (columns: {', '.join(map(str, frame.columns))})")
    out = frame.copy()
    out["image_id"] = _id_text(out["image_id"])
    out["patient_id"] = _id_text(out["patient_id"])
    if (out["image_id"] == "").any():
        raise InputError("metadata: some rows have an empty image_id")
    if (out["patient_id"] == "").any():
        first = out.loc[out["patient_id"] == "", "image_id"].iloc[0]
        raise InputError(f"metadata: image {first} has an empty patient_id")
    duplicated = out["image_id"].duplicated()
    if duplicated.any():
        raise InputError(f"metadata: image_id {out.loc[duplicated, 'image_id'].iloc[0]} appears twice")

    source = label_column if label_column in out.columns else None
    if source is None and "cancer" in out.columns:
        source = "cancer"
    out["label"] = (normalise_label(out[source], source) if source
                    else pd.Series(np.nan, index=out.index, dtype="float64"))

    out["laterality"] = normalise_laterality(out.get("laterality", pd.Series("", index=out.index)))
    if "view" in out.columns:
        out["view"] = normalise_view(out["view"])
        out["view_rare"] = ~out["view"].isin(STANDARD_VIEWS) & (out["view"] != "")
    else:
        out["view"] = ""
        out["view_rare"] = False
    if "density" in out.columns:
        out["density"] = normalise_density(out["density"])
    if "implant" in out.columns:
        out["implant"] = normalise_flag(out["implant"], "implant")
    if "age" in out.columns:
        out["age"] = pd.to_numeric(out["age"], errors="coerce").astype("float64")
        out["age_missing"] = out["age"].isna()
    existing = out["prediction_id"] if "prediction_id" in out.columns else None
    computed = prediction_ids(out["patient_id"], out["laterality"], out["image_id"])
    if existing is not None:
        existing = _id_text(existing)
        # "patient_" was built from a blank laterality: it would merge both breasts
        usable = (existing != "") & (existing != out["patient_id"] + "_")
        out["prediction_id"] = existing.where(usable, computed)
    else:
        out["prediction_id"] = computed
    return out


def _is_numeric(frame: pd.DataFrame, column: str) -> bool:
    if column in NUMERIC_COLUMNS:
        return True
    series = frame[column]
    return pd.api.types.is_float_dtype(series) and series.nunique(dropna=True) > 10


class MetadataEncoder:
    """Metadata columns -> float32 conditioning vector, fitted on the training split.

    ``columns``: names to encode, in order. ``numeric``: columns to treat as
    numbers (default: ``age`` and float columns with more than 10 values);
    every other column is one-hot over its training categories. Fitted
    attributes end in ``_``.
    """

    def __init__(self, columns: Sequence[str], numeric: Iterable[str] | None = None) -> None:
        if not columns:
            raise InputError("MetadataEncoder: give at least one metadata column")
        self.columns = tuple(columns)
        self.numeric = None if numeric is None else tuple(numeric)
        self.categories_: dict[str, list[str]] = {}
        self.fill_: dict[str, float] = {}
        self.mean_: dict[str, float] = {}
        self.scale_: dict[str, float] = {}
        self.fitted_on_: int = 0

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise InputError(f"conditioning column(s) {', '.join(missing)} not in the metadata "
                             f"(available: {', '.join(map(str, frame.columns))})")

    def fit(self, train: pd.DataFrame) -> MetadataEncoder:
        """Learn categories, imputation values and scales from the TRAINING rows only."""
        self._check_columns(train)
        if len(train) == 0:
            raise InputError("MetadataEncoder.fit: the training frame is empty")
        numeric = set(self.numeric) if self.numeric is not None else {
            c for c in self.columns if _is_numeric(train, c)}
        self.categories_, self.fill_, self.mean_, self.scale_ = {}, {}, {}, {}
        for column in self.columns:
            if column in numeric:
                values = pd.to_numeric(train[column], errors="coerce").astype("float64")
                known = values.dropna()
                fill = float(known.median()) if len(known) else 0.0
                filled = values.fillna(fill)
                spread = float(filled.std(ddof=0)) if len(filled) > 1 else 0.0
                self.fill_[column] = fill
                self.mean_[column] = float(filled.mean())
                self.scale_[column] = spread if spread > 0 else 1.0
            else:
                self.categories_[column] = sorted({str(v) for v in _category_text(train[column])} - {""})
        self.fitted_on_ = len(train)
        return self

    @property
    def feature_names_(self) -> list[str]:
        """One name per vector entry: ``column=category`` or ``column``."""
        names: list[str] = []
        for column in self.columns:
            if column in self.categories_:
                names += [f"{column}={category}" for category in self.categories_[column]]
            else:
                names.append(column)
        return names

    @property
    def dim(self) -> int:
        """Length of the conditioning vector."""
        return len(self.feature_names_)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode ``frame`` as a ``[len(frame), dim]`` float32 array."""
        if not self.fitted_on_:
            raise RuntimeError("MetadataEncoder: call fit() before transform()")
        self._check_columns(frame)
        blocks: list[np.ndarray] = []
        for column in self.columns:
            if column in self.categories_:
                text = _category_text(frame[column]).to_numpy()
                categories = np.asarray(self.categories_[column], dtype=object)
                blocks.append((text[:, None] == categories[None, :]).astype(np.float32))
            else:
                values = pd.to_numeric(frame[column], errors="coerce").astype("float64")
                values = values.fillna(self.fill_[column]).to_numpy()
                scaled = (values - self.mean_[column]) / self.scale_[column]
                blocks.append(scaled.astype(np.float32)[:, None])
        if not blocks:
            return np.zeros((len(frame), 0), np.float32)
        return np.concatenate(blocks, axis=1)

    def fit_transform(self, train: pd.DataFrame) -> np.ndarray:
        """``fit(train).transform(train)``."""
        return self.fit(train).transform(train)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description of the fitted encoder."""
        return {
            "columns": list(self.columns),
            "numeric": None if self.numeric is None else list(self.numeric),
            "categories": self.categories_,
            "fill": self.fill_,
            "mean": self.mean_,
            "scale": self.scale_,
            "fitted_on": self.fitted_on_,
            "feature_names": self.feature_names_,
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MetadataEncoder:
        """Rebuild an encoder written by :meth:`to_dict`."""
        try:
            encoder = cls(values["columns"], values.get("numeric"))
            encoder.categories_ = {k: list(v) for k, v in values["categories"].items()}
            encoder.fill_ = {k: float(v) for k, v in values["fill"].items()}
            encoder.mean_ = {k: float(v) for k, v in values["mean"].items()}
            encoder.scale_ = {k: float(v) for k, v in values["scale"].items()}
            encoder.fitted_on_ = int(values["fitted_on"])
        except (KeyError, TypeError, AttributeError) as error:
            raise InputError(f"metadata encoder description is incomplete ({error!r})") from error
        return encoder

    def save(self, path: PathLike) -> None:
        """Write the fitted encoder as JSON atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> MetadataEncoder:
        """Read an encoder written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: metadata encoder file not found")
        return cls.from_dict(read_json(path))

    def __repr__(self) -> str:
        state = f"dim={self.dim}" if self.fitted_on_ else "unfitted"
        return f"MetadataEncoder(columns={list(self.columns)}, {state})"


def _category_text(values: pd.Series) -> pd.Series:
    """Categorical values as text with ``""`` for missing (ints without ``.0``)."""
    return _id_text(values)


def impute_from_train(frame: pd.DataFrame, train: pd.DataFrame,
                      column: str = "age") -> tuple[pd.DataFrame, float]:
    """Fill missing ``column`` values in ``frame`` with the median of ``train`` (the training split).

    Returns the filled copy and the value used, which the caller records in
    its run config; ``<column>_missing`` keeps track of the rows that were filled.
    """
    if column not in frame.columns or column not in train.columns:
        raise InputError(f"column {column!r} not in the metadata; cannot impute it")
    known = pd.to_numeric(train[column], errors="coerce").dropna()
    if known.empty:
        raise InputError(f"column {column!r}: no training row has a value to impute from")
    value = float(known.median())
    out = frame.copy()
    numeric = pd.to_numeric(out[column], errors="coerce")
    out[f"{column}_missing"] = numeric.isna()
    out[column] = numeric.fillna(value)
    return out, value
