"""Synthetic lesions pasted into normal tissue: where they go, what they change, their masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from cvae_mammo.synthetic.lesions import (
    LESION_KINDS,
    LESION_STYLES,
    MASK_CHANGE,
    RELATIVE_MASK_CHANGE,
    add_synthetic_lesion,
    jitter,
)
from cvae_mammo.synthetic.phantom import make_phantom


def _normal(height: int = 256, seed: int = 0) -> np.ndarray:
    """A lesion-free phantom breast (textured tissue on a dark background)."""
    return make_phantom(np.random.default_rng(seed), (height, height // 2), lesions=[]).image


@pytest.mark.parametrize("style", LESION_STYLES)
@pytest.mark.parametrize("kind", LESION_KINDS)
def test_each_kind_changes_only_its_mask_inside_the_breast(kind: str, style: str) -> None:
    image = _normal()
    breast = image > 0.04
    for seed in range(4):
        changed, mask = add_synthetic_lesion(image, np.random.default_rng(seed), kind=kind,
                                             style=style)
        assert changed.shape == image.shape and changed.dtype == np.float32
        assert changed.min() >= 0.0 and changed.max() <= 1.0
        assert mask.sum() > 0, f"{kind} seed {seed}: empty mask"
        assert not (mask.astype(bool) & ~breast).any()
        change = np.abs(changed - image)
        floor = MASK_CHANGE if style == "shapes" else RELATIVE_MASK_CHANGE * change.max()
        assert change[mask == 0].max() <= floor + 1e-6
        assert change[mask == 1].min() > floor
        if kind != "distortion":  # added density: the lesion is brighter than the tissue was
            assert (changed - image)[mask == 1].mean() > 0


def _noisy_breast(noise: float, seed: int = 0) -> np.ndarray:
    """A flat breast (0.5) with white-noise texture of standard deviation ``noise``."""
    image = np.zeros((256, 128), np.float32)
    tissue = 0.5 + np.random.default_rng(seed).normal(0, noise, (224, 100))
    image[16:240, :100] = np.clip(tissue, 0.05, 1)
    return image


@pytest.mark.parametrize("kind", ["mass", "asymmetry", "calcifications"])
def test_tissue_lesions_are_as_strong_as_the_tissue_around_them_is_varied(kind: str) -> None:
    def median_peak(noise: float, style: str) -> float:
        image = _noisy_breast(noise)
        return float(np.median([np.abs(add_synthetic_lesion(
            image, np.random.default_rng(s), kind=kind, style=style)[0] - image).max()
            for s in range(12)]))

    tissue = median_peak(0.04, "tissue") / median_peak(0.01, "tissue")
    shapes = median_peak(0.04, "shapes") / median_peak(0.01, "shapes")
    assert 2.5 < tissue < 6.0, tissue  # 4x the texture: ~4x the contrast
    assert shapes < 1.6, shapes  # fixed ranges: the texture barely matters


def test_tissue_masses_carry_texture_and_subtle_ones_are_drawn() -> None:
    image = _noisy_breast(0.02)
    peaks, rough = [], []
    for seed in range(16):
        changed, mask = add_synthetic_lesion(image, np.random.default_rng(seed), kind="mass",
                                             style="tissue")
        change = changed - image
        peaks.append(np.abs(change).max())
        inside = mask.astype(bool)
        smooth = ndimage.gaussian_filter(change, 1.5)
        rough.append(np.std((change - smooth)[inside]) / max(np.abs(change[inside]).mean(), 1e-6))
    assert min(peaks) < 4 * 0.02 < max(peaks)  # subtle ones (within 4 local std) and clear ones
    assert np.median(rough) > 0.17  # not a smooth blob (shapes: ~0.09): borrowed texture


def test_same_seed_same_lesion_and_kinds_are_drawn_when_not_given() -> None:
    image = _normal()
    a = add_synthetic_lesion(image, np.random.default_rng(7))
    b = add_synthetic_lesion(image, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    masks = [add_synthetic_lesion(image, np.random.default_rng(s))[1] for s in range(12)]
    assert len({m.sum() for m in masks}) > 6


def test_lesion_size_follows_the_image_height() -> None:
    def mean_area(height: int) -> float:
        image = _normal(height)
        return float(np.mean([add_synthetic_lesion(image, np.random.default_rng(s), kind="mass")[1]
                              .sum() for s in range(16)]))

    ratio = mean_area(512) / mean_area(256)
    assert 2.5 < ratio < 6.0, ratio  # area grows with the square of the height (4x)


def test_no_breast_no_lesion_and_unknown_kind_is_an_error() -> None:
    blank = np.zeros((64, 32), np.float32)
    changed, mask = add_synthetic_lesion(blank, np.random.default_rng(0))
    np.testing.assert_array_equal(changed, blank)
    assert mask.sum() == 0
    with pytest.raises(ValueError, match="lesion kind 'cyst'"):
        add_synthetic_lesion(_normal(), np.random.default_rng(0), kind="cyst")
    with pytest.raises(ValueError, match="lesion style 'real'"):
        add_synthetic_lesion(_normal(), np.random.default_rng(0), style="real")


def test_jitter_misaligns_but_keeps_the_breast() -> None:
    image = _normal()
    moved = jitter(image, np.random.default_rng(1))
    assert moved.shape == image.shape
    assert not np.allclose(moved, image)
    overlap = ((moved > 0.04) & (image > 0.04)).sum() / (image > 0.04).sum()
    assert overlap > 0.8
