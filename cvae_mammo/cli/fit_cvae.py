"""Train the convolutional VAE on the train-split negatives of a dataset folder.

Writes a run folder (model.keras, config.json, metadata.json, history.csv,
logs/, checkpoints/, reconstructions/, validation.json). Use --config small
(256x128) on a CPU; the default config targets 1456x728 on a GPU.
"""

from __future__ import annotations

import argparse
import sys

from cvae_mammo.config import parse_image_size


def _columns(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cvae-mammo fit-cvae``."""
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv + splits.csv)")
    parser.add_argument("--out", required=True, help="run folder to create (or resume)")
    parser.add_argument("--config", default=None,
                        help="CVAEConfig JSON/YAML file, or a preset: default (1456x728), small")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--batch-size", type=int, default=None, help="override the batch size")
    parser.add_argument("--image-size", type=parse_image_size, default=None,
                        help="HEIGHTxWIDTH, e.g. 512x256 (overrides the config)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out from its last per-epoch checkpoint")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though --data's manifest.csv or "
                             "splits.csv differs from the run's (metadata.json keeps both)")
    parser.add_argument("--precision", choices=("float32", "mixed"), default="float32",
                        help="mixed = float16 compute on GPU (bfloat16 on CPU)")
    parser.add_argument("--xla", choices=("auto", "on", "off"), default="auto",
                        help="XLA compilation (auto = on when a GPU is visible)")
    parser.add_argument("--condition", type=_columns, default=None,
                        help="metadata columns to condition on, e.g. view,laterality,density")


def run(args: argparse.Namespace) -> int:
    """Train and print the run folder."""
    from cvae_mammo.errors import TrainingDivergedError
    from cvae_mammo.training.cvae import fit_cvae

    try:
        run_dir = fit_cvae(args.data, args.out, config=args.config, epochs=args.epochs,
                           batch_size=args.batch_size, image_size=args.image_size,
                           seed=args.seed, resume=args.resume, precision=args.precision,
                           xla=args.xla, conditioning=args.condition,
                           allow_data_change=args.allow_data_change)
    except TrainingDivergedError as error:
        print(f"cvae-mammo fit-cvae: training diverged: {error}", file=sys.stderr)
        return 3
    print(run_dir)
    return 0
