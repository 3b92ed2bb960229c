"""Write DATASET_DIR/splits.csv: patient-grouped (no patient in two splits), stratified on the
label (and optionally other columns), deterministic for a seed; then print images, patients and
positives per split. Use --val/--test fractions, or --folds K for K-fold cross-validation
(optionally with a --test hold-out)."""

from __future__ import annotations

import argparse
import logging

LOGGER = logging.getLogger("cvae_mammo.split")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo split``."""
    parser.add_argument("dataset_dir", metavar="DATASET_DIR", help="folder holding manifest.csv")
    parser.add_argument("--val", type=float, default=None,
                        help="share of patients for validation (default 0.15; not with --folds)")
    parser.add_argument("--test", type=float, default=None,
                        help="share of patients for test (default 0.15, or 0 with --folds)")
    parser.add_argument("--folds", type=int, default=None, metavar="K",
                        help="K-fold split of the non-test patients (column fold 0..K-1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--stratify", default="", metavar="COL,...",
                        help="extra manifest columns to stratify on, e.g. site_id,density")
    parser.add_argument("--label-column", default="label",
                        help="manifest column holding the 0/1 label (blank = unknown)")
    parser.add_argument("--out", default="splits.csv",
                        help="output file name, relative to DATASET_DIR unless absolute")


def run(args: argparse.Namespace) -> int:
    """Make, write and summarise the split."""
    from pathlib import Path

    import pandas as pd

    from cvae_mammo.data.dataset import MANIFEST_NAME, MammoDataset, resolve_splits_path
    from cvae_mammo.data.metadata import normalise_metadata
    from cvae_mammo.data.splits import make_splits, write_splits
    from cvae_mammo.errors import InputError

    if args.folds is not None and args.val is not None:
        raise InputError("--val and --folds exclude each other (with --folds a fold is the validation set)")
    root = Path(args.dataset_dir)
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: manifest not found (run `cvae-mammo preprocess` first)")
    frame = normalise_metadata(pd.read_csv(manifest_path, dtype={"image_id": str, "patient_id": str}),
                               args.label_column)
    stratify = [c.strip() for c in args.stratify.split(",") if c.strip()]
    splits = make_splits(
        frame,
        val=0.15 if args.val is None else args.val,
        test=(0.0 if args.folds else 0.15) if args.test is None else args.test,
        folds=args.folds,
        seed=args.seed,
        stratify=stratify,
        label_column="label",
    )
    out = resolve_splits_path(root, args.out)
    write_splits(splits, out)
    LOGGER.info("wrote %s (%d images, seed %d)", out, len(splits), args.seed)
    dataset = MammoDataset.open(root, out, label_column=args.label_column, check_images=False)
    print(dataset.counts().to_string())
    if args.folds:
        per_fold = dataset.frame[dataset.frame["fold"] >= 0].groupby("fold").agg(
            images=("image_id", "size"), patients=("patient_id", "nunique"),
            positives=("label", lambda v: int((v == 1).sum())))
        print(per_fold.to_string())
    return 0
