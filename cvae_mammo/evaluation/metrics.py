"""Model-independent evaluation metrics for binary scores.

Every function takes plain arrays: ``labels`` (1 positive, 0 negative) and
``scores`` (any monotone scale; higher = more suspicious). A score at or
above a threshold is a positive prediction. Confidence intervals come from a
patient-level (grouped) bootstrap: patients are resampled with replacement
and each image of a drawn patient counts as often as the patient was drawn.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

ArrayLike = Sequence[float] | np.ndarray


def _as_labels(labels: ArrayLike) -> np.ndarray:
    """Labels as a boolean array, rejecting anything but 0/1 (NaN included)."""
    values = np.asarray(labels, dtype=float).ravel()
    if values.size and not np.isin(values, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1 (drop unknown labels before computing metrics)")
    return values.astype(bool)


def _as_scores(scores: ArrayLike, n: int | None = None) -> np.ndarray:
    values = np.asarray(scores, dtype=float).ravel()
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite numbers (no NaN or infinity)")
    if n is not None and values.size != n:
        raise ValueError(f"got {n} labels but {values.size} scores")
    return values


def _check_both_classes(y: np.ndarray, what: str) -> None:
    if y.all() or not y.any():
        raise ValueError(f"{what} needs both positive and negative labels")


# --------------------------------------------------------------------------- threshold-free


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half)."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _check_both_classes(y, "ROC-AUC")
    return float(roc_auc_score(y, s))


def pr_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the precision-recall curve as average precision (step-wise, no interpolation)."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _check_both_classes(y, "PR-AUC")
    return float(average_precision_score(y, s))


def probabilistic_f1(labels: ArrayLike, probabilities: ArrayLike, beta: float = 1.0) -> float:
    """RSNA probabilistic F-beta (pF1 for ``beta=1``).

    pTP = sum of the probabilities on positives, pFP = on negatives;
    precision = pTP / (pTP + pFP), recall = pTP / number of positives.
    Probabilities must lie in [0, 1] (raw anomaly scores are not probabilities:
    use the calibrated, normalised scores). Returns 0 when precision or recall is 0.
    """
    y = _as_labels(labels)
    p = _as_scores(probabilities, y.size)
    if p.size and (p.min() < 0.0 or p.max() > 1.0):
        raise ValueError("probabilistic F1 needs probabilities in [0, 1]; got "
                         f"values in [{p.min():.4g}, {p.max():.4g}]")
    n_positive = int(y.sum())
    if n_positive == 0:
        raise ValueError("probabilistic F1 needs at least one positive label")
    p_tp = float(p[y].sum())
    p_fp = float(p[~y].sum())
    if p_tp <= 0.0:
        return 0.0
    precision = p_tp / (p_tp + p_fp)
    recall = p_tp / n_positive
    beta2 = beta * beta
    return (1.0 + beta2) * precision * recall / (beta2 * precision + recall)


# --------------------------------------------------------------------------- threshold sweep


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Confusion counts at every distinct cut point of a score set.

    ``thresholds`` decrease; cut ``k`` predicts positive the scores at or above
    ``thresholds[k]``. Cut 0 lies just above the highest score (nothing
    positive), the last cut at the lowest score (everything positive), and the
    others halfway between consecutive distinct scores, so a threshold chosen
    here labels the data it was chosen on exactly as the sweep says.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_positive: int
    n_negative: int

    @property
    def fn(self) -> np.ndarray:
        """False negatives per cut."""
        return self.n_positive - self.tp

    @property
    def tn(self) -> np.ndarray:
        """True negatives per cut."""
        return self.n_negative - self.fp

    @property
    def sensitivity(self) -> np.ndarray:
        """Recall of the positives per cut (NaN without positives)."""
        return self.tp / self.n_positive if self.n_positive else np.full(self.tp.shape, np.nan)

    @property
    def specificity(self) -> np.ndarray:
        """True-negative rate per cut (NaN without negatives)."""
        return self.tn / self.n_negative if self.n_negative else np.full(self.tp.shape, np.nan)

    @property
    def precision(self) -> np.ndarray:
        """Precision per cut (1 where nothing is predicted positive, as scikit-learn)."""
        predicted = self.tp + self.fp
        return np.divide(self.tp, predicted, out=np.ones(self.tp.shape), where=predicted > 0)

    @property
    def f1(self) -> np.ndarray:
        """F1 per cut (0 where there are no true positives)."""
        denominator = 2 * self.tp + self.fp + self.fn
        return np.divide(2 * self.tp, denominator, out=np.zeros(self.tp.shape),
                         where=denominator > 0)


def threshold_sweep(labels: ArrayLike, scores: ArrayLike) -> Sweep:
    """Confusion counts at every distinct cut point of ``scores`` (see :class:`Sweep`)."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    if s.size == 0:
        raise ValueError("threshold sweep needs at least one score")
    distinct, inverse = np.unique(s, return_inverse=True)
    distinct = distinct[::-1]
    inverse = distinct.size - 1 - inverse
    pos_at = np.bincount(inverse, weights=y, minlength=distinct.size)
    neg_at = np.bincount(inverse, weights=~y, minlength=distinct.size)
    tp = np.concatenate([[0], np.cumsum(pos_at)]).astype(np.int64)
    fp = np.concatenate([[0], np.cumsum(neg_at)]).astype(np.int64)
    midpoints = (distinct[:-1] + distinct[1:]) / 2.0
    above = np.nextafter(distinct[0], np.inf)
    thresholds = np.concatenate([[above], midpoints, [distinct[-1]]])
    return Sweep(thresholds, tp, fp, int(y.sum()), int((~y).sum()))


def best_f1_threshold(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """The highest F1 over all thresholds and the (highest) threshold reaching it."""
    sweep = threshold_sweep(labels, scores)
    if sweep.n_positive == 0:
        raise ValueError("F1 needs at least one positive label")
    best = int(np.argmax(sweep.f1))
    return float(sweep.f1[best]), float(sweep.thresholds[best])


def binarised_probabilistic_f1(labels: ArrayLike, scores: ArrayLike) -> tuple[float, float]:
    """RSNA pF1 of 0/1 predictions binarised at the best threshold, and that threshold.

    On 0/1 predictions pTP and pFP are counts, so the best threshold is the best-F1 one.
    """
    _, threshold = best_f1_threshold(labels, scores)
    binary = (_as_scores(scores) >= threshold).astype(float)
    return probabilistic_f1(labels, binary), threshold


# --------------------------------------------------------------------------- at a threshold


def confusion_matrix(labels: ArrayLike, scores: ArrayLike, threshold: float) -> np.ndarray:
    """2x2 matrix ``[[tn, fp], [fn, tp]]`` (scikit-learn's layout) at ``threshold``."""
    y = _as_labels(labels)
    predicted = _as_scores(scores, y.size) >= threshold
    return np.array([[np.sum(~y & ~predicted), np.sum(~y & predicted)],
                     [np.sum(y & ~predicted), np.sum(y & predicted)]], dtype=np.int64)


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def threshold_metrics(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, Any]:
    """F1, precision, recall (= sensitivity), specificity and counts at ``threshold``.

    Undefined ratios (e.g. precision with nothing predicted positive) are NaN.
    """
    (tn, fp), (fn, tp) = confusion_matrix(labels, scores, threshold).tolist()
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "threshold": float(threshold),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "precision": precision,
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
    }


# --------------------------------------------------------------------------- bootstrap


def group_bootstrap_weights(groups: ArrayLike | None, n: int, n_bootstrap: int,
                            seed: int = 0) -> Iterator[np.ndarray]:
    """Per-row weights of ``n_bootstrap`` patient-level bootstrap resamples.

    Each resample draws as many groups as there are, with replacement; a row's
    weight is the number of times its group was drawn. Without ``groups`` every
    row is its own group (the ordinary bootstrap).
    """
    if groups is None:
        codes = np.arange(n)
    else:
        group_values = np.asarray(groups).ravel()
        if group_values.size != n:
            raise ValueError(f"got {n} rows but {group_values.size} group ids")
        _, codes = np.unique(group_values.astype(str), return_inverse=True)
    n_groups = int(codes.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        drawn = np.bincount(rng.integers(0, n_groups, n_groups), minlength=n_groups)
        yield drawn[codes].astype(float)


def _percentile_interval(values: list[float], confidence: float) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


class _RocCounter:
    """ROC points of one score set under any row weights, sorting the scores only once."""

    def __init__(self, y: np.ndarray, s: np.ndarray) -> None:
        distinct, inverse = np.unique(s, return_inverse=True)
        self._inverse = distinct.size - 1 - inverse  # rank 0 = highest score
        self._size = distinct.size
        self._y = y.astype(float)

    def curve(self, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(FPR, TPR) from (0, 0) through every distinct score, highest first."""
        w = np.ones(self._y.size) if weights is None else weights
        positives = np.bincount(self._inverse, weights=w * self._y, minlength=self._size)
        negatives = np.bincount(self._inverse, weights=w * (1.0 - self._y), minlength=self._size)
        tpr = np.concatenate([[0.0], np.cumsum(positives)]) / positives.sum()
        fpr = np.concatenate([[0.0], np.cumsum(negatives)]) / negatives.sum()
        return fpr, tpr


def roc_points(labels: ArrayLike, scores: ArrayLike,
               weights: ArrayLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score (ties form one diagonal step), optionally weighted."""
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _check_both_classes(y, "ROC")
    return _RocCounter(y, s).curve(None if weights is None else np.asarray(weights, float))


def _area(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


@dataclasses.dataclass(frozen=True)
class RocBand:
    """ROC-AUC with its bootstrap interval and a pointwise TPR band on a fixed FPR grid."""

    auc: float
    auc_ci: tuple[float, float]
    fpr_grid: np.ndarray
    tpr: np.ndarray
    tpr_low: np.ndarray
    tpr_high: np.ndarray
    n_bootstrap_used: int


def roc_with_ci(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike | None = None,
                n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                grid_size: int = 101) -> RocBand:
    """ROC-AUC with a patient-level bootstrap percentile CI, and the ROC curve's CI band.

    The band is pointwise: the TPR percentiles at each FPR of a fixed grid.
    Resamples that miss a class are skipped (``n_bootstrap_used`` says how many counted).
    """
    y = _as_labels(labels)
    s = _as_scores(scores, y.size)
    _check_both_classes(y, "ROC-AUC")
    grid = np.linspace(0.0, 1.0, grid_size)
    counter = _RocCounter(y, s)

    def on_grid(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
        values = np.interp(grid, fpr, tpr)
        values[0] = 0.0
        return values

    aucs: list[float] = []
    curves: list[np.ndarray] = []
    for weights in group_bootstrap_weights(groups, y.size, n_bootstrap, seed):
        if weights[y].sum() == 0 or weights[~y].sum() == 0:
            continue
        fpr, tpr = counter.curve(weights)
        aucs.append(_area(fpr, tpr))
        curves.append(on_grid(fpr, tpr))
    tail = (1.0 - confidence) / 2.0 * 100.0
    if curves:
        low, high = np.percentile(np.stack(curves), [tail, 100.0 - tail], axis=0)
    else:
        low = high = np.full(grid.shape, np.nan)
    fpr, tpr = counter.curve()
    return RocBand(roc_auc(y, s), _percentile_interval(aucs, confidence), grid,
                   on_grid(fpr, tpr), low, high, len(aucs))


def operating_point_ci(labels: ArrayLike, scores: ArrayLike, threshold: float,
                       groups: ArrayLike | None = None, n_bootstrap: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold`` with patient-level bootstrap CIs."""
    y = _as_labels(labels)
    predicted = _as_scores(scores, y.size) >= threshold
    hits = (y & predicted).astype(float)
    rejections = (~y & ~predicted).astype(float)
    sensitivities: list[float] = []
    specificities: list[float] = []
    for weights in group_bootstrap_weights(groups, y.size, n_bootstrap, seed):
        n_pos = weights[y].sum()
        n_neg = weights[~y].sum()
        if n_pos > 0:
            sensitivities.append(float(weights @ hits / n_pos))
        if n_neg > 0:
            specificities.append(float(weights @ rejections / n_neg))
    point = threshold_metrics(y, predicted.astype(float), 0.5)
    return {
        "sensitivity": point["sensitivity"],
        "specificity": point["specificity"],
        "sensitivity_ci": _percentile_interval(sensitivities, confidence),
        "specificity_ci": _percentile_interval(specificities, confidence),
        "confidence": confidence,
        "n_bootstrap": n_bootstrap,
    }


def paired_roc_auc_difference(labels: ArrayLike, scores_a: ArrayLike, scores_b: ArrayLike,
                              groups: ArrayLike | None = None, margin: float = 0.0,
                              n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0
                              ) -> tuple[float, tuple[float, float], float]:
    """ROC-AUC of ``scores_a`` minus that of ``scores_b`` on the same images, with a paired
    (patient-level, both scores resampled together) bootstrap CI, and the share of resamples
    in which the difference is at most ``margin``."""
    y = _as_labels(labels)
    a, b = _as_scores(scores_a, y.size), _as_scores(scores_b, y.size)
    _check_both_classes(y, "ROC-AUC")
    counters = _RocCounter(y, a), _RocCounter(y, b)
    differences = []
    for weights in group_bootstrap_weights(groups, y.size, n_bootstrap, seed):
        if weights[y].sum() == 0 or weights[~y].sum() == 0:
            continue
        first, second = (_area(*counter.curve(weights)) for counter in counters)
        differences.append(first - second)
    share = float(np.mean(np.asarray(differences) <= margin)) if differences else float("nan")
    return roc_auc(y, a) - roc_auc(y, b), _percentile_interval(differences, confidence), share
