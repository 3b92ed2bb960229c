"""The metadata CSV joined on ``image_id``, and ``manifest.csv`` rows from per-image records.

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from cvae_mammo.errors import InputError
from cvae_mammo.fileio import (
    PathLike,
)

log = logging.getLogger(__name__)

#: Metadata columns never copied into the manifest (identifying DICOM attributes).
IDENTIFYING_COLUMNS = frozenset(
    name.lower() for name in (
        "PatientName", "PatientBirthDate", "PatientBirthTime", "PatientAddress",
        "AccessionNumber", "StudyDate", "StudyTime", "AcquisitionDate", "ContentDate",
        "SeriesDate", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
        "PerformingPhysicianName", "OperatorsName", "OtherPatientIDs", "OtherPatientNames",
        "PatientTelephoneNumbers", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
        "DeviceSerialNumber", "StationName", "patient_name", "birth_date", "accession_number",
    )
)
CORE_COLUMNS = ("image_id", "patient_id", "laterality", "view", "prediction_id", "path", "label")
PROVENANCE_COLUMNS = (
    "source_file", "transfer_syntax", "window_center", "window_width", "voi_function",
    "photometric", "flipped", "laterality_tag_disagrees", "laterality_source",
    "crop_x0", "crop_y0", "crop_x1", "crop_y1", "original_height", "original_width",
    "decode_scale", "pectoral_removed",
)


@dataclasses.dataclass
class Metadata:
    """A metadata table joined on ``image_id``: one row per image, values kept as text.

    ``labels`` maps image_id to 1/0 (absent = unknown); ``passthrough`` lists
    the columns copied into the manifest as given.
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


def load_metadata(source: PathLike | pd.DataFrame, label_column: str | None = None) -> Metadata:
    """Read a metadata CSV (the RSNA ``train.csv`` as is, or any CSV with ``image_id``).

    The label comes from ``label_column``, else ``label``, else ``cancer`` when
    present. Identifying columns (patient names, dates, accession numbers,
    UIDs ...) are dropped. Several rows for one image are collapsed to the
    first, with the label as the maximum over them.
    """
    if isinstance(source, pd.DataFrame):
        frame, name = source.astype(str).replace({"nan": "", "None": "", "<NA>": ""}), "metadata"
    else:
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"{name}: metadata CSV not found")
        try:
            frame = pd.read_csv(source, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, UnicodeDecodeError) as error:
            raise InputError(f"{name}: not a readable CSV ({error})") from error
    frame = frame.rename(columns=lambda c: str(c).strip())
    if "image_id" not in frame.columns:
        raise InputError(f"{name}: metadata needs an image_id column; found "
                         f"{', '.join(frame.columns)}")
    dropped = [c for c in frame.columns if c.lower() in IDENTIFYING_COLUMNS]
    if dropped:
        log.warning("%s: identifying columns not copied: %s", name, ", ".join(dropped))
        frame = frame.drop(columns=dropped)
    frame = frame.apply(lambda column: column.str.strip())
    frame = frame[frame["image_id"] != ""]
    if label_column is None:
        label_column = next((c for c in ("label", "cancer") if c in frame.columns), None)
    elif label_column not in frame.columns:
        raise InputError(f"{name}: label column {label_column!r} not found; columns are "
                         f"{', '.join(frame.columns)}")
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



def _laterality(value: Any) -> str:
    text = str(value or "").strip().upper()
    return text[0] if text[:1] in {"L", "R"} else ""


def build_manifest(records: Sequence[dict[str, Any]], metadata: Metadata | None) -> pd.DataFrame:
    """Manifest rows (DESIGN.md columns) from per-image records joined with the metadata."""
    rows = []
    for record in records:
        image_id = record["image_id"]
        meta = None
        if metadata is not None and image_id in metadata.frame.index:
            meta = metadata.frame.loc[image_id]
        from_meta = _laterality(meta.get("laterality")) if meta is not None else ""
        from_tag = _laterality(record.get("laterality_tag"))
        from_pixels = "R" if record["flipped"] else "L"
        reference = from_meta or from_tag
        laterality = reference or from_pixels
        view = (str(meta.get("view", "")) if meta is not None else "") or record.get("view_tag", "")
        label = metadata.labels.get(image_id) if metadata is not None else None
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


