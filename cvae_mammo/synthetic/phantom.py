"""Synthetic phantom mammograms with inserted lesions and their masks.

A phantom is a float32 image in ``[0, 1]`` (1 = bright = dense, as a
radiologist sees it) of a whole detector field: dark background, a breast
whose chest wall lies on one image edge, fibroglandular texture with a
power-law (1/f) spectrum whose amount follows the BI-RADS density class
A-D, a pectoral muscle triangle on MLO views, burnt-in laterality/view
markers, and optionally the thin vertical line artefact seen near one edge of
Hologic images. Lesions are masses (soft bright blobs), spiculated masses
(a blob with radiating spicules) and clusters of microcalcifications (tiny
very bright specks); each comes with a binary mask and a bounding box.

Conventions: ``laterality="L"`` puts the chest wall on the left image edge
(nipple pointing right) and ``"R"`` on the right edge, as mammograms are
hung back to back. Everything random comes from the ``numpy.random.Generator``
passed in, so one seed reproduces an image exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np

#: Lesion kinds that :func:`make_phantom` can insert.
LESION_KINDS: tuple[str, ...] = ("mass", "spiculated", "calcifications")
#: BI-RADS density classes -> fraction of the breast that is fibroglandular.
DENSITY_FRACTIONS: dict[str, float] = {"A": 0.08, "B": 0.25, "C": 0.5, "D": 0.75}
VIEWS: tuple[str, ...] = ("CC", "MLO")
LATERALITIES: tuple[str, ...] = ("L", "R")

_FAT_LEVEL = 0.40
_GLAND_LEVEL = 0.65
_MUSCLE_LEVEL = 0.8
_MARKER_LEVEL = 1.0


@dataclasses.dataclass(frozen=True)
class LesionSpec:
    """What to insert: a lesion kind, its radius as a fraction of image height, its contrast.

    ``contrast`` is added to the image intensity at the lesion centre (masses)
    or is the brightness gain of each speck (calcifications).
    """

    kind: str
    radius_fraction: float
    contrast: float

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"lesion kind {self.kind!r}: expected one of {', '.join(LESION_KINDS)}")
        if not 0.0 < self.radius_fraction < 0.25:
            raise ValueError(f"lesion radius_fraction {self.radius_fraction}: expected 0-0.25")


@dataclasses.dataclass(frozen=True)
class Lesion:
    """A lesion inserted in a phantom: where it is and what area it covers.

    ``center`` is (row, col) in pixels, ``radius`` in pixels, ``bbox`` is
    (row0, col0, row1, col1) with exclusive ends, of the lesion's mask.
    """

    kind: str
    center: tuple[float, float]
    radius: float
    contrast: float
    bbox: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class Phantom:
    """One synthetic mammogram and its ground truth."""

    image: np.ndarray  # float32 (H, W) in [0, 1], bright = dense
    breast_mask: np.ndarray  # bool (H, W): breast tissue incl. pectoral muscle
    lesion_mask: np.ndarray  # bool (H, W): union of all lesion masks
    lesions: tuple[Lesion, ...]
    view: str
    laterality: str
    density: str


def sample_lesion_spec(rng: np.random.Generator, kind: str | None = None) -> LesionSpec:
    """Draw a lesion of ``kind`` (random if None) with a plausible size and contrast."""
    if kind is None:
        kind = str(rng.choice(LESION_KINDS, p=[0.4, 0.35, 0.25]))
    if kind == "mass":
        return LesionSpec(kind, float(rng.uniform(0.045, 0.07)), float(rng.uniform(0.3, 0.4)))
    if kind == "spiculated":
        return LesionSpec(kind, float(rng.uniform(0.035, 0.05)), float(rng.uniform(0.3, 0.4)))
    if kind == "calcifications":
        return LesionSpec(kind, float(rng.uniform(0.035, 0.055)), float(rng.uniform(0.6, 0.75)))
    raise ValueError(f"lesion kind {kind!r}: expected one of {', '.join(LESION_KINDS)}")


def power_law_noise(
    rng: np.random.Generator, shape: tuple[int, int], beta: float = 3.0, stretch: float = 1.0
) -> np.ndarray:
    """Zero-mean, unit-variance noise whose power spectrum falls as ``1/f**beta``.

    ``stretch > 1`` makes structures elongated along the columns' axis
    (fibres running from the chest wall towards the nipple).
    """
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    freq = np.sqrt(fy**2 + (fx * stretch) ** 2)
    freq[0, 0] = 1.0
    amplitude = freq ** (-beta / 2.0)
    amplitude[0, 0] = 0.0
    spectrum = amplitude * (
        rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape)
    )
    field = np.fft.irfft2(spectrum, s=shape)
    field -= field.mean()
    return (field / (field.std() + 1e-12)).astype(np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _breast_outline(
    rng: np.random.Generator, shape: tuple[int, int], view: str
) -> tuple[np.ndarray, np.ndarray]:
    """Breast mask (chest wall on the left edge) and the normalised depth map.

    Depth is 0 at the chest wall and 1 at the skin along each row's profile.
    """
    height, width = shape
    rows = np.arange(height, dtype=np.float32)[:, None]
    cols = np.arange(width, dtype=np.float32)[None, :]
    depth_max = height * rng.uniform(0.4, 0.46)
    if view == "CC":
        centre = height * rng.uniform(0.47, 0.53)
        half_height = height * rng.uniform(0.4, 0.45)
        exponent = rng.uniform(1.8, 2.4)  # superellipse: >2 is boxier
        t = np.clip(np.abs(rows - centre) / half_height, 0.0, 1.0)
        edge = depth_max * (1.0 - t**exponent) ** (1.0 / exponent)
        edge[np.abs(rows - centre) >= half_height] = 0.0
    else:
        bottom = height * rng.uniform(0.86, 0.93)
        knee = rng.uniform(0.55, 0.65)
        top_width = rng.uniform(0.3, 0.42)
        t = rows / bottom
        upper = top_width + (1.0 - top_width) * np.sin(0.5 * np.pi * np.clip(t / knee, 0, 1))
        lower = np.sqrt(np.clip(1.0 - ((t - knee) / (1.0 - knee)) ** 2, 0.0, 1.0))
        edge = depth_max * np.where(t < knee, upper, lower)
        edge[rows >= bottom] = 0.0
    # a gentle wobble of the skin line so no two outlines are identical
    wobble = 1.0 + 0.02 * np.sin(rows / height * rng.uniform(4, 9) + rng.uniform(0, 2 * np.pi))
    edge = edge * wobble
    mask = cols < edge
    depth = np.where(mask, cols / np.maximum(edge, 1.0), 1.0).astype(np.float32)
    return mask, depth


def _pectoral_muscle(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Soft (0-1) pectoral muscle triangle in the upper chest-wall corner (left edge)."""
    height, width = shape
    rows = np.arange(height, dtype=np.float32)[:, None] / height
    cols = np.arange(width, dtype=np.float32)[None, :] / height
    top = rng.uniform(0.14, 0.22)  # its width along the top edge (fraction of height)
    side = rng.uniform(0.38, 0.55)  # its length down the chest wall
    bow = rng.uniform(0.0, 0.15)  # a slightly convex anterior border
    line = cols / top + rows / side
    line = line - bow * np.sin(np.pi * np.clip(rows / side, 0, 1))
    return 1.0 - _smoothstep((line - 0.97) / 0.06)


def _tissue(
    rng: np.random.Generator, mask: np.ndarray, depth: np.ndarray, density: str
) -> np.ndarray:
    """Fat + fibroglandular texture inside ``mask`` with the density class's gland fraction."""
    shape = mask.shape
    texture = power_law_noise(rng, shape, beta=3.0, stretch=rng.uniform(1.5, 2.5))
    fine = power_law_noise(rng, shape, beta=2.0)
    # glands sit behind the nipple, away from the chest wall and the subcutaneous fat
    prior = np.exp(-(((depth - 0.45) / 0.35) ** 2)).astype(np.float32)
    score = texture + 1.6 * prior + 0.25 * fine
    fraction = DENSITY_FRACTIONS[density]
    threshold = np.quantile(score[mask], 1.0 - fraction) if mask.any() else 0.0
    glands = 1.0 / (1.0 + np.exp(-(score - threshold) / 0.5))
    tissue = _FAT_LEVEL + (_GLAND_LEVEL - _FAT_LEVEL) * glands + 0.015 * fine
    return tissue.astype(np.float32)


def _skin_falloff(mask: np.ndarray) -> np.ndarray:
    """Compressed-breast thickness: tissue darkens over the last few percent towards the skin."""
    # the chest wall and a breast running off the top edge (MLO) are not skin edges
    padded = np.pad(mask.astype(np.uint8), 8, mode="edge")
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[8:-8, 8:-8]
    scale = 0.035 * mask.shape[0]
    return (0.55 + 0.45 * (1.0 - np.exp(-distance / scale))).astype(np.float32)


def _place(
    rng: np.random.Generator, allowed: np.ndarray, radius: float
) -> tuple[float, float]:
    """A random point of ``allowed`` at least ``radius`` away from its border."""
    padded = np.pad(allowed.astype(np.uint8), 1)  # keep lesions off the image edges too
    inner = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1] > radius
    candidates = np.argwhere(inner if inner.any() else allowed)
    row, col = candidates[rng.integers(len(candidates))]
    return float(row), float(col)


def _blob(
    rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Soft ellipse-like lobulated blob profile (1 inside, 0 outside)."""
    rows = np.arange(shape[0], dtype=np.float32)[:, None] - centre[0]
    cols = np.arange(shape[1], dtype=np.float32)[None, :] - centre[1]
    angle = rng.uniform(0, np.pi)
    ratio = rng.uniform(0.7, 1.0)
    u = rows * np.cos(angle) + cols * np.sin(angle)
    v = -rows * np.sin(angle) + cols * np.cos(angle)
    theta = np.arctan2(v, u)
    lobes = 1.0 + 0.12 * np.sin(rng.integers(3, 6) * theta + rng.uniform(0, 2 * np.pi))
    r = np.sqrt(u**2 + (v / ratio) ** 2) / (radius * lobes)
    return 1.0 - _smoothstep((r - 0.75) / 0.5)


def _spicules(
    rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Thin bright lines radiating from a mass (0-1)."""
    canvas = np.zeros(shape, dtype=np.float32)
    thickness = max(1, round(radius / 8))
    for angle in np.sort(rng.uniform(0, 2 * np.pi, size=rng.integers(8, 15))):
        length = radius * rng.uniform(1.6, 2.8)
        end = (centre[1] + length * np.cos(angle), centre[0] + length * np.sin(angle))
        start = (centre[1] + 0.5 * radius * np.cos(angle), centre[0] + 0.5 * radius * np.sin(angle))
        cv2.line(
            canvas,
            (round(start[0]), round(start[1])),
            (round(end[0]), round(end[1])),
            color=1.0,
            thickness=thickness,
            lineType=cv2.LINE_AA,
        )
    return cv2.GaussianBlur(canvas, (0, 0), sigmaX=max(0.5, radius / 12))


def _calcifications(
    rng: np.random.Generator, shape: tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """A cluster of 8-24 tiny bright specks inside ``radius`` (0-1)."""
    canvas = np.zeros(shape, dtype=np.float32)
    speck = max(1.0, 0.006 * shape[0])
    for _ in range(rng.integers(8, 25)):
        distance = radius * np.sqrt(rng.uniform(0, 1))
        angle = rng.uniform(0, 2 * np.pi)
        col = centre[1] + distance * np.cos(angle)
        row = centre[0] + distance * np.sin(angle)
        size = speck * rng.uniform(0.6, 1.6)
        cv2.ellipse(
            canvas,
            (round(col), round(row)),
            (max(1, round(size)), max(1, round(size * rng.uniform(0.5, 1.0)))),
            float(rng.uniform(0, 180)),
            0,
            360,
            color=1.0,
            thickness=-1,
            lineType=cv2.LINE_AA,
        )
    return cv2.GaussianBlur(canvas, (0, 0), sigmaX=0.6)


def _insert_lesion(
    rng: np.random.Generator,
    image: np.ndarray,
    allowed: np.ndarray,
    spec: LesionSpec,
) -> tuple[np.ndarray, Lesion]:
    """Add one lesion to ``image`` in place; return its mask and description."""
    shape = image.shape
    radius = spec.radius_fraction * shape[0]
    reach = radius * (2.0 if spec.kind == "spiculated" else 1.0)
    centre = _place(rng, allowed, reach)
    if spec.kind == "calcifications":
        specks = _calcifications(rng, shape, centre, radius)
        image += spec.contrast * specks
        rows, cols = np.ogrid[: shape[0], : shape[1]]
        mask = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (1.15 * radius) ** 2
    else:
        profile = _blob(rng, shape, centre, radius)
        mask = profile > 0.25
        if spec.kind == "spiculated":
            lines = _spicules(rng, shape, centre, radius)
            profile = np.maximum(profile, 0.6 * lines / max(float(lines.max()), 1e-6))
            mask |= lines > 0.25 * float(lines.max())
        image += spec.contrast * profile
    mask &= allowed
    found = np.argwhere(mask)
    if len(found):
        (r0, c0), (r1, c1) = found.min(axis=0), found.max(axis=0) + 1
    else:  # lesion centre exists even if the mask were clipped away entirely
        r0, c0, r1, c1 = int(centre[0]), int(centre[1]), int(centre[0]) + 1, int(centre[1]) + 1
    lesion = Lesion(spec.kind, centre, float(radius), spec.contrast, (int(r0), int(c0), int(r1), int(c1)))
    return mask, lesion


def _mirror(lesion: Lesion, width: int) -> Lesion:
    """The same lesion after a left-right flip of an image ``width`` pixels wide."""
    r0, c0, r1, c1 = lesion.bbox
    return dataclasses.replace(
        lesion,
        center=(lesion.center[0], width - 1 - lesion.center[1]),
        bbox=(r0, width - c1, r1, width - c0),
    )


def _burn_marker(
    image: np.ndarray, text: str, breast: np.ndarray, chest_wall_left: bool
) -> None:
    """Burn a laterality/view label into the top corner away from the chest wall."""
    height, width = image.shape
    scale = height / 900.0
    thickness = max(1, round(2 * scale))
    (text_w, text_h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    margin = round(0.07 * width)
    col = width - text_w - margin if chest_wall_left else margin
    row = round(0.04 * height) + text_h
    box = breast[max(0, row - text_h - 2) : row + 3, max(0, col - 2) : col + text_w + 2]
    if box.any():  # never touch the breast: the crop must still find it as one component
        return
    canvas = np.zeros(image.shape, dtype=np.uint8)  # OpenCV draws text on 8-bit images only
    cv2.putText(canvas, text, (col, row), cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness)
    image[canvas > 127] = _MARKER_LEVEL


def make_phantom(
    rng: np.random.Generator,
    size: tuple[int, int] = (512, 416),
    *,
    view: str = "CC",
    laterality: str = "L",
    density: str = "B",
    lesions: Sequence[LesionSpec | str] = (),
    markers: bool = True,
    line_artefact: bool = False,
    noise: float = 0.01,
) -> Phantom:
    """Render one phantom mammogram of ``size`` = (height, width) pixels.

    ``lesions`` are :class:`LesionSpec` or kind names (then sampled with
    :func:`sample_lesion_spec`). A detector-like size has height:width of
    about 1.2 (Hologic 4096x3328); the breast then fills about half the
    width, so the cropped breast has the usual ~2:1 height:width.
    """
    if view not in VIEWS:
        raise ValueError(f"view {view!r}: expected one of {', '.join(VIEWS)}")
    if laterality not in LATERALITIES:
        raise ValueError(f"laterality {laterality!r}: expected L or R")
    if density not in DENSITY_FRACTIONS:
        raise ValueError(f"density {density!r}: expected one of A, B, C, D")
    shape = (int(size[0]), int(size[1]))
    if min(shape) < 32:
        raise ValueError(f"phantom size {shape}: need at least 32x32 pixels")

    # independent streams, so adding a lesion leaves the rest of the image unchanged
    anatomy_rng, lesion_rng, noise_rng = rng.spawn(3)
    breast, depth = _breast_outline(anatomy_rng, shape, view)
    image = _tissue(anatomy_rng, breast, depth, density)
    allowed = breast.copy()
    if view == "MLO":
        muscle = _pectoral_muscle(anatomy_rng, shape) * breast
        muscle_texture = 0.03 * power_law_noise(anatomy_rng, shape, beta=2.5)
        image = image * (1.0 - muscle) + (_MUSCLE_LEVEL + muscle_texture) * muscle
        allowed &= muscle < 0.05
    image = image * _skin_falloff(breast)

    lesion_mask = np.zeros(shape, dtype=bool)
    inserted = []
    for item in lesions:
        spec = sample_lesion_spec(lesion_rng, item) if isinstance(item, str) else item
        mask, lesion = _insert_lesion(lesion_rng, image, allowed, spec)
        lesion_mask |= mask
        inserted.append(lesion)

    image = np.where(breast, image, 0.03).astype(np.float32)
    image += noise * noise_rng.standard_normal(shape).astype(np.float32)
    if laterality == "R":  # chest wall on the right edge
        image, breast, lesion_mask = image[:, ::-1], breast[:, ::-1], lesion_mask[:, ::-1]
        inserted = [_mirror(lesion, shape[1]) for lesion in inserted]
    image = np.ascontiguousarray(image)
    chest_wall_left = laterality == "L"
    if markers:
        _burn_marker(image, f"{laterality}{view}", breast, chest_wall_left)
    if line_artefact:
        offset = int(noise_rng.integers(max(2, shape[1] // 60), max(3, shape[1] // 25)))
        col = shape[1] - 1 - offset if chest_wall_left else offset
        image[:, col : col + max(1, shape[1] // 400)] = noise_rng.uniform(0.55, 0.85)
    image = np.clip(image, 0.0, 1.0)
    return Phantom(
        image=np.ascontiguousarray(image, dtype=np.float32),
        breast_mask=np.ascontiguousarray(breast),
        lesion_mask=np.ascontiguousarray(lesion_mask),
        lesions=tuple(inserted),
        view=view,
        laterality=laterality,
        density=density,
    )
