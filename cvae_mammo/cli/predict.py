"""Score images with a trained run (CVAE or classifier).

New exams, straight from DICOM / PNG / PGM files or folders:

    cvae-mammo predict --run RUN INPUT... --out DIR [--maps] [--metadata CSV]

preprocesses every file exactly as the run's training images were, pairs each breast
with the other breast of the same woman (DICOM tags, or --metadata), and writes
DIR/scores.csv: one row per image (image_id, prediction_id, score, score_normalised,
pred_label, has_partner, source) with its breast's pooled breast_score,
breast_score_normalised and breast_pred_label; DIR/failures.csv lists files that
could not be read (the others are still scored); --maps writes DIR/maps/<image_id>.png.

A split of a preprocessed dataset folder:

    cvae-mammo predict --run RUN --data DATASET --split test [--maps DIR]

writes RUN/scores_<split>.csv. score_normalised and pred_label need RUN/threshold.json
(run `cvae-mammo calibrate` first); without it they are left blank.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cvae-mammo predict`."""
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="raw DICOM / PNG / PGM files or folders to score (needs --out)")
    parser.add_argument("--run", required=True, help="run folder (config.json, model.keras)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder for scores.csv (and maps/) when scoring INPUTs")
    parser.add_argument("--metadata", default=None, metavar="CSV",
                        help="optional CSV joined on image_id: patient_id, laterality, view and "
                             "the run's conditioning columns (else taken from DICOM tags)")
    parser.add_argument("--data", default=None, help="dataset folder (manifest.csv, splits.csv)")
    parser.add_argument("--split", default="test", help="with --data: split to score")
    parser.add_argument("--maps", nargs="?", const="", default=None, metavar="DIR",
                        help="write heat-map / Grad-CAM overlays (PNG); with INPUTs they go to "
                             "OUT/maps, with --data to DIR (default RUN/maps_<split>)")


def _score_split(args: argparse.Namespace) -> int:
    from cvae_mammo.inference.predict import predict_split

    maps = None if args.maps is None else (args.maps or Path(args.run) / f"maps_{args.split}")
    scores = predict_split(args.run, args.data, args.split, maps_dir=maps)
    out = Path(args.run) / f"scores_{args.split}.csv"
    _print_summary(len(scores), scores, out)
    if maps is not None:
        print(f"overlays -> {maps}")
    return 0


def _score_inputs(args: argparse.Namespace) -> int:
    from cvae_mammo.errors import InputError
    from cvae_mammo.fileio import atomic_write_csv
    from cvae_mammo.inference.detector import Detector

    if not args.out:
        raise InputError("predict: scoring INPUT files needs --out DIR")
    out = Path(args.out)
    detector = Detector.load(args.run)
    maps = out / "maps" if args.maps is not None else None
    results = detector.predict(args.inputs, metadata=args.metadata, maps_dir=maps)
    if not len(results.failures) and not results.images:
        raise InputError(f"predict: no image files found in {', '.join(args.inputs)}")
    if len(results.failures):
        atomic_write_csv(out / "failures.csv", results.failures)
        for row in results.failures.itertuples():
            print(f"not scored: {row.source}: {row.reason}")
    if not results.images:
        print(f"no image could be scored; see {out / 'failures.csv'}")
        return 1
    table = results.to_frame()
    breasts = results.breasts().set_index("prediction_id")
    for column in ("score", "score_normalised", "pred_label"):
        table[f"breast_{column}"] = table["prediction_id"].map(breasts[column]).to_numpy()
    atomic_write_csv(out / "scores.csv", table)
    alone = int((table["has_partner"] == 0).sum())
    _print_summary(len(table), table, out / "scores.csv")
    if alone:
        print(f"{alone} image(s) scored without the other breast (has_partner = 0)")
    if maps is not None:
        print(f"overlays -> {maps}")
    return 0


def _print_summary(count: int, scores: pd.DataFrame, out: Path) -> None:
    calibrated = scores["pred_label"].notna().any()
    flagged = int(scores["pred_label"].fillna(0).sum()) if calibrated else None
    print(f"{count} images scored -> {out}"
          + (f"; {flagged} above the threshold" if flagged is not None else
             "; not calibrated (no threshold.json)"))


def run(args: argparse.Namespace) -> int:
    """Score the inputs (or the dataset split) and print where the scores went."""
    from cvae_mammo.errors import InputError

    if args.data and args.inputs:
        raise InputError("predict: give either INPUT files or --data, not both")
    if args.data:
        return _score_split(args)
    if not args.inputs:
        raise InputError("predict: give INPUT files/folders (with --out) or --data DATASET")
    return _score_inputs(args)
