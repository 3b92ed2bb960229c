"""JPEG 2000 through OpenJPEG: window decodes are bit-exact cuts of whole decodes, errors name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from cvae_mammo.errors import ImageReadError
from cvae_mammo.preprocessing import jpeg2000
from cvae_mammo.preprocessing.dicom import _decode_jpeg2000_pillow, read_dicom
from cvae_mammo.preprocessing.image import PreprocessConfig, preprocess_image
from cvae_mammo.preprocessing.jpeg2000 import OpenJpegError, level_window
from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom

SHAPE = (301, 203)  # odd sizes: every level rounds up
BOXES = [(0, 0, 203, 301), (5, 7, 150, 290), (64, 32, 203, 301), (100, 150, 101, 151)]


def _textured(shape: tuple[int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    smooth = 2000 + 1500 * np.sin(rows / 17.0) * np.cos(cols / 11.0)
    return np.clip(smooth + rng.normal(0, 60, shape), 0, 4095).astype(np.uint16)


def test_the_library_pillow_bundles_is_found() -> None:
    lib = jpeg2000.library()
    assert lib is not None
    major, minor = (int(v) for v in lib.opj_version().decode().split(".")[:2])
    assert (major, minor) >= (2, 3)


@pytest.mark.parametrize("jp2", [False, True])
def test_window_decode_is_an_exact_cut_of_the_whole_level(tmp_path: Path, jp2: bool) -> None:
    pixels = _textured()
    path = write_mammogram_dicom(tmp_path / "x.dcm", pixels, transfer_syntax="jpeg2000",
                                 bits_stored=12, jp2_header=jp2)
    image = read_dicom(path)
    frame = image._frame()
    assert image.resolution_levels >= 4
    np.testing.assert_array_equal(jpeg2000.decode(frame), pixels)
    for level in range(image.resolution_levels + 1):
        whole = jpeg2000.decode(frame, level)
        assert whole.shape == (-(-SHAPE[0] // 2**level), -(-SHAPE[1] // 2**level))
        if level <= 1:  # Pillow (the fallback) agrees; it refuses some reductions of odd sizes
            np.testing.assert_array_equal(_decode_jpeg2000_pillow(frame, level, 12), whole)
        for box in BOXES:
            x0, y0, x1, y1 = level_window(box, level)
            cut = whole[y0:y1, x0:x1]
            np.testing.assert_array_equal(jpeg2000.decode(frame, level, box), cut)
            np.testing.assert_array_equal(image.decode(level, box), cut)


def test_level_window_starts_on_the_sample_at_or_before_the_box() -> None:
    assert level_window((0, 0, 4915, 5355), 1) == (0, 0, 2458, 2678)
    assert level_window((3696, 872, 4915, 4200), 3) == (462, 109, 615, 525)
    assert level_window((5, 7, 9, 9), 2) == (1, 1, 3, 3)


def test_bad_requests_and_damaged_codestreams_name_the_file(tmp_path: Path) -> None:
    path = write_mammogram_dicom(tmp_path / "good.dcm", _textured(), transfer_syntax="jpeg2000",
                                 bits_stored=12)
    image = read_dicom(path)
    top = image.resolution_levels
    with pytest.raises(ValueError, match=f"resolution level {top + 1} not in 0..{top}") as info:
        image.decode(top + 1)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="outside the 301x203 image"):
        image.decode(0, (0, 0, 204, 10))
    frame = image._frame()
    with pytest.raises(OpenJpegError, match="header failed"):
        jpeg2000.decode(frame[:60])
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([frame[: len(frame) // 2]])  # header intact, tiles cut short
    ds.save_as(tmp_path / "cut.dcm")
    for run in (lambda p: read_dicom(p).decode(1, (0, 0, 100, 100)),
                lambda p: preprocess_image(p, PreprocessConfig(image_size=(64, 32)))):
        with pytest.raises(ImageReadError, match=r"could not be decoded.*OpenJpegError") as info:
            run(tmp_path / "cut.dcm")
        assert info.value.stage == "decode" and str(tmp_path / "cut.dcm") in str(info.value)


@pytest.mark.shared_data
def test_real_hologic_window_decode_is_bit_exact(rsna_hologic_dicom: Path) -> None:
    image = read_dicom(rsna_hologic_dicom)
    assert (image.rows, image.columns, image.photometric) == (5355, 4915, "MONOCHROME1")
    assert image.resolution_levels == 5 and image.j2k_precision == 16
    box = (0, 800, 1200, 4304)  # the breast: a quarter of the frame's width
    window = image.decode(0, box)
    np.testing.assert_array_equal(window, image.dataset.pixel_array[800:4304, :1200])
    half = _decode_jpeg2000_pillow(image._frame(), 1, image.j2k_precision)
    np.testing.assert_array_equal(image.decode(1, box), half[400:2152, :600])
    # Pillow refuses 1/8 of this file; OpenJPEG decodes every level.
    assert image.decode(3).shape == (670, 615)
