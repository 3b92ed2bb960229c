"""Mammograms (DICOM / PNG / PGM / TIFF / JPEG) -> a clean dataset folder.

One image (:func:`preprocess_image`): decode (JPEG 2000 at the coarsest
resolution level that still gives the output resolution after the crop),
window to [0, 1] with tissue bright, find the breast on a thumbnail
(:mod:`cvae_mammo.breast`), flip so the chest wall is on the left, crop with
a margin, optionally mask the pectoral muscle, resize and quantise.

A dataset (:func:`preprocess_dataset`): a process pool over the inputs,
``images/<patient_id>/<image_id>.png`` written atomically, one provenance
record per image in ``records/`` (written after its PNG, so a killed run
resumes where it stopped), then ``manifest.csv``, ``failures.csv``,
``unmatched.csv`` (metadata rows without image and images without metadata
row) and ``preprocess.json`` (settings, summary, package versions).

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cvae_mammo.breast import BreastRegion, locate_breast, pectoral_mask
from cvae_mammo.config import DEFAULT_IMAGE_SIZE, ConfigBase, parse_image_size
from cvae_mammo.dicom import (
    DicomImage,
    WindowChoice,
    choose_window,
    is_dicom_file,
    read_dicom,
    rescale,
)
from cvae_mammo.errors import ImageReadError, InputError
from cvae_mammo.fileio import (
    PathLike,
    atomic_write_csv,
    atomic_write_json,
    package_versions,
    read_json,
)
from cvae_mammo.imageio import IMAGE_SUFFIXES, read_grayscale, write_png

log = logging.getLogger(__name__)

#: Side of the thumbnail the breast is located on (pixels, longest side).
THUMBNAIL_SIDE = 512
#: Crop boxes are aligned to this many original pixels, so every JPEG 2000 level crops alike.
BOX_ALIGN = 8
#: Views treated as MLO for pectoral-muscle masking (blank = unknown, also masked).
MLO_VIEWS = frozenset({"MLO", "ML", "LMO", "LM", "XCCL_MLO", ""})
#: Config fields that do not change the pixels (excluded from the settings hash).
_NON_PIXEL_FIELDS = frozenset({"label_column"})
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
class PreprocessConfig(ConfigBase):
    """Settings of the preprocessing (all but ``label_column`` change the output pixels).

    ``image_size`` is (height, width); ``resize`` is ``stretch`` or
    ``keep-aspect`` (scaled to fit, chest wall on the left, padded with 0);
    ``bits`` 8 or 16; ``window_index`` picks one of several DICOM window
    pairs; ``crop_margin`` is a fraction of the breast's size;
    ``mask_background`` zeroes pixels outside the breast mask inside the crop;
    ``reduced_resolution`` allows decoding JPEG 2000 below full resolution;
    ``percentiles`` is the range used when a DICOM has no window.
    """

    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    bits: int = 8
    resize: str = "stretch"
    window_index: int = 0
    remove_pectoral: bool = False
    crop_margin: float = 0.02
    mask_background: bool = True
    reduced_resolution: bool = True
    percentiles: tuple[float, float] = (0.5, 99.5)
    label_column: str | None = None

    def __post_init__(self) -> None:
        try:
            self.image_size = parse_image_size(self.image_size)
        except ValueError as error:
            raise InputError(str(error)) from error
        if self.bits not in (8, 16):
            raise InputError(f"bits must be 8 or 16, got {self.bits}")
        if self.resize not in ("stretch", "keep-aspect"):
            raise InputError(f"resize must be 'stretch' or 'keep-aspect', got {self.resize!r}")
        if not 0.0 <= self.crop_margin < 0.5:
            raise InputError(f"crop_margin must be in [0, 0.5), got {self.crop_margin}")
        if self.window_index < 0:
            raise InputError(f"window_index must be >= 0, got {self.window_index}")

    def settings_hash(self) -> str:
        """Short hash of the pixel-affecting settings; resume skips images with the same hash."""
        values = {k: v for k, v in self.to_dict().items() if k not in _NON_PIXEL_FIELDS}
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass
class ProcessedImage:
    """Output of :func:`preprocess_image`: the quantised image and its provenance.

    ``tags`` holds what the file says about itself (DICOM PatientID,
    SOPInstanceUID, laterality, view) for id resolution; it is never written
    to the manifest except laterality and view.
    """

    image: np.ndarray
    provenance: dict[str, Any]
    tags: dict[str, str]


# --------------------------------------------------------------------------- one image


@dataclasses.dataclass
class _Decoded:
    """Stored pixels at one resolution level and how to turn them into display values."""

    stored: np.ndarray  # integer pixels at 1/2**level resolution
    level: int
    levels: int  # coarsest level the file offers (0: full resolution only)
    dicom: DicomImage | None
    window: WindowChoice | None = None

    def modality(self, stored: np.ndarray) -> np.ndarray:
        """Float32 values before the display mapping (DICOM: rescaled; images: in [0, 1])."""
        if self.dicom is None:
            top = 255.0 if stored.dtype == np.uint8 else 65535.0
            return stored.astype(np.float32) * np.float32(1.0 / top)
        return rescale(stored, self.dicom.slope, self.dicom.intercept)

    def to_display(self, values: np.ndarray) -> np.ndarray:
        """Display values in [0, 1], tissue bright (VOI LUT, MONOCHROME1 inverted)."""
        return values if self.dicom is None else self.window.apply(values, self.dicom)

    def display(self, stored: np.ndarray) -> np.ndarray:
        """Display values of (a crop of) stored pixels."""
        return self.to_display(self.modality(stored))


def _open(path: Path, config: PreprocessConfig) -> _Decoded:
    """Decode at the coarsest level the full image allows; the crop check may refine it."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _Decoded(read_grayscale(path), 0, 0, None)
    dicom = read_dicom(path)
    levels = dicom.resolution_levels if config.reduced_resolution else 0
    stored, level = dicom.decode_best(choose_level(dicom.rows, dicom.columns, config, levels))
    return _Decoded(stored, level, levels, dicom)


def _thumbnail(stored: np.ndarray) -> np.ndarray:
    height, width = stored.shape
    factor = THUMBNAIL_SIDE / max(height, width)
    if factor >= 1.0:
        return stored
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return cv2.resize(stored, size, interpolation=cv2.INTER_AREA)


def _scale_box(box: tuple[int, int, int, int], from_shape: tuple[int, int],
               to_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    fy, fx = to_shape[0] / from_shape[0], to_shape[1] / from_shape[1]
    x0, y0, x1, y1 = box
    return (max(0, math.floor(x0 * fx)), max(0, math.floor(y0 * fy)),
            min(to_shape[1], math.ceil(x1 * fx)), min(to_shape[0], math.ceil(y1 * fy)))


def choose_level(crop_height: int, crop_width: int, config: PreprocessConfig,
                 levels: int) -> int:
    """Coarsest JPEG 2000 level (0 = full) whose crop still has the output resolution."""
    out_h, out_w = config.image_size
    if config.resize == "stretch":
        room = min(crop_height / out_h, crop_width / out_w)
    else:
        room = max(crop_height / out_h, crop_width / out_w)
    if room < 2.0:
        return 0
    return min(levels, math.floor(math.log2(room)))


def _output_shape(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """Size the crop is resampled to: the output size, or its aspect-preserving fit."""
    out_h, out_w = config.image_size
    if config.resize == "stretch":
        return out_h, out_w
    factor = min(out_h / height, out_w / width)
    return min(out_h, max(1, round(height * factor))), min(out_w, max(1, round(width * factor)))


def _resample(crop: np.ndarray, level: int, full_size: tuple[int, int],
              shape: tuple[int, int]) -> np.ndarray:
    """Resample a crop decoded at ``level`` (covering ``full_size`` original pixels) to ``shape``.

    At full resolution this is an area resize. A JPEG 2000 LL band sample k
    is centred on original pixel ``2**level * k``, not on the middle of its
    block as an area resize assumes, so reduced levels are resampled with the
    exact affine map after a Gaussian anti-alias blur; both paths then agree
    to within ~40+ dB PSNR.
    """
    out_h, out_w = shape
    if level == 0:
        shrink = crop.shape[0] >= out_h and crop.shape[1] >= out_w
        method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        return cv2.resize(crop, (out_w, out_h), interpolation=method)
    step = float(2**level)
    sy, sx = full_size[0] / out_h, full_size[1] / out_w  # original pixels per output pixel
    ry, rx = sy / step, sx / step  # decoded pixels per output pixel
    if max(ry, rx) > 1.0:
        sigma_y = 0.5 * math.sqrt(max(ry, 1.0) ** 2 - 1.0)
        sigma_x = 0.5 * math.sqrt(max(rx, 1.0) ** 2 - 1.0)
        crop = cv2.GaussianBlur(crop, (0, 0), sigmaX=max(sigma_x, 1e-3),
                                sigmaY=max(sigma_y, 1e-3), borderType=cv2.BORDER_REPLICATE)
    matrix = np.array([[rx, 0.0, (0.5 * sx - 0.5) / step],
                       [0.0, ry, (0.5 * sy - 0.5) / step]], dtype=np.float64)
    return cv2.warpAffine(crop, matrix, (out_w, out_h),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def _place(image: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Put an aspect-preserving resample on the output canvas (chest wall left, centred)."""
    out_h, out_w = config.image_size
    if image.shape == (out_h, out_w):
        return image
    canvas = np.zeros((out_h, out_w), dtype=image.dtype)
    top = (out_h - image.shape[0]) // 2
    canvas[top : top + image.shape[0], : image.shape[1]] = image
    return canvas


def _align(box: tuple[int, int, int, int], shape: tuple[int, int],
           step: int) -> tuple[int, int, int, int]:
    """Grow ``box`` to multiples of ``step`` (clamped), so every resolution level crops alike."""
    x0, y0, x1, y1 = box
    return ((x0 // step) * step, (y0 // step) * step,
            min(shape[1], -(-x1 // step) * step), min(shape[0], -(-y1 // step) * step))


def _checked_box(box: Sequence[int], shape: tuple[int, int],
                 source: str) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
        raise ImageReadError(source, f"crop box {tuple(box)} outside the {shape[0]}x{shape[1]} "
                             "image", "crop")
    return x0, y0, x1, y1


def _upsample_mask(mask: np.ndarray, shape: tuple[int, int], grow: bool) -> np.ndarray:
    """Float 0/1 mask at ``shape``; ``grow`` widens it by ~1% first so the cut lies in background."""
    mask = mask.astype(np.uint8)
    if grow:
        side = max(3, round(0.01 * max(mask.shape))) | 1
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side)))
    resized = cv2.resize(mask.astype(np.float32), (shape[1], shape[0]),
                         interpolation=cv2.INTER_LINEAR)
    return (resized > 0.5).astype(np.float32)


def _quantise(image: np.ndarray, bits: int) -> np.ndarray:
    top = 255.0 if bits == 8 else 65535.0
    scaled = np.clip(image, 0.0, 1.0) * np.float32(top) + np.float32(0.5)
    return scaled.astype(np.uint8 if bits == 8 else np.uint16)


def preprocess_image(path: PathLike, config: PreprocessConfig | None = None, *,
                     view: str | None = None,
                     crop_box: tuple[int, int, int, int] | None = None) -> ProcessedImage:
    """Preprocess one DICOM or image file into the output array plus provenance.

    ``view`` (e.g. from the metadata) decides whether pectoral masking
    applies when ``config.remove_pectoral`` is set; it defaults to the DICOM
    ViewPosition. Crop coordinates in the provenance are in original pixels,
    before any flip; ``crop_box`` (same convention, e.g. from an earlier
    provenance) overrides the detected box. Raises :class:`ImageReadError`
    with the failing stage.
    """
    config = config or PreprocessConfig()
    path = Path(path)
    source = str(path)
    decoded = _open(path, config)
    dicom = decoded.dicom
    thumb_stored = _thumbnail(decoded.stored)
    if dicom is not None:
        values = rescale(thumb_stored, dicom.slope, dicom.intercept)
        decoded.window = choose_window(dicom, values, config.window_index, config.percentiles)
    thumb = decoded.display(thumb_stored)
    try:
        region: BreastRegion = locate_breast(thumb, config.crop_margin)
    except ValueError as error:
        raise ImageReadError(source, str(error), "crop") from error
    full_shape = (dicom.rows, dicom.columns) if dicom else decoded.stored.shape
    box = _align(_scale_box(region.box, thumb.shape, full_shape), full_shape, BOX_ALIGN)
    if crop_box is not None:
        box = _checked_box(crop_box, full_shape, source)
        region = dataclasses.replace(region, box=_scale_box(box, full_shape, thumb.shape))
    stored, level = decoded.stored, decoded.level
    if level > 0:
        needed = choose_level(box[3] - box[1], box[2] - box[0], config, decoded.levels)
        if needed < level:  # a small breast: the crop needs a finer level than the image
            stored, level = dicom.decode_best(needed)
    level_box = _scale_box(box, full_shape, stored.shape)
    crop = decoded.modality(stored[level_box[1] : level_box[3], level_box[0] : level_box[2]])
    view = (dicom.view if dicom else "") if view is None else view
    flipped = region.chest_wall_right
    thumb_mask = region.mask[region.box[1] : region.box[3], region.box[0] : region.box[2]]
    pectoral_removed = False
    if config.remove_pectoral and view.strip().upper() in MLO_VIEWS:
        thumb_crop = thumb[region.box[1] : region.box[3], region.box[0] : region.box[2]]
        mirror = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)
        pectoral = mirror(pectoral_mask(mirror(thumb_crop), mirror(thumb_mask)))
        pectoral_removed = bool(pectoral.any())
        thumb_mask = thumb_mask & ~pectoral
    full_size = (box[3] - box[1], box[2] - box[0])
    shape = _output_shape(*full_size, config)
    # Resample the modality values first, then window: the display mapping and the mask
    # then run on output-sized arrays only.
    resampled = decoded.to_display(_resample(crop, level, full_size, shape))
    if config.mask_background or pectoral_removed:
        resampled *= _upsample_mask(thumb_mask, shape, grow=not pectoral_removed)
    if flipped:
        resampled = resampled[:, ::-1]
    output = _quantise(_place(resampled, config), config.bits)
    window = decoded.window
    provenance = {
        "source_file": source,
        "transfer_syntax": dicom.transfer_syntax if dicom else path.suffix.lower().lstrip("."),
        "window_center": window.center if window else None,
        "window_width": window.width if window else None,
        "voi_function": window.function if window else "",
        "photometric": dicom.photometric if dicom else "MONOCHROME2",
        "flipped": flipped,
        "crop_x0": box[0], "crop_y0": box[1], "crop_x1": box[2], "crop_y1": box[3],
        "original_height": full_shape[0], "original_width": full_shape[1],
        "decode_scale": 1.0 / 2**level,
        "pectoral_removed": pectoral_removed,
    }
    tags = {
        "patient_id": dicom.patient_id if dicom else "",
        "image_uid": dicom.image_uid if dicom else "",
        "laterality": dicom.laterality if dicom else "",
        "view": dicom.view if dicom else "",
    }
    return ProcessedImage(output, provenance, tags)


# --------------------------------------------------------------------------- inputs and ids


def discover_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into the image and DICOM files to process.

    Folders contribute files with an image suffix, ``.dcm`` files, and files
    without a suffix that carry the DICOM preamble. Files named explicitly
    are always kept (a bad one is then recorded as a failure).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if not child.is_file() or child.name.startswith("."):
                    continue
                suffix = child.suffix.lower()
                if (suffix in IMAGE_SUFFIXES or suffix == ".dcm"
                        or (suffix == "" and is_dicom_file(child))):
                    found.append(child)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: input file or folder not found")
    unique = list(dict.fromkeys(found))
    return unique


def safe_id(text: str) -> str:
    """An id usable as a file name (characters other than ``A-Za-z0-9._-`` become ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(text).strip()).strip(".")
    return cleaned or "unknown"


def path_ids(path: Path, lookup: dict[str, str]) -> tuple[str, str] | None:
    """Ids known without opening the file: the metadata (by file stem), then the RSNA layout."""
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if lookup.get(stem):
        return safe_id(stem), safe_id(lookup[stem])
    if path.parent.name.isdigit() and stem.isdigit():
        return stem, path.parent.name
    return None


def _ids_from_file(path: Path, lookup: dict[str, str]) -> tuple[str, str]:
    known = path_ids(path, lookup)
    if known:
        return known
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["PatientID", "SOPInstanceUID"])
            patient, uid = str(header.get("PatientID", "")), str(header.get("SOPInstanceUID", ""))
            if patient and uid:
                return safe_id(stem if stem in lookup else uid), safe_id(patient)
            if patient:
                return safe_id(stem), safe_id(patient)
        except Exception:  # unreadable header: the file name gives the ids, decoding will fail
            log.debug("no DICOM header ids in %s", path)
    return safe_id(stem), safe_id(stem)


# --------------------------------------------------------------------------- worker


_WORKER: dict[str, Any] = {}


def _init_worker(config: dict[str, Any], out_dir: str, views: dict[str, str],
                 single_thread: bool) -> None:
    if single_thread:
        cv2.setNumThreads(1)
    parsed = PreprocessConfig.from_dict(config)
    _WORKER.update(config=parsed, out_dir=Path(out_dir), views=views,
                   hash=parsed.settings_hash())


def _record_path(out_dir: Path, patient_id: str, image_id: str) -> Path:
    return out_dir / "records" / patient_id / f"{image_id}.json"


def _work(task: tuple[str, str, str]) -> dict[str, Any]:
    """Process one (file, image_id, patient_id) in a worker; returns a result dict, never raises."""
    path_text, image_id, patient_id = task
    path = Path(path_text)
    config: PreprocessConfig = _WORKER["config"]
    out_dir: Path = _WORKER["out_dir"]
    stage = "ids"
    try:
        record_file = _record_path(out_dir, patient_id, image_id)
        relative = f"images/{patient_id}/{image_id}.png"
        source = os.path.abspath(path_text)
        if record_file.is_file():
            previous = read_json(record_file)
            if previous.get("source_file") != source:
                return _failure(path_text, "ids", f"duplicate image_id {image_id} (patient "
                                f"{patient_id}) already produced from "
                                f"{previous.get('source_file')}", image_id)
            if previous.get("settings_hash") == _WORKER["hash"] and (out_dir / relative).is_file():
                return {"status": "resumed", "record": previous}
        stage = "process"
        processed = preprocess_image(path, config, view=_WORKER["views"].get(image_id))
        stage = "write"
        write_png(out_dir / relative, processed.image)
        record = {
            "image_id": image_id, "patient_id": patient_id, "path": relative,
            **processed.provenance, "source_file": source,
            "laterality_tag": processed.tags["laterality"], "view_tag": processed.tags["view"],
            "settings_hash": _WORKER["hash"],
        }
        atomic_write_json(record_file, record)
        return {"status": "processed", "record": record}
    except ImageReadError as error:
        return _failure(path_text, error.stage, error.reason, image_id)
    except Exception as error:
        return _failure(path_text, stage, f"{type(error).__name__}: {error}", image_id)


def _failure(source: str, stage: str, reason: str, image_id: str = "") -> dict[str, Any]:
    return {"status": "failed", "image_id": image_id,
            "failure": {"source": source, "stage": stage, "reason": reason.replace("\n", " ")}}


# --------------------------------------------------------------------------- metadata


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


# --------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class PreprocessSummary:
    """Counts of one :func:`preprocess_dataset` run."""

    out_dir: str
    total: int = 0
    processed: int = 0
    resumed: int = 0
    failed: int = 0
    metadata_without_image: int = 0
    images_without_metadata: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when at least one image is in the dataset after this run."""
        return self.processed + self.resumed > 0

    def line(self) -> str:
        """The closing summary line."""
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        text = (f"preprocess: {self.processed} processed, {self.resumed} skipped (resumed), "
                f"{self.failed} failed of {self.total} in {self.seconds:.1f} s "
                f"({rate:.2f} images/s) -> {self.out_dir}")
        if self.metadata_without_image or self.images_without_metadata:
            text += (f"; {self.metadata_without_image} metadata rows without image, "
                     f"{self.images_without_metadata} images without metadata row "
                     "(see unmatched.csv)")
        return text


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


def _parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match:
            raise InputError(f"shard {shard!r}: expected i/N, e.g. 0/4")
        shard = (int(match.group(1)), int(match.group(2)))
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count}: need 0 <= i < N")
    return index, count


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never plain fork: a child forked after OpenCV (or TensorFlow) started its thread
    # pool can deadlock. A fork server starts clean and forks cheap workers from there.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cvae_mammo.preprocess"])
        return context
    return multiprocessing.get_context("spawn")


def _run_workers(tasks: list[tuple[str, str, str]], init_args: tuple[Any, ...], workers: int,
                 progress: bool) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(tasks), unit="img", desc="preprocess", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        if workers > 1 and len(tasks) > 1:
            try:
                with ProcessPoolExecutor(workers, mp_context=_pool_context(),
                                         initializer=_init_worker, initargs=init_args) as pool:
                    futures = {pool.submit(_work, task): i for i, task in enumerate(tasks)}
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
            except BrokenProcessPool as error:
                # e.g. a __main__ that worker processes cannot import (code read from stdin)
                log.warning("worker processes failed (%s); finishing in this process", error)
        _init_worker(*init_args[:-1], single_thread=False)
        for index, task in enumerate(tasks):
            if index not in results:
                results[index] = _work(task)
                bar.update()
    finally:
        bar.close()
    return [results[index] for index in range(len(tasks))]


def _gather_other_shards(out_dir: Path, sources: set[str], have: set[str]) -> list[dict]:
    records = []
    for record_file in sorted((out_dir / "records").rglob("*.json")):
        record = read_json(record_file)
        if record.get("source_file") in sources and record.get("source_file") not in have:
            records.append(record)
    return records


def preprocess_dataset(
    inputs: Sequence[PathLike] | PathLike,
    out_dir: PathLike,
    config: PreprocessConfig | None = None,
    metadata: PathLike | pd.DataFrame | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Preprocess files and folders of mammograms into the dataset folder ``out_dir``.

    ``workers`` defaults to all cores; ``shard=(i, N)`` processes every N-th
    input starting at i (the manifest then gathers every shard finished so
    far in ``out_dir``); ``limit`` caps this run's images. Images already
    written with the same pixel settings are skipped (resume). Bad files are
    recorded in ``failures.csv`` and the run goes on.
    """
    started = time.perf_counter()
    config = config or PreprocessConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = load_metadata(metadata, config.label_column) if metadata is not None else None
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files = discover_inputs(inputs)
    if not files:
        raise InputError(f"no DICOM or image files found in {', '.join(map(str, inputs))}")
    shard = _parse_shard(shard)
    work = files[shard[0] :: shard[1]] if shard else files
    if limit is not None:
        work = work[: max(0, int(limit))]
    lookup = meta.lookup("patient_id") if meta else {}
    if meta is not None:
        lookup = {image_id: lookup.get(image_id, "") for image_id in meta.frame.index}
    views = meta.lookup("view") if meta else {}

    failures: list[dict[str, Any]] = []
    todo: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in work:
        ids = _ids_from_file(path, lookup)
        if ids in seen:
            failures.append(_failure(str(path), "ids", f"duplicate image_id {ids[0]} (patient "
                                     f"{ids[1]}); also from {seen[ids]}", ids[0]))
            continue
        seen[ids] = path
        todo.append((str(path), *ids))
    workers = max(1, min(int(workers or os.cpu_count() or 1), max(1, len(todo))))
    init_args = (config.to_dict(), str(out_dir), views, workers > 1)
    results = failures + _run_workers(todo, init_args, workers, progress)

    records = [r["record"] for r in results if "record" in r]
    if shard:
        sources = {os.path.abspath(p) for p in files}
        records += _gather_other_shards(out_dir, sources, {r["source_file"] for r in records})
    manifest = build_manifest(records, meta)
    atomic_write_csv(out_dir / "manifest.csv", manifest)
    failure_rows = pd.DataFrame([r["failure"] for r in results if r["status"] == "failed"],
                                columns=["source", "stage", "reason"])
    if shard and (out_dir / "failures.csv").is_file():
        earlier = pd.read_csv(out_dir / "failures.csv", dtype=str, keep_default_na=False)
        earlier = earlier[~earlier["source"].isin({str(p) for p in work})]
        failure_rows = pd.concat([earlier, failure_rows], ignore_index=True)
    atomic_write_csv(out_dir / "failures.csv", failure_rows)

    summary = PreprocessSummary(
        out_dir=str(out_dir), total=len(work),
        processed=sum(r["status"] == "processed" for r in results),
        resumed=sum(r["status"] == "resumed" for r in results),
        failed=sum(r["status"] == "failed" for r in results),
    )
    if meta is not None:
        unmatched = _unmatched(meta, records, results)
        atomic_write_csv(out_dir / "unmatched.csv", unmatched)
        counts = unmatched["kind"].value_counts()
        summary.metadata_without_image = int(counts.get("metadata_without_image", 0))
        summary.images_without_metadata = int(counts.get("image_without_metadata", 0))
    summary.seconds = time.perf_counter() - started
    atomic_write_json(out_dir / "preprocess.json", {
        "config": config.to_dict(),
        "settings_hash": config.settings_hash(),
        "inputs": [str(p) for p in inputs],
        "metadata": None if metadata is None else meta.source,
        "label_column": meta.label_column if meta else None,
        "workers": workers,
        "shard": list(shard) if shard else None,
        "limit": limit,
        "summary": dataclasses.asdict(summary),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "package_versions": package_versions(),
    })
    log.debug(summary.line())
    return summary


def _unmatched(meta: Metadata, records: list[dict[str, Any]],
               results: list[dict[str, Any]]) -> pd.DataFrame:
    seen = {r["image_id"] for r in records} | {r.get("image_id") for r in results}
    rows = [{"kind": "metadata_without_image", "image_id": image_id,
             "patient_id": meta.frame.at[image_id, "patient_id"]
             if "patient_id" in meta.frame.columns else "", "source_file": ""}
            for image_id in meta.frame.index if image_id not in seen]
    rows += [{"kind": "image_without_metadata", "image_id": r["image_id"],
              "patient_id": r["patient_id"], "source_file": r["source_file"]}
             for r in records if r["image_id"] not in meta.frame.index]
    return pd.DataFrame(rows, columns=["kind", "image_id", "patient_id", "source_file"])
