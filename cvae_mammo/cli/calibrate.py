"""`cvae-mammo calibrate`: a run's decision threshold from held-out (validation) patients.

Options and printing only; the work is :func:`cvae_mammo.evaluation.run_calibration.calibrate_run`.
Writes RUN_DIR/threshold.json (method, value, level, normalisation, validation
counts and a bootstrap confidence interval of the operating point), scoring.json
and scores_<split>.csv. With no positive image in the split only normal-quantile
is defined: it is used with a warning.
"""

from __future__ import annotations

import argparse
import logging

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
                        help="anomaly runs: also choose the score (each map's mean/top-k: lesion "
                             "segmenter, NLL, excess, KL, feature density; -ELBO; "
                             "with or without the other breast's, alone or with the brightest-"
                             "tissue rule) with the best ROC-AUC on --split; it needs many "
                             "validation women: on ~20 it overfits (README 'Measured')")


def run(args: argparse.Namespace) -> int:
    """Calibrate and print the chosen threshold."""
    from pathlib import Path

    from cvae_mammo.evaluation.run_calibration import calibrate_run

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
