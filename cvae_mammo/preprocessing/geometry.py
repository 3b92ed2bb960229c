"""Map pixels of an original image into its preprocessed (cropped, flipped, resized) geometry.

Every manifest row records its crop box in original pixels (``crop_x0, crop_y0,
crop_x1, crop_y1``) and whether it was flipped; with the dataset's output size
and the default ``stretch`` resize, that is enough to carry an annotation (a
lesion mask, a circle) onto the preprocessed image, for checking anomaly maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def _flag(value: Any) -> bool:
    return str(value).strip().lower() in {"1", "true"}


def mask_to_dataset(mask: np.ndarray, row: Mapping[str, Any], size: tuple[int, int]) -> np.ndarray:
    """A bool mask in original pixels -> bool ``size`` (H, W) mask in the dataset image's geometry.

    ``row`` is the image's manifest row (crop box and ``flipped``).
    """
    import cv2

    crop = np.asarray(mask, np.uint8)[int(row["crop_y0"]):int(row["crop_y1"]),
                                      int(row["crop_x0"]):int(row["crop_x1"])] * 255
    height, width = size
    resized = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA) >= 128
    if _flag(row["flipped"]):
        resized = resized[:, ::-1]
    return np.ascontiguousarray(resized)


def circle_mask(shape: tuple[int, int], centre_xy: tuple[float, float], radius: float) -> np.ndarray:
    """Bool ``shape`` mask of a filled circle (centre as column, row in pixels)."""
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (cols - centre_xy[0]) ** 2 + (rows - centre_xy[1]) ** 2 <= radius**2
