"""Synthetic lesions pasted into real normal mammograms: training data for the lesion segmenter.

:func:`add_synthetic_lesion` puts one lesion inside the breast of a preprocessed image
(float ``[H, W]`` in [0, 1], tissue bright) and returns the changed image with the
lesion's mask. Kinds (:data:`LESION_KINDS`, drawn with :data:`LESION_ODDS`):

* ``mass`` -- a soft, rotated ellipse of extra density;
* ``spiculated`` -- the same with thin lines radiating from it;
* ``calcifications`` -- a cluster of 3-15 tiny bright specks;
* ``asymmetry`` -- a larger, fainter ellipse (focal asymmetric density);
* ``distortion`` -- a local swirl of the tissue (architectural distortion).

Sizes are in pixels of a 256-pixel-high image and scale with the image height. Unlike
:mod:`cvae_mammo.synthetic.phantom` (whole artificial breasts for the demo), these
lesions are added to real tissue. Two styles (:data:`LESION_STYLES`) set their contrast:

* ``shapes`` -- smooth profiles whose contrast is drawn from fixed ranges and shrinks where
  the tissue is already dense (on mini-MIAS normals at 256x128, median peak: masses 2.9 and
  asymmetries 1.5 local standard deviations of the tissue around them, calcification specks
  41 times its fine texture);
* ``tissue`` -- contrast drawn relative to the image's own statistics around the lesion:
  masses 1-5 and asymmetries 0.7-3 local standard deviations (log-uniform), calcification
  specks 2-10 times the local fine-texture amplitude, so that many are as subtle as real
  ones; masses and asymmetries also carry the fine texture of another place of the same
  breast, so that a smooth blob is not what marks a lesion. The mask is where the change
  exceeds a quarter of its peak.

:func:`jitter` misaligns the other breast (scale, shift) the way two breasts of one woman
are never aligned. Everything random comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LESION_KINDS: tuple[str, ...] = ("mass", "spiculated", "calcifications", "asymmetry",
                                 "distortion")
#: How often each kind of :data:`LESION_KINDS` is drawn.
LESION_ODDS: tuple[float, ...] = (0.25, 0.2, 0.2, 0.15, 0.2)
#: Image height the pixel sizes below are given for.
REFERENCE_HEIGHT = 256
#: A pixel whose value changed by more than this belongs to the lesion's mask.
MASK_CHANGE = 0.02
#: How the lesions' contrast is set (see the module docstring).
LESION_STYLES: tuple[str, ...] = ("shapes", "tissue")
#: ``tissue`` style: a pixel belongs to the mask where the change exceeds this share of its peak.
RELATIVE_MASK_CHANGE = 0.25


def _grid(shape: tuple[int, int], centre: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    return rows - centre[0], cols - centre[1]


def soft_ellipse(shape: tuple[int, int], centre: tuple[float, float],
                 radii: tuple[float, float], angle: float, power: float) -> np.ndarray:
    """A rotated ellipse profile, 1 at the centre falling to 0 at its rim."""
    dy, dx = _grid(shape, centre)
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radii[0]
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radii[1]
    return np.clip(1 - (u * u + v * v), 0, 1) ** power


def spicules(shape: tuple[int, int], centre: tuple[float, float], reach: float,
             rng: np.random.Generator) -> np.ndarray:
    """5-13 thin lines radiating from ``centre`` for 1.5-3.5 ``reach``, fading outwards (0-1)."""
    dy, dx = _grid(shape, centre)
    angle = np.arctan2(dy, dx)
    distance = np.hypot(dy, dx)
    lines = np.zeros(shape, np.float32)
    for direction in rng.uniform(-np.pi, np.pi, rng.integers(5, 14)):
        length = rng.uniform(1.5, 3.5) * reach
        off = np.angle(np.exp(1j * (angle - direction)))
        lines = np.maximum(lines, np.exp(-(distance * off) ** 2 / 0.8) * (distance < length)
                           * (1 - distance / length))
    return lines


def swirl(image: np.ndarray, centre: tuple[float, float], radius: float,
          rng: np.random.Generator) -> np.ndarray:
    """``image`` turned around ``centre`` by up to 0.8-2 rad, fading out at ``radius``."""
    dy, dx = _grid(image.shape, centre)
    fall = np.clip(1 - np.hypot(dy, dx) / radius, 0, 1) ** 2
    turn = rng.uniform(0.8, 2.0) * rng.choice([-1, 1]) * fall
    source = [centre[0] + dy * np.cos(turn) - dx * np.sin(turn),
              centre[1] + dy * np.sin(turn) + dx * np.cos(turn)]
    return ndimage.map_coordinates(image, source, order=1, mode="nearest").astype(np.float32)


def calcification_cluster(shape: tuple[int, int], centre: tuple[float, float], spread: float,
                          rng: np.random.Generator) -> np.ndarray:
    """3-15 specks scattered (normal, ``spread`` px) around ``centre``, slightly blurred."""
    specks = np.zeros(shape, np.float32)
    for _ in range(rng.integers(3, 16)):
        row = int(np.clip(centre[0] + rng.normal(0, spread), 0, shape[0] - 1))
        col = int(np.clip(centre[1] + rng.normal(0, spread), 0, shape[1] - 1))
        specks[row, col] = rng.uniform(0.2, 0.6)
    return ndimage.gaussian_filter(specks, rng.uniform(0.3, 0.7)) * 3


def _fine_texture(image: np.ndarray) -> np.ndarray:
    """The image minus its Gaussian blur: the texture a lesion's own contrast is measured against."""
    return image - ndimage.gaussian_filter(image, 1.5)


def _local_statistics(image: np.ndarray, fine: np.ndarray, breast: np.ndarray,
                      centre: tuple[float, float], radius: float) -> tuple[float, float]:
    """Standard deviation of the ``breast`` pixels (a mask away from its edge) within
    ``radius`` of ``centre``, and of their ``fine`` texture, each at least 0.005."""
    row, col, reach = int(centre[0]), int(centre[1]), max(3, int(radius))
    window = (slice(max(0, row - reach), row + reach + 1), slice(max(0, col - reach),
                                                                 col + reach + 1))
    inside = breast[window]
    return (max(0.005, float(image[window][inside].std())),
            max(0.005, float(fine[window][inside].std())))


def _texture_from_elsewhere(fine: np.ndarray, sources: np.ndarray, centre: tuple[float, float],
                            limit: float, rng: np.random.Generator) -> np.ndarray:
    """The ``fine`` texture, clipped to +-``limit`` and moved so that a random pixel of
    ``sources`` (a mask away from the breast's edge) lands on ``centre``."""
    rows, cols = np.nonzero(sources)
    pick = rng.integers(len(rows))
    shift = (round(centre[0] - rows[pick]), round(centre[1] - cols[pick]))
    return np.roll(np.clip(fine, -limit, limit), shift, axis=(0, 1))


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def add_synthetic_lesion(image: np.ndarray, rng: np.random.Generator,
                         mask_threshold: float = 0.04, kind: str | None = None,
                         style: str = "shapes") -> tuple[np.ndarray, np.ndarray]:
    """``image`` with one synthetic lesion inside its breast, and the lesion's 0/1 mask.

    The breast is where ``image > mask_threshold``; the centre is drawn away from its
    edge. ``kind`` (one of :data:`LESION_KINDS`) defaults to a draw with :data:`LESION_ODDS`;
    ``style`` (one of :data:`LESION_STYLES`) sets how its contrast is drawn.
    """
    image = np.ascontiguousarray(image, dtype=np.float32)
    if kind is not None and kind not in LESION_KINDS:
        raise ValueError(f"lesion kind {kind!r}: choose one of {', '.join(LESION_KINDS)}")
    if style not in LESION_STYLES:
        raise ValueError(f"lesion style {style!r}: choose one of {', '.join(LESION_STYLES)}")
    size = image.shape[0] / REFERENCE_HEIGHT
    breast = image > mask_threshold
    if not breast.any():
        return image, np.zeros_like(image)
    inner = ndimage.binary_erosion(breast, iterations=max(1, round(6 * size)))
    inner = inner if inner.any() else breast
    rows, cols = np.nonzero(inner)
    pick = rng.integers(len(rows))
    centre = (float(rows[pick]), float(cols[pick]))
    kind = kind or str(rng.choice(LESION_KINDS, p=LESION_ODDS))
    relative = style == "tissue"
    if relative:
        fine = _fine_texture(image)
        spread, fine_spread = _local_statistics(image, fine, inner, centre, 8 * size)
    if kind == "distortion":
        changed = swirl(image, centre, rng.uniform(6, 18) * size, rng)
    elif kind == "calcifications":
        specks = calcification_cluster(image.shape, centre, rng.uniform(2, 8) * size, rng)
        if relative:
            specks *= _log_uniform(rng, 2, 10) * fine_spread / max(float(specks.max()), 1e-6)
        changed = image + specks
    else:
        low, high = (8, 24) if kind == "asymmetry" else (2.5, 12)
        radii = (rng.uniform(low, high) * size, rng.uniform(low, high) * size)
        profile = soft_ellipse(image.shape, centre, radii, rng.uniform(0, np.pi),
                               rng.uniform(0.5, 2))
        if kind == "spiculated":
            profile = np.maximum(profile, 0.7 * spicules(image.shape, centre, max(radii), rng))
        if relative:
            contrast = (_log_uniform(rng, 0.7, 3) if kind == "asymmetry"
                        else _log_uniform(rng, 1, 5)) * spread
            texture = _texture_from_elsewhere(fine, inner, centre, 3 * fine_spread, rng)
            changed = image + profile * (contrast + rng.uniform(0.5, 1.5) * texture)
        else:
            gain = rng.uniform(0.04, 0.12) if kind == "asymmetry" else rng.uniform(0.06, 0.25)
            changed = image + gain * profile * (1.3 - np.clip(image, 0.1, 1))
    changed = np.where(breast, np.clip(changed, 0, 1), image).astype(np.float32)
    change = np.abs(changed - image)
    floor = RELATIVE_MASK_CHANGE * float(change.max()) if relative else MASK_CHANGE
    return changed, ((change > floor) & breast).astype(np.float32)


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` rescaled by up to 7% and shifted by up to 2.3% of its height and 3% of its width."""
    scale = rng.uniform(0.93, 1.07)
    height, width = image.shape
    shift = [rng.uniform(-1, 1) * 0.023 * height, rng.uniform(-1, 1) * 0.031 * width]
    return ndimage.affine_transform(np.ascontiguousarray(image, np.float32), [1 / scale, 1 / scale],
                                    offset=shift, order=1, output_shape=image.shape
                                    ).astype(np.float32)
