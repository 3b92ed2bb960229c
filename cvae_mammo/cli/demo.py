"""Run the whole pipeline on built-in synthetic phantom mammograms.

Makes RSNA-like phantom DICOMs (JPEG 2000 / JPEG Lossless, MONOCHROME1/2,
SIGMOID/LINEAR VOI) with inserted masses, spiculated masses and calcification
clusters, then runs preprocess -> split -> fit-cvae -> calibrate ->
fit-classifier -> calibrate -> predict -> report and prints where report.html
is. Sized for at most 6 minutes on an idle 2-core CPU at the default size (stage seconds
go to OUT/demo.json); --quick runs every stage on a handful of images in a
couple of minutes.
"""

from __future__ import annotations

import argparse

from cvae_mammo.config import format_image_size, parse_image_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo demo``."""
    from cvae_mammo.demo import DEMO_IMAGE_SIZE

    parser.add_argument("--out", default="cvae_mammo_demo", metavar="DIR",
                        help="output folder (phantoms/, dataset/, runs/, report/)")
    parser.add_argument("--size", type=parse_image_size, default=format_image_size(DEMO_IMAGE_SIZE),
                        metavar="HxW", help="preprocessed image size, height x width")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 16 women, 2 CVAE epochs, 1 classifier epoch")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when the report was written."""
    from cvae_mammo.demo import run_demo

    result = run_demo(args.out, size=args.size, seed=args.seed, quick=args.quick,
                      progress=not args.no_progress)
    return 0 if result.report_html is not None else 1
