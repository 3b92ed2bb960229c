"""Preprocess DICOM / PNG / PGM / TIFF / JPEG mammograms into a dataset folder.

Writes DATASET_DIR/images/<patient_id>/<image_id>.png, manifest.csv,
failures.csv, unmatched.csv (with --metadata) and preprocess.json. Re-running
with the same settings skips images already written; the manifest always lists
every image in DATASET_DIR, so a rerun on some of the inputs loses nothing.
Metadata columns are copied by an allow-list (--keep-column adds one). Exit
status is non-zero only when no image could be processed.
"""

from __future__ import annotations

import argparse
import sys

from cvae_mammo.config import DEFAULT_IMAGE_SIZE, format_image_size
from cvae_mammo.preprocessing.manifest import PASSTHROUGH_COLUMNS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo preprocess``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="image/DICOM files or folders (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DATASET_DIR", help="output folder")
    parser.add_argument("--metadata", metavar="CSV",
                        help="RSNA train.csv or a CSV with image_id[, patient_id, laterality, "
                             "view, label, ...], joined on image_id")
    parser.add_argument("--keep-column", action="append", default=[], metavar="NAME",
                        help="also copy this metadata column into manifest.csv (repeatable); "
                             "by default only the allow-list is copied: "
                             f"{', '.join(PASSTHROUGH_COLUMNS)}")
    parser.add_argument("--label-column", default=None,
                        help="metadata column holding the 1/0 label (default: label, else "
                             "cancer)")
    parser.add_argument("--size", default=format_image_size(DEFAULT_IMAGE_SIZE), type=str,
                        help="output size HEIGHTxWIDTH")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8, help="PNG bit depth")
    parser.add_argument("--resize", choices=("stretch", "keep-aspect"), default="stretch",
                        help="stretch the crop to the size, or keep its aspect and pad")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: all cores)")
    parser.add_argument("--shard", default=None, metavar="i/N",
                        help="process every N-th input starting at i (0-based)")
    parser.add_argument("--window-index", type=int, default=0,
                        help="which DICOM window pair to use when there are several")
    parser.add_argument("--remove-pectoral", action="store_true",
                        help="mask the pectoral muscle on MLO views (heuristic)")
    parser.add_argument("--limit", type=int, default=None, help="process at most N images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the preprocessing; 0 when at least one image is in the dataset."""
    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig

    config = PreprocessConfig(
        image_size=args.size,
        bits=args.bits,
        resize=args.resize,
        window_index=args.window_index,
        remove_pectoral=args.remove_pectoral,
        label_column=args.label_column,
    )
    summary = preprocess_dataset(
        args.inputs, args.out, config=config, metadata=args.metadata, workers=args.workers,
        shard=args.shard, limit=args.limit, progress=not args.no_progress,
        keep_columns=args.keep_column,
    )
    print(summary.line(), file=sys.stdout)
    return 0 if summary.ok else 1
