"""Benchmark: our preprocessing vs a straightforward full-resolution pipeline, same files, one run.

Files: the real RSNA Hologic DICOM (5355x4915, patient 10006) and the real
2776x2082 RSNA DICOM when ../shared/data is present, and synthetic DICOMs with
real Hologic geometry (a narrow breast against the left or right edge of a
5355x4915 or 4096x3328 frame, JPEG 2000 lossless, 16 bits, MONOCHROME1,
SIGMOID) from :func:`cvae_mammo.synthetic.hologic.write_hologic_dicom`.

Printed per file (one worker, fastest of --repeats interleaved runs in one
process, both totals include writing the PNG):
* full: pydicom ``pixel_array`` + pydicom VOI LUT + largest-component crop on
  the full image + area resize + PNG encode;
* ours: :func:`cvae_mammo.preprocessing.image.preprocess_image` + PNG encode;
* full/ours, the crop's size, the JPEG 2000 level ours decoded it at, and the
  PSNR of our output against our full-resolution path
  (``reduced_resolution=False``, same crop box).
``--sweep`` then prints PSNR per forced level and output size against the
how many original pixels a decoded sample exceeds an output pixel by, which sets
:data:`cvae_mammo.preprocessing.image.MAX_EXCESS`. Last, images/s of
:func:`preprocess_dataset` with 1 and 2 workers on ``--copies`` copies of every
file, next to the load average (the machine may be shared).

Run: ``python benchmarks/bench_preprocess.py [--repeats 3] [--size 1456x728] [--sweep]``
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_voi_lut

from cvae_mammo.config import parse_image_size
from cvae_mammo.preprocessing.batch import preprocess_dataset
from cvae_mammo.preprocessing.image import (
    MAX_EXCESS,
    PreprocessConfig,
    ProcessedImage,
    preprocess_image,
)
from cvae_mammo.preprocessing.imageio import psnr, write_png
from cvae_mammo.synthetic.hologic import HOLOGIC_FRAMES, write_hologic_dicom

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path(tempfile.gettempdir()) / "bench_preprocess_output.png"
RSNA_DICOMS = [REPO.parent / "shared" / "data" / "rsna" / "dicom" / name
               for name in ("10006/462822612.dcm", "36/200779059.dcm")]
SWEEP_SIZES = ((2048, 1024), (1456, 728), (1024, 512), (512, 256), (256, 128))
PSNR_TARGET = 40.0


def full_resolution_pipeline(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The straightforward pipeline; returns the image it wrote as PNG."""
    ds = pydicom.dcmread(path)
    values = apply_voi_lut(ds.pixel_array, ds).astype(np.float32)
    values = (values - values.min()) / max(float(np.ptp(values)), 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = 1.0 - values
    binary = (values > 0.1).astype(np.uint8)
    stats = cv2.connectedComponentsWithStats(binary, connectivity=8)[2]
    best = int(np.argmax(stats[1:, cv2.CC_STAT_AREA])) + 1
    x, y, w, h = stats[best, :4]
    crop = values[y : y + h, x : x + w]
    if crop[:, : w // 2].sum() < crop[:, w // 2 :].sum():
        crop = crop[:, ::-1]
    resized = cv2.resize(crop, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    image = (resized * 255 + 0.5).astype(np.uint8)
    OUTPUT.write_bytes(cv2.imencode(".png", image)[1].tobytes())
    return image


def ours(path: Path, config: PreprocessConfig) -> ProcessedImage:
    """Our pipeline, PNG included."""
    result = preprocess_image(path, config)
    write_png(OUTPUT, result.image)
    return result


def crop_box(result: ProcessedImage) -> tuple[int, int, int, int]:
    """The crop box (x0, y0, x1, y1) a result's provenance records."""
    return tuple(int(result.provenance[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))


def level_of(result: ProcessedImage) -> int:
    """The JPEG 2000 level the crop was decoded at."""
    return round(math.log2(1.0 / result.provenance["decode_scale"]))


def psnr_to_full(path: Path, config: PreprocessConfig, result: ProcessedImage,
                 level: int | None = None) -> float:
    """PSNR of ``result`` (or of the crop forced to ``level``) against the full-resolution path."""
    box = crop_box(result)
    reference = preprocess_image(path, config.replace(reduced_resolution=False), crop_box=box)
    if level is not None:
        result = preprocess_image(path, config, crop_box=box, level=level)
    return psnr(result.image, reference.image)


def best_seconds(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each function, runs interleaved (robust on a shared CPU)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def label(path: Path) -> str:
    """A short name for a file in the tables."""
    return f"{path.parent.name}/{path.stem}"


def compare(files: list[Path], config: PreprocessConfig, repeats: int) -> None:
    """Print both pipelines' s/img, the ratio, PSNR and level per file."""
    header = (f"{'file':<22}{'frame':>11}{'crop':>11}{'full s':>8}{'ours s':>8}{'full/ours':>10}"
              f"{'PSNR dB':>8}{'level':>6}")
    print(header)
    print("-" * len(header))
    for path in files:
        result = ours(path, config)
        best = best_seconds({"full": lambda p=path: full_resolution_pipeline(p, config.image_size),
                             "ours": lambda p=path: ours(p, config)}, repeats)
        x0, y0, x1, y1 = crop_box(result)
        frame = f"{result.provenance['original_height']}x{result.provenance['original_width']}"
        print(f"{label(path):<22}{frame:>11}{f'{y1 - y0}x{x1 - x0}':>11}{best['full']:>8.3f}"
              f"{best['ours']:>8.3f}{best['full'] / best['ours']:>9.2f}x"
              f"{psnr_to_full(path, config, result):>8.1f}{level_of(result):>6}", flush=True)


def sweep(files: list[Path]) -> None:
    """PSNR per forced level and output size, against a decoded sample's excess over an output pixel.

    The excess is ``2**level - s`` original pixels, s = original pixels per
    output pixel on the axis with the least room: the quantity
    :func:`~cvae_mammo.preprocessing.image.choose_level` bounds by ``MAX_EXCESS``.
    """
    rows = []
    for path in files:
        for size in SWEEP_SIZES:
            config = PreprocessConfig(image_size=size, bits=16)
            result = preprocess_image(path, config)
            x0, y0, x1, y1 = crop_box(result)
            room = min((y1 - y0) / size[0], (x1 - x0) / size[1])
            for level in range(1, 5):
                if -4.0 <= 2**level - room <= 8.0:
                    rows.append((2**level - room, psnr_to_full(path, config, result, level),
                                 level, size, label(path)))
    print(f"\n{'excess px':>10}{'PSNR dB':>9}{'level':>6}{'output':>11}  file")
    for excess, value, level, size, name in sorted(rows):
        print(f"{excess:>10.2f}{value:>9.1f}{level:>6}{f'{size[0]}x{size[1]}':>11}  {name}")
    failing = [excess for excess, value, *_ in rows if value < PSNR_TARGET]
    print(f"smallest excess with PSNR < {PSNR_TARGET:g} dB: "
          f"{f'{min(failing):.2f}' if failing else 'none'}; MAX_EXCESS in use: {MAX_EXCESS}")


def worker_scaling(files: list[Path], config: PreprocessConfig, copies: int,
                   scratch: Path) -> None:
    """images/s of preprocess_dataset with 1 and 2 workers on copies of every file."""
    folder = scratch / "copies"
    count = 0
    for index in range(copies):
        for number, path in enumerate(files):
            target = folder / f"{index}{number}" / f"{index}{number}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            count += 1
    print(f"\npreprocess_dataset on {count} images ({copies} copies of each file):")
    rates = {}
    for workers in (1, 2):
        load = os.getloadavg()[0]
        started = time.perf_counter()
        summary = preprocess_dataset([folder], scratch / f"out{workers}", config=config,
                                     workers=workers, progress=False)
        seconds = time.perf_counter() - started
        rates[workers] = summary.processed / seconds
        print(f"  workers={workers}: {summary.processed} images in {seconds:.1f} s = "
              f"{rates[workers]:.2f} images/s (failed {summary.failed}; 1-min load average "
              f"before {load:.2f}, after {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs)",
              flush=True)
    print(f"  2 workers / 1 worker: {rates[2] / rates[1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="1456x728")
    parser.add_argument("--copies", type=int, default=11,
                        help="copies of each file in the worker-scaling runs")
    parser.add_argument("--sweep", action="store_true",
                        help="also print PSNR per forced level and output size")
    args = parser.parse_args()
    config = PreprocessConfig(image_size=parse_image_size(args.size))
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        files = [path for path in RSNA_DICOMS if path.is_file()]
        print("writing synthetic Hologic-geometry JPEG 2000 DICOMs ...", flush=True)
        for seed, ((rows, columns), laterality, view) in enumerate(
                [(HOLOGIC_FRAMES[0], "L", "CC"), (HOLOGIC_FRAMES[0], "R", "MLO"),
                 (HOLOGIC_FRAMES[1], "R", "CC"), (HOLOGIC_FRAMES[1], "L", "MLO")]):
            path = scratch / "synthetic" / f"{rows}x{columns}" / f"{laterality}{view}.dcm"
            files.append(write_hologic_dicom(path, rows, columns, laterality=laterality,
                                             view=view, seed=seed)[0])
        print(f"output {config.image_size[0]}x{config.image_size[1]}, {config.bits}-bit; "
              f"fastest of {args.repeats} interleaved runs; 1-min load average "
              f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
        compare(files, config, args.repeats)
        if args.sweep:
            sweep(files)
        worker_scaling(files, config, args.copies, scratch)


if __name__ == "__main__":
    main()
