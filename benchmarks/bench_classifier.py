#!/usr/bin/env python
"""Training images/s of the classifier per backbone family, on CPU at 512x256 and on a GPU.

For each backbone (default: ConvNeXtTiny, EfficientNetB0, EfficientNetV2B0, one per family)
builds the classifier with random weights (ImageNet weights change nothing about speed and
cannot be downloaded offline), compiles it as ``fit_classifier`` does (graph mode, AdamW,
focal loss, backbone unfrozen) and times ``train_on_batch`` on a fixed batch of real
mini-MIAS images resized to the benchmark size (random images when ../shared/data is
absent). The first step (graph tracing, and XLA compilation of depthwise convolutions) is
reported separately; the figure is the best of ``--rounds`` timed rounds, since the machine
may be shared. Ratios are to EfficientNetB0 measured in the same run. The input pipeline is
not included (see benchmarks/bench_data.py for it).

On a GPU the script also measures 1456x728 with mixed precision (float16) and XLA; without
one it says so and skips that part.

    python benchmarks/bench_classifier.py [--size 512x256] [--batch-size 4] [--steps 3]
        [--rounds 2] [--backbones ConvNeXtTiny,EfficientNetB0,EfficientNetV2B0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MIAS = Path(os.environ.get("CVAE_MAMMO_SHARED_DATA", REPO.parent / "shared" / "data")) / "mini_mias"
REFERENCE = "EfficientNetB0"


def load_images(count: int, size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """``count`` mini-MIAS images at ``size`` in [0, 1] ``[N, H, W, 1]`` and where they came from."""
    from cvae_mammo.data.pipeline import read_image

    sources = sorted((MIAS / "images").glob("*.png"))[:count]
    if len(sources) < count:
        rng = np.random.default_rng(0)
        return rng.random((count, *size, 1), dtype=np.float32), "random images (no mini-MIAS)"
    return np.stack([read_image(str(p), size) for p in sources]), f"mini-MIAS {MIAS}"


def measure(backbone: str, images: np.ndarray, steps: int, rounds: int, precision: str,
            jit: bool) -> dict[str, float]:
    """First-step seconds and the best training images/s of ``backbone`` on ``images``."""
    import keras

    from cvae_mammo.models.classifier import build_classifier, compile_classifier
    from cvae_mammo.models.classifier_config import ClassifierConfig
    from cvae_mammo.training.common import configure_precision, make_optimizer

    keras.backend.clear_session()
    configure_precision(precision)
    size = images.shape[1:3]
    config = ClassifierConfig(backbone=backbone, weights=None, image_size=size)
    model = build_classifier(config)
    compile_classifier(model, config, make_optimizer(1e-4, total_steps=1000, warmup_steps=10),
                       jit_compile=jit)
    labels = {"label": (np.arange(len(images)) % 2).astype(np.float32).reshape(-1, 1)}
    x = {"image": images}
    started = time.perf_counter()
    model.train_on_batch(x, labels)
    first = time.perf_counter() - started
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(steps):
            loss = model.train_on_batch(x, labels)
        float(np.asarray(loss).reshape(-1)[0])  # wait for the device
        best = max(best, steps * len(images) / (time.perf_counter() - started))
    configure_precision("float32")
    return {"first_step_s": first, "images_per_s": best, "params_m": model.count_params() / 1e6}


def header(title: str) -> None:
    """Print a table title and column names."""
    print(f"\n{title}")
    print(f"{'backbone':<18}{'params (M)':>11}{'first step (s)':>16}{'train img/s':>13}"
          f"{'x ' + REFERENCE:>20}", flush=True)


def row(name: str, result: dict[str, float], reference: float | None) -> None:
    """Print one backbone's figures as soon as they are measured (ratio when known)."""
    ratio = f"{result['images_per_s'] / reference:.2f}" if reference else "n/a"
    print(f"{name:<18}{result['params_m']:>11.1f}{result['first_step_s']:>16.1f}"
          f"{result['images_per_s']:>13.2f}{ratio:>20}", flush=True)


def run_table(title: str, backbones: list[str], images: np.ndarray, steps: int, rounds: int,
              precision: str, jit: bool) -> None:
    """Measure the reference first, then the others, printing each row as it completes."""
    header(title)
    order = sorted(backbones, key=lambda name: name != REFERENCE)
    reference = None
    for name in order:
        result = measure(name, images, steps, rounds, precision, jit)
        if name == REFERENCE:
            reference = result["images_per_s"]
        row(name, result, reference)


def main() -> None:
    """Run the CPU benchmark, then the GPU one when a GPU is visible."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="512x256", help="CPU benchmark HEIGHTxWIDTH")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backbones", default="ConvNeXtTiny,EfficientNetB0,EfficientNetV2B0")
    parser.add_argument("--gpu-size", default="1456x728")
    parser.add_argument("--gpu-batch-size", type=int, default=8)
    args = parser.parse_args()

    import tensorflow as tf

    from cvae_mammo.config import parse_image_size

    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    gpus = tf.config.list_physical_devices("GPU")
    size = parse_image_size(args.size)
    images, origin = load_images(args.batch_size, size)
    print(f"images: {origin}; batch {args.batch_size}; {args.steps} steps x {args.rounds} rounds; "
          f"CPU cores visible: {len(os.sched_getaffinity(0))} (shared with other jobs: "
          f"load average {os.getloadavg()[0]:.1f})", flush=True)
    with tf.device("/CPU:0"):
        run_table(f"CPU, float32, {args.size}, graph mode (no XLA), backbone unfrozen",
                  backbones, images, args.steps, args.rounds, "float32", jit=False)
    if not gpus:
        print(f"\nGPU {args.gpu_size} mixed precision: no GPU visible on this machine; skipped.")
        return
    gpu_size = parse_image_size(args.gpu_size)
    gpu_images, _ = load_images(args.gpu_batch_size, gpu_size)
    run_table(f"GPU ({gpus[0].name}), mixed_float16 + XLA, {args.gpu_size}, batch "
              f"{args.gpu_batch_size}", backbones, gpu_images, max(args.steps, 10), args.rounds,
              "mixed", jit=True)


if __name__ == "__main__":
    main()
