"""Decision thresholds and score normalisation, fitted on held-out (validation) scores.

Works on any model's scores (CVAE anomaly scores, classifier probabilities):
a score at or above the threshold is a positive prediction. Methods:

- ``f1``: the threshold with the best F1;
- ``pf1``: the threshold whose normalised scores, read as probabilities, give
  the best RSNA probabilistic F1 (what the competition scored);
- ``youden``: the best sensitivity + specificity - 1;
- ``sensitivity:T``: the highest threshold keeping sensitivity >= T;
- ``specificity:T``: the lowest threshold keeping specificity >= T;
- ``normal-quantile:Q``: the Q-quantile of the negative (normal) scores.

Thresholds chosen from the ranking lie halfway between consecutive distinct
scores. With no positive in the calibration set only ``normal-quantile`` and
``specificity`` are defined: the others fall back to ``normal-quantile:0.99``
with a warning rather than return a degenerate threshold.

Normalisation maps a score to ``1 / (1 + exp(-(score - threshold) / scale))``:
monotone, 0.5 at the threshold, ``scale`` from the spread of the normal scores.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import expit

from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.metrics import (
    ArrayLike,
    operating_point_ci,
    probabilistic_f1,
    threshold_sweep,
)
from cvae_mammo.fileio import PathLike, atomic_write_json, read_json
from cvae_mammo.inference.aggregate import aggregate_breasts, check_aggregation

LOGGER = logging.getLogger(__name__)

#: Method name -> default target (None: the method takes no target).
METHODS: dict[str, float | None] = {
    "f1": None,
    "pf1": None,
    "youden": None,
    "sensitivity": 0.9,
    "specificity": 0.95,
    "normal-quantile": 0.99,
}
LEVELS: tuple[str, ...] = ("image", "breast")
FALLBACK_METHOD = "normal-quantile:0.99"
#: Methods defined without positive labels.
_NEEDS_NO_POSITIVES = frozenset({"normal-quantile", "specificity"})
_TOLERANCE = 1e-12


@dataclasses.dataclass(frozen=True)
class ThresholdMethod:
    """A parsed method: ``name`` from :data:`METHODS` and its ``target`` (or None)."""

    name: str
    target: float | None = None

    @classmethod
    def parse(cls, text: str) -> ThresholdMethod:
        """Parse ``"f1"``, ``"sensitivity:0.9"``, ``"normal-quantile"`` (default target) ..."""
        name, _, target_text = str(text).strip().partition(":")
        if name not in METHODS:
            raise InputError(f"threshold method {text!r}: unknown; choose one of "
                             f"{', '.join(METHODS)} (targets as sensitivity:0.9)")
        default = METHODS[name]
        if default is None:
            if target_text:
                raise InputError(f"threshold method {text!r}: {name} takes no target")
            return cls(name)
        try:
            target = float(target_text) if target_text else default
        except ValueError:
            raise InputError(f"threshold method {text!r}: target must be a number") from None
        if not 0.0 < target <= 1.0:
            raise InputError(f"threshold method {text!r}: target must lie in (0, 1]")
        return cls(name, target)

    def __str__(self) -> str:
        return self.name if self.target is None else f"{self.name}:{self.target:g}"


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """Monotone map of scores to [0, 1] with 0.5 at ``center`` (the threshold)."""

    center: float
    scale: float
    kind: str = "logistic"

    def __call__(self, scores: ArrayLike) -> np.ndarray:
        """Normalised scores: ``1 / (1 + exp(-(score - center) / scale))``."""
        return expit((np.asarray(scores, dtype=float) - self.center) / self.scale)


def _split_labelled(scores: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Finite scores and 0/1 labels with unknown (NaN) labels dropped."""
    s = np.asarray(scores, dtype=float).ravel()
    y = np.asarray(labels, dtype=float).ravel()
    if s.size != y.size:
        raise ValueError(f"got {s.size} scores but {y.size} labels")
    if not np.isfinite(s).all():
        raise InputError("calibration scores contain NaN or infinite values")
    known = ~np.isnan(y)
    if not np.isin(y[known], (0.0, 1.0)).all():
        raise InputError("calibration labels must be 0, 1 or blank")
    return s[known], y[known].astype(bool)


def normal_scale(scores: ArrayLike, labels: ArrayLike) -> float:
    """Spread of the negative scores (1.4826 x MAD, else std), never zero."""
    s, y = _split_labelled(scores, labels)
    for values in (s[~y], s):
        if values.size:
            mad = 1.4826 * float(np.median(np.abs(values - np.median(values))))
            for spread in (mad, float(np.std(values))):
                if spread > 0:
                    return spread
    return max(1e-6, 1e-6 * float(np.max(np.abs(s))) if s.size else 1.0)


def _pf1_threshold(s: np.ndarray, y: np.ndarray, scale: float, candidates: np.ndarray) -> float:
    """The threshold maximising pF1 of ``expit((s - t) / scale)``: grid search, then Brent."""

    def pf1(t: float) -> float:
        return probabilistic_f1(y, expit((s - t) / scale))

    low, high = s.min() - 3 * scale, s.max() + 3 * scale
    if candidates.size > 512:  # pF1 is smooth in t: quantiles of the cut points suffice
        candidates = np.quantile(candidates, np.linspace(0.0, 1.0, 512))
    grid = np.unique(np.concatenate([np.linspace(low, high, 512), candidates]))
    values = np.array([pf1(t) for t in grid])
    best = int(np.argmax(values))
    bounds = (grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)])
    if bounds[1] > bounds[0]:
        refined = minimize_scalar(lambda t: -pf1(t), bounds=bounds, method="bounded",
                                  options={"xatol": 1e-9 * max(1.0, scale)})
        if -refined.fun > values[best]:
            return float(refined.x)
    return float(grid[best])


def choose_threshold(scores: ArrayLike, labels: ArrayLike,
                     method: str | ThresholdMethod) -> tuple[float, ThresholdMethod, str | None]:
    """Pick a threshold on labelled scores.

    Returns ``(threshold, method actually used, warning or None)``; unknown
    (NaN) labels are ignored. Raises InputError without negative labels.
    """
    wanted = method if isinstance(method, ThresholdMethod) else ThresholdMethod.parse(method)
    s, y = _split_labelled(scores, labels)
    if not (~y).any():
        raise InputError("calibration needs negative (normal) images; the calibration set has "
                         f"{s.size} labelled scores and none is negative")
    used, warning = wanted, None
    if not y.any() and wanted.name not in _NEEDS_NO_POSITIVES:
        used = ThresholdMethod.parse(FALLBACK_METHOD)
        warning = (f"no positive labels in the calibration set: method {wanted} is undefined, "
                   f"using {used} instead")
        warnings.warn(warning, UserWarning, stacklevel=2)
        LOGGER.warning(warning)
    if used.name == "normal-quantile":
        value = float(np.quantile(s[~y], used.target))
    elif used.name == "pf1":
        sweep = threshold_sweep(y, s)
        value = _pf1_threshold(s, y, normal_scale(s, y), sweep.thresholds)
    else:
        sweep = threshold_sweep(y, s)
        if used.name == "f1":
            index = int(np.argmax(sweep.f1))
        elif used.name == "youden":
            index = int(np.argmax(sweep.sensitivity + sweep.specificity))
        elif used.name == "sensitivity":
            index = int(np.argmax(sweep.sensitivity >= used.target - _TOLERANCE))
        else:
            index = int(np.flatnonzero(sweep.specificity >= used.target - _TOLERANCE)[-1])
        value = float(sweep.thresholds[index])
    flagged = int(np.sum(s >= value))
    if flagged in (0, s.size) and y.any():
        degenerate = (f"threshold {value:.6g} ({used}) labels {'every' if flagged else 'no'} "
                      "calibration case positive: the scores barely separate the classes")
        warnings.warn(degenerate, UserWarning, stacklevel=2)
        LOGGER.warning(degenerate)
        warning = degenerate if warning is None else f"{warning}; {degenerate}"
    return value, used, warning


def nan_to_none(value: Any) -> Any:
    """Copy of nested dicts/lists with float NaN replaced by None (valid JSON null)."""
    if isinstance(value, dict):
        return {key: nan_to_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [nan_to_none(item) for item in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _none_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [float("nan") if item is None else item for item in value]
    return float("nan") if value is None else value


@dataclasses.dataclass
class Calibration:
    """A run's calibrated decision rule, saved as ``threshold.json`` in the run dir.

    ``level`` says whether the threshold applies to image scores or to breast
    scores pooled with ``aggregation``; ``counts`` and ``operating_point``
    describe the calibration (validation) set.
    """

    method: str
    method_used: str
    value: float
    level: str
    aggregation: str
    normalisation: Normalisation
    counts: dict[str, int]
    operating_point: dict[str, Any]
    split: str | None = None
    warning: str | None = None

    def normalise(self, scores: ArrayLike) -> np.ndarray:
        """Scores on a 0-1 scale where 0.5 is the threshold."""
        return self.normalisation(scores)

    def predict(self, scores: ArrayLike) -> np.ndarray:
        """0/1 labels: 1 where the raw score is at or above the threshold."""
        return (np.asarray(scores, dtype=float) >= self.value).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary (the threshold.json content); undefined values become null."""
        return nan_to_none(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "threshold.json") -> Calibration:
        """Rebuild from :meth:`to_dict` output; ``source`` names the file in errors."""
        fields = {field.name for field in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        unknown = sorted(set(values) - fields)
        if missing or unknown:
            raise InputError(f"{source}: not a threshold file (missing {missing or 'nothing'}, "
                             f"unknown {unknown or 'nothing'})")
        values = dict(values)
        try:
            values["normalisation"] = Normalisation(**values["normalisation"])
            operating = {key: _none_to_nan(value)
                         for key, value in dict(values["operating_point"]).items()}
            for key in ("sensitivity_ci", "specificity_ci"):
                if key in operating:
                    operating[key] = tuple(operating[key])
            values["operating_point"] = operating
            values["value"] = float(values["value"])
        except (TypeError, ValueError) as error:
            raise InputError(f"{source}: malformed threshold file ({error})") from error
        return cls(**values)

    def save(self, path: PathLike) -> None:
        """Write ``threshold.json`` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: PathLike) -> Calibration:
        """Read a ``threshold.json`` written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: threshold file not found (run calibrate first)")
        values = read_json(path)
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a JSON object")
        return cls.from_dict(values, source=str(path))


def calibrate(frame: pd.DataFrame, method: str = "f1", level: str = "image",
              aggregation: str = "mean", split: str | None = None, n_bootstrap: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> Calibration:
    """Fit a threshold and normalisation on a calibration set of image scores.

    ``frame`` has one row per image with ``score`` and ``label`` (blank =
    unknown, ignored), and ``patient_id`` (bootstrap groups) and
    ``prediction_id`` (needed for ``level="breast"``, where images are first
    pooled per breast with ``aggregation``).
    """
    if level not in LEVELS:
        raise InputError(f"calibration level {level!r}: choose one of {', '.join(LEVELS)}")
    check_aggregation(aggregation)
    for column in ("score", "label"):
        if column not in frame:
            raise InputError(f"calibration scores need a {column!r} column")
    rows = aggregate_breasts(frame, aggregation) if level == "breast" else frame
    labels = pd.to_numeric(rows["label"], errors="coerce").to_numpy(dtype=float)
    scores = pd.to_numeric(rows["score"], errors="coerce").to_numpy(dtype=float)
    value, used, warning = choose_threshold(scores, labels, method)
    known = ~np.isnan(labels)
    groups = rows["patient_id"].astype(str).to_numpy()[known] if "patient_id" in rows else None
    s, y = scores[known], labels[known].astype(bool)
    counts = {"n": int(known.size), "n_positive": int(y.sum()), "n_negative": int((~y).sum()),
              "n_unlabelled": int((~known).sum()),
              "n_patients": int(np.unique(groups).size) if groups is not None else int(s.size)}
    operating = operating_point_ci(y, s, value, groups, n_bootstrap, confidence, seed)
    return Calibration(
        method=str(ThresholdMethod.parse(method)) if isinstance(method, str) else str(method),
        method_used=str(used), value=value, level=level, aggregation=aggregation,
        normalisation=Normalisation(center=value, scale=normal_scale(s, y)),
        counts=counts, operating_point=operating, split=split, warning=warning)
