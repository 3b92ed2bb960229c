"""Benchmark: our preprocessing vs a straightforward full-resolution pipeline, same files, one run.

Files: the real RSNA DICOM (when ../shared/data is present) and synthetic
Hologic-sized JPEG 2000 lossless DICOMs (5355x4915 and 4096x3328, 12-bit,
MONOCHROME1, SIGMOID, two window pairs) written by
:func:`cvae_mammo.synthetic.dicom_writer.write_mammogram_dicom`.

Printed per file (fastest of --repeats interleaved runs, one process):
* full-resolution pipeline: pydicom ``pixel_array`` + pydicom VOI LUT +
  largest-component crop on the full image + area resize + PNG encode;
* ours: :func:`cvae_mammo.preprocessing.image.preprocess_image` + PNG encode;
* the bare decode at the resolution level ours used (``read_dicom`` + ``decode``);
(both totals include writing the PNG file)
* ratios full/ours and ours/bare-decode;
then images/s of :func:`preprocess_dataset` with 1 and 2 workers.

Run: ``python benchmarks/bench_preprocess.py [--repeats 3] [--size 1456x728]``
"""

from __future__ import annotations

import argparse
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
from cvae_mammo.preprocessing.dicom import read_dicom
from cvae_mammo.preprocessing.image import PreprocessConfig, preprocess_image
from cvae_mammo.preprocessing.imageio import write_png
from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path(tempfile.gettempdir()) / "bench_preprocess_output.png"
RSNA_DICOM = REPO.parent / "shared" / "data" / "rsna" / "dicom" / "36" / "200779059.dcm"


def synthetic_hologic(path: Path, height: int, width: int, seed: int) -> Path:
    """A textured 12-bit breast phantom, stored MONOCHROME1 like Hologic units."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    depth = width - 1 - xx  # chest wall on the right, like a right breast
    inside = (depth / (0.55 * width)) ** 2 + ((yy - height / 2) / (0.46 * height)) ** 2 <= 1
    small = rng.normal(0.0, 1.0, (height // 16, width // 16)).astype(np.float32)
    texture = cv2.resize(cv2.GaussianBlur(small, (0, 0), 2.0), (width, height),
                         interpolation=cv2.INTER_CUBIC)
    tissue = 1800 + 500 * np.clip(depth / width, 0, 1) + 250 * texture
    tissue += rng.normal(0.0, 25.0, (height, width)).astype(np.float32)
    display = np.where(inside, tissue, 60.0)
    stored = np.clip(4095 - display, 0, 4095).astype(np.uint16)
    return write_mammogram_dicom(
        path, stored, transfer_syntax="jpeg2000", photometric="MONOCHROME1", bits_stored=12,
        window=[(2100, 1400), (2100, 2000)], voi_function="SIGMOID", patient_id="900",
        image_id=str(seed), laterality="R", view="CC")


def full_resolution_pipeline(path: Path, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """The straightforward pipeline; returns the PNG-ready image and its decode seconds."""
    started = time.perf_counter()
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    decode_seconds = time.perf_counter() - started
    values = apply_voi_lut(pixels, ds).astype(np.float32)
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
    return image, decode_seconds


def ours(path: Path, config: PreprocessConfig) -> dict:
    result = preprocess_image(path, config)
    write_png(OUTPUT, result.image)
    return result.provenance


def bare_decode(path: Path, level: int) -> None:
    read_dicom(path).decode(level)


def best_seconds(functions: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` runs of each function, runs interleaved (robust on a shared CPU)."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="1456x728")
    parser.add_argument("--copies", type=int, default=3,
                        help="copies of each file in the worker-throughput runs")
    args = parser.parse_args()
    size = parse_image_size(args.size)
    config = PreprocessConfig(image_size=size)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        files = []
        if RSNA_DICOM.is_file():
            files.append(RSNA_DICOM)
        print("writing synthetic Hologic-sized JPEG 2000 DICOMs ...", flush=True)
        files.append(synthetic_hologic(scratch / "in" / "900" / "1.dcm", 5355, 4915, 1))
        files.append(synthetic_hologic(scratch / "in" / "900" / "2.dcm", 4096, 3328, 2))
        decoder = pydicom.pixels.get_decoder(pydicom.dcmread(files[0]).file_meta
                                             .TransferSyntaxUID)
        print(f"output {size[0]}x{size[1]}; pydicom J2K plugins available: "
              f"{decoder.available_plugins}; fastest of {args.repeats} interleaved runs\n")
        header = (f"{'file':<28}{'full dec':>9}{'full tot':>9}{'our dec':>9}{'our tot':>9}"
                  f"{'scale':>7}{'full/our':>9}{'our/dec':>8}")
        print(header)
        print("-" * len(header))
        for path in files:
            provenance = ours(path, config)
            level = round(np.log2(1.0 / provenance["decode_scale"]))
            best = best_seconds({
                "full_decode": lambda p=path: pydicom.dcmread(p).pixel_array,
                "full_total": lambda p=path: full_resolution_pipeline(p, size),
                "our_decode": lambda p=path, k=level: bare_decode(p, k),
                "our_total": lambda p=path: ours(p, config),
            }, args.repeats)
            full_decode, full_total = best["full_decode"], best["full_total"]
            our_decode, our_total = best["our_decode"], best["our_total"]
            rows, cols = provenance["original_height"], provenance["original_width"]
            name = f"{path.parent.name}/{path.name} {rows}x{cols}"
            print(f"{name:<28}{full_decode:>9.3f}{full_total:>9.3f}{our_decode:>9.3f}"
                  f"{our_total:>9.3f}{provenance['decode_scale']:>7.2f}"
                  f"{full_total / our_total:>8.2f}x{our_total / our_decode:>7.2f}x", flush=True)

        copies = []
        for index in range(args.copies):
            for number, path in enumerate(files):
                target = scratch / "copies" / f"{index}{number}" / f"{index}{number}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
                copies.append(target)
        print(f"\npreprocess_dataset on {len(copies)} images ({args.copies} copies of each):")
        for workers in (1, 2):
            out = scratch / f"out{workers}"
            started = time.perf_counter()
            summary = preprocess_dataset([scratch / "copies"], out, config=config,
                                         workers=workers, progress=False)
            seconds = time.perf_counter() - started
            print(f"  workers={workers}: {summary.processed} images in {seconds:.2f} s = "
                  f"{summary.processed / seconds:.2f} images/s (failed {summary.failed})",
                  flush=True)


if __name__ == "__main__":
    main()
