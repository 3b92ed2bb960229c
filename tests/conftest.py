"""Shared pytest fixtures: CPU-only TensorFlow, quiet logs, and the real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CVAE_MAMMO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (real data lives in ../shared/data; "
                    "set CVAE_MAMMO_SHARED_DATA to point elsewhere)")
    return path


@pytest.fixture(scope="session")
def mias_dir() -> Path:
    """The mini-MIAS subset: images/mdbNNN.png and labels.csv."""
    return _require(SHARED_DATA / "mini_mias", "mini-MIAS data")


@pytest.fixture(scope="session")
def rsna_train_csv() -> Path:
    """The real RSNA competition metadata (54,706 rows)."""
    return _require(SHARED_DATA / "rsna" / "train.csv", "RSNA train.csv")


@pytest.fixture(scope="session")
def rsna_dicom() -> Path:
    """One real RSNA DICOM: patient 36, image 200779059, JPEG 2000 lossless."""
    return _require(SHARED_DATA / "rsna" / "dicom" / "36" / "200779059.dcm", "the RSNA DICOM")


# --- data-module fixtures (issue 3) -------------------------------------------------------------

MIAS_DATASET_SIZE: tuple[int, int] = (128, 64)  # (H, W): tiny, fast on CPU


def _write_mias_dataset(mias: Path, out: Path, size: tuple[int, int], seed: int) -> Path:
    """A dataset folder (the README's folder format) from the real mini-MIAS PNGs, made by the real
    ``preprocess_dataset`` (breast crop, orientation, stretch to ``size``, 8-bit PNG).

    Metadata given: label = 1 when the image has any non-NORM abnormality row, severity (M if
    any malignant finding, else B or blank), background_tissue, view MLO, laterality blank
    (preprocessing then takes it from the pixels). splits.csv: val 0.2 / test 0.2, ``seed``.
    """
    import pandas as pd

    from cvae_mammo.data.splits import make_splits, write_splits
    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig

    rows = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    metadata = rows.groupby("image_id", sort=True).agg(
        patient_id=("patient_id", "first"),
        background_tissue=("background_tissue", "first"),
        label=("abnormality", lambda v: int((v != "NORM").any())),
        severity=("severity", lambda v: "M" if "M" in set(v) else ("B" if "B" in set(v) else "")),
    ).reset_index().assign(view="MLO", laterality="")
    summary = preprocess_dataset(mias / "images", out, PreprocessConfig(image_size=tuple(size)),
                                 metadata=metadata, workers=2, progress=False)
    assert summary.failed == 0, f"preprocessing mini-MIAS failed: see {out / 'failures.csv'}"
    manifest = pd.read_csv(out / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    write_splits(make_splits(manifest, val=0.2, test=0.2, seed=seed), out / "splits.csv")
    return out


@pytest.fixture(scope="session")
def mias_dataset_factory(mias_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Callable ``(size=(H, W), seed=0) -> Path`` building (once per size/seed) a mini-MIAS
    dataset folder with ``preprocess_dataset``: images/<patient>/<image>.png, manifest.csv and
    a seeded splits.csv (patient-grouped, val 0.2 / test 0.2). ~15 s on 2 busy cores."""
    built: dict[tuple[tuple[int, int], int], Path] = {}

    def make(size: tuple[int, int] = MIAS_DATASET_SIZE, seed: int = 0) -> Path:
        key = (tuple(size), seed)
        if key not in built:
            out = tmp_path_factory.mktemp(f"mias_{size[0]}x{size[1]}_s{seed}")
            built[key] = _write_mias_dataset(mias_dir, out, tuple(size), seed)
        return built[key]

    return make


@pytest.fixture(scope="session")
def mias_dataset(mias_dataset_factory) -> Path:
    """The mini-MIAS dataset folder at 128x64 (HxW) with manifest.csv and splits.csv (seed 0)."""
    return mias_dataset_factory()
