"""Synthetic DICOMs with real Hologic geometry: a narrow breast in a large frame.

Real RSNA Hologic images are 5355x4915 or 4096x3328 (rows x columns), JPEG 2000
lossless, 16 bits stored, MONOCHROME1, VOI LUT function SIGMOID with several
window pairs, and the breast often fills only about a quarter of the frame's
width (crop boxes measured on three real files: 1219x4232, 1091x3328 and
1200x3504 pixels), against the chest-wall edge, with a thin vertical line
artefact further out and a constant, noise-free background.
:func:`write_hologic_dicom` writes such a file from a phantom
(:func:`cvae_mammo.synthetic.phantom.make_phantom`) rendered at a quarter of the
frame's size, narrowed to that geometry and given full-resolution detector
noise of about the real files' amplitude, so code that must scale with the
crop rather than the frame can be tested without the real data.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from cvae_mammo.fileio import PathLike
from cvae_mammo.synthetic.dataset import Unit, display_to_stored
from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom
from cvae_mammo.synthetic.phantom import make_phantom

#: The two Hologic frame sizes in the RSNA data, (rows, columns).
HOLOGIC_FRAMES: tuple[tuple[int, int], ...] = ((5355, 4915), (4096, 3328))
#: How the real Hologic files store pixels (window pairs as in a real RSNA file).
HOLOGIC_UNIT = Unit(49, 1, "1.2.840.10008.1.2.4.90", "MONOCHROME1", "SIGMOID", 16, 1.0, 0.0,
                    3, True)
HOLOGIC_WINDOWS: tuple[tuple[float, float], ...] = (
    (1802.3, 1092.0), (2020.7, 1092.0), (1583.9, 1092.0))
#: Breast box as fractions of the frame: height and width ranges of the real crops.
BREAST_HEIGHT = (0.62, 0.79)
BREAST_WIDTH = (0.22, 0.25)
#: Detector noise (display units, 0-1) added at full resolution inside the breast.
NOISE = 0.013
_ARTEFACT_DISPLAY = 0.5


def hologic_display(rows: int, columns: int, *, laterality: str = "L", view: str = "CC",
                    seed: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Display image (float32, 0-1, bright = dense) of a narrow breast and its box.

    The box is (x0, y0, x1, y1) of the breast in the frame, exclusive ends;
    ``laterality`` ``L`` puts the chest wall on the left edge, ``R`` on the
    right. A 3-pixel vertical line artefact runs down the frame about a tenth
    of its width beyond the breast.
    """
    rng = np.random.default_rng(seed)
    phantom = make_phantom(rng, (rows // 4, columns // 4), view=view, laterality="L",
                           markers=False, noise=0.0)
    found_rows = np.flatnonzero(phantom.breast_mask.any(axis=1))
    depth = int(np.flatnonzero(phantom.breast_mask.any(axis=0))[-1]) + 1
    top, bottom = int(found_rows[0]), int(found_rows[-1]) + 1
    height = round(rng.uniform(*BREAST_HEIGHT) * rows)
    width = round(rng.uniform(*BREAST_WIDTH) * columns)
    y0 = int(rng.integers(0, rows - height + 1)) if view == "CC" else 0
    size = (width, height)
    tissue = cv2.resize(phantom.image[top:bottom, :depth], size, interpolation=cv2.INTER_CUBIC)
    inside = cv2.resize(phantom.breast_mask[top:bottom, :depth].astype(np.float32), size,
                        interpolation=cv2.INTER_LINEAR) > 0.5
    tissue += NOISE * rng.standard_normal(tissue.shape, dtype=np.float32)
    display = np.zeros((rows, columns), dtype=np.float32)
    display[y0 : y0 + height, :width] = np.where(inside, np.clip(tissue, 0.0, 1.0), 0.0)
    line = width + round(0.1 * columns)
    display[:, line : line + 3] = _ARTEFACT_DISPLAY
    box = (0, y0, width, y0 + height)
    if laterality == "R":
        display = np.ascontiguousarray(display[:, ::-1])
        box = (columns - width, y0, columns, y0 + height)
    return display, box


def write_hologic_dicom(path: PathLike, rows: int = 5355, columns: int = 4915, *,
                        laterality: str = "L", view: str = "CC", seed: int = 0,
                        patient_id: str = "900", image_id: str | None = None
                        ) -> tuple[Path, tuple[int, int, int, int]]:
    """Write a Hologic-like JPEG 2000 lossless DICOM of :func:`hologic_display`.

    Stored values invert the first of :data:`HOLOGIC_WINDOWS` (SIGMOID,
    MONOCHROME1), so preprocessing with window index 0 gives the display
    image back; 16 bits stored, 5 wavelet levels. Returns the path and the
    breast's box in the frame.
    """
    display, box = hologic_display(rows, columns, laterality=laterality, view=view, seed=seed)
    stored = display_to_stored(display, HOLOGIC_UNIT, HOLOGIC_WINDOWS[0])
    written = write_mammogram_dicom(
        path, stored, transfer_syntax="jpeg2000", photometric="MONOCHROME1", bits_stored=16,
        window=list(HOLOGIC_WINDOWS), voi_function="SIGMOID", patient_id=patient_id,
        image_id=image_id if image_id is not None else str(seed), laterality=laterality,
        view=view)
    return written, box
