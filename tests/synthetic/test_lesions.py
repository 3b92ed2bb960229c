"""Synthetic lesions pasted into normal tissue: where they go, what they change, their masks."""

from __future__ import annotations

import numpy as np
import pytest

from cvae_mammo.synthetic.lesions import (
    LESION_KINDS,
    MASK_CHANGE,
    add_synthetic_lesion,
    jitter,
)
from cvae_mammo.synthetic.phantom import make_phantom


def _normal(height: int = 256, seed: int = 0) -> np.ndarray:
    """A lesion-free phantom breast (textured tissue on a dark background)."""
    return make_phantom(np.random.default_rng(seed), (height, height // 2), lesions=[]).image


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_each_kind_changes_only_its_mask_inside_the_breast(kind: str) -> None:
    image = _normal()
    breast = image > 0.04
    for seed in range(4):
        changed, mask = add_synthetic_lesion(image, np.random.default_rng(seed), kind=kind)
        assert changed.shape == image.shape and changed.dtype == np.float32
        assert changed.min() >= 0.0 and changed.max() <= 1.0
        assert mask.sum() > 0, f"{kind} seed {seed}: empty mask"
        assert not (mask.astype(bool) & ~breast).any()
        assert np.abs(changed - image)[mask == 0].max() <= MASK_CHANGE + 1e-6
        assert np.abs(changed - image)[mask == 1].min() > MASK_CHANGE
        if kind != "distortion":  # added density: the lesion is brighter than the tissue was
            assert (changed - image)[mask == 1].mean() > 0


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


def test_jitter_misaligns_but_keeps_the_breast() -> None:
    image = _normal()
    moved = jitter(image, np.random.default_rng(1))
    assert moved.shape == image.shape
    assert not np.allclose(moved, image)
    overlap = ((moved > 0.04) & (image > 0.04)).sum() / (image > 0.04).sum()
    assert overlap > 0.8
