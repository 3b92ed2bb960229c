"""Decode mammography DICOMs: transfer syntaxes, reduced-resolution JPEG 2000, VOI LUT.

Decoders (all permissively licensed):

* JPEG 2000 (.90 / .91): OpenJPEG on the codestream taken from the
  encapsulated PixelData, at 1/2, 1/4 ... resolution (:meth:`DicomImage.decode`
  ``level``) and, given a ``box``, only the window that covers it
  (:mod:`cvae_mammo.preprocessing.jpeg2000`, the libopenjp2 Pillow bundles);
  where that library cannot be loaded, Pillow's ``reduce`` on the whole image.
* JPEG Lossless (.57 / .70): imagecodecs (libjpeg-turbo 3, BSD-style licence);
  JPEG-LS (.80 / .81): imagecodecs (CharLS, BSD). pylibjpeg-libjpeg (GPL) is
  never used.
* RLE and uncompressed: pydicom's own numpy decoders.

Display conversion (:func:`to_display`) applies RescaleSlope/Intercept, the
VOI LUT (LINEAR, LINEAR_EXACT, SIGMOID or a VOI LUT Sequence; one of several
window pairs, chosen by index), a robust percentile range when no window is
given, and inverts MONOCHROME1 so tissue is bright. Output is float32 in [0, 1].
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cvae_mammo.errors import ImageReadError
from cvae_mammo.fileio import PathLike
from cvae_mammo.preprocessing import jpeg2000
from cvae_mammo.preprocessing.jpeg2000 import Box, jpeg2000_header, level_window

JPEG2000_SYNTAXES = frozenset({JPEG2000Lossless, JPEG2000})
JPEG_LOSSLESS_SYNTAXES = frozenset({JPEGLossless, JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({JPEGLSLossless, JPEGLSNearLossless})
NATIVE_SYNTAXES = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
     DeflatedExplicitVRLittleEndian, RLELossless}
)
#: Every transfer syntax this module decodes.
SUPPORTED_SYNTAXES = JPEG2000_SYNTAXES | JPEG_LOSSLESS_SYNTAXES | JPEG_LS_SYNTAXES | NATIVE_SYNTAXES

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def is_dicom_file(path: PathLike) -> bool:
    """True when the file carries the DICOM Part 10 preamble (``DICM`` at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


@dataclasses.dataclass
class DicomImage:
    """A DICOM mammogram whose header has been read and validated; pixels are decoded on demand.

    Attributes hold only what the pipeline needs (no patient names, dates or
    accession numbers). ``resolution_levels`` is the number of extra
    resolution levels :meth:`decode` can skip (the JPEG 2000 decomposition
    count; 0 for other syntaxes).
    """

    source: str
    dataset: Dataset
    transfer_syntax: str
    rows: int
    columns: int
    photometric: str
    bits_stored: int
    slope: float
    intercept: float
    windows: list[tuple[float, float]]
    voi_function: str
    has_voi_lut_sequence: bool
    resolution_levels: int
    j2k_precision: int
    patient_id: str
    image_uid: str
    laterality: str
    view: str

    def decode(self, level: int = 0, box: Box | None = None) -> np.ndarray:
        """Stored pixel values as an integer array, at 1/2**``level`` resolution (JPEG 2000 only).

        ``box`` (x0, y0, x1, y1 in original pixels, exclusive ends) returns only
        the samples of :func:`~cvae_mammo.preprocessing.jpeg2000.level_window`
        that cover it; JPEG 2000 then decodes only that window (when OpenJPEG's
        library is available; else the whole level, then cut).
        """
        if level < 0 or level > self.resolution_levels:
            raise ValueError(f"{self.source}: resolution level {level} not in "
                             f"0..{self.resolution_levels}")
        whole = (0, 0, self.columns, self.rows)
        if box is not None and not (0 <= box[0] < box[2] <= self.columns
                                    and 0 <= box[1] < box[3] <= self.rows):
            raise ValueError(f"{self.source}: box {box} outside the {self.rows}x{self.columns} "
                             "image")
        x0, y0, x1, y1 = level_window(box or whole, level)
        try:
            if self._jpeg2000() and jpeg2000.library() is not None:
                array = jpeg2000.decode(self._frame(), level, box)
            else:
                array = self._decode_whole(level)
                self._check_shape(array, level_window(whole, level))
                array = array[y0:y1, x0:x1]
        except ImageReadError:
            raise
        except Exception as error:
            raise ImageReadError(self.source, f"pixel data could not be decoded "
                                 f"({type(error).__name__}: {error})", "decode") from error
        self._check_shape(array, (x0, y0, x1, y1))
        return array

    def _decode_whole(self, level: int) -> np.ndarray:
        if self._jpeg2000():
            return _decode_jpeg2000_pillow(self._frame(), level, self.j2k_precision)
        if self.transfer_syntax in JPEG_LOSSLESS_SYNTAXES and self._unsigned():
            return _decode_jpeg_lossless(self._frame())
        if self.transfer_syntax in JPEG_LS_SYNTAXES and self._unsigned():
            import imagecodecs

            return imagecodecs.jpegls_decode(self._frame())
        return self.dataset.pixel_array

    def _check_shape(self, array: np.ndarray, window: Box) -> None:
        expected = (window[3] - window[1], window[2] - window[0])
        if array.ndim != 2 or array.shape != expected:
            raise ImageReadError(self.source, f"decoded pixels have shape {array.shape}, "
                                 f"expected {expected}", "decode")

    def decode_best(self, level: int, box: Box | None = None) -> tuple[np.ndarray, int]:
        """:meth:`decode` at ``level``, or at the nearest finer level the decoder manages.

        Pillow (the fallback when OpenJPEG's library cannot be loaded) refuses
        some reductions, e.g. 1/8 of the real RSNA images; returns the pixels
        and the level actually used.
        """
        while True:
            try:
                return self.decode(level, box), level
            except ImageReadError:
                if level == 0:
                    raise
                level -= 1

    def _unsigned(self) -> bool:
        return int(self.dataset.get("PixelRepresentation", 0)) == 0

    def _jpeg2000(self) -> bool:
        """JPEG 2000 that OpenJPEG / Pillow decode here (unsigned, up to 16 bits)."""
        return (self.transfer_syntax in JPEG2000_SYNTAXES and self._unsigned()
                and self.bits_stored <= 16)

    def _frame(self) -> bytes:
        return next(generate_frames(self.dataset.PixelData, number_of_frames=1))


def read_dicom(path: PathLike) -> DicomImage:
    """Read and validate a DICOM header (pixels stay encoded until :meth:`DicomImage.decode`).

    Raises :class:`ImageReadError` (stage ``read``) for non-DICOM or truncated
    files, missing pixel data, colour or multi-frame images, and (stage
    ``decode``) for transfer syntaxes this module cannot decode.
    """
    source = str(path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dataset = pydicom.dcmread(path)
    except InvalidDicomError as error:
        raise ImageReadError(source, f"not a DICOM file ({error})", "read") from error
    except Exception as error:
        raise ImageReadError(source, f"unreadable or truncated DICOM ({type(error).__name__}: "
                             f"{error})", "read") from error
    ended_early = [w for w in caught if "end of file" in str(w.message).lower()]
    if ended_early:
        raise ImageReadError(source, f"truncated DICOM ({ended_early[0].message})", "read")
    if "PixelData" not in dataset:
        cut = _cut_inside_element(dataset, path)
        if cut:
            raise ImageReadError(source, f"truncated DICOM ({cut})", "read")
        raise ImageReadError(source, "no pixel data (PixelData element missing)", "read")
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    if not syntax:
        syntax = ImplicitVRLittleEndian
    if syntax not in SUPPORTED_SYNTAXES:
        name = pydicom.uid.UID(syntax).name
        raise ImageReadError(source, f"unsupported transfer syntax {syntax} ({name})", "decode")
    samples = int(dataset.get("SamplesPerPixel", 1))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if samples != 1 or photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ImageReadError(source, f"colour image (SamplesPerPixel={samples}, "
                             f"PhotometricInterpretation={photometric}); expected grayscale",
                             "read")
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(source, f"multi-frame image ({frames} frames); expected one",
                             "read")
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        bits_stored = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    except (AttributeError, TypeError, ValueError) as error:
        raise ImageReadError(source, f"image geometry missing ({error})", "read") from error
    image = DicomImage(
        source=source,
        dataset=dataset,
        transfer_syntax=syntax,
        rows=rows,
        columns=columns,
        photometric=photometric,
        bits_stored=bits_stored,
        slope=float(dataset.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(dataset.get("RescaleIntercept", 0.0) or 0.0),
        windows=_window_pairs(dataset),
        voi_function=str(dataset.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper(),
        has_voi_lut_sequence="VOILUTSequence" in dataset,
        resolution_levels=0,
        j2k_precision=0,
        patient_id=str(dataset.get("PatientID", "") or ""),
        image_uid=str(dataset.get("SOPInstanceUID", "") or ""),
        laterality=str(dataset.get("ImageLaterality", "") or dataset.get("Laterality", "") or ""),
        view=str(dataset.get("ViewPosition", "") or ""),
    )
    if image._jpeg2000():
        try:
            image.resolution_levels, image.j2k_precision = jpeg2000_header(image._frame())
        except Exception as error:
            raise ImageReadError(source, f"JPEG 2000 codestream unreadable ({error})",
                                 "decode") from error
    return image


def _cut_inside_element(dataset: Dataset, path: PathLike) -> str:
    """Why the file ends inside an element, or "" when its last element ends with the file.

    pydicom stops quietly at the end of a file, even in the middle of an element's
    header or value; the last element read shows where the file should have gone on.
    """
    last = dataset if len(dataset) else dataset.file_meta
    if not len(last):
        return ""
    tag = list(last.keys())[-1]
    element = last.get_item(tag)
    value_tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    if value_tell is None or length is None or length == 0xFFFFFFFF:
        return ""
    size = os.path.getsize(path)
    end = value_tell + length
    if end > size:
        return f"the file ends at byte {size}, inside the value of element {tag}"
    if end < size:
        return f"the file ends at byte {size}, inside the element after {tag}"
    return ""


def _window_pairs(dataset: Dataset) -> list[tuple[float, float]]:
    centers = dataset.get("WindowCenter")
    widths = dataset.get("WindowWidth")
    if centers is None or widths is None:
        return []
    centers = list(centers) if isinstance(centers, pydicom.multival.MultiValue) else [centers]
    widths = list(widths) if isinstance(widths, pydicom.multival.MultiValue) else [widths]
    return [(float(c), float(w)) for c, w in zip(centers, widths) if float(w) > 0]


def _decode_jpeg2000_pillow(frame: bytes, level: int, precision: int) -> np.ndarray:
    with Image.open(io.BytesIO(frame)) as image:
        image.reduce = level
        image.load()
        if image.mode not in {"L", "I;16", "I;16L", "I;16B"}:
            raise ValueError(f"unexpected JPEG 2000 image mode {image.mode}")
        array = np.asarray(image)
    if array.dtype == np.uint16 and 8 < precision < 16:
        # Pillow scales 9-15 bit samples up to the full 16-bit range; undo it exactly.
        array = array >> (16 - precision)
    return array


def _decode_jpeg_lossless(frame: bytes) -> np.ndarray:
    """JPEG Lossless (process 14) with libjpeg-turbo, falling back to liblj92 (both imagecodecs)."""
    import imagecodecs

    try:
        return imagecodecs.jpeg8_decode(frame)
    except Exception:  # e.g. a stream libjpeg-turbo rejects; liblj92 reads most of those
        return imagecodecs.ljpeg_decode(frame)


def rescale(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality values ``stored * slope + intercept`` as float32."""
    values = stored.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def apply_window(values: np.ndarray, center: float, width: float,
                 function: str = "LINEAR") -> np.ndarray:
    """Map modality values to [0, 1] with a DICOM VOI window (PS3.3 C.11.2.1.2).

    LINEAR: ``((x - (c - 0.5)) / (w - 1) + 0.5)`` clipped; LINEAR_EXACT:
    ``(x - c) / w + 0.5`` clipped; SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    function = function.upper()
    if function == "SIGMOID":
        out = np.float32(-4.0 / width) * (values - np.float32(center))
        np.exp(out, out=out)
        out += np.float32(1.0)
        np.reciprocal(out, out=out)
        return out
    if function == "LINEAR_EXACT":
        out = (values - np.float32(center)) / np.float32(width) + np.float32(0.5)
    elif function == "LINEAR":
        span = max(width - 1.0, 1e-6)
        out = (values - np.float32(center - 0.5)) / np.float32(span) + np.float32(0.5)
    else:
        raise ValueError(f"unknown VOI LUT function {function!r}; known: {', '.join(VOI_FUNCTIONS)}")
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_window(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """(center, width) of a LINEAR_EXACT window spanning the ``low``-``high`` percentiles.

    Computed on a strided subsample of at most ~250k pixels, so it is cheap on
    full-size mammograms.
    """
    step = max(1, int(math.sqrt(values.size / 250_000)))
    sample = values[::step, ::step]
    lo, hi = np.percentile(sample, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return float((lo + hi) / 2.0), float(hi - lo)


@dataclasses.dataclass(frozen=True)
class WindowChoice:
    """The display mapping chosen for one DICOM, recorded as provenance."""

    center: float | None
    width: float | None
    function: str  # LINEAR / LINEAR_EXACT / SIGMOID / LUT_SEQUENCE / PERCENTILE

    def apply(self, values: np.ndarray, image: DicomImage) -> np.ndarray:
        """Apply the mapping to modality values, inverting MONOCHROME1."""
        if self.function == "LUT_SEQUENCE":
            out = _apply_lut_sequence(values, image)
        else:
            function = "LINEAR_EXACT" if self.function == "PERCENTILE" else self.function
            out = apply_window(values, self.center, self.width, function)
        if image.photometric == "MONOCHROME1":
            np.subtract(np.float32(1.0), out, out=out)
        return out


def choose_window(image: DicomImage, values: np.ndarray, index: int = 0,
                  percentiles: tuple[float, float] = (0.5, 99.5)) -> WindowChoice:
    """Pick the display mapping for ``image``.

    Window pair ``index`` (clamped to the pairs present) with the file's VOI
    LUT function; else the VOI LUT Sequence; else a percentile range of
    ``values`` (the modality values, usually a thumbnail).
    """
    if image.windows:
        center, width = image.windows[min(max(index, 0), len(image.windows) - 1)]
        function = image.voi_function if image.voi_function in VOI_FUNCTIONS else "LINEAR"
        return WindowChoice(center, width, function)
    if image.has_voi_lut_sequence:
        return WindowChoice(None, None, "LUT_SEQUENCE")
    center, width = percentile_window(values, *percentiles)
    return WindowChoice(center, width, "PERCENTILE")


def _apply_lut_sequence(values: np.ndarray, image: DicomImage) -> np.ndarray:
    item = image.dataset.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        # OW data: 16-bit words, even for 8-bit LUTs, unless it has one byte per entry.
        one_byte = len(data) == entries and bits <= 8
        lut = np.frombuffer(data, dtype=np.uint8 if one_byte else "<u2")
    else:
        lut = np.asarray(data if isinstance(data, list | tuple | np.ndarray) else [data])
    lut = lut[:entries].astype(np.float32)
    scale = float(2 ** min(max(bits, 1), 16) - 1)
    index = np.clip(np.rint(values - first), 0, lut.size - 1).astype(np.intp)
    return lut[index] / np.float32(scale)
