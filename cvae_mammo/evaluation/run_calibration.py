"""Calibrate a run on held-out patients: :func:`calibrate_run` (``cvae-mammo calibrate``).

Scores the split with the run, fits the score normalisation of anomaly runs on the
split's normal images (and, with ``select_score``, chooses the score itself,
:func:`~cvae_mammo.inference.scoring.select_scoring`), then the threshold
(:func:`~cvae_mammo.evaluation.calibration.calibrate`). Writes ``scoring.json``,
``threshold.json`` and ``scores_<split>.csv`` once, with ``score``,
``score_normalised`` and ``pred_label`` computed under the new threshold.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.calibration import LEVELS, Calibration, ThresholdMethod, calibrate
from cvae_mammo.fileio import PathLike, atomic_write_csv, atomic_write_json
from cvae_mammo.inference.aggregate import check_aggregation

LOGGER = logging.getLogger(__name__)
#: Every candidate's ROC-AUC on the calibration split, written by ``select_score``.
SELECTION_FILE = "score_selection.json"


def calibrate_run(run_dir: PathLike, data_dir: PathLike, split: str = "val", method: str = "f1",
                  level: str = "image", aggregation: str = "mean", seed: int = 0,
                  select_score: bool = False) -> Calibration:
    """Score ``split`` with the run and save its threshold; returns the :class:`Calibration`.

    For anomaly-score runs the pooled scores of the split's normal images first set
    the standardisation (``reference``) saved in ``scoring.json``, so combined and
    contralateral scores are on a common scale before the threshold is chosen. With
    ``select_score`` the score itself is chosen on the split too; that needs positive
    and negative images in it.
    """
    from cvae_mammo.inference.predict import (
        THRESHOLD_FILE,
        apply_calibration,
        load_predictor,
        load_scoring,
        predict_split,
    )
    from cvae_mammo.inference.scoring import (
        SCORE_NAMES,
        SCORING_FILE,
        final_scores,
        fit_reference,
        select_scoring,
    )

    ThresholdMethod.parse(method)  # bad options fail before the split is scored
    check_aggregation(aggregation)
    if level not in LEVELS:
        raise InputError(f"calibration level {level!r}: choose one of {', '.join(LEVELS)}")
    run_dir = Path(run_dir)
    predictor = load_predictor(run_dir)
    scores = predict_split(run_dir, data_dir, split, write=False, predictor=predictor)
    if any(name in scores for name in SCORE_NAMES):
        normals = scores[scores["label"] == 0]
        scoring = load_scoring(run_dir)
        scoring.reference = fit_reference(normals if len(normals) > 1 else scores)
        if select_score:
            if not (scores["label"] == 1).any() or normals.empty:
                raise InputError(f"--select-score: split {split!r} needs positive and negative "
                                 "images")
            scoring, aucs = select_scoring(scores, scoring)
            LOGGER.info("score selected on %s: %s (ROC-AUC %.3f)", split, scoring.weights,
                        max(aucs.values()))
            atomic_write_json(run_dir / SELECTION_FILE, {"split": split, "roc_auc": aucs,
                                                          "chosen": scoring.to_dict()})
        scoring.save(run_dir / SCORING_FILE)
        scores["score"] = final_scores(scores, scoring).to_numpy(float)
    calibration = calibrate(scores, method=method, level=level, aggregation=aggregation,
                            split=split, seed=seed)
    calibration.save(run_dir / THRESHOLD_FILE)
    atomic_write_csv(run_dir / f"scores_{split}.csv", apply_calibration(scores, calibration))
    return calibration
