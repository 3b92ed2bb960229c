"""Anomaly maps, pooled scores and contralateral scores on constructed arrays with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.inference.scoring import (
    MAP_KINDS,
    SCORE_NAMES,
    ScoringConfig,
    combine_scores,
    contralateral_scores,
    final_scores,
    fit_reference,
    image_scores,
    score_maps,
    select_scoring,
    smooth_in_mask,
    top_percent_mean,
    upsample_grid,
)
from cvae_mammo.models.density import FeatureDensity


def _breast(height: int = 64, width: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A flat grey 'breast' on the left 3/4 of the image and its mask."""
    mask = np.zeros((height, width), bool)
    mask[:, : 3 * width // 4] = True
    image = np.where(mask, 0.5, 0.0)
    return image, mask


def _blob(shape: tuple[int, int], centre: tuple[int, int], radius: float, height: float) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return height * ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2)


def _analysis(mean: np.ndarray, scale: np.ndarray | float = 0.05,
              grid: tuple[int, int] = (4, 2)) -> dict[str, np.ndarray]:
    """What ConvVAE.analyse returns for one image, built by hand (Laplace NLL)."""
    scale = np.broadcast_to(np.asarray(scale, float), mean.shape)
    return {"mean": mean, "scale": scale, "nll": np.zeros_like(mean),
            "kl": np.zeros(grid), "features": np.zeros((*grid, 3))}


def test_maps_without_smoothing_equal_their_definitions_inside_the_mask() -> None:
    rng = np.random.default_rng(0)
    image, mask = _breast()
    mean = np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)
    scale = rng.uniform(0.02, 0.2, image.shape)
    analysis = _analysis(mean, scale)
    analysis["nll"] = np.abs(image - mean) / scale + np.log(2 * scale)
    maps = score_maps(image, analysis, mask, ScoringConfig(smooth_sigma=0))
    assert set(maps) == set(MAP_KINDS)
    np.testing.assert_allclose(maps["l1"][mask], np.abs(image - mean)[mask], rtol=1e-5)
    np.testing.assert_allclose(maps["nll"][mask], analysis["nll"][mask], rtol=1e-5)
    np.testing.assert_allclose(maps["excess"][mask],
                               (np.maximum(image - mean, 0) / scale)[mask], rtol=1e-5)
    np.testing.assert_allclose(maps["intensity"][mask], image[mask], rtol=1e-6)
    assert not maps["density"].any()  # no fitted density given
    for kind in MAP_KINDS:
        assert not maps[kind][~mask].any()


def test_excess_sees_a_bright_lesion_relative_to_the_expected_scale() -> None:
    image, mask = _breast()
    config = ScoringConfig(smooth_sigma=1.0, top_percent=2.0)
    clean = image_scores(score_maps(image, _analysis(image), mask, config), mask, config)
    assert clean["excess_topk"] == 0.0 and clean["l1_topk"] == 0.0
    lesion = np.clip(image + _blob(image.shape, (30, 10), 3, 0.4), 0, 1)
    tight = image_scores(score_maps(lesion, _analysis(image, 0.02), mask, config), mask, config)
    wide = image_scores(score_maps(lesion, _analysis(image, 0.2), mask, config), mask, config)
    assert tight["excess_topk"] > 5.0 > wide["excess_topk"]
    assert tight["l1_topk"] == pytest.approx(wide["l1_topk"])
    darker = np.clip(image - _blob(image.shape, (30, 10), 3, 0.4), 0, 1)
    dark = image_scores(score_maps(darker, _analysis(image, 0.02), mask, config), mask, config)
    assert dark["excess_topk"] == 0.0 < dark["l1_topk"]  # only denser-than-expected counts
    background = image.copy()
    background[:, 28:] = 1.0  # a bright marker outside the breast mask
    outside = image_scores(score_maps(background, _analysis(image), mask, config), mask, config)
    assert outside["l1_topk"] == 0.0 and outside["excess_mean"] == 0.0


def test_latent_grid_maps_cover_the_image_and_the_feature_density_marks_the_outlier() -> None:
    grid = np.zeros((4, 2))
    grid[1, 0] = 1.0
    full = upsample_grid(grid, (60, 30))  # the grid covers the 64x32 padded image
    assert full.shape == (60, 30)
    assert full[20, 4] > 0.5 and full[55, 25] == 0.0
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(20, 4, 2, 3))
    density = FeatureDensity.fit(normal, np.ones((20, 4, 2), bool))
    features = rng.normal(size=(4, 2, 3))
    features[2, 1] += 8.0
    distances = density.distance(features)
    assert distances.argmax() == 2 * 2 + 1 and distances.max() > 3 * np.median(distances)
    image, mask = _breast(64, 32)
    analysis = _analysis(image)
    analysis["features"] = features
    maps = score_maps(image, analysis, mask, ScoringConfig(smooth_sigma=0), density)
    assert maps["density"][40, 20] > maps["density"][5, 5]


def test_feature_density_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(4)
    density = FeatureDensity.fit(rng.normal(size=(5, 3, 3, 4)), np.ones((5, 3, 3), bool))
    density.save(tmp_path / "d.npz")
    loaded = FeatureDensity.load(tmp_path / "d.npz")
    vectors = rng.normal(size=(7, 4))
    np.testing.assert_allclose(loaded.distance(vectors), density.distance(vectors), rtol=1e-6)
    with pytest.raises(ValueError, match="fewer than two"):
        FeatureDensity.fit(np.zeros((1, 1, 1, 4)), np.ones((1, 1, 1), bool))


def test_smoothing_inside_the_mask_keeps_a_constant_map_constant() -> None:
    _, mask = _breast()
    smoothed = smooth_in_mask(np.full(mask.shape, 0.3), mask, sigma=4.0)
    np.testing.assert_allclose(smoothed[mask], 0.3, rtol=1e-9)
    assert not smoothed[~mask].any()


def test_maps_are_deterministic_and_shapes_are_checked() -> None:
    rng = np.random.default_rng(2)
    image, mask = _breast()
    analysis = _analysis(rng.random(image.shape))
    first, second = score_maps(image, analysis, mask), score_maps(image, analysis, mask)
    for kind in MAP_KINDS:
        np.testing.assert_array_equal(first[kind], second[kind])
    with pytest.raises(ValueError, match="differ"):
        score_maps(image[:-1], analysis, mask[:-1])


def test_top_percent_mean_and_empty_mask() -> None:
    values = np.arange(100, dtype=float).reshape(10, 10)
    mask = np.ones_like(values, bool)
    assert top_percent_mean(values, mask, 5.0) == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    assert top_percent_mean(values, mask, 0.1) == 99.0
    maps = {kind: values for kind in MAP_KINDS}
    scores = image_scores(maps, np.zeros_like(mask), ScoringConfig(), neg_elbo=3.0)
    assert set(scores) == set(SCORE_NAMES)
    assert np.isnan(scores["l1_mean"]) and np.isnan(scores["nll_topk"]) and scores["neg_elbo"] == 3.0


def test_config_validation_round_trip_and_earlier_files(tmp_path) -> None:
    with pytest.raises(ValueError, match="overlay"):
        ScoringConfig(overlay="l3")
    with pytest.raises(ValueError, match="weights"):
        ScoringConfig(weights={"median": 1.0})
    config = ScoringConfig(weights={"nll_topk": 1.0, "neg_elbo": 0.5},
                           reference={"nll_topk": [0.1, 0.02]}, contralateral_weight=0.7)
    config.save(tmp_path / "scoring.json")
    assert ScoringConfig.load(tmp_path / "scoring.json") == config
    assert config.map_kind == "nll"
    # scoring.json of earlier versions: one map_kind, bare pool names
    old = ScoringConfig.from_dict({"map_kind": "l1", "ssim_sigma": 1.5, "ssim_mix": 0.5,
                                   "smooth_sigma": 2.0, "top_percent": 1.0,
                                   "weights": {"mean": 1.0}, "reference": {"mean": [0.1, 0.01]},
                                   "contralateral_weight": 1.0})
    assert old.weights == {"l1_mean": 1.0} and old.reference == {"l1_mean": [0.1, 0.01]}


def test_contralateral_score_on_constructed_pairs() -> None:
    frame = pd.DataFrame({
        "image_id": [f"i{k}" for k in range(9)],
        "patient_id": ["a", "a", "b", "b", "c", "d", "d", "d", "d"],
        "laterality": ["L", "R", "", "", "L", "L", "L", "R", "R"],
        "view": ["MLO"] * 7 + ["MLO", "CC"],
        "own_score": [5.0, 1.0, 2.0, 2.0, 3.0, 4.0, 2.0, 1.0, 9.0],
    }, index=[10, 11, 12, 13, 14, 15, 16, 17, 18])
    result = contralateral_scores(frame, weight=1.0, fallback=0.5)
    # d: two left MLO images against one right MLO; the right CC has no CC partner
    expected = [4.0, -4.0, 0.0, 0.0, 2.5, 3.0, 1.0, -2.0, 8.5]
    np.testing.assert_allclose(result.to_numpy(), expected)
    half = contralateral_scores(frame, weight=0.5, fallback=0.0)
    assert half[10] == pytest.approx(4.5) and half[14] == pytest.approx(3.0)


def test_final_scores_standardise_combine_and_subtract_the_other_breast() -> None:
    normals = pd.DataFrame({"nll_topk": [1.0, 3.0], "neg_elbo": [10.0, 30.0]})
    reference = fit_reference(normals, ("nll_topk", "neg_elbo"))
    assert reference == {"nll_topk": [2.0, 1.0], "neg_elbo": [20.0, 10.0]}
    scores = pd.DataFrame({"image_id": ["x", "y"], "patient_id": ["p", "p"],
                           "laterality": ["", ""], "nll_topk": [4.0, 2.0],
                           "neg_elbo": [20.0, 40.0]})
    own = ScoringConfig(weights={"nll_topk": 1.0, "neg_elbo": 1.0}, reference=reference)
    np.testing.assert_allclose(combine_scores(scores, own), [2.0, 2.0])
    contra = ScoringConfig(weights={"nll_topk": 1.0}, reference=reference,
                           contralateral_weight=1.0)
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
        "nll_mean": rng.normal(size=n),                     # carries no signal
        "excess_mean": rng.normal(size=n) + 3.0 * labels,    # separates the classes
        "neg_elbo": rng.normal(size=n),
        "intensity_topk": rng.normal(size=n),
        "l1_topk": rng.normal(size=n) + 5.0 * labels,        # not a selectable score
        "kl_mean": np.zeros(n),                             # constant: not a candidate
    })
    chosen, aucs = select_scoring(frame, ScoringConfig(smooth_sigma=1.5))
    learned = ("nll_mean", "excess_mean", "neg_elbo")
    assert set(aucs) == {f"{name}{suffix}" for name in learned
                         for suffix in ("-contra", "+intensity-contra")}
    assert "excess_mean" in chosen.weights and chosen.smooth_sigma == 1.5
    assert chosen.contralateral_weight == 1.0
    assert aucs[max(aucs, key=aucs.get)] > 0.9 > aucs["nll_mean-contra"]
