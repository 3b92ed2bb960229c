"""Write small synthetic MG DICOMs from a numpy array, in every transfer syntax the pipeline reads.

Used by the tests, the benchmark and the demo's phantom generator. Files
carry only synthetic ids (PatientID, SOPInstanceUID derived from them),
laterality and view; no names or dates.

Encoders: imagecodecs (OpenJPEG for JPEG 2000, libjpeg-turbo for JPEG
Lossless, CharLS for JPEG-LS) and pydicom's own RLE encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from cvae_mammo.fileio import PathLike, atomic_open

#: Digital Mammography X-Ray Image Storage - For Presentation.
MAMMOGRAPHY_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"

#: Short names accepted for ``transfer_syntax``.
TRANSFER_SYNTAXES: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg2000-lossy": JPEG2000,
    "jpeg-lossless": JPEGLossless,
    "jpeg-lossless-sv1": JPEGLosslessSV1,
    "jpeg-ls": JPEGLSLossless,
}

Window = tuple[float, float]


def _encode(pixels: np.ndarray, syntax: str, bits_stored: int, *, jp2_header: bool,
            j2k_levels: int | None, lossy_psnr: float) -> bytes:
    import imagecodecs

    if syntax in (JPEG2000Lossless, JPEG2000):
        lossless = syntax == JPEG2000Lossless
        levels = j2k_levels if j2k_levels is not None else 5
        levels = max(0, min(levels, int(np.log2(min(pixels.shape))) - 2))
        return imagecodecs.jpeg2k_encode(
            pixels, level=0 if lossless else lossy_psnr, reversible=lossless,
            codecformat="jp2" if jp2_header else "j2k", bitspersample=bits_stored,
            resolutions=levels + 1,
        )
    if syntax in (JPEGLossless, JPEGLosslessSV1):
        predictor = 1 if syntax == JPEGLosslessSV1 else 6
        return imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=predictor,
                                        bitspersample=bits_stored)
    if syntax == JPEGLSLossless:
        return imagecodecs.jpegls_encode(pixels, level=0)
    raise ValueError(f"no encoder for transfer syntax {syntax}")


def write_mammogram_dicom(
    path: PathLike,
    pixels: np.ndarray,
    *,
    transfer_syntax: str = "explicit",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: Window | Sequence[Window] | None = None,
    voi_function: str | None = None,
    voi_lut: tuple[int, int, np.ndarray] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    patient_id: str = "0",
    image_id: str = "0",
    laterality: str = "",
    view: str = "",
    jp2_header: bool = False,
    j2k_levels: int | None = None,
    lossy_psnr: float = 60.0,
) -> Path:
    """Write ``pixels`` (2-D unsigned integers: the stored values) as an MG DICOM file.

    ``transfer_syntax`` is a UID or a short name from :data:`TRANSFER_SYNTAXES`.
    ``window`` is one (center, width) pair or several; ``voi_function`` is
    LINEAR, LINEAR_EXACT or SIGMOID (omitted when None); ``voi_lut`` =
    (first_mapped_value, bits, lut_values) adds a VOI LUT Sequence.
    ``slope``/``intercept`` become RescaleSlope/Intercept. JPEG 2000 files get
    ``j2k_levels`` decomposition levels (default 5, fewer for small images),
    optionally behind a JP2 header; lossy JPEG 2000 targets ``lossy_psnr`` dB.
    Returns the path written (atomically).
    """
    pixels = np.asarray(pixels)
    if pixels.ndim != 2 or pixels.dtype.kind != "u":
        raise ValueError(f"pixels must be a 2-D unsigned integer array, got {pixels.dtype} "
                         f"{pixels.shape}")
    syntax = TRANSFER_SYNTAXES.get(transfer_syntax, transfer_syntax)
    pixels = pixels.astype(np.uint16 if pixels.dtype.itemsize > 1 else np.uint8)
    allocated = pixels.dtype.itemsize * 8
    if bits_stored is None:
        bits_stored = max(8, int(pixels.max()).bit_length()) if allocated == 16 else 8
    if int(pixels.max()) >= 2**bits_stored:
        raise ValueError(f"pixel values up to {pixels.max()} do not fit in {bits_stored} bits")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MAMMOGRAPHY_SOP_CLASS
    sop_uid = generate_uid(entropy_srcs=["cvae_mammo", str(patient_id), str(image_id)])
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MAMMOGRAPHY_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MG"
    ds.PatientID = str(patient_id)
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["cvae_mammo-study", str(patient_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["cvae_mammo-series", str(image_id)])
    ds.InstanceNumber = 1
    if laterality:
        ds.ImageLaterality = laterality
    if view:
        ds.ViewPosition = view
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if window is not None:
        pairs = [window] if isinstance(window[0], int | float) else list(window)
        ds.WindowCenter = [f"{c:g}" for c, _ in pairs] if len(pairs) > 1 else f"{pairs[0][0]:g}"
        ds.WindowWidth = [f"{w:g}" for _, w in pairs] if len(pairs) > 1 else f"{pairs[0][1]:g}"
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if voi_lut is not None:
        first, bits, values = voi_lut
        item = Dataset()
        values = np.asarray(values, dtype=np.uint16)
        item.LUTDescriptor = [len(values) % 65536, first, bits]
        item.LUTData = values.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = [item]

    if syntax == ExplicitVRLittleEndian:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
    elif syntax == RLELossless:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if allocated == 16 else "OB"
        ds.compress(RLELossless, encoding_plugin="pydicom")
    else:
        frame = _encode(pixels, syntax, bits_stored, jp2_header=jp2_header,
                        j2k_levels=j2k_levels, lossy_psnr=lossy_psnr)
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        if syntax == JPEG2000:
            ds.LossyImageCompression = "01"
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        ds.save_as(handle, enforce_file_format=True)
    return path
