"""Preprocessing fixtures: the real Hologic RSNA file and synthetic files with Hologic geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cvae_mammo.synthetic.hologic import HOLOGIC_FRAMES, write_hologic_dicom
from tests.conftest import SHARED_DATA, _require


@pytest.fixture(scope="session")
def rsna_hologic_dicom() -> Path:
    """The real Hologic RSNA DICOM: patient 10006, 5355x4915, JPEG 2000 lossless, MONOCHROME1."""
    return _require(SHARED_DATA / "rsna" / "dicom" / "10006" / "462822612.dcm",
                    "the Hologic RSNA DICOM")


@dataclasses.dataclass(frozen=True)
class HologicFile:
    """A synthetic Hologic-geometry DICOM and the truth it was written from."""

    path: Path
    box: tuple[int, int, int, int]  # the breast in the frame, (x0, y0, x1, y1)
    laterality: str


@pytest.fixture(scope="session")
def hologic_files(tmp_path_factory: pytest.TempPathFactory) -> list[HologicFile]:
    """A narrow breast against the left edge of a 5355x4915 frame and the right of a 4096x3328."""
    folder = tmp_path_factory.mktemp("hologic")
    files = []
    for seed, ((rows, columns), laterality, view) in enumerate(
            [(HOLOGIC_FRAMES[0], "L", "CC"), (HOLOGIC_FRAMES[1], "R", "MLO")]):
        path, box = write_hologic_dicom(folder / f"{rows}x{columns}.dcm", rows, columns,
                                        laterality=laterality, view=view, seed=seed)
        files.append(HologicFile(path, box, laterality))
    return files
