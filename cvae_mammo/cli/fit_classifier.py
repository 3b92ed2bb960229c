"""Train the transfer-learning classifier (ConvNeXt / EfficientNet, focal loss) on a dataset folder.

Uses the train split's labelled images (positives and negatives) and
validates on the val split, the same split file as the CVAE. Writes a run
folder (model.keras, config.json, metadata.json, history.csv, logs/,
checkpoints/, predictions_val.csv, validation.json). Pretrained weights:
--weights imagenet downloads them (needs internet); --weights PATH loads a
local backbone weights file; --weights none starts from random weights.
--backbone LesionSegmenter --weights RUN_DIR starts from the lesion segmenter of a
CVAE run (fit-cvae with lesion_steps > 0) and fine-tunes it on the labels; it
also reads the other breast, and --image-size must be the run's.
"""

from __future__ import annotations

import argparse
import sys

from cvae_mammo.cli.training_args import add_training_arguments, columns, training_overrides
from cvae_mammo.models.classifier_config import AUX_TARGETS, BACKBONES, LOSSES, TABULAR_FEATURES


def _aux(text: str) -> dict[str, float]:
    """``biopsy=0.2,density=0.1`` (a bare name gets weight 0.1)."""
    targets: dict[str, float] = {}
    for part in columns(text):
        name, _, weight = part.partition("=")
        targets[name.strip()] = float(weight) if weight else 0.1
    return targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo fit-classifier``."""
    add_training_arguments(parser, "ClassifierConfig JSON/YAML file")
    parser.add_argument("--backbone", choices=list(BACKBONES), default=None,
                        help="keras.applications backbone, or LesionSegmenter: a CVAE run's "
                             "lesion segmenter (config default: EfficientNetB0)")
    parser.add_argument("--weights", default=None,
                        help="imagenet | PATH to a local backbone weights file | none; for "
                             "LesionSegmenter the CVAE run folder")
    parser.add_argument("--loss", choices=LOSSES, default=None,
                        help="binary focal cross-entropy (default) or class-weighted BCE")
    parser.add_argument("--freeze-epochs", type=int, default=None,
                        help="epochs with the backbone frozen before fine-tuning")
    parser.add_argument("--aux", type=_aux, default=None,
                        help=f"auxiliary targets with loss weights, e.g. biopsy=0.2,density=0.1 "
                             f"(known: {', '.join(AUX_TARGETS)})")
    parser.add_argument("--tabular", type=columns, default=None,
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
            loss=args.loss, freeze_epochs=args.freeze_epochs, **training_overrides(args))
    except TrainingDivergedError as error:
        print(f"cvae-mammo fit-classifier: training diverged: {error}", file=sys.stderr)
        return 3
    print(run_dir)
    return 0
