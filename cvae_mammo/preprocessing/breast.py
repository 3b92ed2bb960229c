"""Find the breast in a display-ready mammogram: mask, side, crop box, pectoral muscle.

All functions take a small float image in [0, 1] with tissue bright (the
preprocessing computes them on a ~512-pixel thumbnail and scales the result),
so they cost milliseconds whatever the original resolution.

The breast is the largest connected bright region after a morphological
opening. The opening cuts thin structures (the Hologic vertical line
artefact, film edges, marker strings) from the breast, and taking only the
largest component drops burnt-in labels, markers and mini-MIAS film labels,
which a bounding box of all non-zero pixels would keep.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
from scipy import ndimage

#: The breast must cover at least this fraction of the image to be believed.
MIN_BREAST_FRACTION = 0.01


@dataclasses.dataclass(frozen=True)
class BreastRegion:
    """Where the breast is in an image.

    ``mask`` is boolean (H, W); ``box`` is ``(x0, y0, x1, y1)`` with exclusive
    ends, margin included; ``chest_wall_right`` is True when most of the
    breast's mass lies in the right half, i.e. the image must be flipped so
    that every breast has its chest wall on the left.
    """

    mask: np.ndarray
    box: tuple[int, int, int, int]
    chest_wall_right: bool


def breast_mask(image: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest connected bright region of ``image`` (floats in [0, 1]).

    Raises ValueError when no region covering at least 1% of the image exists
    (e.g. a blank image).
    """
    height, width = image.shape
    gray = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    gray = cv2.medianBlur(gray, 3)
    otsu, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    # Halfway between the background and the Otsu level keeps the faint skin line;
    # the floor above the background rejects noise.
    background = float(np.percentile(gray[::4, ::4], 2))
    level = max(background + 4.0, 0.5 * (background + float(otsu)))
    binary = (gray > level).astype(np.uint8)
    side = max(3, round(0.03 * min(height, width))) | 1
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
    opened = cv2.morphologyEx(binary, cv2.MORPH_OPEN, kernel)
    mask = _largest_component(opened)
    if mask.sum() < MIN_BREAST_FRACTION * height * width:
        raise ValueError(f"no breast region found (largest bright region is {mask.sum()} "
                         "pixels)")
    # Give back the rim the opening shaved off and the faint skin zone below the level:
    # grow (a bounded distance) into pixels above the background noise.
    below = gray[gray <= level]
    noise = float(np.percentile(below, 90)) if below.size else background
    loose = gray > min(level, max(background + 4.0, noise + 2.0))
    grow = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * side + 1, 2 * side + 1))
    mask = cv2.dilate(mask.astype(np.uint8), grow).astype(bool) & loose
    mask = ndimage.binary_fill_holes(mask).astype(np.uint8)
    # A small median filter smooths the noisy contour along the skin line (not the nipple).
    smooth = max(3, round(0.01 * min(height, width))) | 1
    mask = cv2.medianBlur(mask * 255, smooth) > 127
    return _largest_component(mask.astype(np.uint8))


def _largest_component(binary: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 0/1 image (all False when there is none)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count < 2:
        return np.zeros(binary.shape, dtype=bool)
    return labels == int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1


def chest_wall_on_right(image: np.ndarray, mask: np.ndarray) -> bool:
    """True when the breast's pixel mass (intensity inside ``mask``) is mostly in the right half."""
    weights = np.where(mask, image, 0.0)
    half = image.shape[1] // 2
    return float(weights[:, half:].sum()) > float(weights[:, :half].sum())


def bounding_box(mask: np.ndarray, margin: float) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` box of ``mask`` widened by ``margin`` x its size on each side."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    pad_y = round(margin * (y1 - y0))
    pad_x = round(margin * (x1 - x0))
    height, width = mask.shape
    return max(0, x0 - pad_x), max(0, y0 - pad_y), min(width, x1 + pad_x), min(height, y1 + pad_y)


def locate_breast(image: np.ndarray, margin: float = 0.02) -> BreastRegion:
    """Mask, crop box and side of the breast in ``image`` (floats in [0, 1], tissue bright)."""
    mask = breast_mask(image)
    return BreastRegion(
        mask=mask,
        box=bounding_box(mask, margin),
        chest_wall_right=chest_wall_on_right(image, mask),
    )


def pectoral_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Heuristic pectoral-muscle mask of an MLO view oriented with the chest wall on the left.

    The muscle is the bright wedge in the upper-left corner. At successively
    higher Otsu levels of the breast's upper half, take the bright component
    touching the left edge near the top, fit a straight line to its right
    border row by row, and accept the triangle under that line when it is
    plausible (a falling border that the component fills well). Returns an
    all-False mask when no level gives a plausible wedge.
    """
    height = image.shape[0]
    upper = mask.copy()
    upper[height // 2 :] = False
    gray = np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)
    values = gray[upper]
    if values.size < 50:
        return np.zeros_like(mask, dtype=bool)
    level = int(values.min())
    for _ in range(3):
        brighter = values[values > level]
        if brighter.size < 50 or int(brighter.max()) == int(brighter.min()):
            break
        level = int(cv2.threshold(brighter.reshape(-1, 1), 0, 255,
                                  cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0])
        wedge = _corner_wedge((gray > level) & upper, mask)
        if wedge is not None:
            return wedge
    return np.zeros_like(mask, dtype=bool)


def _corner_wedge(bright: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """The triangle fitted to the bright component in the top-left corner, if plausible."""
    height, width = bright.shape
    labels, _ = ndimage.label(bright)
    seeds = labels[: max(1, height // 4), : max(1, width // 20)]
    seeds = seeds[seeds > 0]
    if seeds.size == 0:
        return None
    component = labels == np.bincount(seeds).argmax()
    rows = np.flatnonzero(component.any(axis=1))
    if rows.size < 5:
        return None
    right_edges = np.array([np.flatnonzero(component[row])[-1] for row in rows], dtype=float)
    slope, top_x = np.polyfit(rows.astype(float), right_edges, 1)
    if slope >= 0:
        return None
    left_y = -top_x / slope  # where the border meets the left edge
    if not (0.05 * width < top_x < 0.9 * width and 0.05 * height < left_y < 0.95 * height):
        return None
    yy, xx = np.mgrid[0:height, 0:width]
    wedge = (xx < top_x + slope * yy) & mask
    overlap = (wedge & component).sum()
    if overlap < 0.7 * wedge.sum() or overlap < 0.7 * component.sum():
        return None
    return wedge
