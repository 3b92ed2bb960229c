"""Command-line options shared by ``fit-cvae`` and ``fit-classifier`` (TensorFlow-free).

Every option left out keeps the config's value; the config's own defaults are
in :class:`~cvae_mammo.models.training_options.TrainingOptions`.
"""

from __future__ import annotations

import argparse
from typing import Any

from cvae_mammo.config import parse_image_size
from cvae_mammo.models.training_options import PRECISIONS, STRATEGIES, XLA_MODES

#: Options of :func:`add_training_arguments` passed to the fit functions under the same name.
OVERRIDES: tuple[str, ...] = ("epochs", "batch_size", "image_size", "seed", "precision", "xla",
                              "strategy", "resume", "allow_data_change")


def columns(text: str) -> list[str]:
    """``a,b , c`` -> ``["a", "b", "c"]``."""
    return [part.strip() for part in text.split(",") if part.strip()]


def add_training_arguments(parser: argparse.ArgumentParser, config_help: str) -> None:
    """Data, run folder, config file and the shared training options."""
    parser.add_argument("--data", required=True, help="dataset folder (manifest.csv + splits.csv)")
    parser.add_argument("--out", required=True, help="run folder to create (or resume)")
    parser.add_argument("--config", default=None, help=config_help)
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per step on each replica (the config's batch_size)")
    parser.add_argument("--image-size", type=parse_image_size, default=None,
                        help="HEIGHTxWIDTH, e.g. 512x256 (overrides the config)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of everything random (config default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue --out from its last per-epoch checkpoint")
    parser.add_argument("--allow-data-change", action="store_true",
                        help="with --resume: continue even though --data's manifest.csv or "
                             "splits.csv differs from the run's (metadata.json keeps both)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="mixed = float16 compute on GPU (bfloat16 on CPU); config default "
                             "float32")
    parser.add_argument("--xla", choices=XLA_MODES, default=None,
                        help="XLA compilation (config default auto = on when a GPU is visible)")
    parser.add_argument("--strategy", choices=STRATEGIES, default=None,
                        help="tf.distribute strategy: one device, mirrored (this machine's "
                             "GPUs), multi-worker (cluster in TF_CONFIG; run the same command "
                             "on every worker), auto (config default: multi-worker with a "
                             "TF_CONFIG cluster, mirrored with several GPUs, else one)")


def training_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The shared options as keyword arguments of ``fit_cvae`` / ``fit_classifier``."""
    return {name: getattr(args, name) for name in OVERRIDES}
