#!/usr/bin/env python
"""CVAE speed and memory: training and inference images/s and peak RSS per image size.

Each case runs in its own process so its peak RSS is its own. On a CPU the
cases are float32 without XLA; with a GPU visible each size also runs with
``--precision mixed`` and XLA. The reference is a trivial two-layer conv net
timed in the same process at the same size (``ratio`` = its images/s over
the CVAE's inference images/s).

    python benchmarks/bench_cvae.py                       # 256x128 and 1456x728
    python benchmarks/bench_cvae.py --sizes 512x256 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def _case(size: str, batch: int, steps: int, precision: str, xla: bool) -> dict:
    import keras
    import numpy as np

    from cvae_mammo.config import parse_image_size
    from cvae_mammo.models.cvae import CVAEConfig, build_cvae
    from cvae_mammo.training.common import configure_precision, make_optimizer

    height, width = parse_image_size(size)
    configure_precision(precision)
    config = CVAEConfig() if height >= 1024 else CVAEConfig.small()
    config = config.replace(image_size=(height, width), batch_size=batch)
    model = build_cvae(config)
    model.compile(optimizer=make_optimizer(1e-3, total_steps=100), jit_compile=xla)
    images = np.random.default_rng(0).random((batch * steps, height, width, 1), dtype=np.float32)
    model.fit(images[:batch], batch_size=batch, epochs=1, verbose=0)  # trace / compile
    started = time.perf_counter()
    model.fit(images, batch_size=batch, epochs=1, verbose=0)
    train = len(images) / (time.perf_counter() - started)
    model.reconstruct(images[:batch], batch_size=batch)
    started = time.perf_counter()
    model.reconstruct(images, batch_size=batch)
    infer = len(images) / (time.perf_counter() - started)

    reference = keras.Sequential([keras.Input((height, width, 1)),
                                  keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                                  keras.layers.Conv2D(1, 3, padding="same")])
    reference.predict(images[:batch], batch_size=batch, verbose=0)
    started = time.perf_counter()
    reference.predict(images, batch_size=batch, verbose=0)
    ref = len(images) / (time.perf_counter() - started)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"size": size, "batch": batch, "precision": precision, "xla": xla,
            "params": model.count_params(), "train_img_s": round(train, 2),
            "infer_img_s": round(infer, 2), "reference_img_s": round(ref, 2),
            "ratio_reference_over_infer": round(ref / infer, 2), "peak_rss_mib": round(peak_mib)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x128,1456x728")
    parser.add_argument("--steps", type=int, default=3, help="timed batches per case")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=None, help="default: 8 small, 2 full size")
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--xla", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        batch = args.batch or (2 if int(args.case.split("x")[0]) >= 1024 else 8)
        print(json.dumps(_case(args.case, batch, args.steps, args.precision, args.xla)))
        return 0

    import tensorflow as tf

    modes = [("float32", False)]
    if tf.config.list_physical_devices("GPU"):
        modes.append(("mixed", True))
    print(f"{'size':>9} {'batch':>5} {'precision':>9} {'xla':>5} {'params':>9} {'train/s':>8} "
          f"{'infer/s':>8} {'ref/s':>8} {'ref/inf':>7} {'peakMiB':>8}")
    for size in args.sizes.split(","):
        for precision, xla in modes:
            command = [sys.executable, __file__, "--case", size, "--steps", str(args.steps),
                       "--precision", precision] + (["--xla"] if xla else [])
            if args.batch:
                command += ["--batch", str(args.batch)]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if done.returncode:
                print(f"{size}: failed\n{done.stderr[-2000:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{r['size']:>9} {r['batch']:>5} {r['precision']:>9} {r['xla']!s:>5} "
                  f"{r['params']:>9} {r['train_img_s']:>8} {r['infer_img_s']:>8} "
                  f"{r['reference_img_s']:>8} {r['ratio_reference_over_infer']:>7} "
                  f"{r['peak_rss_mib']:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
