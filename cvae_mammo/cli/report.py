"""Side-by-side ROC / F1 report of several runs (CVAE, classifier, ...) on the same split.

Reads each run's scores_<split>.csv and threshold.json (scoring the split with
the run first when the scores file is missing), takes labels, patients and
breasts from the dataset's manifest.csv, and writes to --out: report.html (one
self-contained page), metrics.json, metrics.md and figures/*.png, at image and
breast level. Refuses runs trained on different split files (metadata.json
splits_sha256) unless --allow-different-splits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

LOGGER = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cvae-mammo report`."""
    parser.add_argument("--run", action="append", required=True, metavar="RUN_DIR",
                        help="run folder; repeat for each run to compare")
    parser.add_argument("--name", action="append", default=None, metavar="NAME",
                        help="display name per --run, in the same order; omitted: the run folder name")
    parser.add_argument("--data", required=True, metavar="DATASET_DIR",
                        help="dataset folder (manifest.csv with labels, splits.csv)")
    parser.add_argument("--split", default="test", help="split the runs were scored on")
    parser.add_argument("--out", required=True, metavar="REPORT_DIR", help="report folder")
    parser.add_argument("--maps", action="append", default=None, metavar="DIR",
                        help="map PNGs (<image_id>.png from `predict --maps`) per --run, in the "
                             "same order, for the example grid ('' for a run without maps)")
    parser.add_argument("--allow-different-splits", action="store_true",
                        help="compare runs whose split files differ (hash mismatch)")
    parser.add_argument("--n-bootstrap", type=int, default=1000,
                        help="patient-level bootstrap resamples for the confidence intervals")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def run(args: argparse.Namespace) -> int:
    """Build the report and print the headline numbers."""
    from cvae_mammo.evaluation.collect import collect_runs
    from cvae_mammo.evaluation.report import write_report

    runs, warnings = collect_runs(args.run, args.data, args.split, args.name, args.maps,
                                  args.allow_different_splits)
    for warning in warnings:
        LOGGER.warning(warning)
    summary = write_report(runs, args.out, args.split, n_bootstrap=args.n_bootstrap,
                           seed=args.seed, warnings=warnings)
    for level, results in summary["levels"].items():
        for name, result in results.items():
            low, high = result["roc_auc_ci"]
            at = result["at_threshold"]
            f1 = f", F1 {at['f1']:.3f} at {at['threshold']:.4g}" if at else ""
            print(f"{level:6s} {name}: ROC-AUC {result['roc_auc']:.3f} [{low:.3f}, {high:.3f}], "
                  f"PR-AUC {result['pr_auc']:.3f}{f1}")
    print(f"report -> {Path(args.out) / 'report.html'}")
    return 0
