"""The metadata CSV joined on ``image_id``, file-name-safe ids, and ``manifest.csv`` rows.

Metadata columns reach the manifest through an allow-list only: the columns the
pipeline reads (``image_id``, ``patient_id``, ``laterality``, ``view``, the
label column) and :data:`PASSTHROUGH_COLUMNS`, plus any the caller names
explicitly. Everything else (names, birth dates, free text ...) is dropped, with
a warning that lists the dropped column names (never their values).

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cvae_mammo.errors import InputError
from cvae_mammo.fileio import (
    PathLike,
)

log = logging.getLogger(__name__)

#: Metadata columns the pipeline itself reads (besides the label column).
PIPELINE_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "laterality", "view")
#: Documented metadata columns copied into the manifest as given (RSNA's train.csv,
#: mini-MIAS's labels.csv); any other column needs ``keep_columns`` / ``--keep-column``.
PASSTHROUGH_COLUMNS: tuple[str, ...] = (
    "site_id", "machine_id", "age", "density", "implant", "BIRADS", "biopsy", "invasive",
    "difficult_negative_case", "cancer", "label", "background_tissue", "abnormality",
    "severity",
)
#: Columns that say which woman and which breast an image is: rows of one image must agree.
IDENTITY_COLUMNS: tuple[str, ...] = ("patient_id", "laterality", "view")
CORE_COLUMNS = ("image_id", "patient_id", "laterality", "view", "prediction_id", "path", "label")
PROVENANCE_COLUMNS = (
    "source_file", "transfer_syntax", "window_center", "window_width", "voi_function",
    "photometric", "flipped", "laterality_tag_disagrees", "laterality_source",
    "crop_x0", "crop_y0", "crop_x1", "crop_y1", "original_height", "original_width",
    "decode_scale", "pectoral_removed",
)


def safe_id(text: str) -> str:
    """A file-name-safe id that maps back to ``text`` with :func:`original_id`.

    Characters other than ``A-Za-z0-9._-~`` (``/``, spaces, ``%``, non-ASCII
    letters ...) become ``%XX`` escapes of their UTF-8 bytes, and so does a
    leading dot, so distinct texts never share an id (``a/b`` -> ``a%2Fb``,
    ``a_b`` stays) and no id is ``..`` or a hidden file.
    """
    encoded = urllib.parse.quote(str(text), safe="")
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def original_id(safe: str) -> str:
    """The text a :func:`safe_id` was made from."""
    return urllib.parse.unquote(safe, errors="strict")


@dataclasses.dataclass
class Metadata:
    """A metadata table joined on ``image_id``: one row per image, values kept as text.

    The frame is indexed by the ids as written in the CSV (``original_id`` of
    a manifest id) and holds only allowed columns. ``labels`` maps image_id to
    1/0 (absent = unknown); ``passthrough`` lists the columns copied into the
    manifest as given.
    """

    frame: pd.DataFrame
    label_column: str | None
    labels: dict[str, int]
    passthrough: list[str]
    source: str

    def lookup(self, column: str) -> dict[str, str]:
        """``image_id -> value`` of one column (empty when the column is absent)."""
        if column not in self.frame.columns:
            return {}
        return {k: v for k, v in self.frame[column].items() if v != ""}


_TRUE = {"1", "true", "yes", "y", "positive", "pos", "t"}
_FALSE = {"0", "false", "no", "n", "negative", "neg", "f"}


def _parse_label(value: str, column: str, source: str) -> int | None:
    text = value.strip().lower()
    if text in {"", "nan", "na", "none"}:
        return None
    if text in _TRUE or text in _FALSE:
        return int(text in _TRUE)
    try:
        return int(float(text) != 0.0)
    except ValueError:
        raise InputError(f"{source}: label column {column!r} has value {value!r}; "
                         "expected 1/0, true/false or blank") from None


def load_metadata(source: PathLike | pd.DataFrame, label_column: str | None = None,
                  keep_columns: Iterable[str] = ()) -> Metadata:
    """Read a metadata CSV (the RSNA ``train.csv`` as is, or any CSV with ``image_id``).

    The label comes from ``label_column``, else ``label``, else ``cancer`` when
    present. Only allowed columns are kept (see the module docstring;
    ``keep_columns`` adds to :data:`PASSTHROUGH_COLUMNS`); the others are
    dropped with a warning naming them. Several rows for one image are
    collapsed to the first, with the label as the maximum over them; rows of
    one image that disagree on its patient, laterality or view are an
    :class:`InputError` naming the image. Without a ``patient_id`` column a
    warning says that images then take their patient from the folder layout or
    DICOM tags, else become their own patient.
    """
    if isinstance(source, pd.DataFrame):
        frame, name = source.astype(str).replace({"nan": "", "None": "", "<NA>": ""}), "metadata"
    else:
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"{name}: metadata CSV not found")
        try:
            frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
            raise InputError(f"{name}: not a readable CSV ({' '.join(str(error).split())})"
                             ) from error
    frame = frame.rename(columns=lambda c: str(c).strip())
    if "image_id" not in frame.columns:
        raise InputError(f"{name}: metadata needs an image_id column; found "
                         f"{', '.join(frame.columns)}")
    if label_column is None:
        label_column = next((c for c in ("label", "cancer") if c in frame.columns), None)
    elif label_column not in frame.columns:
        raise InputError(f"{name}: label column {label_column!r} not found; columns are "
                         f"{', '.join(frame.columns)}")
    allowed = {*PIPELINE_COLUMNS, *PASSTHROUGH_COLUMNS, *keep_columns, label_column}
    dropped = [c for c in frame.columns if c not in allowed]
    if dropped:
        log.warning("%s: columns not copied (not on the allow-list; name one with "
                    "--keep-column to copy it): %s", name, ", ".join(dropped))
        frame = frame.drop(columns=dropped)
    if "patient_id" not in frame.columns:
        log.warning("%s: no patient_id column: images take their patient from the RSNA folder "
                    "layout or the DICOM PatientID, and any other image becomes its own patient "
                    "(patient-grouped splits then cannot keep a woman's images together)", name)
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame[frame["image_id"] != ""]
    _check_identity(frame, name)
    labels: dict[str, int] = {}
    if label_column:
        for image_id, value in zip(frame["image_id"], frame[label_column]):
            parsed = _parse_label(value, label_column, name)
            if parsed is not None:
                labels[image_id] = max(parsed, labels.get(image_id, 0))
    duplicates = int(frame["image_id"].duplicated().sum())
    if duplicates:
        log.warning("%s: %d extra rows for images already listed; the first row of each is "
                    "used (label = maximum)", name, duplicates)
    frame = frame.drop_duplicates("image_id").set_index("image_id", drop=False)
    reserved = set(CORE_COLUMNS) | set(PROVENANCE_COLUMNS) | {"settings_hash"}
    passthrough = [c for c in frame.columns if c not in reserved]
    return Metadata(frame, label_column, labels, passthrough, name)


def _check_identity(frame: pd.DataFrame, name: str) -> None:
    """Rows of one image must agree on the identity columns (blank values aside)."""
    repeated = frame[frame["image_id"].duplicated(keep=False)]
    for column in (c for c in IDENTITY_COLUMNS if c in frame.columns):
        given = repeated[repeated[column] != ""]
        counts = given.groupby("image_id")[column].nunique()
        if (counts > 1).any():
            image_id = counts[counts > 1].index[0]
            values = sorted(set(given.loc[given["image_id"] == image_id, column]))
            raise InputError(f"{name}: image {image_id} is listed with {column} "
                             f"{' and '.join(map(repr, values))}; one image has one {column} "
                             f"({int((counts > 1).sum())} such image(s))")


def _laterality(value: Any) -> str:
    text = str(value or "").strip().upper()
    return text[0] if text[:1] in {"L", "R"} else ""


def build_manifest(records: Sequence[dict[str, Any]], metadata: Metadata | None) -> pd.DataFrame:
    """Manifest rows (the README's manifest.csv columns) from per-image records joined with the metadata."""
    rows = []
    for record in records:
        image_id = record["image_id"]
        meta = None
        if metadata is not None and original_id(image_id) in metadata.frame.index:
            meta = metadata.frame.loc[original_id(image_id)]
        from_meta = _laterality(meta.get("laterality")) if meta is not None else ""
        from_tag = _laterality(record.get("laterality_tag"))
        from_pixels = "R" if record["flipped"] else "L"
        reference = from_meta or from_tag
        laterality = reference or from_pixels
        view = (str(meta.get("view", "")) if meta is not None else "") or record.get("view_tag", "")
        label = metadata.labels.get(original_id(image_id)) if metadata is not None else None
        row = {
            "image_id": image_id, "patient_id": record["patient_id"], "laterality": laterality,
            "view": view, "prediction_id": f"{record['patient_id']}_{laterality}",
            "path": record["path"], "label": label,
        }
        if metadata is not None:
            row.update({c: (meta[c] if meta is not None else "") for c in metadata.passthrough})
        row.update({c: record.get(c) for c in PROVENANCE_COLUMNS})
        row["laterality_tag_disagrees"] = int(reference != from_pixels) if reference else None
        row["laterality_source"] = ("metadata" if from_meta else "dicom" if from_tag
                                    else "pixels")
        rows.append(row)
    passthrough = metadata.passthrough if metadata is not None else []
    columns = [*CORE_COLUMNS, *passthrough, *PROVENANCE_COLUMNS]
    frame = pd.DataFrame(rows, columns=columns)
    for column in ("label", "laterality_tag_disagrees"):
        frame[column] = frame[column].astype("Int64")
    for column in ("flipped", "pectoral_removed"):
        frame[column] = frame[column].astype(int)
    return frame.sort_values(["patient_id", "image_id"], kind="stable").reset_index(drop=True)


