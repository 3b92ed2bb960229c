#!/usr/bin/env python
"""Images/s delivered by the data pipeline at 1456x728, with and without augmentation, on 1 and 2 cores.

Builds a dataset folder of 1456x728 PNGs from the real mini-MIAS images (../shared/data), then,
for each (cores, policy) pair, runs the pipeline in a fresh process pinned to that many cores
(``os.sched_setaffinity``) with a tf.data private thread pool of the same size, and prints
images/s, the augmentation/plain cost ratio (time per image) and the 2-core/1-core speed-up.

    python benchmarks/bench_data.py [--images 48] [--batches 12] [--bits 8] [--size 1456x728]
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

REPO = Path(__file__).resolve().parents[1]
MIAS = Path(os.environ.get("CVAE_MAMMO_SHARED_DATA", REPO.parent / "shared" / "data")) / "mini_mias"
POLICIES = ("none", "cvae", "classifier")
#: Timed rounds per configuration; the best round is reported (the machine is shared).
ROUNDS = 5


def build_folder(out: Path, size: tuple[int, int], count: int, bits: int) -> None:
    """``count`` mini-MIAS images resized to ``size`` as 8- or 16-bit PNGs + a manifest."""
    import cv2
    import numpy as np
    import pandas as pd

    from cvae_mammo.fileio import atomic_write_csv

    sources = sorted((MIAS / "images").glob("*.png"))[:count]
    if not sources:
        sys.exit(f"mini-MIAS images not found under {MIAS}")
    rows = []
    for source in sources:
        image = cv2.resize(cv2.imread(str(source), cv2.IMREAD_UNCHANGED), (size[1], size[0]),
                           interpolation=cv2.INTER_LINEAR)
        if bits == 16:
            image = image.astype(np.uint16) * 257
        relative = f"images/{source.stem}.png"
        (out / "images").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out / relative), image)
        rows.append({"image_id": source.stem, "patient_id": source.stem, "path": relative,
                     "label": 0})
    atomic_write_csv(out / "manifest.csv", pd.DataFrame(rows))


def worker(folder: Path, size: tuple[int, int], cores: int, policy: str, batches: int) -> dict:
    """Time one configuration in this process (called in a child pinned to ``cores`` CPUs)."""
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    import cv2

    cv2.setNumThreads(1)  # parallelism comes from tf.data, not from inside OpenCV
    import pandas as pd

    from cvae_mammo.data.metadata import normalise_metadata
    from cvae_mammo.data.pipeline import build_pipeline

    frame = normalise_metadata(pd.read_csv(folder / "manifest.csv", dtype={"image_id": str,
                                                                           "patient_id": str}))
    pipeline = build_pipeline(frame, folder, image_size=size, batch_size=4, shuffle=True, seed=0,
                              repeat=True, augment=None if policy == "none" else policy,
                              threads=cores)
    iterator = iter(pipeline)
    for _ in range(2):  # warm-up: graph tracing, thread start, first files in the page cache
        next(iterator)
    rounds = []
    for _ in range(ROUNDS):
        start, cpu_start = time.perf_counter(), time.process_time()
        images = sum(int(next(iterator)["image"].shape[0]) for _ in range(batches))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rounds.append({"images_per_s": images / wall, "cpu_ms_per_image": 1000 * cpu / images,
                       "cores_busy": cpu / wall})
    middle = len(rounds) // 2
    return {"cores": cores, "policy": policy, "images": images, "rounds": len(rounds),
            "images_per_s": max(r["images_per_s"] for r in rounds),
            **{key: sorted(r[key] for r in rounds)[middle]
               for key in ("cpu_ms_per_image", "cores_busy")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="distinct PNGs in the folder")
    parser.add_argument("--batches", type=int, default=12, help="timed batches of 4 per run")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=8)
    parser.add_argument("--size", default="1456x728", help="HEIGHTxWIDTH")
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "CORES", "POLICY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from cvae_mammo.config import parse_image_size

    size = parse_image_size(args.size)
    if args.worker:
        folder, cores, policy = args.worker
        print(json.dumps(worker(Path(folder), size, int(cores), policy, args.batches)))
        return 0

    available = len(os.sched_getaffinity(0))
    core_counts = [c for c in (1, 2) if c <= available]
    print(f"data pipeline benchmark: {args.images} mini-MIAS PNGs ({args.bits}-bit) at {args.size}, "
          f"batch 4, best of {ROUNDS} rounds of {args.batches} batches; {available} cores visible "
          f"(os.cpu_count={os.cpu_count()}), load average {os.getloadavg()[0]:.1f}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        build_folder(Path(tmp), size, args.images, args.bits)
        for cores in core_counts:
            for policy in POLICIES:
                done = subprocess.run(
                    [sys.executable, __file__, "--worker", tmp, str(cores), policy,
                     "--size", args.size, "--batches", str(args.batches)],
                    capture_output=True, text=True, check=False)
                if done.returncode:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return done.returncode
                result = json.loads(done.stdout.strip().splitlines()[-1])
                results[cores, policy] = result
                print(f"  cores={cores} policy={policy:<10} {result['images_per_s']:7.1f} images/s "
                      f"(best of {result['rounds']} rounds of {result['images']} images), "
                      f"{result['cpu_ms_per_image']:5.1f} CPU ms/image, "
                      f"{result['cores_busy']:.2f} cores busy (medians)")
    print("augmentation cost relative to the plain decode pipeline (target < 2x): wall time per "
          "image (best rounds) | CPU time per image (medians, robust to other jobs' load)")
    for cores in core_counts:
        plain = results[cores, "none"]
        ratios = ", ".join(
            f"{p} {plain['images_per_s'] / results[cores, p]['images_per_s']:.2f}x | "
            f"{results[cores, p]['cpu_ms_per_image'] / plain['cpu_ms_per_image']:.2f}x"
            for p in POLICIES[1:])
        print(f"  cores={cores}: {ratios}")
    if len(core_counts) == 2:
        print("scaling, images/s on 2 cores / on 1 core (ideal 2.0; cores are shared with other "
              "jobs on this machine):")
        for policy in POLICIES:
            speedup = results[2, policy]["images_per_s"] / results[1, policy]["images_per_s"]
            print(f"  {policy:<10} {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
