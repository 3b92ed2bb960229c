"""A trained detector as one object: :class:`Detector` scores new, raw exams.

``Detector.load(run_dir)`` reads a run folder once (CVAE or classifier): the model,
its scoring (``scoring.json``, ``feature_density.npz``), its threshold
(``threshold.json``) and the preprocessing the training images went through
(``config.json`` ``preprocessing``, recorded at fit time). ``detector.predict``
takes raw DICOM / PNG / PGM files or folders, or already-preprocessed arrays,
preprocesses raw files exactly as the training images were
(:func:`~cvae_mammo.preprocessing.image.preprocess_image` with the recorded
settings, then the same quantisation and resize as a dataset PNG), pairs each
breast with the other breast of the same woman (DICOM PatientID / ImageLaterality /
ViewPosition, or the metadata given), and scores everything through the one
inference path :func:`~cvae_mammo.inference.predict.score_images`. So a raw
DICOM scored here and the same file preprocessed into a dataset and scored with
``predict --data`` give the same score.

A file that cannot be read is listed in :attr:`Predictions.failures` with its
reason; the others are still scored. An image without its partner is scored
alone and flagged (``has_partner`` = 0), never dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.errors import ImageReadError, InputError
from cvae_mammo.fileio import PathLike, read_json

LOGGER = logging.getLogger(__name__)

#: Columns of :meth:`Predictions.to_frame` taken from each result, in order.
RESULT_COLUMNS: tuple[str, ...] = (
    "image_id", "prediction_id", "patient_id", "laterality", "view", "score",
    "score_normalised", "pred_label", "has_partner", "source",
)


@dataclasses.dataclass
class ImageResult:
    """The detector's verdict on one image.

    ``score`` is the run's final score (for a CVAE: standardised, minus the other
    breast's when so calibrated; for a classifier: a probability);
    ``score_normalised`` puts the threshold at 0.5; ``label`` is 1 above it (None
    when the run is not calibrated). ``anomaly_map`` (CVAE) or Grad-CAM map
    (classifier) is ``[H, W]`` at the model size, when maps were asked for.
    ``provenance`` says how the image was preprocessed (source file, window,
    crop box, flip, ...).
    """

    image_id: str
    prediction_id: str
    patient_id: str
    laterality: str
    view: str
    score: float
    score_normalised: float
    label: int | None
    has_partner: bool
    source: str
    anomaly_map: np.ndarray | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Predictions:
    """Results of one :meth:`Detector.predict` call: per image, per breast and as a table."""

    images: list[ImageResult]
    scores: pd.DataFrame
    failures: pd.DataFrame
    calibration: Any = None

    def to_frame(self) -> pd.DataFrame:
        """One row per image: ids, score, normalised score, label, partner flag, source."""
        return self.scores[[c for c in RESULT_COLUMNS if c in self.scores]].copy()

    def breasts(self) -> pd.DataFrame:
        """One row per breast (``prediction_id``): the pooled score and, when calibrated,
        the normalised score and label under a breast-level threshold (or the pooled
        image labels for an image-level one)."""
        from cvae_mammo.inference.aggregate import aggregate_breasts

        method = self.calibration.aggregation if self.calibration is not None else "mean"
        breasts = aggregate_breasts(self.scores.assign(label=np.nan), method)
        breasts = breasts.drop(columns=["label"])
        if self.calibration is None:
            breasts["score_normalised"] = np.nan
            breasts["pred_label"] = pd.array([pd.NA] * len(breasts), dtype="Int64")
        elif self.calibration.level == "breast":
            breasts["score_normalised"] = self.calibration.normalise(breasts["score"])
            breasts["pred_label"] = self.calibration.predict(breasts["score"])
        else:
            per_image = self.scores.groupby("prediction_id")
            breasts["score_normalised"] = breasts["prediction_id"].map(
                per_image["score_normalised"].max())
            breasts["pred_label"] = breasts["prediction_id"].map(per_image["pred_label"].max())
        return breasts


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


class Detector:
    """A trained run (CVAE or classifier) ready to score new exams; see the module docstring.

    Attributes: ``run_dir``, ``model_type`` (``"cvae"`` or ``"classifier"``),
    ``predictor`` (model + scoring), ``calibration`` (None when uncalibrated) and
    ``preprocessing`` (the :class:`~cvae_mammo.preprocessing.image.PreprocessConfig`
    applied to raw files).
    """

    def __init__(self, run_dir: Path, model_type: str, predictor: Any, calibration: Any,
                 preprocessing: Any) -> None:
        self.run_dir = run_dir
        self.model_type = model_type
        self.predictor = predictor
        self.calibration = calibration
        self.preprocessing = preprocessing

    @classmethod
    def load(cls, run_dir: PathLike) -> Detector:
        """Load the model, its scoring, threshold and preprocessing from a run folder, once."""
        from cvae_mammo.inference.predict import load_calibration, load_predictor
        from cvae_mammo.training.runs import read_run_config

        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        predictor = load_predictor(run_dir)
        return cls(run_dir, str(config["model_type"]), predictor, load_calibration(run_dir),
                   _preprocessing_of(run_dir, config, predictor.image_size))

    def predict(self, inputs: PathLike | np.ndarray | Sequence[Any],
                metadata: pd.DataFrame | PathLike | None = None, maps: bool = False,
                maps_dir: PathLike | None = None, batch_size: int = 8) -> Predictions:
        """Score raw files / folders, or preprocessed arrays (float in [0, 1] or 8/16-bit).

        ``metadata`` (a DataFrame or CSV joined on ``image_id``) may give
        ``patient_id``, ``laterality``, ``view`` and the run's conditioning columns;
        otherwise they come from the DICOM tags (files) or default to one patient per
        image (arrays, ids ``image_0``, ``image_1``, ...). ``maps`` keeps each image's
        anomaly / Grad-CAM map in the results; ``maps_dir`` writes overlays.
        """
        from cvae_mammo.inference.predict import finish_scores, score_images

        items = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
        if not items:
            raise InputError("Detector.predict: no inputs given")
        rows, pixels, failures = self._prepare(items)
        rows = _join_metadata(rows, metadata)
        if rows.empty:
            return Predictions([], rows, failures, self.calibration)
        from cvae_mammo.data.pipeline import fit_pixels, to_unit_float

        size = self.predictor.image_size

        def load(index: int) -> tuple[np.ndarray, tuple[int, int]]:
            return to_unit_float(fit_pixels(pixels[index], size)), pixels[index].shape

        scored, kept = score_images(self.predictor, rows, load, maps_dir=maps_dir,
                                    batch_size=batch_size, keep_maps=maps)
        scored = finish_scores(self.predictor, scored, self.calibration)
        if "has_partner" not in scored:
            from cvae_mammo.data.pairing import with_partners

            scored["has_partner"] = with_partners(scored)["has_partner"].to_numpy()
        results = [self._result(row, kept.get(str(row["image_id"])), provenance)
                   for (_, row), provenance in zip(scored.iterrows(), rows["_provenance"])]
        return Predictions(results, scored.drop(columns=["_provenance"]), failures,
                           self.calibration)

    def _result(self, row: pd.Series, amap: np.ndarray | None,
                provenance: dict[str, Any]) -> ImageResult:
        label = row.get("pred_label")
        return ImageResult(
            image_id=str(row["image_id"]), prediction_id=str(row["prediction_id"]),
            patient_id=str(row["patient_id"]), laterality=_text(row.get("laterality")),
            view=_text(row.get("view")), score=float(row["score"]),
            score_normalised=float(row["score_normalised"]),
            label=None if pd.isna(label) else int(label), has_partner=bool(row["has_partner"]),
            source=_text(row.get("source")), anomaly_map=amap, provenance=provenance)

    # -- inputs ------------------------------------------------------------------------------
    def _prepare(self, items: list[Any]) -> tuple[pd.DataFrame, list[np.ndarray], pd.DataFrame]:
        """Rows (ids, tags, provenance), quantised pixels and failures of every input."""
        from cvae_mammo.preprocessing.batch import discover_inputs

        records: list[dict[str, Any]] = []
        pixels: list[np.ndarray] = []
        failures: list[dict[str, str]] = []
        arrays = [item for item in items if isinstance(item, np.ndarray)]
        if arrays and len(arrays) != len(items):
            raise InputError("Detector.predict: pass either files/folders or arrays, not both")
        if arrays:
            for index, array in enumerate(arrays):
                pixels.append(_as_pixels(array, index))
                records.append({"image_id": f"image_{index}", "patient_id": f"image_{index}",
                                "laterality": "", "view": "", "source": "array",
                                "_provenance": {}})
        else:
            for path in discover_inputs(items):
                try:
                    processed = self._preprocess(path)
                except (ImageReadError, OSError) as error:
                    LOGGER.warning("skipping %s: %s", path, error)
                    failures.append({"source": str(path), "reason": str(error)})
                    continue
                pixels.append(processed.image)
                records.append(_record(path, processed))
        rows = pd.DataFrame.from_records(records, columns=[
            "image_id", "patient_id", "laterality", "view", "source", "_provenance"])
        return rows, pixels, pd.DataFrame(failures, columns=["source", "reason"])

    def _preprocess(self, path: Path) -> Any:
        from cvae_mammo.preprocessing.image import preprocess_image

        return preprocess_image(path, self.preprocessing)


def _as_pixels(array: np.ndarray, index: int) -> np.ndarray:
    """A preprocessed array as uint8/uint16 pixels (float [0, 1] quantised to 16 bits)."""
    values = np.asarray(array).squeeze()
    if values.ndim != 2:
        raise InputError(f"array {index}: shape {np.shape(array)}, expected [H, W] or [H, W, 1]")
    if values.dtype in (np.uint8, np.uint16):
        return values
    if np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() > 1:
        raise InputError(f"array {index}: values must lie in [0, 1] (or be 8/16-bit integers)")
    return np.round(values.astype(np.float64) * 65535).astype(np.uint16)


def _record(path: Path, processed: Any) -> dict[str, Any]:
    """Ids and tags of one preprocessed file: DICOM tags, else the file name and the pixels."""
    tags = processed.tags
    laterality = tags.get("laterality", "") or ("R" if processed.provenance.get("flipped")
                                                else "L")
    return {"image_id": path.stem if path.suffix else path.name,
            "patient_id": tags.get("patient_id", "") or (path.stem if path.suffix else path.name),
            "laterality": laterality, "view": tags.get("view", ""), "source": os.fspath(path),
            "_provenance": dict(processed.provenance)}


def _join_metadata(rows: pd.DataFrame, metadata: pd.DataFrame | PathLike | None) -> pd.DataFrame:
    """Metadata values (joined on ``image_id``) override the file's own; ``prediction_id`` set."""
    rows = rows.copy()
    if metadata is not None:
        table = metadata if isinstance(metadata, pd.DataFrame) else pd.read_csv(
            metadata, dtype={"image_id": str, "patient_id": str})
        if "image_id" not in table:
            raise InputError("Detector.predict: metadata needs an image_id column")
        table = table.assign(image_id=table["image_id"].astype(str)).drop_duplicates("image_id")
        table = table.set_index("image_id")
        for column in table.columns:
            given = rows["image_id"].map(table[column])
            if column in rows:
                rows[column] = given.where(given.notna() & (given.astype(str) != ""),
                                           rows[column])
            else:
                rows[column] = given
    for column in ("patient_id", "laterality", "view"):
        rows[column] = rows[column].fillna("").astype(str)
    rows["prediction_id"] = [f"{p}_{side}" if side else str(p)
                             for p, side in zip(rows["patient_id"], rows["laterality"])]
    return rows


def _preprocessing_of(run_dir: Path, config: dict[str, Any], image_size: tuple[int, int]) -> Any:
    """The preprocessing the run's training images went through (see the module docstring)."""
    from cvae_mammo.preprocessing.image import PreprocessConfig

    recorded = config.get("preprocessing")
    if recorded is None:
        metadata = run_dir / "metadata.json"
        dataset = read_json(metadata).get("dataset_dir") if metadata.is_file() else None
        settings = Path(dataset or "") / "preprocess.json"
        if dataset and settings.is_file():
            recorded = read_json(settings).get("config")
    if recorded is None:
        LOGGER.warning("%s: no recorded preprocessing; raw files are preprocessed with the "
                       "defaults at %sx%s", run_dir, *image_size)
        return PreprocessConfig(image_size=image_size)
    return PreprocessConfig.from_dict(recorded)
