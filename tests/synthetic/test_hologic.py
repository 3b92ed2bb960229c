"""Synthetic Hologic-geometry DICOMs: a narrow breast against one edge, stored like the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvae_mammo.preprocessing.dicom import choose_window, read_dicom, rescale
from cvae_mammo.synthetic.hologic import (
    BREAST_HEIGHT,
    BREAST_WIDTH,
    HOLOGIC_FRAMES,
    HOLOGIC_WINDOWS,
    hologic_display,
    write_hologic_dicom,
)


def test_narrow_breast_against_the_chest_wall_edge_and_a_line_artefact_beyond() -> None:
    rows, columns = HOLOGIC_FRAMES[1]
    left, box = hologic_display(rows, columns, laterality="L", view="CC", seed=5)
    right, mirrored = hologic_display(rows, columns, laterality="R", view="CC", seed=5)
    assert left.shape == (rows, columns) and left.dtype == np.float32
    np.testing.assert_array_equal(right, left[:, ::-1])
    x0, y0, x1, y1 = box
    assert x0 == 0 and mirrored == (columns - x1, y0, columns, y1)
    assert BREAST_WIDTH[0] * columns - 1 <= x1 <= BREAST_WIDTH[1] * columns + 1
    assert BREAST_HEIGHT[0] * rows - 1 <= y1 - y0 <= BREAST_HEIGHT[1] * rows + 1
    breast = left[y0:y1, x0:x1]
    assert breast.mean() > 0.2 and (breast > 0).mean() > 0.6
    outside = left.copy()
    outside[y0:y1, x0:x1] = 0.0
    lit = np.flatnonzero(outside.any(axis=0))
    # Outside the breast only the 3-pixel line artefact, a tenth of the width further out.
    assert len(lit) == 3 and lit[0] == x1 + round(0.1 * columns)
    mlo = hologic_display(rows, columns, laterality="L", view="MLO", seed=5)[1]
    assert mlo[1] == 0  # an MLO breast runs off the top edge


def test_stored_like_a_real_hologic_file_and_window_zero_gives_the_display_back(
        tmp_path: Path) -> None:
    rows, columns = 1024, 832  # the 4096x3328 geometry at a quarter of the size
    path, box = write_hologic_dicom(tmp_path / "h.dcm", rows, columns, laterality="R",
                                    seed=2, image_id="77")
    image = read_dicom(path)
    assert (image.rows, image.columns, image.photometric) == (rows, columns, "MONOCHROME1")
    assert image.transfer_syntax == "1.2.840.10008.1.2.4.90"
    assert image.bits_stored == 16 and image.resolution_levels >= 4
    assert image.voi_function == "SIGMOID" and image.windows == list(HOLOGIC_WINDOWS)
    assert (image.laterality, image.view, image.patient_id) == ("R", "CC", "900")
    values = rescale(image.decode(), image.slope, image.intercept)
    shown = choose_window(image, values).apply(values, image)
    display = hologic_display(rows, columns, laterality="R", seed=2)[0]
    visible = (display > 0.01) & (display < 0.99)  # SIGMOID is clipped at 0.002 / 0.998
    assert np.abs(shown[visible] - display[visible]).max() < 2e-3
    assert box[2] == columns
    background = shown[:, : box[0] - 40]  # black, but for the line artefact (0.5)
    assert np.median(background) < 0.01 and background.max() < 0.51
