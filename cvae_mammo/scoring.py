"""Anomaly maps and image scores from a reconstruction, plus contralateral comparison.

Everything here is NumPy/SciPy and deterministic: the same image, reconstruction
and breast mask always give the same map and scores. The model side (which
reconstruction, which ELBO) lives in :mod:`cvae_mammo.predict`.

* :func:`anomaly_map` -- per-pixel error (L1, L2, SSIM-based or a mix) inside the
  breast mask, smoothed by normalised convolution so the mask edge is not biased.
* :func:`image_scores` -- every pooled score of a map: ``mean``, ``topk`` (mean of
  the top-k% of the map), ``max`` (of the smoothed map) and ``neg_elbo``.
* :class:`ScoringConfig` -- which map, which pooling, how scores combine and how much
  of the other breast is subtracted; saved as ``scoring.json`` in the run folder.
* :func:`contralateral_scores` -- how much more anomalous a breast is than the other
  breast of the same woman (same ``patient_id``, other laterality; when laterality is
  unknown, as in mini-MIAS pairs, the other images of the same patient).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from cvae_mammo.config import ConfigBase

#: Per-pixel error measures :func:`anomaly_map` understands.
MAP_KINDS: tuple[str, ...] = ("l1", "l2", "ssim", "l1_ssim")
#: Pooled image scores :func:`image_scores` returns.
SCORE_NAMES: tuple[str, ...] = ("mean", "topk", "max", "neg_elbo")
#: File name of the scoring config inside a run folder.
SCORING_FILE = "scoring.json"


@dataclasses.dataclass
class ScoringConfig(ConfigBase):
    """How a run turns (image, reconstruction, mask) into one anomaly score.

    ``weights`` combines the pooled scores of :data:`SCORE_NAMES` after
    standardising each by ``reference`` (``name -> [mean, std]`` measured on normal
    images by :func:`fit_reference`; missing names are used raw). The combined own
    score ``s`` of an image becomes ``s - contralateral_weight * s_other`` where
    ``s_other`` is the mean own score of the other breast of the same woman, or 0 (the
    expected standardised score of a normal breast) when there is no other breast.

    Defaults (L1 map, mean inside the breast, minus the other breast's) were the most
    consistent option on held-out mini-MIAS women (benchmarks/eval_mias.py): top-k and
    max pooling follow the pectoral muscle and skin edge, which the CVAE reconstructs
    worst, rather than lesions.
    """

    map_kind: str = "l1"
    ssim_sigma: float = 1.5
    ssim_mix: float = 0.5
    smooth_sigma: float = 2.0
    top_percent: float = 1.0
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"mean": 1.0})
    reference: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    contralateral_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.map_kind not in MAP_KINDS:
            raise ValueError(f"ScoringConfig.map_kind {self.map_kind!r}: expected one of {MAP_KINDS}")
        unknown = sorted(set(self.weights) - set(SCORE_NAMES))
        if unknown or not self.weights:
            raise ValueError(
                f"ScoringConfig.weights {self.weights!r}: need at least one of {SCORE_NAMES}"
            )
        if not 0.0 < self.top_percent <= 100.0:
            raise ValueError(f"ScoringConfig.top_percent {self.top_percent}: must be in (0, 100]")
        if not 0.0 <= self.ssim_mix <= 1.0:
            raise ValueError(f"ScoringConfig.ssim_mix {self.ssim_mix}: must be in [0, 1]")
        if self.smooth_sigma < 0 or self.ssim_sigma <= 0:
            raise ValueError("ScoringConfig: smooth_sigma must be >= 0 and ssim_sigma > 0")


def _as_2d(array: Any, name: str) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise ValueError(f"{name}: expected an [H, W] or [H, W, 1] array, got shape {values.shape}")
    return values


def ssim_map(image: np.ndarray, reconstruction: np.ndarray, sigma: float = 1.5,
             data_range: float = 1.0) -> np.ndarray:
    """Per-pixel structural similarity (Gaussian window of ``sigma`` pixels), in [-1, 1]."""
    x = _as_2d(image, "image")
    y = _as_2d(reconstruction, "reconstruction")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    blur = lambda a: ndimage.gaussian_filter(a, sigma, mode="reflect")  # noqa: E731
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )


def smooth_in_mask(values: np.ndarray, mask: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing that only averages pixels inside ``mask``; zero outside it."""
    values = _as_2d(values, "map")
    weight = _as_2d(mask, "mask") > 0
    if sigma <= 0:
        return np.where(weight, values, 0.0)
    numerator = ndimage.gaussian_filter(np.where(weight, values, 0.0), sigma, mode="constant")
    denominator = ndimage.gaussian_filter(weight.astype(np.float64), sigma, mode="constant")
    smoothed = numerator / np.maximum(denominator, 1e-12)
    return np.where(weight, smoothed, 0.0)


def anomaly_map(image: Any, reconstruction: Any, mask: Any,
                config: ScoringConfig | None = None) -> np.ndarray:
    """Smoothed per-pixel anomaly map ([H, W] float32, zero outside the breast mask).

    ``image`` and ``reconstruction`` are in [0, 1]; ``mask`` is the breast mask
    (non-zero = breast). Larger values mean "less like the reconstruction".
    """
    config = config or ScoringConfig()
    x = _as_2d(image, "image")
    y = _as_2d(reconstruction, "reconstruction")
    m = _as_2d(mask, "mask") > 0
    if x.shape != y.shape or x.shape != m.shape:
        raise ValueError(
            f"anomaly_map: image {x.shape}, reconstruction {y.shape} and mask {m.shape} differ"
        )
    if config.map_kind == "l1":
        error = np.abs(x - y)
    elif config.map_kind == "l2":
        error = (x - y) ** 2
    else:
        dissimilarity = (1.0 - ssim_map(x, y, config.ssim_sigma)) / 2.0
        if config.map_kind == "ssim":
            error = dissimilarity
        else:
            error = config.ssim_mix * dissimilarity + (1 - config.ssim_mix) * np.abs(x - y)
    return smooth_in_mask(error, m, config.smooth_sigma).astype(np.float32)


def top_percent_mean(values: np.ndarray, mask: np.ndarray, percent: float) -> float:
    """Mean of the largest ``percent`` % of ``values`` inside ``mask`` (at least one pixel)."""
    inside = np.asarray(values)[np.asarray(mask) > 0]
    if inside.size == 0:
        return float("nan")
    count = max(1, int(np.ceil(inside.size * percent / 100.0)))
    return float(np.partition(inside, inside.size - count)[-count:].mean())


def image_scores(amap: np.ndarray, mask: Any, config: ScoringConfig | None = None,
                 neg_elbo: float | None = None) -> dict[str, float]:
    """All pooled scores of one anomaly map: mean, topk, max and neg_elbo (NaN if not given).

    Only pixels inside ``mask`` count; an empty mask gives NaN scores.
    """
    config = config or ScoringConfig()
    values = _as_2d(amap, "map")
    m = _as_2d(mask, "mask") > 0
    inside = values[m]
    empty = inside.size == 0
    return {
        "mean": float("nan") if empty else float(inside.mean()),
        "topk": top_percent_mean(values, m, config.top_percent),
        "max": float("nan") if empty else float(inside.max()),
        "neg_elbo": float("nan") if neg_elbo is None else float(neg_elbo),
    }


def fit_reference(scores: pd.DataFrame, names: tuple[str, ...] = SCORE_NAMES
                  ) -> dict[str, list[float]]:
    """``name -> [mean, std]`` of each pooled score column (use normal images only)."""
    reference: dict[str, list[float]] = {}
    for name in names:
        if name in scores and scores[name].notna().any():
            column = scores[name].astype(float)
            std = float(column.std(ddof=0))
            reference[name] = [float(column.mean()), std if std > 0 else 1.0]
    return reference


def combine_scores(scores: pd.DataFrame, config: ScoringConfig) -> pd.Series:
    """Weighted sum of standardised pooled scores: the own (non-contralateral) score."""
    missing = [name for name in config.weights if name not in scores]
    if missing:
        raise ValueError(f"combine_scores: score column(s) {missing} missing")
    total = pd.Series(0.0, index=scores.index)
    for name, weight in config.weights.items():
        mean, std = config.reference.get(name, [0.0, 1.0])
        total = total + weight * (scores[name].astype(float) - mean) / std
    return total


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def partner_indices(frame: pd.DataFrame) -> dict[Any, list[Any]]:
    """Index of each row -> indices of the other breast's images of the same patient.

    Needs ``patient_id``; uses ``laterality`` when both rows have one (other side only),
    otherwise every other image of the same patient counts (mini-MIAS pairs).
    """
    if "patient_id" not in frame:
        raise ValueError("contralateral scoring needs a patient_id column")
    laterality = frame["laterality"] if "laterality" in frame else pd.Series(None, index=frame.index)
    partners: dict[Any, list[Any]] = {}
    for _, group in frame.groupby("patient_id", sort=False):
        for index in group.index:
            side = laterality[index]
            partners[index] = [
                other for other in group.index
                if other != index and (
                    _blank(side) or _blank(laterality[other]) or laterality[other] != side
                )
            ]
    return partners


def contralateral_scores(frame: pd.DataFrame, column: str = "own_score", weight: float = 1.0,
                         fallback: float = 0.0) -> pd.Series:
    """``own - weight * mean(own of the other breast)`` per row.

    Rows with no other breast in ``frame`` use ``fallback`` (the expected own score of
    a normal breast) in place of the other breast's score.
    """
    partners = partner_indices(frame)
    own = frame[column].astype(float)
    other = pd.Series(
        [own[partners[i]].mean() if partners[i] else fallback for i in frame.index],
        index=frame.index,
    )
    return own - weight * other.fillna(fallback)


def final_scores(scores: pd.DataFrame, config: ScoringConfig) -> pd.Series:
    """The configured image score: combined own score minus the weighted other-breast score.

    ``scores`` holds the pooled columns of :func:`image_scores`, and ``patient_id``
    (plus ``laterality`` if known) when ``contralateral_weight`` is not zero.
    """
    own = combine_scores(scores, config)
    if config.contralateral_weight == 0:
        return own
    frame = scores.assign(own_score=own)
    return contralateral_scores(frame, "own_score", config.contralateral_weight, fallback=0.0)


def score_options(scores: pd.DataFrame, mapping: Mapping[str, ScoringConfig]) -> pd.DataFrame:
    """One column of :func:`final_scores` per named config (for benchmarks and reports)."""
    return pd.DataFrame({name: final_scores(scores, cfg) for name, cfg in mapping.items()})


def select_scoring(scores: pd.DataFrame, config: ScoringConfig) -> tuple[ScoringConfig, dict[str, float]]:
    """The single pooled score and contralateral setting with the best ROC-AUC on ``scores``.

    ``scores`` must be a calibration split (validation patients) with 0/1 ``label``
    and the pooled columns of :data:`SCORE_NAMES`; ``config`` supplies the map and
    the normal-image ``reference``. Candidates are each pooled score alone, with and
    without subtracting the other breast's; the first best in that order wins.
    Returns the chosen config and every candidate's AUC (``"topk"``,
    ``"topk-contra"``, ...), for the log and the run folder.
    """
    from cvae_mammo.metrics import roc_auc

    labelled = scores[scores["label"].isin([0, 1])]
    candidates = {}
    for name in SCORE_NAMES:
        for contra in (0.0, 1.0):
            key = f"{name}-contra" if contra else name
            candidates[key] = config.replace(weights={name: 1.0}, contralateral_weight=contra)
    aucs = {key: roc_auc(labelled["label"], final_scores(labelled, candidate))
            for key, candidate in candidates.items()}
    best = max(aucs, key=aucs.get)
    return candidates[best], aucs
