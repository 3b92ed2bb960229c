"""Anomaly maps, pooled scores and contralateral scores on constructed arrays with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.inference.scoring import (
    ScoringConfig,
    anomaly_map,
    combine_scores,
    contralateral_scores,
    final_scores,
    fit_reference,
    image_scores,
    partner_indices,
    select_scoring,
    smooth_in_mask,
    ssim_map,
    top_percent_mean,
)


def _breast(height: int = 64, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A flat grey 'breast' on the left 3/4 of the image and its mask."""
    mask = np.zeros((height, width), bool)
    mask[:, : 3 * width // 4] = True
    image = np.where(mask, 0.5, 0.0)
    return image, mask


def _blob(shape: tuple[int, int], centre: tuple[int, int], radius: float, height: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return height * ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2)


def test_l1_and_l2_maps_without_smoothing_equal_the_pixel_errors_inside_the_mask() -> None:
    rng = np.random.default_rng(0)
    image, mask = _breast()
    recon = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    l1 = anomaly_map(image, recon, mask, ScoringConfig(map_kind="l1", smooth_sigma=0))
    l2 = anomaly_map(image[..., None], recon[..., None], mask, ScoringConfig(map_kind="l2",
                                                                            smooth_sigma=0))
    np.testing.assert_allclose(l1[mask], np.abs(image - recon)[mask], rtol=1e-6)
    np.testing.assert_allclose(l2[mask], ((image - recon) ** 2)[mask], rtol=1e-5)
    assert not l1[~mask].any() and not l2[~mask].any()


def test_lesion_raises_topk_but_background_outside_the_mask_does_not() -> None:
    image, mask = _breast()
    config = ScoringConfig(map_kind="l1", smooth_sigma=1.0, top_percent=2.0)
    clean = image_scores(anomaly_map(image, image, mask, config), mask, config)
    assert clean["topk"] == 0.0 and clean["max"] == 0.0

    lesion = np.clip(image + _blob(image.shape, (30, 10), 3, 0.4), 0, 1)
    with_lesion = image_scores(anomaly_map(lesion, image, mask, config), mask, config)
    assert with_lesion["topk"] > 0.2
    assert with_lesion["topk"] > 5 * with_lesion["mean"]

    background = image.copy()
    background[:, 28:] = 1.0  # a bright marker outside the breast mask
    outside = image_scores(anomaly_map(background, image, mask, config), mask, config)
    assert {k: outside[k] for k in ("mean", "topk", "max")} == {"mean": 0.0, "topk": 0.0, "max": 0.0}


def test_smoothing_inside_the_mask_keeps_a_constant_map_constant() -> None:
    _, mask = _breast()
    smoothed = smooth_in_mask(np.full(mask.shape, 0.3), mask, sigma=4.0)
    np.testing.assert_allclose(smoothed[mask], 0.3, rtol=1e-9)
    assert not smoothed[~mask].any()


def test_ssim_map_is_one_for_identical_images_and_the_ssim_map_kind_sees_structure() -> None:
    rng = np.random.default_rng(1)
    image, mask = _breast()
    texture = np.clip(image + rng.normal(0, 0.1, image.shape) * mask, 0, 1)
    np.testing.assert_allclose(ssim_map(texture, texture), 1.0, atol=1e-9)
    config = ScoringConfig(map_kind="ssim", smooth_sigma=0)
    assert anomaly_map(texture, texture, mask, config).max() == pytest.approx(0.0, abs=1e-7)
    # a blurred reconstruction loses the texture: SSIM dissimilarity is large, L1 small
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(texture, 3)
    ssim = anomaly_map(texture, blurred, mask, config)[mask].mean()
    mixed = anomaly_map(texture, blurred, mask, ScoringConfig(map_kind="l1_ssim", smooth_sigma=0,
                                                              ssim_mix=0.5))[mask].mean()
    l1 = anomaly_map(texture, blurred, mask, ScoringConfig(map_kind="l1", smooth_sigma=0))[
        mask].mean()
    assert ssim > 0.2
    assert mixed == pytest.approx(0.5 * ssim + 0.5 * l1, rel=1e-5)


def test_maps_are_deterministic_and_shapes_are_checked() -> None:
    rng = np.random.default_rng(2)
    image, mask = _breast()
    recon = rng.random(image.shape)
    config = ScoringConfig(map_kind="l1_ssim")
    np.testing.assert_array_equal(anomaly_map(image, recon, mask, config),
                                  anomaly_map(image, recon, mask, config))
    with pytest.raises(ValueError, match="differ"):
        anomaly_map(image, recon[:-1], mask, config)


def test_top_percent_mean_and_empty_mask() -> None:
    values = np.arange(100, dtype=float).reshape(10, 10)
    mask = np.ones_like(values, bool)
    assert top_percent_mean(values, mask, 5.0) == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    assert top_percent_mean(values, mask, 0.1) == 99.0
    scores = image_scores(values, np.zeros_like(mask), ScoringConfig(), neg_elbo=3.0)
    assert np.isnan(scores["mean"]) and np.isnan(scores["topk"]) and scores["neg_elbo"] == 3.0


def test_config_validation_and_round_trip(tmp_path) -> None:
    with pytest.raises(ValueError, match="map_kind"):
        ScoringConfig(map_kind="l3")
    with pytest.raises(ValueError, match="weights"):
        ScoringConfig(weights={"median": 1.0})
    config = ScoringConfig(map_kind="ssim", weights={"topk": 1.0, "neg_elbo": 0.5},
                           reference={"topk": [0.1, 0.02]}, contralateral_weight=0.7)
    config.save(tmp_path / "scoring.json")
    assert ScoringConfig.load(tmp_path / "scoring.json") == config


def test_contralateral_score_on_constructed_pairs() -> None:
    frame = pd.DataFrame({
        "patient_id": ["a", "a", "b", "b", "c", "d", "d", "d"],
        "laterality": ["L", "R", "", "", "L", "L", "L", "R"],
        "own_score": [5.0, 1.0, 2.0, 2.0, 3.0, 4.0, 2.0, 1.0],
    }, index=[10, 11, 12, 13, 14, 15, 16, 17])
    partners = partner_indices(frame)
    assert partners[10] == [11] and partners[12] == [13]
    assert partners[14] == []
    assert partners[15] == [17] and partners[17] == [15, 16]  # two images of the left breast
    result = contralateral_scores(frame, weight=1.0, fallback=0.5)
    expected = [4.0, -4.0, 0.0, 0.0, 2.5, 3.0, 1.0, -2.0]
    np.testing.assert_allclose(result.to_numpy(), expected)
    half = contralateral_scores(frame, weight=0.5, fallback=0.0)
    assert half[10] == pytest.approx(4.5) and half[14] == pytest.approx(3.0)


def test_final_scores_standardise_combine_and_subtract_the_other_breast() -> None:
    normals = pd.DataFrame({"topk": [1.0, 3.0], "neg_elbo": [10.0, 30.0]})
    reference = fit_reference(normals, ("topk", "neg_elbo"))
    assert reference == {"topk": [2.0, 1.0], "neg_elbo": [20.0, 10.0]}
    scores = pd.DataFrame({"patient_id": ["p", "p"], "laterality": ["", ""],
                           "topk": [4.0, 2.0], "neg_elbo": [20.0, 40.0],
                           "mean": [0.0, 0.0], "max": [0.0, 0.0]})
    own = ScoringConfig(weights={"topk": 1.0, "neg_elbo": 1.0}, reference=reference)
    np.testing.assert_allclose(combine_scores(scores, own), [2.0, 2.0])
    contra = ScoringConfig(weights={"topk": 1.0}, reference=reference, contralateral_weight=1.0)
    np.testing.assert_allclose(final_scores(scores, contra), [2.0, -2.0])


def test_select_scoring_picks_the_pooled_score_that_separates_the_calibration_split() -> None:
    rng = np.random.default_rng(0)
    n = 40
    labels = np.array([0, 1] * (n // 2))
    frame = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(n)],
        "patient_id": [f"p{k // 2}" for k in range(n)],
        "laterality": ["L", "R"] * (n // 2),
        "label": labels,
        "mean": rng.normal(size=n),                      # carries no signal
        "topk": rng.normal(size=n) + 3.0 * labels,        # separates the classes
        "max": rng.normal(size=n),
        "neg_elbo": rng.normal(size=n),
    })
    chosen, aucs = select_scoring(frame, ScoringConfig())
    assert set(aucs) == {f"{name}{suffix}" for name in ("mean", "topk", "max", "neg_elbo")
                         for suffix in ("", "-contra")}
    assert next(iter(chosen.weights)) == "topk"
    assert aucs[max(aucs, key=aucs.get)] > 0.9 > aucs["mean"]
    assert chosen.map_kind == ScoringConfig().map_kind
