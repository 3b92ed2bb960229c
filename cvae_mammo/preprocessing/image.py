"""One mammogram (DICOM / PNG / PGM / TIFF / JPEG) -> one clean image: :func:`preprocess_image`.

Decode a cheap coarse view (JPEG 2000: the coarsest wavelet level still about
:data:`THUMBNAIL_SIDE` pixels long), window it to [0, 1] with tissue bright and
find the breast on it (:mod:`cvae_mammo.preprocessing.breast`); then decode,
once, only the crop's window at the coarsest level whose quality suffices
(:func:`choose_level`), flip so the chest wall is on the left, optionally mask
the pectoral muscle, resize and quantise. Other formats are decoded once, whole.
The provenance of every step is returned with the pixels.

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from cvae_mammo.config import DEFAULT_IMAGE_SIZE, ConfigBase, parse_image_size
from cvae_mammo.errors import ImageReadError, InputError
from cvae_mammo.fileio import (
    PathLike,
)
from cvae_mammo.preprocessing.breast import BreastRegion, locate_breast, pectoral_mask
from cvae_mammo.preprocessing.dicom import (
    DicomImage,
    WindowChoice,
    choose_window,
    read_dicom,
    rescale,
)
from cvae_mammo.preprocessing.imageio import IMAGE_SUFFIXES, read_grayscale_format
from cvae_mammo.preprocessing.jpeg2000 import Box, level_window

log = logging.getLogger(__name__)

#: Side of the thumbnail the breast is located on (pixels, longest side).
THUMBNAIL_SIDE = 512
#: Crop boxes are aligned to this many original pixels (the sample grid of levels 0-3).
BOX_ALIGN = 8
#: Original pixels by which a decoded JPEG 2000 sample may exceed an output pixel, on the axis
#: with the least room (see :func:`choose_level`). Set from PSNR against the full-resolution
#: path (``benchmarks/bench_preprocess.py --sweep``: levels 1-4, outputs 256x128 to 2048x1024,
#: real and synthetic Hologic files): every case up to 2.0 gave >= 40.8 dB, the first below
#: 40 dB came at 2.5; 1.5 keeps a margin.
MAX_EXCESS = 1.5
#: Views treated as MLO for pectoral-muscle masking (blank = unknown, also masked).
MLO_VIEWS = frozenset({"MLO", "ML", "LMO", "LM", "XCCL_MLO", ""})
#: Config fields that do not change the pixels (excluded from the settings hash).
_NON_PIXEL_FIELDS = frozenset({"label_column"})


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

    stored: np.ndarray  # integer pixels of the whole image at 1/2**level resolution
    level: int
    dicom: DicomImage | None
    file_format: str  # the DICOM transfer syntax, or the image format decoded
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

    def crop(self, box: Box, level: int) -> tuple[np.ndarray, int]:
        """Stored pixels of :func:`level_window` (``box``, ``level``), cut or decoded alone,
        and the level they are at (finer, where a fallback decoder refuses ``level``)."""
        if level == self.level:
            x0, y0, x1, y1 = level_window(box, level)
            return self.stored[y0:y1, x0:x1], level
        return self.dicom.decode_best(level, box)


def coarse_level(rows: int, columns: int, config: PreprocessConfig, levels: int) -> int:
    """JPEG 2000 level the breast is located on: about :data:`THUMBNAIL_SIDE` long, or coarser
    when the whole frame at that coarser level still suffices for the output."""
    thumbnail = 0
    while thumbnail < levels and max(rows, columns) / 2 ** (thumbnail + 1) >= THUMBNAIL_SIDE:
        thumbnail += 1
    return max(thumbnail, choose_level(rows, columns, config, levels))


def _open(path: Path, config: PreprocessConfig) -> _Decoded:
    """Decode the view the breast is located on: a coarse JPEG 2000 level, else the whole image."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        stored, decoded_as = read_grayscale_format(path)
        return _Decoded(stored, 0, None, file_format=decoded_as)
    dicom = read_dicom(path)
    level = 0
    if config.reduced_resolution:
        level = coarse_level(dicom.rows, dicom.columns, config, dicom.resolution_levels)
    stored, level = dicom.decode_best(level)
    return _Decoded(stored, level, dicom, file_format=dicom.transfer_syntax)


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
    """Coarsest JPEG 2000 level (0 = full, at most ``levels``) whose quality suffices for the crop.

    Level L qualifies when a decoded sample, ``2**L`` original pixels wide,
    spans at most :data:`MAX_EXCESS` original pixels more than an output pixel
    on the axis with the least room. Mammographic texture has a power-law
    spectrum (about 1/f**3), so what a coarser level loses, the band between its
    Nyquist frequency and the output's, grows with that difference of periods
    rather than with their ratio: mild upsampling of a large output loses
    little, a coarse level for a small output loses much.
    """
    out_h, out_w = _output_shape(crop_height, crop_width, config)
    span = min(crop_height / out_h, crop_width / out_w) + MAX_EXCESS
    return min(levels, math.floor(math.log2(span)))


def _output_shape(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """Size the crop is resampled to: the output size, or its aspect-preserving fit."""
    out_h, out_w = config.image_size
    if config.resize == "stretch":
        return out_h, out_w
    factor = min(out_h / height, out_w / width)
    return min(out_h, max(1, round(height * factor))), min(out_w, max(1, round(width * factor)))


def _resample(crop: np.ndarray, level: int, box: Box, shape: tuple[int, int]) -> np.ndarray:
    """Resample ``crop`` (:func:`level_window` of ``box`` at ``level``) to ``shape``.

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
    x0, y0, x1, y1 = box
    first_x, first_y = level_window(box, level)[:2]
    sy, sx = (y1 - y0) / out_h, (x1 - x0) / out_w  # original pixels per output pixel
    ry, rx = sy / step, sx / step  # decoded pixels per output pixel
    if max(ry, rx) > 1.0:
        sigma_y = 0.5 * math.sqrt(max(ry, 1.0) ** 2 - 1.0)
        sigma_x = 0.5 * math.sqrt(max(rx, 1.0) ** 2 - 1.0)
        crop = cv2.GaussianBlur(crop, (0, 0), sigmaX=max(sigma_x, 1e-3),
                                sigmaY=max(sigma_y, 1e-3), borderType=cv2.BORDER_REPLICATE)
    # Output pixel j is centred on original x0 + (j + 0.5) sx - 0.5; crop sample k on
    # step * (first_x + k).
    matrix = np.array([[rx, 0.0, (x0 + 0.5 * sx - 0.5) / step - first_x],
                       [0.0, ry, (y0 + 0.5 * sy - 0.5) / step - first_y]], dtype=np.float64)
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
                     crop_box: tuple[int, int, int, int] | None = None,
                     level: int | None = None) -> ProcessedImage:
    """Preprocess one DICOM or image file into the output array plus provenance.

    ``view`` (e.g. from the metadata) decides whether pectoral masking
    applies when ``config.remove_pectoral`` is set; it defaults to the DICOM
    ViewPosition. Crop coordinates in the provenance are in original pixels,
    before any flip; ``crop_box`` (same convention, e.g. from an earlier
    provenance) overrides the detected box. ``level`` forces the JPEG 2000
    level the crop is decoded at (clamped to the file's levels; for quality
    studies), instead of :func:`choose_level`. Raises :class:`ImageReadError`
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
    if level is None:  # at most the coarse level: a crop never needs a second, coarser decode
        level = choose_level(box[3] - box[1], box[2] - box[0], config, decoded.level)
    level = min(max(level, 0), dicom.resolution_levels if dicom else 0)
    stored, level = decoded.crop(box, level)
    crop = decoded.modality(stored)
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
    resampled = decoded.to_display(_resample(crop, level, box, shape))
    if config.mask_background or pectoral_removed:
        resampled *= _upsample_mask(thumb_mask, shape, grow=not pectoral_removed)
    if flipped:
        resampled = resampled[:, ::-1]
    output = _quantise(_place(resampled, config), config.bits)
    window = decoded.window
    provenance = {
        "source_file": source,
        "transfer_syntax": decoded.file_format,
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


