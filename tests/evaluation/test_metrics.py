"""Metrics against scikit-learn and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from cvae_mammo.evaluation import metrics


def _rsna_pfbeta(labels, predictions, beta=1.0):
    """The RSNA competition's reference loop, written out independently."""
    positives = tp = fp = 0.0
    for label, prediction in zip(labels, predictions):
        if label:
            positives += 1
            tp += prediction
        else:
            fp += prediction
    precision = tp / (tp + fp)
    recall = tp / positives
    if precision > 0 and recall > 0:
        return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
    return 0.0


@pytest.fixture()
def scored():
    rng = np.random.default_rng(3)
    labels = (rng.random(400) < 0.2).astype(int)
    scores = rng.normal(size=400) + 1.2 * labels
    scores[:40] = np.round(scores[:40], 1)  # some ties
    return labels, scores


def test_pf1_hand_computed():
    # pTP = 0.9 + 0.6 = 1.5, pFP = 0.2 + 0.3 = 0.5; precision 0.75, recall 1.5 / 2 = 0.75
    assert metrics.probabilistic_f1([1, 1, 0, 0], [0.9, 0.6, 0.2, 0.3]) == pytest.approx(0.75)
    # three positives: recall = 1.5 / 3 = 0.5, precision 0.75 -> 2 * 0.375 / 1.25 = 0.6
    assert metrics.probabilistic_f1([1, 1, 1, 0, 0], [0.9, 0.6, 0.0, 0.2, 0.3]) == pytest.approx(0.6)
    assert metrics.probabilistic_f1([1, 0], [0.0, 0.7]) == 0.0


def test_pf1_matches_reference_loop(scored):
    labels, scores = scored
    probabilities = 1 / (1 + np.exp(-scores))
    for beta in (1.0, 2.0):
        assert metrics.probabilistic_f1(labels, probabilities, beta) == pytest.approx(
            _rsna_pfbeta(labels, probabilities, beta))
    binary = (probabilities > 0.6).astype(float)
    assert metrics.probabilistic_f1(labels, binary) == pytest.approx(
        skm.f1_score(labels, binary))


def test_pf1_rejects_raw_scores():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.probabilistic_f1([1, 0], [1.5, 0.2])
    with pytest.raises(ValueError, match="positive"):
        metrics.probabilistic_f1([0, 0], [0.5, 0.2])


def test_auc_matches_sklearn(scored):
    labels, scores = scored
    assert metrics.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert metrics.pr_auc(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores))
    # hand case: of the 2 x 2 positive-negative pairs, 3 are ordered right
    assert metrics.roc_auc([1, 1, 0, 0], [0.9, 0.3, 0.5, 0.1]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([1, np.nan], [0.2, 0.3])


def test_threshold_metrics_hand_and_sklearn(scored):
    result = metrics.threshold_metrics([1, 1, 1, 0, 0, 0, 0], [0.9, 0.5, 0.2, 0.6, 0.1, 0.3, 0.5],
                                       0.5)
    # predicted positive: 0.9, 0.5 (pos), 0.6, 0.5 (neg) -> tp 2, fp 2, fn 1, tn 2
    assert (result["tp"], result["fp"], result["fn"], result["tn"]) == (2, 2, 1, 2)
    assert result["precision"] == pytest.approx(0.5)
    assert result["sensitivity"] == pytest.approx(2 / 3)
    assert result["specificity"] == pytest.approx(0.5)
    assert result["f1"] == pytest.approx(4 / 7)
    labels, scores = scored
    predicted = scores >= 0.4
    assert metrics.confusion_matrix(labels, scores, 0.4).tolist() == skm.confusion_matrix(
        labels, predicted).tolist()
    result = metrics.threshold_metrics(labels, scores, 0.4)
    assert result["f1"] == pytest.approx(skm.f1_score(labels, predicted))
    assert result["precision"] == pytest.approx(skm.precision_score(labels, predicted))
    assert result["recall"] == pytest.approx(skm.recall_score(labels, predicted))
    assert np.isnan(metrics.threshold_metrics([1, 0], [0.1, 0.2], 0.9)["precision"])


def test_sweep_and_best_f1_match_brute_force(scored):
    labels, scores = scored
    sweep = metrics.threshold_sweep(labels, scores)
    assert np.all(np.diff(sweep.thresholds) < 0)
    for k in range(0, sweep.thresholds.size, 37):
        predicted = scores >= sweep.thresholds[k]
        assert sweep.tp[k] == np.sum(predicted & (labels == 1))
        assert sweep.fp[k] == np.sum(predicted & (labels == 0))
    brute = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    best, threshold = metrics.best_f1_threshold(labels, scores)
    assert best == pytest.approx(brute)
    assert skm.f1_score(labels, scores >= threshold) == pytest.approx(best)
    binarised, threshold = metrics.binarised_probabilistic_f1(labels, scores)
    assert binarised == pytest.approx(brute)
    assert _rsna_pfbeta(labels, (scores >= threshold).astype(float)) == pytest.approx(brute)
    # hand case: cutting between 0.3 and 0.6 separates perfectly
    assert metrics.best_f1_threshold([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.7]) == (
        pytest.approx(1.0), pytest.approx(0.45))


def test_grouped_bootstrap_resamples_whole_patients():
    groups = np.array(["a", "a", "a", "b", "c", "c"])
    for weights in metrics.group_bootstrap_weights(groups, 6, 50, seed=1):
        assert weights[0] == weights[1] == weights[2]
        assert weights[4] == weights[5]
        # three patients drawn per resample
        assert weights[0] + weights[3] + weights[4] == 3
    first = list(metrics.group_bootstrap_weights(groups, 6, 5, seed=7))
    again = list(metrics.group_bootstrap_weights(groups, 6, 5, seed=7))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_roc_ci_contains_auc_and_narrows_with_data():
    rng = np.random.default_rng(0)

    def band(n_patients):
        patients = np.repeat(np.arange(n_patients), 4)
        labels = (rng.random(n_patients) < 0.3).astype(int)[patients]
        scores = rng.normal(size=patients.size) + labels
        return metrics.roc_with_ci(labels, scores, patients, n_bootstrap=200, seed=0)

    small, large = band(40), band(400)
    for result in (small, large):
        low, high = result.auc_ci
        assert low < result.auc < high
        assert np.all(result.tpr_low <= result.tpr + 1e-9)
        assert np.all(result.tpr_high >= result.tpr - 1e-9)
        assert result.tpr[-1] == pytest.approx(1.0)
    assert np.diff(large.auc_ci)[0] < np.diff(small.auc_ci)[0]


def test_operating_point_ci():
    labels = np.array([1] * 10 + [0] * 30)
    scores = np.concatenate([np.linspace(0.5, 1.0, 10), np.linspace(0.0, 0.6, 30)])
    result = metrics.operating_point_ci(labels, scores, 0.55, n_bootstrap=300, seed=2)
    assert result["sensitivity"] == pytest.approx(9 / 10)
    assert result["specificity"] == pytest.approx(np.mean(scores[10:] < 0.55))
    low, high = result["sensitivity_ci"]
    assert low <= 0.9 <= high and high <= 1.0
    low, high = result["specificity_ci"]
    assert low < result["specificity"] < high


def test_weighted_roc_points_match_sklearn(scored):
    labels, scores = scored
    weights = np.random.default_rng(4).integers(0, 3, labels.size).astype(float)
    fpr, tpr = metrics.roc_points(labels, scores, weights)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(
        skm.roc_auc_score(labels, scores, sample_weight=weights))
    sk_fpr, sk_tpr, _ = skm.roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr = metrics.roc_points(labels, scores)
    assert np.allclose(fpr, sk_fpr) and np.allclose(tpr, sk_tpr)


def test_paired_auc_difference_is_the_difference_and_its_ci_is_paired():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    strong = y + rng.normal(0, 0.8, 300)
    weak = y + rng.normal(0, 3.0, 300)
    groups = np.repeat(np.arange(150), 2)
    diff, (low, high), share = metrics.paired_roc_auc_difference(y, strong, weak, groups,
                                                                 margin=0.05, n_bootstrap=300)
    assert diff == pytest.approx(skm.roc_auc_score(y, strong) - skm.roc_auc_score(y, weak))
    assert low < diff < high and low > 0.05 and share < 0.05
    same, (low, high), share = metrics.paired_roc_auc_difference(y, strong, strong, groups,
                                                                 n_bootstrap=50)
    assert same == 0.0 and low == high == 0.0 and share == 1.0
