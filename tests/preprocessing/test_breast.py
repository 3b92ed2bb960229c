"""Breast mask, side, crop box and pectoral muscle, on phantoms and on real mini-MIAS films."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cvae_mammo.preprocessing.breast import (
    bounding_box,
    breast_mask,
    chest_wall_on_right,
    locate_breast,
    pectoral_mask,
)
from cvae_mammo.preprocessing.imageio import read_grayscale
from tests.preprocessing.test_dicom import ARTEFACT, breast_phantom


def _display(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) / 4095.0


@pytest.mark.parametrize("side", ["left", "right"])
def test_mask_ignores_line_artefact_and_marker(side: str) -> None:
    pixels, (x0, y0, x1, y1) = breast_phantom(chest_wall=side)
    mask = breast_mask(_display(pixels))
    truth = np.zeros_like(mask)
    truth[y0:y1, x0:x1] = True
    assert not mask[pixels == ARTEFACT].any()
    assert ndimage.label(mask)[1] == 1
    inside = pixels[y0:y1, x0:x1] > 1000
    assert mask[y0:y1, x0:x1][inside].mean() > 0.97
    region = locate_breast(_display(pixels), margin=0.0)
    bx0, by0, bx1, by1 = region.box
    assert abs(bx0 - x0) <= 2 and abs(bx1 - x1) <= 2 and abs(by0 - y0) <= 2
    assert abs(by1 - y1) <= 2
    assert region.chest_wall_right is (side == "right")
    assert chest_wall_on_right(_display(pixels), mask) is (side == "right")


def test_bounding_box_margin_and_clamping() -> None:
    mask = np.zeros((100, 80), dtype=bool)
    mask[10:60, 0:40] = True
    assert bounding_box(mask, 0.1) == (0, 5, 44, 65)
    assert bounding_box(mask, 0.0) == (0, 10, 40, 60)


def test_blank_image_has_no_breast() -> None:
    with pytest.raises(ValueError, match="no breast region"):
        breast_mask(np.zeros((64, 48), dtype=np.float32))


def test_pectoral_wedge_found_on_mlo_phantom() -> None:
    pixels, _ = breast_phantom(240, 180, chest_wall="left", artefacts=False)
    display = _display(pixels)
    yy, xx = np.mgrid[0:240, 0:180]
    wedge = (xx < 70 - 70 * yy / 110) & (pixels > 1000)
    display[wedge] = 0.95
    mask = breast_mask(display)
    found = pectoral_mask(display, mask)
    overlap = (found & wedge).sum() / (found | wedge).sum()
    assert overlap > 0.6
    # Without a wedge there is nothing bright in the corner to remove.
    plain = _display(breast_phantom(240, 180, artefacts=False)[0])
    assert pectoral_mask(plain, breast_mask(plain)).sum() < 0.05 * breast_mask(plain).sum()


def test_real_mini_mias_masks_and_sides(mias_dir: Path) -> None:
    # mdb001/mdb002 and mdb009/mdb010 are the two breasts of one woman each.
    sides = {}
    for name in ("mdb001", "mdb002", "mdb009", "mdb010"):
        image = read_grayscale(mias_dir / "images" / f"{name}.png").astype(np.float32) / 255
        region = locate_breast(image)
        fraction = region.mask.mean()
        assert 0.1 < fraction < 0.8, (name, fraction)
        assert ndimage.label(region.mask)[1] == 1
        x0, y0, x1, y1 = region.box
        assert (y1 - y0) > 0.6 * image.shape[0]  # MLO breasts run most of the film's height
        # ... but not its width: film labels, markers and the film-edge band are left out.
        assert (x1 - x0) < 0.6 * image.shape[1], (name, region.box)
        sides[name] = region.chest_wall_right
    assert sides["mdb001"] != sides["mdb002"] and sides["mdb009"] != sides["mdb010"]
