"""Train the convolutional VAE on the train-split negatives of a dataset folder.

Writes a run folder (model.keras, config.json, metadata.json, history.csv,
logs/, checkpoints/, reconstructions/, validation.json). Use --config small
(256x128) on a CPU; the default config targets 1456x728 on a GPU.
"""

from __future__ import annotations

import argparse
import sys

from cvae_mammo.cli.training_args import add_training_arguments, columns, training_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo fit-cvae``."""
    add_training_arguments(parser, "CVAEConfig JSON/YAML file, or a preset: default (1456x728), "
                                   "small")
    parser.add_argument("--condition", type=columns, default=None,
                        help="metadata columns to condition on, e.g. view,laterality,density")
    parser.add_argument("--lesion-steps", type=int, default=None, metavar="N",
                        help="training steps of the bilateral lesion segmenter trained after the "
                             "CVAE (its score becomes the run's); 0: none. Default: the config's "
                             "lesion_steps (800, per seed)")


def run(args: argparse.Namespace) -> int:
    """Train and print the run folder."""
    from cvae_mammo.errors import TrainingDivergedError
    from cvae_mammo.training.cvae import fit_cvae

    try:
        run_dir = fit_cvae(args.data, args.out, config=args.config, conditioning=args.condition,
                           lesion_steps=args.lesion_steps, **training_overrides(args))
    except TrainingDivergedError as error:
        print(f"cvae-mammo fit-cvae: training diverged: {error}", file=sys.stderr)
        return 3
    print(run_dir)
    return 0
