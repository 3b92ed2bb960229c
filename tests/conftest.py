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
