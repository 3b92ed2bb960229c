"""Score one split of a dataset with a trained run (CVAE or classifier).

Writes RUN_DIR/scores_<split>.csv (image_id, prediction_id, score,
score_normalised, pred_label, then the per-option scores). score_normalised and
pred_label need RUN_DIR/threshold.json (run `cvae-mammo calibrate` first);
without it they are left blank. --maps DIR writes a heat-map overlay per image
(DIR/<image_id>.png, same size as the image).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cvae-mammo predict`."""
    parser.add_argument("--run", required=True, help="run folder (config.json, model.keras)")
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv, splits.csv)")
    parser.add_argument("--split", default="test", help="split to score: train, val or test")
    parser.add_argument("--maps", default=None, metavar="DIR",
                        help="write heat-map overlays (PNG) to this folder")


def run(args: argparse.Namespace) -> int:
    """Score the split and print where the scores went."""
    from pathlib import Path

    from cvae_mammo.inference.predict import predict_split

    scores = predict_split(args.run, args.data, args.split, maps_dir=args.maps)
    out = Path(args.run) / f"scores_{args.split}.csv"
    flagged = int(scores["pred_label"].fillna(0).sum()) if scores["pred_label"].notna().any() else None
    print(f"{len(scores)} images scored -> {out}"
          + (f"; {flagged} above the threshold" if flagged is not None else
             "; not calibrated (no threshold.json)"))
    if args.maps:
        print(f"overlays -> {args.maps}")
    return 0
