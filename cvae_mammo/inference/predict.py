"""Score images with a trained run: ``scores_<split>.csv`` and optional heat-map overlays.

A run folder is self-contained: ``config.json`` (its ``model_type`` picks the
predictor), ``model.keras``, ``scoring.json`` (:class:`~cvae_mammo.inference.scoring.ScoringConfig`;
defaults when absent) and, after calibration, ``threshold.json``.

Predictors are registered per ``model_type`` in :data:`PREDICTORS` (``"cvae"`` here;
another model type, e.g. the classifier, adds itself with :func:`register_predictor`).
A predictor is built from the run folder and maps a batch of images ``[B, H, W, 1]``
in [0, 1] plus their metadata rows (and, for a bilateral model, the other breast's
images) to a DataFrame of scores and optionally per-image anomaly maps ``[B, H, W]``.
Partners come from :mod:`cvae_mammo.data.pairing`; an image without one is scored
alone and flagged (``has_partner`` = 0), never dropped.
"""

from __future__ import annotations

import importlib
import io
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from cvae_mammo.data.pairing import with_partners
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_bytes, atomic_write_csv
from cvae_mammo.inference.scoring import (
    SCORING_FILE,
    ScoringConfig,
    final_scores,
    image_scores,
    score_maps,
)

LOGGER = logging.getLogger(__name__)

#: Columns every scores file starts with.
SCORE_COLUMNS: tuple[str, ...] = ("image_id", "prediction_id", "score", "score_normalised",
                                  "pred_label")
THRESHOLD_FILE = "threshold.json"


class Predictor(Protocol):
    """What :func:`predict_frame` needs from a model type."""

    image_size: tuple[int, int]
    needs_partners: bool

    def score(self, images: np.ndarray, rows: pd.DataFrame, partners: np.ndarray | None = None
              ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """Per-image score columns for ``rows`` (same order) and maps ``[B, H, W]`` or None.

        ``partners`` (same shape as ``images``, all zero where an image has none) is
        given when ``needs_partners`` is true.
        """

    def finalise(self, scores: pd.DataFrame) -> pd.Series:
        """The final ``score`` of every image once all of them are scored (may use pairs)."""


PredictorFactory = Callable[[Path, dict[str, Any]], Predictor]
#: model_type -> factory(run_dir, config.json content), or ``"module:attribute"`` naming one
#: that is imported only when a run of that type is scored.
PREDICTORS: dict[str, PredictorFactory | str] = {
    "classifier": "cvae_mammo.inference.classifier_predict:ClassifierPredictor",
}


def register_predictor(model_type: str, factory: PredictorFactory) -> None:
    """Make :func:`load_predictor` build ``factory(run_dir, config)`` for ``model_type`` runs."""
    PREDICTORS[model_type] = factory


def load_predictor(run_dir: PathLike) -> Predictor:
    """Build the predictor registered for the run's ``model_type``."""
    from cvae_mammo.training.runs import read_run_config

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_type = str(config["model_type"])
    if model_type not in PREDICTORS:
        raise InputError(f"{run_dir / 'config.json'}: model_type {model_type!r} has no predictor "
                         f"(known: {', '.join(sorted(PREDICTORS))})")
    factory = PREDICTORS[model_type]
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise InputError(f"{run_dir / 'config.json'}: model_type {model_type!r} needs "
                             f"{factory}, which is not available ({error})") from error
    return factory(run_dir, config)


def load_scoring(run_dir: PathLike) -> ScoringConfig:
    """The run's ``scoring.json``, or the defaults when the run has none."""
    path = Path(run_dir) / SCORING_FILE
    return ScoringConfig.load(path) if path.is_file() else ScoringConfig()


class CVAEPredictor:
    """Anomaly maps and scores from a CVAE run (posterior-mean reconstruction: deterministic)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        from cvae_mammo.models.density import DENSITY_FILE, FeatureDensity
        from cvae_mammo.models.lesion_segmenter import load_lesion_segmenter
        from cvae_mammo.models.losses import breast_mask
        from cvae_mammo.training.runs import load_run_encoder, load_run_model

        self.model = load_run_model(run_dir)
        self.scoring = load_scoring(run_dir)
        self.image_size = (int(config["image_size"][0]), int(config["image_size"][1]))
        self.mask_threshold = float(config.get("model", {}).get("mask_threshold", 0.04))
        self.bilateral = bool(config.get("model", {}).get("bilateral", False))
        self.segmenter = load_lesion_segmenter(run_dir)
        self.needs_partners = self.bilateral or self.segmenter is not None
        self.encoder = load_run_encoder(run_dir)
        density_path = Path(run_dir) / DENSITY_FILE
        self.density = FeatureDensity.load(density_path) if density_path.is_file() else None
        self._breast_mask = breast_mask

    def masks(self, images: np.ndarray) -> np.ndarray:
        """Breast masks ``[B, H, W]`` (bool) with the training loss's rule."""
        return np.asarray(self._breast_mask(images, self.mask_threshold))[..., 0] > 0.5

    def score(self, images: np.ndarray, rows: pd.DataFrame, partners: np.ndarray | None = None
              ) -> tuple[pd.DataFrame, np.ndarray]:
        """Pooled scores (:data:`~cvae_mammo.inference.scoring.SCORE_NAMES`) and overlay maps."""
        from cvae_mammo.models.lesion_segmenter import lesion_probability

        condition = self.encoder.transform(rows) if self.encoder is not None else None
        analysis = self.model.analyse(images, partners if self.bilateral else None, condition)
        if self.segmenter is not None:
            analysis["lesion"] = lesion_probability(self.segmenter, images, partners)
        masks = self.masks(images)
        overlay_kind = self.scoring.map_kind
        rows_out, overlays = [], []
        for i in range(len(images)):
            own = {key: values[i] for key, values in analysis.items()}
            maps = score_maps(images[i], own, masks[i], self.scoring, self.density)
            pixels = max(int(masks[i].sum()), 1)
            neg_elbo = float(own["nll"][masks[i]].sum() + own["kl"].sum()) / pixels
            rows_out.append(image_scores(maps, masks[i], self.scoring, neg_elbo=neg_elbo))
            overlays.append(maps[overlay_kind])
        return pd.DataFrame(rows_out, index=rows.index), np.stack(overlays)

    def finalise(self, scores: pd.DataFrame) -> pd.Series:
        """Combined, optionally contralateral score (:func:`~cvae_mammo.inference.scoring.final_scores`)."""
        return final_scores(scores, self.scoring)


register_predictor("cvae", CVAEPredictor)


def load_calibration(run_dir: PathLike) -> Any:
    """The run's :class:`~cvae_mammo.evaluation.calibration.Calibration`, None when uncalibrated."""
    path = Path(run_dir) / THRESHOLD_FILE
    if not path.is_file():
        return None
    from cvae_mammo.evaluation.calibration import Calibration

    return Calibration.load(path)


def apply_calibration(frame: pd.DataFrame, calibration: Any) -> pd.DataFrame:
    """Add ``score_normalised`` and ``pred_label`` (blank when the run is not calibrated).

    A breast-level threshold labels every image of a breast by the breast's pooled score.
    """
    frame = frame.copy()
    if calibration is None:
        frame["score_normalised"] = np.nan
        frame["pred_label"] = pd.array([pd.NA] * len(frame), dtype="Int64")
        return frame
    frame["score_normalised"] = calibration.normalise(frame["score"].to_numpy(float))
    if calibration.level == "breast":
        from cvae_mammo.inference.aggregate import aggregate_breasts

        breasts = aggregate_breasts(frame, calibration.aggregation).set_index("prediction_id")
        pooled = frame["prediction_id"].map(breasts["score"])
        frame["pred_label"] = calibration.predict(pooled.to_numpy(float))
    else:
        frame["pred_label"] = calibration.predict(frame["score"].to_numpy(float))
    return frame


def overlay(image: np.ndarray, amap: np.ndarray, size: tuple[int, int] | None = None,
            alpha: float = 0.5, vmax: float | None = None) -> np.ndarray:
    """RGB uint8 heat-map overlay of ``amap`` on the grey ``image`` (both [H, W]).

    Resized to ``size`` (H, W) when given. The map is scaled to [0, ``vmax``] (default:
    its own maximum) and blended with the ``inferno`` colour map, more opaque where it is
    higher, so the mammogram stays visible where the map is low.
    """
    import cv2
    from matplotlib import colormaps

    grey = np.asarray(image, np.float32).squeeze()
    heat = np.asarray(amap, np.float32).squeeze()
    if size is not None and grey.shape != tuple(size):
        grey = cv2.resize(grey, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    if heat.shape != grey.shape:
        heat = cv2.resize(heat, (grey.shape[1], grey.shape[0]), interpolation=cv2.INTER_LINEAR)
    top = float(vmax) if vmax else float(heat.max())
    scaled = np.clip(heat / top, 0.0, 1.0) if top > 0 else np.zeros_like(heat)
    colour = colormaps["inferno"](scaled)[..., :3]
    base = np.repeat(np.clip(grey, 0.0, 1.0)[..., None], 3, axis=2)
    weight = (alpha * np.sqrt(scaled) * (heat > 0))[..., None]
    return np.round(255 * ((1 - weight) * base + weight * colour)).astype(np.uint8)


def save_png(path: PathLike, rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as PNG atomically."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _read(path: str, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """A dataset image at ``size`` as float ``[H, W, 1]`` and its stored (H, W); InputError naming it."""
    import cv2

    from cvae_mammo.data.pipeline import fit_pixels, to_unit_float

    pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if pixels is None:
        reason = "file not found" if not os.path.exists(path) else "cannot decode"
        raise InputError(f"{path}: cannot read image ({reason})")
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    return to_unit_float(fit_pixels(pixels, size)), pixels.shape[:2]


#: Loads row ``i`` of a frame being scored: (float image [H, W, 1] at the model size,
#: the size the overlay is drawn at).
ImageLoader = Callable[[int], tuple[np.ndarray, tuple[int, int]]]


def score_images(predictor: Predictor, rows: pd.DataFrame, load: ImageLoader,
                 maps_dir: PathLike | None = None, batch_size: int = 8,
                 keep_maps: bool = False) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The one inference path: pooled score columns of every row (and its maps).

    ``rows`` (index 0..n-1) are paired with their other breast when the predictor
    needs partners (``partner_id``, ``has_partner`` columns added). Returns the rows
    with score columns, and ``image_id -> map`` when ``keep_maps``; overlays go to
    ``maps_dir/<image_id>.png`` when given. The final ``score`` is not set here
    (:func:`finish_scores` does it once every image is scored).
    """
    from tqdm import tqdm

    rows = rows.reset_index(drop=True)
    if predictor.needs_partners:
        rows = with_partners(rows)
        position = {image_id: i for i, image_id in enumerate(rows["image_id"].astype(str))}
    parts: list[pd.DataFrame] = []
    kept: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    progress = tqdm(total=len(rows), desc="predict", unit="img", leave=False)
    for start in range(0, len(rows), batch_size):
        chunk = rows.iloc[start:start + batch_size]
        loaded = [load(index) for index in chunk.index]
        stack = np.stack([array for array, _ in loaded]).astype(np.float32)
        partners = None
        if predictor.needs_partners:
            partners = np.stack([
                load(position[partner])[0] if partner else np.zeros_like(stack[0])
                for partner in chunk["partner_id"]]).astype(np.float32)
        table, maps = predictor.score(stack, chunk, partners)
        parts.append(table)
        if maps is not None:
            for i, image_id in enumerate(chunk["image_id"].astype(str)):
                if maps_dir is not None:
                    save_png(Path(maps_dir) / f"{image_id}.png",
                             overlay(stack[i, ..., 0], maps[i], size=loaded[i][1]))
                if keep_maps:
                    kept[image_id] = maps[i]
        progress.update(len(chunk))
    progress.close()
    elapsed = time.perf_counter() - started
    LOGGER.info("scored %d images in %.1f s (%.2f images/s)", len(rows), elapsed,
                len(rows) / elapsed if elapsed > 0 else math.inf)
    scored = pd.concat([rows.drop(columns=["partner_path"], errors="ignore"), pd.concat(parts)],
                       axis=1)
    return scored, kept


def finish_scores(predictor: Predictor, scored: pd.DataFrame, calibration: Any) -> pd.DataFrame:
    """Set the final ``score`` (pairs may matter), apply the threshold, put the key columns first."""
    scored = scored.copy()
    scored["score"] = predictor.finalise(scored).to_numpy(float)
    scored = apply_calibration(scored, calibration)
    front = [c for c in SCORE_COLUMNS if c in scored]
    return scored[front + [c for c in scored.columns if c not in front]]


def predict_frame(run_dir: PathLike, rows: pd.DataFrame, root: PathLike,
                  maps_dir: PathLike | None = None, batch_size: int = 8,
                  predictor: Predictor | None = None) -> pd.DataFrame:
    """Score the dataset images of ``rows`` (``root / rows.path``) with a run.

    Returns ``rows`` with the pooled score columns, ``score``, ``score_normalised``
    and ``pred_label`` (the last two need ``threshold.json``); for a bilateral run
    also ``partner_id`` and ``has_partner``. Overlays go to
    ``maps_dir/<image_id>.png`` at each image's stored size. ``predictor``
    reuses an already loaded :func:`load_predictor` of ``run_dir``.
    """
    run_dir = Path(run_dir)
    predictor = predictor or load_predictor(run_dir)
    rows = rows.reset_index(drop=True)

    def load(index: int) -> tuple[np.ndarray, tuple[int, int]]:
        return _read(os.fspath(Path(root) / str(rows.at[index, "path"])), predictor.image_size)

    scored, _ = score_images(predictor, rows, load, maps_dir=maps_dir, batch_size=batch_size)
    return finish_scores(predictor, scored, load_calibration(run_dir))


def predict_split(run_dir: PathLike, data_dir: PathLike, split: str = "test",
                  maps_dir: PathLike | None = None, write: bool = True,
                  predictor: Predictor | None = None) -> pd.DataFrame:
    """Score one split of a dataset folder; writes ``run_dir/scores_<split>.csv`` when ``write``."""
    from cvae_mammo.data.dataset import MammoDataset

    dataset = MammoDataset.open(data_dir)
    rows = dataset.subset(split=split)
    if rows.empty:
        raise InputError(f"{dataset.splits_path}: split {split!r} has no images")
    scored = predict_frame(run_dir, rows, root=dataset.root, maps_dir=maps_dir,
                           predictor=predictor)
    if write:
        atomic_write_csv(Path(run_dir) / f"scores_{split}.csv", scored)
    return scored
