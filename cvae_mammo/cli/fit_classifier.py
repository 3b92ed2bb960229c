"""Train the transfer-learning classifier (ConvNeXt / EfficientNet, focal loss) on a dataset folder.

Uses the train split's labelled images (positives and negatives) and
validates on the val split, the same split file as the CVAE. Writes a run
folder (model.keras, config.json, metadata.json, history.csv, logs/,
checkpoints/, predictions_val.csv, validation.json). Pretrained weights:
--weights imagenet downloads them (needs internet); --weights PATH loads a
local backbone weights file; --weights none starts from random weights.
"""

from __future__ import annotations

import argparse
import sys

from cvae_mammo.config import parse_image_size


def _columns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _aux(text: str) -> dict[str, float]:
    """``biopsy=0.2,density=0.1`` (a bare name gets weight 0.1)."""
    targets: dict[str, float] = {}
    for part in _columns(text):
        name, _, weight = part.partition("=")
        targets[name.strip()] = float(weight) if weight else 0.1
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo fit-classifier``."""
    from cvae_mammo.models.classifier import AUX_TARGETS, BACKBONES, TABULAR_FEATURES

    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv + splits.csv)")
    parser.add_argument("--out", required=True, help="run folder to create (or resume)")
    parser.add_argument("--config", default=None, help="ClassifierConfig JSON/YAML file")
    parser.add_argument("--backbone", choices=list(BACKBONES), default=None,
                        help="keras.applications backbone (config default: EfficientNetB0)")
    parser.add_argument("--weights", default=None,
                        help="imagenet | PATH to a local backbone weights file | none")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs (frozen + fine-tune)")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    parser.add_argument("--image-size", type=parse_image_size, default=None,
                        help="HEIGHTxWIDTH, e.g. 512x256 (config default 512x256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out from its last per-epoch checkpoint")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though --data's manifest.csv or "
                             "splits.csv differs from the run's (metadata.json keeps both)")
    parser.add_argument("--loss", choices=("focal", "bce"), default=None,
                        help="binary focal cross-entropy (default) or class-weighted BCE")
    parser.add_argument("--freeze-epochs", type=int, default=None,
                        help="epochs with the backbone frozen before fine-tuning")
    parser.add_argument("--precision", choices=("float32", "mixed"), default=None,
                        help="mixed = float16 compute on GPU (bfloat16 on CPU)")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                        help="XLA compilation (auto = on when a GPU is visible)")
    parser.add_argument("--aux", type=_aux, default=None,
                        help=f"auxiliary targets with loss weights, e.g. biopsy=0.2,density=0.1 "
                             f"(known: {', '.join(AUX_TARGETS)})")
    parser.add_argument("--tabular", type=_columns, default=None,
                        help=f"metadata inputs joined before the head ({', '.join(TABULAR_FEATURES)})")


def run(args: argparse.Namespace) -> int:
    """Train and print the run folder."""
    from cvae_mammo.errors import InputError, TrainingDivergedError
    from cvae_mammo.training.classifier import fit_classifier, resolve_config

    try:
        config = resolve_config(args.config)
        extra = {}
        if args.aux is not None:
            extra["aux_targets"] = args.aux
        if args.tabular is not None:
            extra["tabular_features"] = tuple(args.tabular)
        config = config.replace(**extra)
    except ValueError as error:
        raise InputError(str(error)) from error
    try:
        run_dir = fit_classifier(
            args.data, args.out, config=config, backbone=args.backbone, weights=args.weights,
            epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
            seed=args.seed, resume=args.resume, loss=args.loss,
            freeze_epochs=args.freeze_epochs, precision=args.precision, xla=args.xla,
            allow_data_change=args.allow_data_change)
    except TrainingDivergedError as error:
        print(f"cvae-mammo fit-classifier: training diverged: {error}", file=sys.stderr)
        return 3
    print(run_dir)
    return 0
