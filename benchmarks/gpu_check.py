#!/usr/bin/env python
"""One GPU check at 1456x728: training and inference speed, memory, and whether input keeps up.

For the CVAE (default config), EfficientNetB0 and ConvNeXtTiny (random weights), each in
its own process so that memory figures are its own:

- training images/s in float32 and mixed precision, XLA off and on (in-memory batches, so
  the figure is the model's alone), and inference images/s (``model.predict``);
- peak GPU memory of a training step per batch size (mixed precision, XLA on), or OOM;
- the data pipeline's images/s (``build_pipeline`` on 1456x728 PNG phantoms, with the
  model's augmentation policy) next to the model's best training images/s: below it, the
  input is the bottleneck.

Each model gets an equal share of ``--budget`` seconds (default 380; a model a minute
past it is stopped, so the whole run stays under 8 minutes) and the table says what was
skipped. Without a GPU it prints
that and exits 0; ``--cpu-smoke`` runs every measurement at 64x32 on the CPU instead
(to check the script, not to read its figures).

    python benchmarks/gpu_check.py [--batch 8] [--budget 420]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS: tuple[str, ...] = ("cvae", "EfficientNetB0", "ConvNeXtTiny")
SIZE = (1456, 728)
SMOKE_SIZE = (64, 32)
MEMORY_BATCHES: tuple[int, ...] = (2, 4, 8, 16)
#: (precision, XLA) cases, the usual GPU setting first: later ones are the first skipped.
CASES: tuple[tuple[str, bool], ...] = (("mixed", True), ("float32", False), ("float32", True),
                                       ("mixed", False))
WARMUP_STEPS, TIMED_STEPS = 3, 10


def _build(model_name: str, size: tuple[int, int], batch: int, xla: bool):
    """A compiled model and one in-memory training batch of ``batch`` images."""
    import numpy as np

    from cvae_mammo.training.common import make_optimizer

    images = np.random.default_rng(0).random((batch, *size, 1), dtype=np.float32)
    optimizer = make_optimizer(1e-4, total_steps=1000, warmup_steps=10)
    if model_name == "cvae":
        from cvae_mammo.models.cvae import CVAEConfig, build_cvae

        model = build_cvae(CVAEConfig(image_size=size, batch_size=batch))
        model.compile(optimizer=optimizer, jit_compile=xla)
        return model, {"image": images}
    from cvae_mammo.models.classifier import build_classifier, compile_classifier
    from cvae_mammo.models.classifier_config import ClassifierConfig

    config = ClassifierConfig(backbone=model_name, weights=None, image_size=size)
    model = build_classifier(config)
    compile_classifier(model, config, optimizer, jit_compile=xla)
    return model, ({"image": images}, {"label": np.zeros((batch, 1), np.float32)})


def _train_rate(model, batch_data, batch: int) -> float:
    """Training images/s over TIMED_STEPS steps after WARMUP_STEPS (tracing, compiling)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensors(batch_data).repeat()
    model.fit(dataset, steps_per_epoch=WARMUP_STEPS, epochs=1, verbose=0, shuffle=False)
    started = time.perf_counter()
    model.fit(dataset, steps_per_epoch=TIMED_STEPS, epochs=1, verbose=0, shuffle=False)
    return TIMED_STEPS * batch / (time.perf_counter() - started)


def _infer_rate(model, batch_data, batch: int) -> float:
    """``model.predict`` images/s on TIMED_STEPS batches (after one warm-up call)."""
    import numpy as np

    inputs = batch_data[0] if isinstance(batch_data, tuple) else batch_data
    images = np.concatenate([inputs["image"]] * TIMED_STEPS)
    model.predict({"image": images[:batch]}, batch_size=batch, verbose=0)
    started = time.perf_counter()
    model.predict({"image": images}, batch_size=batch, verbose=0)
    return len(images) / (time.perf_counter() - started)


def _peak_memory_mib(model_name: str, size: tuple[int, int], batch: int) -> str:
    """Peak GPU memory of two training steps at ``batch`` (mixed precision, XLA on)."""
    import gc

    import keras
    import tensorflow as tf

    keras.backend.clear_session()
    gc.collect()  # the previous model's memory must not count in this peak
    tf.config.experimental.reset_memory_stats("GPU:0")
    try:
        model, data = _build(model_name, size, batch, xla=True)
        model.fit(tf.data.Dataset.from_tensors(data).repeat(), steps_per_epoch=2, epochs=1,
                  verbose=0, shuffle=False)
    except tf.errors.ResourceExhaustedError:
        return "OOM"
    return f"{tf.config.experimental.get_memory_info('GPU:0')['peak'] / 2**20:.0f} MiB"


def _speed(model_name: str, size: tuple[int, int], batch: int, precision: str,
           xla: bool) -> dict:
    """Training and inference images/s of a fresh model (freed when this returns)."""
    import keras

    from cvae_mammo.training.common import configure_precision

    keras.backend.clear_session()
    configure_precision(precision)
    model, data = _build(model_name, size, batch, xla)
    return {"case": f"{precision}, XLA {'on' if xla else 'off'}",
            "train": _train_rate(model, data, batch), "infer": _infer_rate(model, data, batch)}


def run_case(model_name: str, size: tuple[int, int], batch: int, deadline: float,
             gpu: bool) -> dict:
    """Every measurement of one model (in this process), skipping what the deadline leaves out."""
    from cvae_mammo.training.common import configure_precision

    result: dict = {"model": model_name, "speed": [], "memory": {}, "skipped": []}
    for precision, xla in CASES:
        if time.time() > deadline:
            result["skipped"].append(f"{precision}, XLA {'on' if xla else 'off'}")
            continue
        result["speed"].append(_speed(model_name, size, batch, precision, xla))
    if gpu:
        configure_precision("mixed")
        for memory_batch in MEMORY_BATCHES:
            if time.time() > deadline:
                result["skipped"].append(f"memory at batch {memory_batch}")
                continue
            result["memory"][memory_batch] = _peak_memory_mib(model_name, size, memory_batch)
    configure_precision("float32")
    return result


def pipeline_rates(size: tuple[int, int], batch: int, count: int = 48) -> dict[str, float]:
    """Images/s of ``build_pipeline`` on ``count`` PNG phantoms per augmentation policy."""
    import numpy as np
    import pandas as pd

    from cvae_mammo.data.pipeline import build_pipeline
    from cvae_mammo.preprocessing.imageio import write_png
    from cvae_mammo.synthetic.phantom import make_phantom

    rates = {}
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for index in range(min(count, 8)):  # 8 distinct phantoms, repeated
            pixels = make_phantom(np.random.default_rng(index), size, markers=False).image
            write_png(Path(folder) / f"{index}.png", np.round(pixels * 255).astype(np.uint8))
        for index in range(count):
            rows.append({"image_id": str(index), "path": f"{index % 8}.png", "label": 0})
        frame = pd.DataFrame(rows)
        for policy in ("cvae", "classifier"):
            dataset = build_pipeline(frame, folder, image_size=size, batch_size=batch,
                                     augment=policy, shuffle=True, repeat=True)
            iterator = iter(dataset)
            next(iterator)
            started = time.perf_counter()
            batches = max(2, count // batch)
            for _ in range(batches):
                next(iterator)
            rates[policy] = batches * batch / (time.perf_counter() - started)
            del iterator, dataset  # stop the prefetching before the folder goes
    return rates


def _print(results: list[dict], rates: dict[str, float], size: tuple[int, int],
           batch: int) -> None:
    print(f"\nimages/s at {size[0]}x{size[1]}, batch {batch} "
          f"(training on in-memory batches; inference = model.predict)")
    print(f"{'model':<15} {'case':<20} {'train':>8} {'infer':>8}")
    for result in results:
        for row in result.get("speed", []):
            print(f"{result['model']:<15} {row['case']:<20} {row['train']:8.1f} "
                  f"{row['infer']:8.1f}")
        if result.get("error"):
            print(f"{result['model']:<15} failed: {result['error']}")
    print("\npeak GPU memory of a training step (mixed precision, XLA on)")
    for result in results:
        memory = result.get("memory") or {}
        if memory:
            print(f"{result['model']:<15} " + "  ".join(f"batch {b}: {v}"
                                                       for b, v in memory.items()))
    print("\ndata pipeline (build_pipeline, PNG decode + augmentation) vs the model's best "
          "training images/s")
    for result in results:
        speeds = [row["train"] for row in result.get("speed", [])]
        if not speeds:
            continue
        policy = "cvae" if result["model"] == "cvae" else "classifier"
        feeds = rates.get(policy)
        if feeds is None:
            continue
        verdict = "input-bound" if feeds < max(speeds) else "input keeps up"
        print(f"{result['model']:<15} pipeline ({policy}) {feeds:8.1f}  model {max(speeds):8.1f}"
              f"  -> {verdict}")
    skipped = [f"{r['model']}: {s}" for r in results for s in r.get("skipped", [])]
    if skipped:
        print("\nskipped (time budget): " + "; ".join(skipped))


def main() -> int:
    """Measure every model in its own process and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="batch size of the speed figures")
    parser.add_argument("--budget", type=float, default=380.0,
                        help="seconds after which no new measurement starts (each model gets "
                             "an equal share of what is left; a model still running a minute "
                             "past the budget is stopped)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU needed: every measurement at 64x32 on the CPU")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one model, JSON out
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SMOKE_SIZE if args.cpu_smoke else SIZE
    from cvae_mammo.tf_startup import start_tensorflow

    start_tensorflow()
    import tensorflow as tf

    gpu = bool(tf.config.list_physical_devices("GPU"))
    if args.case:
        print(json.dumps(run_case(args.case, size, args.batch, args.deadline, gpu)))
        return 0
    if not gpu and not args.cpu_smoke:
        print("gpu_check: no GPU visible to TensorFlow; nothing measured "
              "(run it on a GPU machine, or pass --cpu-smoke to check the script)")
        return 0
    started = time.time()
    deadline = started + args.budget
    print(f"gpu_check: {tf.config.list_physical_devices('GPU') or 'CPU smoke run'}; "
          f"budget {args.budget:.0f} s")
    rates = pipeline_rates(size, args.batch)
    results = []
    for index, model_name in enumerate(MODELS):
        share = time.time() + (deadline - time.time()) / (len(MODELS) - index)
        command = [sys.executable, __file__, "--case", model_name, "--batch", str(args.batch),
                   "--deadline", str(share)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                                  timeout=max(10.0, deadline + 60 - time.time()))
        except subprocess.TimeoutExpired:
            results.append({"model": model_name, "error": "stopped: past the time budget"})
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode or not lines:
            tail = " ".join(done.stderr.strip().splitlines()[-2:])[-300:]
            results.append({"model": model_name, "error": tail or f"exit {done.returncode}"})
        else:
            results.append(json.loads(lines[-1]))
        print(f"  {model_name} measured ({time.time() - started:.0f} s elapsed)", flush=True)
    _print(results, rates, size, args.batch)
    print(f"\ntotal {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
