"""Anomaly maps, pooled image scores, and the comparison with the other breast.

Everything here is NumPy/SciPy and deterministic: the same image and model
outputs always give the same maps and scores. The model side lives in
:meth:`cvae_mammo.models.cvae.ConvVAE.analyse` and :mod:`cvae_mammo.inference.predict`.

Maps (:data:`MAP_KINDS`, each ``[H, W]``, zero outside the breast, smoothed
inside it by normalised convolution so the mask edge is not biased):

* ``l1`` -- ``|x - mean|``, the plain reconstruction error;
* ``nll`` -- the decoder's per-pixel negative log-likelihood: with a learned
  (heteroscedastic) scale, error relative to the uncertainty the model expects
  there; for a bilateral model, what the other breast does not explain;
* ``excess`` -- ``max(0, x - mean) / scale``: tissue brighter (denser) than
  expected, in units of the predicted scale (masses and calcifications are dense);
* ``kl`` -- the posterior's KL per latent position, upsampled: what the latent
  code had to store about this place;
* ``density`` -- Mahalanobis distance of the encoder features to those of the
  training normals (:class:`~cvae_mammo.models.density.FeatureDensity`);
* ``intensity`` -- the image itself (with ``topk`` and the other breast, the
  bilateral brightest-tissue rule, a non-learned reference);
* ``lesion`` -- the lesion probability of the run's bilateral lesion segmenter
  (:mod:`cvae_mammo.models.lesion_segmenter`), all zero in a run without one.

Scores: ``<map>_mean`` and ``<map>_topk`` (mean of the top ``top_percent`` % of
the map inside the breast), plus ``neg_elbo``. :class:`ScoringConfig` combines
standardised scores with weights and subtracts the other breast's
(:func:`contralateral_scores`, pairs from :mod:`cvae_mammo.data.pairing`); it
is saved as ``scoring.json`` in the run folder. :func:`select_scoring` chooses
it on a calibration split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from cvae_mammo.config import ConfigBase
from cvae_mammo.data.pairing import partner_candidates
from cvae_mammo.errors import InputError

#: Per-pixel maps :func:`score_maps` computes.
MAP_KINDS: tuple[str, ...] = ("l1", "nll", "excess", "kl", "density", "intensity", "lesion")
#: Poolings of a map into an image score.
POOLS: tuple[str, ...] = ("mean", "topk")
#: Every pooled score :func:`image_scores` returns.
SCORE_NAMES: tuple[str, ...] = (*(f"{m}_{p}" for m in MAP_KINDS for p in POOLS), "neg_elbo")
#: The non-learned reference score (brightest tissue), combined with learned ones in selection.
INTENSITY_SCORE = "intensity_topk"
#: File name of the scoring config inside a run folder.
SCORING_FILE = "scoring.json"
#: Names of scores written by versions before the map became part of the score name.
_LEGACY_POOLS = ("mean", "topk", "max")


@dataclasses.dataclass
class ScoringConfig(ConfigBase):
    """How a run turns its maps into one anomaly score per image.

    ``weights`` combines pooled scores (:data:`SCORE_NAMES`) after standardising
    each by ``reference`` (``name -> [mean, std]`` measured on normal images by
    :func:`fit_reference`; missing names are used raw). The combined own score
    ``s`` of an image becomes ``s - contralateral_weight * s_other``, ``s_other``
    being the mean own score of the other breast's images of the same view, or 0
    (the expected standardised score of a normal breast) when there is none.
    ``overlay`` names the map drawn in overlays (default: the first weighted one).
    """

    smooth_sigma: float = 2.0
    top_percent: float = 1.0
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"nll_mean": 1.0})
    reference: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    contralateral_weight: float = 1.0
    overlay: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.weights) - set(SCORE_NAMES))
        if unknown or not self.weights:
            raise ValueError(
                f"ScoringConfig.weights {self.weights!r}: need at least one of {SCORE_NAMES}"
            )
        if not 0.0 < self.top_percent <= 100.0:
            raise ValueError(f"ScoringConfig.top_percent {self.top_percent}: must be in (0, 100]")
        if self.smooth_sigma < 0:
            raise ValueError("ScoringConfig: smooth_sigma must be >= 0")
        if self.overlay and self.overlay not in MAP_KINDS:
            raise ValueError(f"ScoringConfig.overlay {self.overlay!r}: one of {MAP_KINDS}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ScoringConfig:
        """Also reads ``scoring.json`` of earlier versions (``map_kind`` + bare pool names)."""
        values = dict(values)
        map_kind = values.pop("map_kind", None)
        for legacy in ("ssim_sigma", "ssim_mix"):
            values.pop(legacy, None)
        if map_kind is not None:
            prefix = map_kind if map_kind in MAP_KINDS else "l1"

            def rename(name: str) -> str:
                pool = "topk" if name == "max" else name
                return f"{prefix}_{pool}" if name in _LEGACY_POOLS else name

            for key in ("weights", "reference"):
                if key in values:
                    values[key] = {rename(k): v for k, v in values[key].items()}
        return super().from_dict(values)

    @property
    def map_kind(self) -> str:
        """The map drawn in overlays."""
        if self.overlay:
            return self.overlay
        first = next(iter(self.weights))
        return first.rsplit("_", 1)[0] if first != "neg_elbo" else "nll"


def segmenter_scoring() -> ScoringConfig:
    """The score of a run with a lesion segmenter: its top-1% lesion probability minus the
    other breast's (the overlay is the lesion map)."""
    return ScoringConfig(weights={"lesion_topk": 1.0}, overlay="lesion")


def _as_2d(array: Any, name: str) -> np.ndarray:
    values = np.asarray(array, dtype=np.float64)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 2:
        raise ValueError(f"{name}: expected an [H, W] or [H, W, 1] array, got shape {values.shape}")
    return values


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


def upsample_grid(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A latent-grid map ``[h, w]`` spread over the image ``shape`` (the grid covers the padding)."""
    import cv2

    grid = np.asarray(grid, np.float32)
    height, width = shape
    cell_h, cell_w = -(-height // grid.shape[0]), -(-width // grid.shape[1])
    full = cv2.resize(grid, (grid.shape[1] * cell_w, grid.shape[0] * cell_h),
                      interpolation=cv2.INTER_LINEAR)
    return full[:height, :width]


def score_maps(image: Any, analysis: Mapping[str, np.ndarray], mask: Any,
               config: ScoringConfig | None = None,
               density: Any = None) -> dict[str, np.ndarray]:
    """Every map of :data:`MAP_KINDS` for one image, float32 ``[H, W]``.

    ``analysis`` holds this image's entries of :meth:`ConvVAE.analyse` (``mean``,
    ``scale``, ``nll`` ``[H, W]``, ``kl`` ``[h, w]``, ``features`` ``[h, w, C]``);
    ``density`` is the run's :class:`~cvae_mammo.models.density.FeatureDensity`
    (the ``density`` map is all zero without it); an optional ``lesion`` entry
    ``[H, W]`` is the segmenter's probability map (all zero without it).
    """
    config = config or ScoringConfig()
    x = _as_2d(image, "image")
    m = _as_2d(mask, "mask") > 0
    mean = _as_2d(analysis["mean"], "mean")
    scale = _as_2d(analysis["scale"], "scale")
    if x.shape != mean.shape or x.shape != m.shape:
        raise ValueError(f"score_maps: image {x.shape}, mean {mean.shape} and mask {m.shape} differ")
    raw = {
        "l1": np.abs(x - mean),
        "nll": _as_2d(analysis["nll"], "nll"),
        "excess": np.maximum(x - mean, 0.0) / np.maximum(scale, 1e-6),
        "kl": upsample_grid(analysis["kl"], x.shape),
        "density": (upsample_grid(density.distance(analysis["features"]), x.shape)
                    if density is not None else np.zeros_like(x)),
        "intensity": x,
        "lesion": (_as_2d(analysis["lesion"], "lesion") if "lesion" in analysis
                   else np.zeros_like(x)),
    }
    return {kind: smooth_in_mask(raw[kind], m, config.smooth_sigma).astype(np.float32)
            for kind in MAP_KINDS}


def top_percent_mean(values: np.ndarray, mask: np.ndarray, percent: float) -> float:
    """Mean of the largest ``percent`` % of ``values`` inside ``mask`` (at least one pixel)."""
    inside = np.asarray(values)[np.asarray(mask) > 0]
    if inside.size == 0:
        return float("nan")
    count = max(1, int(np.ceil(inside.size * percent / 100.0)))
    return float(np.partition(inside, inside.size - count)[-count:].mean())


def image_scores(maps: Mapping[str, np.ndarray], mask: Any, config: ScoringConfig | None = None,
                 neg_elbo: float | None = None) -> dict[str, float]:
    """Every pooled score of :data:`SCORE_NAMES` from one image's maps (NaN for an empty mask)."""
    config = config or ScoringConfig()
    m = _as_2d(mask, "mask") > 0
    scores: dict[str, float] = {}
    for kind in MAP_KINDS:
        values = _as_2d(maps[kind], kind)
        inside = values[m]
        scores[f"{kind}_mean"] = float(inside.mean()) if inside.size else float("nan")
        scores[f"{kind}_topk"] = top_percent_mean(values, m, config.top_percent)
    scores["neg_elbo"] = float("nan") if neg_elbo is None else float(neg_elbo)
    return scores


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


def contralateral_scores(frame: pd.DataFrame, column: str = "own_score", weight: float = 1.0,
                         fallback: float = 0.0) -> pd.Series:
    """``own - weight * mean(own of the other breast's images of the same view)`` per row.

    Rows with no partner in ``frame`` use ``fallback`` (the expected own score of a
    normal breast) in place of the other breast's score.
    """
    if "patient_id" not in frame:
        raise InputError("contralateral scoring needs a patient_id column")
    if "image_id" not in frame:
        frame = frame.assign(image_id=[str(i) for i in frame.index])
    partners = partner_candidates(frame)
    own = frame[column].astype(float)
    other = pd.Series(
        [own[partners[i]].mean() if partners[i] else fallback for i in frame.index],
        index=frame.index,
    )
    return own - weight * other.fillna(fallback)


def final_scores(scores: pd.DataFrame, config: ScoringConfig) -> pd.Series:
    """The configured image score: combined own score minus the weighted other-breast score.

    ``scores`` holds pooled columns of :func:`image_scores` and ``patient_id``
    (plus ``laterality`` and ``view`` if known) when ``contralateral_weight`` is not zero.
    """
    own = combine_scores(scores, config)
    if config.contralateral_weight == 0:
        return own
    frame = scores.assign(own_score=own)
    return contralateral_scores(frame, "own_score", config.contralateral_weight, fallback=0.0)


#: The learned scores :func:`select_scoring` compares: each model map pooled over the whole
#: breast (diffuse findings, noisy maps) or its top-k% (focal lesions), and -ELBO. The plain
#: L1 error is left out: the NLL map is the same error in units of the model's scale. The
#: lesion segmenter's scores compete only in runs that have one (elsewhere they do not vary).
SELECTABLE: tuple[str, ...] = (
    "lesion_topk", "lesion_mean", "nll_mean", "nll_topk", "excess_mean", "excess_topk",
    "kl_mean", "kl_topk", "density_mean", "density_topk", "neg_elbo",
)


def scoring_candidates(base: ScoringConfig, available: list[str]) -> dict[str, ScoringConfig]:
    """The scores :func:`select_scoring` compares, by name.

    Each :data:`SELECTABLE` score minus the other breast's (``-contra``), alone and
    plus the bilateral brightest-tissue rule (``+intensity-contra``: both standardised,
    equal weights). The rule alone is not a candidate: a CVAE run's score always
    carries what the CVAE learned.
    """
    candidates: dict[str, ScoringConfig] = {}
    learned = [name for name in SELECTABLE if name in available]
    for name in learned:
        candidates[f"{name}-contra"] = base.replace(weights={name: 1.0}, contralateral_weight=1.0)
    if INTENSITY_SCORE in available:
        for name in learned:
            candidates[f"{name}+intensity-contra"] = base.replace(
                weights={name: 1.0, INTENSITY_SCORE: 1.0}, contralateral_weight=1.0)
    return candidates


def select_scoring(scores: pd.DataFrame, config: ScoringConfig) -> tuple[ScoringConfig, dict[str, float]]:
    """The candidate score (:func:`scoring_candidates`) with the best ROC-AUC on ``scores``.

    ``scores`` must be a calibration split (validation patients) with 0/1 ``label``
    and pooled score columns; ``config`` supplies smoothing, pooling and the
    normal-image ``reference``. Ties go to the first candidate in order. Returns the
    chosen config and every candidate's AUC, for the log and the run folder.
    """
    from cvae_mammo.evaluation.metrics import roc_auc

    labelled = scores[scores["label"].isin([0, 1])]
    available = [name for name in SCORE_NAMES
                 if name in labelled and labelled[name].notna().all()
                 and labelled[name].std() > 0]
    candidates = scoring_candidates(config, available)
    if not candidates:
        raise InputError("select_scoring: no pooled score column varies on this split")
    aucs = {key: roc_auc(labelled["label"], final_scores(labelled, candidate))
            for key, candidate in candidates.items()}
    best = max(aucs, key=aucs.get)
    return candidates[best], aucs
