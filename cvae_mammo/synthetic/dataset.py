"""A synthetic RSNA-like screening data set of phantom mammograms in real DICOM files.

:func:`make_phantom_dataset` writes::

    <out>/dicom/<patient_id>/<image_id>.dcm   4 images per woman: L/R x CC/MLO
    <out>/train.csv                           RSNA columns (site_id, patient_id, image_id,
                                              laterality, view, age, cancer, biopsy, invasive,
                                              BIRADS, implant, density, machine_id,
                                              difficult_negative_case)
    <out>/lesions.csv                         one row per inserted lesion, DICOM pixel coordinates
    <out>/masks/<image_id>.png                lesion mask (0/255) of every positive image
    <out>/phantoms.json                       generation options, counts, package versions

Each woman is imaged on one of four simulated units that between them cover
the variants of the real competition data: JPEG 2000 lossless and JPEG
Lossless (process 14, SV1) transfer syntaxes, MONOCHROME1 and MONOCHROME2,
SIGMOID and LINEAR VOI LUT functions, several window pairs, a non-identity
rescale slope/intercept, a JPEG 2000 codestream behind a JP2 header, and the
Hologic vertical line artefact. Stored
pixel values are chosen so that the unit's first window gives back the
phantom's display image. A woman with cancer has one lesion in one breast,
seen in both its CC and MLO views. One seed controls everything.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cvae_mammo.fileio import (
    PathLike,
    atomic_write_csv,
    atomic_write_json,
    package_versions,
    read_json,
)
from cvae_mammo.preprocessing.imageio import write_png
from cvae_mammo.synthetic.phantom import LATERALITIES, VIEWS, make_phantom, sample_lesion_spec

#: RSNA ``train.csv`` columns, in the competition's order.
RSNA_COLUMNS: tuple[str, ...] = (
    "site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy",
    "invasive", "BIRADS", "implant", "density", "machine_id", "difficult_negative_case",
)
LESION_COLUMNS: tuple[str, ...] = (
    "patient_id", "image_id", "laterality", "view", "kind", "center_row", "center_col",
    "radius", "contrast", "bbox_row0", "bbox_col0", "bbox_row1", "bbox_col1", "mask_path",
)
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"


@dataclasses.dataclass(frozen=True)
class Unit:
    """A simulated mammography unit: how its DICOMs store and window the pixels."""

    machine_id: int
    site_id: int
    transfer_syntax: str
    photometric: str
    voi_function: str
    bits_stored: int
    slope: float
    intercept: float
    n_windows: int
    line_artefact: bool
    jp2_header: bool = False

    @property
    def modality_range(self) -> tuple[float, float]:
        """Lowest and highest modality value (stored value after slope/intercept)."""
        top = self.slope * (2**self.bits_stored - 1) + self.intercept
        return self.intercept, top


#: The four units patients are spread over (ids borrowed from RSNA's machine_id range).
UNITS: tuple[Unit, ...] = (
    Unit(49, 1, JPEG2000_LOSSLESS, "MONOCHROME1", "SIGMOID", 12, 1.0, 0.0, 3, True),
    Unit(48, 1, JPEG2000_LOSSLESS, "MONOCHROME2", "LINEAR", 12, 1.0, 0.0, 1, False, True),
    Unit(29, 2, JPEG_LOSSLESS_SV1, "MONOCHROME2", "LINEAR", 14, 0.5, -200.0, 1, False),
    Unit(21, 2, JPEG_LOSSLESS_SV1, "MONOCHROME1", "LINEAR", 12, 1.0, 0.0, 2, False),
)


@dataclasses.dataclass(frozen=True)
class PhantomDataset:
    """Where :func:`make_phantom_dataset` wrote its files, and what it wrote."""

    root: Path
    dicom_dir: Path
    metadata_csv: Path
    lesions_csv: Path
    masks_dir: Path
    n_patients: int
    n_images: int
    n_positive_images: int


def unit_windows(unit: Unit, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Window (center, width) pairs of one image; the first maps the display range."""
    low, high = unit.modality_range
    span = high - low
    centre = low + span * rng.uniform(0.47, 0.53)
    # SIGMOID reaches 0.002-0.998 over ~3.1 widths; LINEAR spans its width exactly
    width = span / (3.6 if unit.voi_function == "SIGMOID" else 1.15)
    windows = [(centre, width)]
    for k in range(1, unit.n_windows):  # narrower "soft tissue" alternatives, as Hologic units add
        windows.append((centre + 0.05 * k * span, width * (1.0 - 0.2 * k)))
    return [(round(c, 1), round(w, 1)) for c, w in windows]


def display_to_stored(display: np.ndarray, unit: Unit, window: tuple[float, float]) -> np.ndarray:
    """Invert the unit's rescale, VOI function and photometric interpretation.

    ``display`` is in [0, 1] (bright = dense); the result, read back through
    slope/intercept, ``window`` with the unit's VOI function and
    MONOCHROME1 inversion, gives ``display`` again up to quantisation.
    """
    centre, width = window
    voi = 1.0 - display if unit.photometric == "MONOCHROME1" else display
    voi = voi.astype(np.float64)
    if unit.voi_function == "SIGMOID":
        voi = np.clip(voi, 0.002, 0.998)
        modality = centre - width / 4.0 * np.log(1.0 / voi - 1.0)
    else:  # DICOM LINEAR: y = (x - (c - 0.5)) / (w - 1) + 0.5
        modality = (voi - 0.5) * (width - 1.0) + centre - 0.5
    stored = np.rint((modality - unit.intercept) / unit.slope)
    return np.clip(stored, 0, 2**unit.bits_stored - 1).astype(np.uint16)


def _patient_table(
    rng: np.random.Generator, n_patients: int, positive_fraction: float
) -> list[dict[str, object]]:
    """One dict per woman: ids, unit, age, density and which breast (if any) has cancer."""
    n_positive = round(n_patients * positive_fraction)
    positive = np.zeros(n_patients, dtype=bool)
    positive[rng.choice(n_patients, size=n_positive, replace=False)] = True
    patient_ids = np.sort(10_000 + rng.choice(55_000, size=n_patients, replace=False))
    # every unit gets a share of the women (all four appear from four women on)
    units = rng.permutation(np.arange(n_patients) % len(UNITS))
    patients = []
    for index in range(n_patients):
        age = float(np.clip(rng.normal(58, 10), 35, 89).round())
        patients.append({
            "patient_id": int(patient_ids[index]),
            "unit": UNITS[int(units[index])],
            "age": math.nan if rng.uniform() < 0.05 else age,
            "density": str(rng.choice(list("ABCD"), p=[0.1, 0.4, 0.4, 0.1])),
            "density_recorded": bool(rng.uniform() > 0.1),
            "cancer_side": str(rng.choice(LATERALITIES)) if positive[index] else "",
            "difficult": bool(not positive[index] and rng.uniform() < 0.1),
        })
    return patients


def _metadata_row(patient: dict[str, object], image_id: int, laterality: str, view: str,
                  rng: np.random.Generator) -> dict[str, object]:
    unit: Unit = patient["unit"]  # type: ignore[assignment]
    cancer = int(patient["cancer_side"] == laterality)
    difficult = bool(patient["difficult"])
    return {
        "site_id": unit.site_id,
        "patient_id": patient["patient_id"],
        "image_id": image_id,
        "laterality": laterality,
        "view": view,
        "age": patient["age"],
        "cancer": cancer,
        "biopsy": int(cancer or difficult),
        "invasive": int(cancer and rng.uniform() < 0.7),
        "BIRADS": 0 if cancer or difficult else (math.nan if rng.uniform() < 0.5 else 1),
        "implant": 0,
        "density": patient["density"] if patient["density_recorded"] else math.nan,
        "machine_id": unit.machine_id,
        "difficult_negative_case": difficult,
    }


def make_phantom_dataset(
    out_dir: PathLike,
    n_patients: int = 40,
    positive_fraction: float = 0.3,
    size: tuple[int, int] = (512, 416),
    seed: int = 0,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> PhantomDataset:
    """Write ``n_patients`` women (4 DICOMs each) of phantom mammograms to ``out_dir``.

    ``positive_fraction`` of the women have cancer in one breast (both of its
    views positive); ``size`` is the detector (height, width) in pixels.
    A finished set with the same options in ``out_dir`` is reused as it is;
    a different one is an error unless ``overwrite`` (then its ``dicom/``
    and ``masks/`` folders are replaced).
    """
    from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom

    if not 1 <= n_patients <= 50_000:
        raise ValueError(f"n_patients={n_patients}: expected 1-50000 women")
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction={positive_fraction}: expected 0-1")
    root = Path(out_dir)
    dicom_dir, masks_dir = root / "dicom", root / "masks"
    options = {"n_patients": n_patients, "positive_fraction": positive_fraction,
               "size": [int(size[0]), int(size[1])], "seed": seed}
    done = _finished(root, options)
    if done is not None:
        return done
    if dicom_dir.exists() and any(dicom_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dicom_dir}: already holds another phantom set "
                                  "(other options or unfinished); use overwrite or another folder")
        for folder in (dicom_dir, masks_dir):
            shutil.rmtree(folder, ignore_errors=True)
    rng = np.random.default_rng(seed)
    patients = _patient_table(rng, n_patients, positive_fraction)
    image_ids = 100_000_000 + rng.choice(2_000_000_000, size=4 * n_patients, replace=False)

    rows, lesion_rows = [], []
    bar = tqdm(total=4 * n_patients, desc="phantoms", unit="img", disable=not progress)
    for p_index, patient in enumerate(patients):
        unit: Unit = patient["unit"]  # type: ignore[assignment]
        for s_index, laterality in enumerate(LATERALITIES):
            spec = sample_lesion_spec(rng) if patient["cancer_side"] == laterality else None
            for v_index, view in enumerate(VIEWS):
                image_id = int(image_ids[4 * p_index + 2 * s_index + v_index])
                phantom = make_phantom(
                    rng, size, view=view, laterality=laterality, density=str(patient["density"]),
                    lesions=() if spec is None else (spec,), line_artefact=unit.line_artefact,
                )
                windows = unit_windows(unit, rng)
                path = dicom_dir / str(patient["patient_id"]) / f"{image_id}.dcm"
                write_mammogram_dicom(
                    path, display_to_stored(phantom.image, unit, windows[0]),
                    transfer_syntax=unit.transfer_syntax, photometric=unit.photometric,
                    window=windows, voi_function=unit.voi_function,
                    slope=unit.slope, intercept=unit.intercept, bits_stored=unit.bits_stored,
                    patient_id=str(patient["patient_id"]), image_id=str(image_id),
                    laterality=laterality, view=view, jp2_header=unit.jp2_header,
                )
                rows.append(_metadata_row(patient, image_id, laterality, view, rng))
                if phantom.lesions:
                    mask_path = masks_dir / f"{image_id}.png"
                    write_png(mask_path, phantom.lesion_mask.astype(np.uint8) * 255)
                for lesion in phantom.lesions:
                    lesion_rows.append({
                        "patient_id": patient["patient_id"], "image_id": image_id,
                        "laterality": laterality, "view": view, "kind": lesion.kind,
                        "center_row": round(lesion.center[0], 1),
                        "center_col": round(lesion.center[1], 1),
                        "radius": round(lesion.radius, 2), "contrast": round(lesion.contrast, 4),
                        "bbox_row0": lesion.bbox[0], "bbox_col0": lesion.bbox[1],
                        "bbox_row1": lesion.bbox[2], "bbox_col1": lesion.bbox[3],
                        "mask_path": mask_path.relative_to(root).as_posix(),
                    })
                bar.update()
    bar.close()

    metadata = pd.DataFrame(rows, columns=list(RSNA_COLUMNS))
    lesions = pd.DataFrame(lesion_rows, columns=list(LESION_COLUMNS))
    atomic_write_csv(root / "train.csv", metadata)
    atomic_write_csv(root / "lesions.csv", lesions)
    n_positive_images = int(metadata["cancer"].sum())
    atomic_write_json(root / "phantoms.json", {
        **options, "n_images": len(metadata), "n_positive_images": n_positive_images,
        "units": [dataclasses.asdict(unit) for unit in UNITS],
        "versions": package_versions(("cvae_mammo", "numpy", "pydicom", "pylibjpeg",
                                      "pylibjpeg-openjpeg", "imagecodecs", "opencv-python-headless")),
    })
    return _finished(root, options)  # type: ignore[return-value]


def _finished(root: Path, options: dict[str, object]) -> PhantomDataset | None:
    """The set in ``root`` when ``phantoms.json`` says it was finished with ``options``."""
    record = root / "phantoms.json"
    if not record.is_file():
        return None
    written = read_json(record)
    if any(written.get(key) != value for key, value in options.items()):
        return None
    return PhantomDataset(
        root=root, dicom_dir=root / "dicom", metadata_csv=root / "train.csv",
        lesions_csv=root / "lesions.csv", masks_dir=root / "masks",
        n_patients=int(written["n_patients"]), n_images=int(written["n_images"]),
        n_positive_images=int(written["n_positive_images"]),
    )


def lesion_masks_in_dataset(phantoms: PhantomDataset, dataset_dir: PathLike) -> Path:
    """Map the lesion masks into a preprocessed dataset's geometry, for checking anomaly maps.

    Uses each image's provenance in ``dataset_dir/manifest.csv`` (crop box in
    original pixels, flip, output size) and writes
    ``dataset_dir/lesion_masks/<image_id>.png`` (0/255, the size of the
    preprocessed image) for every positive image; returns that folder. Only
    the default ``stretch`` resize is supported.
    """
    from cvae_mammo.preprocessing.geometry import mask_to_dataset
    from cvae_mammo.preprocessing.imageio import read_grayscale

    dataset_dir = Path(dataset_dir)
    manifest = pd.read_csv(dataset_dir / "manifest.csv", dtype={"image_id": str})
    settings = read_json(dataset_dir / "preprocess.json")["config"]
    if settings.get("resize", "stretch") != "stretch":
        raise ValueError(f"{dataset_dir}: lesion masks need resize='stretch' preprocessing")
    height, width = settings["image_size"]
    lesions = pd.read_csv(phantoms.lesions_csv, dtype={"image_id": str})
    out = dataset_dir / "lesion_masks"
    rows = manifest.set_index("image_id")
    for image_id, mask_path in lesions.drop_duplicates("image_id")[["image_id", "mask_path"]].values:
        if image_id not in rows.index:
            continue  # the image failed preprocessing (see failures.csv)
        row = rows.loc[image_id]
        mask = read_grayscale(phantoms.root / mask_path) >= 128
        resized = mask_to_dataset(mask, row, (height, width))
        write_png(out / f"{image_id}.png", resized.astype(np.uint8) * 255)
    return out
