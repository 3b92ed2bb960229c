"""Choose and save a run's decision threshold from held-out (validation) patients.

Scores the split with the run (as `cvae-mammo predict` does, writing
scores_<split>.csv), then fits the threshold and the score normalisation and
writes RUN_DIR/threshold.json (method, value, level, normalisation, validation
counts and a bootstrap confidence interval of the operating point). With no
positive image in the split only normal-quantile is defined: it is used with a
warning.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cvae_mammo.calibration import Calibration


LOGGER = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cvae-mammo calibrate`."""
    parser.add_argument("--run", required=True, help="run folder (config.json, model.keras)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv, splits.csv)")
    parser.add_argument("--split", default="val", help="split to calibrate on")
    parser.add_argument("--method", default="f1",
                        help="f1 | pf1 | youden | sensitivity:0.9 | specificity:0.95 | "
                             "normal-quantile:0.99")
    parser.add_argument("--level", default="image", choices=("image", "breast"),
                        help="threshold image scores or per-breast pooled scores")
    parser.add_argument("--aggregation", default="mean", choices=("mean", "max", "soft-or"),
                        help="per-breast pooling of image scores for --level breast")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--select-score", action="store_true",
                        help="anomaly runs: also choose the pooled score (mean/topk/max/neg_elbo, "
                             "with or without the other breast's) with the best ROC-AUC on --split")


def calibrate_run(run_dir: str, data_dir: str, split: str = "val", method: str = "f1",
                  level: str = "image", aggregation: str = "mean", seed: int = 0,
                  select_score: bool = False) -> Calibration:
    """Score ``split`` with the run and save ``threshold.json``; returns the Calibration.

    For anomaly-score runs the pooled scores of the split's normal images first set the
    standardisation (``reference``) saved in ``scoring.json``, so combined and
    contralateral scores are on a common scale before the threshold is chosen. With
    ``select_score`` the pooled score itself is chosen on the split too
    (:func:`~cvae_mammo.scoring.select_scoring`); it needs positives in the split.
    """
    from pathlib import Path

    from cvae_mammo.calibration import calibrate
    from cvae_mammo.errors import InputError
    from cvae_mammo.fileio import atomic_write_csv
    from cvae_mammo.predict import THRESHOLD_FILE, load_scoring, predict_split
    from cvae_mammo.scoring import (
        SCORE_NAMES,
        SCORING_FILE,
        final_scores,
        fit_reference,
        select_scoring,
    )

    scores = predict_split(run_dir, data_dir, split)
    if all(name in scores for name in SCORE_NAMES):
        normals = scores[scores["label"] == 0]
        scoring = load_scoring(run_dir)
        scoring.reference = fit_reference(normals if len(normals) > 1 else scores)
        if select_score:
            if not (scores["label"] == 1).any() or normals.empty:
                raise InputError(f"--select-score: split {split!r} needs positive and negative images")
            scoring, aucs = select_scoring(scores, scoring)
            LOGGER.info("score selected on %s: %s (ROC-AUC %s)", split, scoring.weights,
                        ", ".join(f"{key} {auc:.3f}" for key, auc in aucs.items()))
        scoring.save(Path(run_dir) / SCORING_FILE)
        scores["score"] = final_scores(scores, scoring).to_numpy(float)
        atomic_write_csv(Path(run_dir) / f"scores_{split}.csv", scores)
    calibration = calibrate(scores, method=method, level=level, aggregation=aggregation,
                            split=split, seed=seed)
    calibration.save(Path(run_dir) / THRESHOLD_FILE)
    return calibration


def run(args: argparse.Namespace) -> int:
    """Calibrate and print the chosen threshold."""
    from pathlib import Path

    calibration = calibrate_run(args.run, args.data, args.split, args.method, args.level,
                                args.aggregation, args.seed, args.select_score)
    point = calibration.operating_point
    print(f"threshold {calibration.value:.6g} ({calibration.method_used}, {calibration.level} "
          f"level) on {calibration.counts} -> {Path(args.run) / 'threshold.json'}")
    print("sensitivity {:.3f}, specificity {:.3f}".format(
        point.get("sensitivity", float("nan")), point.get("specificity", float("nan"))))
    if calibration.warning:
        print(f"warning: {calibration.warning}")
    return 0
