"""DICOM decoding and windowing, on synthetic MG DICOMs in every transfer syntax and the real RSNA file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from cvae_mammo.errors import ImageReadError
from cvae_mammo.preprocessing.dicom import (
    apply_window,
    choose_window,
    is_dicom_file,
    read_dicom,
    rescale,
)
from cvae_mammo.preprocessing.image import MAX_EXCESS, PreprocessConfig, preprocess_image
from cvae_mammo.preprocessing.imageio import psnr
from cvae_mammo.preprocessing.jpeg2000 import jpeg2000_header
from cvae_mammo.synthetic.dicom_writer import TRANSFER_SYNTAXES, write_mammogram_dicom

# Stored values of the phantom's regions (MONOCHROME2; MONOCHROME1 stores 4095 - value).
BACKGROUND, OUTER, INNER, ARTEFACT = 100, 2200, 3300, 4000


def breast_phantom(height: int = 240, width: int = 180, *, chest_wall: str = "left",
                   artefacts: bool = True) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Stored 12-bit pixels of a half-ellipse breast on the chest-wall side, and its box.

    The breast has an outer and an inner plateau; with ``artefacts`` a 2-pixel
    vertical line runs down the far edge (the Hologic artefact) and a bright
    burnt-in marker sits in the far top corner. Box is (x0, y0, x1, y1) in
    the returned array, exclusive ends.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(float)
    depth = xx if chest_wall == "left" else (width - 1 - xx)
    cy, ry, rx = height / 2, 0.42 * height, 0.6 * width
    outer = (depth / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    inner = (depth / (0.5 * rx)) ** 2 + ((yy - cy) / (0.5 * ry)) ** 2 <= 1
    pixels = np.full((height, width), BACKGROUND, dtype=np.uint16)
    pixels[outer] = OUTER
    pixels[inner] = INNER
    if artefacts:
        far = slice(width - 4, width - 2) if chest_wall == "left" else slice(2, 4)
        pixels[:, far] = ARTEFACT
        marker_x = slice(width - 30, width - 12) if chest_wall == "left" else slice(12, 30)
        pixels[8:22, marker_x] = ARTEFACT
    rows, cols = np.flatnonzero(outer.any(1)), np.flatnonzero(outer.any(0))
    return pixels, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def expected_display(stored: float, *, slope: float, intercept: float, center: float,
                     width: float, function: str, monochrome1: bool) -> float:
    """The DICOM PS3.3 C.11.2.1.2 formulas, written out independently of the module."""
    x = stored * slope + intercept
    if function == "SIGMOID":
        y = 1.0 / (1.0 + math.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = min(1.0, max(0.0, (x - center) / width + 0.5))
    else:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        y = 0.0 if x <= low else 1.0 if x > high else (x - (center - 0.5)) / (width - 1) + 0.5
    return 1.0 - y if monochrome1 else y


SYNTAX_CASES = [
    # (transfer syntax, jp2 header, photometric, VOI function)
    ("explicit", False, "MONOCHROME2", "LINEAR"),
    ("rle", False, "MONOCHROME1", "SIGMOID"),
    ("jpeg2000", False, "MONOCHROME1", "SIGMOID"),
    ("jpeg2000", True, "MONOCHROME2", "LINEAR"),
    ("jpeg2000-lossy", False, "MONOCHROME2", "SIGMOID"),
    ("jpeg-lossless", False, "MONOCHROME1", "LINEAR"),
    ("jpeg-lossless-sv1", False, "MONOCHROME2", "SIGMOID"),
    ("jpeg-ls", False, "MONOCHROME1", "LINEAR_EXACT"),
]


@pytest.mark.parametrize(("syntax", "jp2", "photometric", "function"), SYNTAX_CASES)
def test_decode_round_trip_every_syntax(tmp_path: Path, syntax: str, jp2: bool,
                                        photometric: str, function: str) -> None:
    pixels = (np.random.default_rng(1).random((70, 50)) * 4095).astype(np.uint16)
    path = write_mammogram_dicom(tmp_path / "x.dcm", pixels, transfer_syntax=syntax,
                                 photometric=photometric, jp2_header=jp2, bits_stored=12)
    image = read_dicom(path)
    assert image.transfer_syntax == TRANSFER_SYNTAXES[syntax]
    decoded = image.decode(0)
    assert decoded.shape == pixels.shape
    if syntax == "jpeg2000-lossy":
        mse = np.mean((decoded.astype(float) - pixels) ** 2)
        assert 10 * np.log10(4095.0**2 / mse) > 40
    else:
        np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize(("syntax", "jp2", "photometric", "function"), SYNTAX_CASES)
def test_preprocess_synthetic_windowing_orientation_crop(
        tmp_path: Path, syntax: str, jp2: bool, photometric: str, function: str) -> None:
    pixels, (x0, y0, x1, y1) = breast_phantom(chest_wall="right")
    monochrome1 = photometric == "MONOCHROME1"
    stored = (4095 - pixels).astype(np.uint16) if monochrome1 else pixels
    slope, intercept = 2.0, -1000.0
    windows = [(3000.0, 6000.0), (3100.0, 8000.0)]
    path = write_mammogram_dicom(
        tmp_path / "p.dcm", stored, transfer_syntax=syntax, photometric=photometric,
        jp2_header=jp2, bits_stored=12, window=windows, voi_function=function,
        slope=slope, intercept=intercept, patient_id="7", image_id="70", laterality="R",
        view="CC")
    config = PreprocessConfig(image_size=(96, 64), window_index=1, crop_margin=0.02)
    result = preprocess_image(path, config)
    out, prov = result.image, result.provenance
    assert out.shape == (96, 64) and out.dtype == np.uint8
    assert prov["flipped"] is True and prov["transfer_syntax"] == TRANSFER_SYNTAXES[syntax]
    assert (prov["window_center"], prov["window_width"]) == windows[1]
    assert prov["voi_function"] == function and prov["photometric"] == photometric
    # Crop box: the breast's box plus a 2% margin (aligned to 8 pixels), not stretched to
    # the line artefact or the marker.
    for got, want, span in zip(
            (prov["crop_x0"], prov["crop_y0"], prov["crop_x1"], prov["crop_y1"]),
            (x0, y0, x1, y1), (x1 - x0, y1 - y0, x1 - x0, y1 - y0)):
        assert abs(got - want) <= 0.02 * span + 8, (got, want)
    # Pixel values: inner plateau near the (now left) chest wall, outer plateau further out.
    tolerance = 4 if syntax == "jpeg2000-lossy" else 1
    for value, column in ((INNER, 6), (OUTER, 48)):
        stored_value = 4095 - value if monochrome1 else value
        want = 255 * expected_display(stored_value, slope=slope, intercept=intercept,
                                      center=windows[1][0], width=windows[1][1],
                                      function=function, monochrome1=monochrome1)
        assert abs(int(out[48, column]) - want) <= tolerance, (value, out[48, column], want)
    # Orientation: the breast's mass now lies in the left half.
    assert out[:, :32].astype(float).sum() > 1.2 * out[:, 32:].astype(float).sum()


def test_jpeg2000_reduced_resolution_keeps_values(tmp_path: Path) -> None:
    pixels, _ = breast_phantom(960, 720, chest_wall="left")
    path = write_mammogram_dicom(tmp_path / "big.dcm", pixels, transfer_syntax="jpeg2000",
                                 bits_stored=12, window=(2048, 4096), voi_function="LINEAR")
    image = read_dicom(path)
    assert image.resolution_levels == 5
    assert image.decode(2).shape == (240, 180)
    small = PreprocessConfig(image_size=(120, 64))
    result = preprocess_image(path, small)
    prov = result.provenance
    # The crop (~830x440) spans ~6.9 original pixels per output pixel on each axis; a level-3
    # sample spans 8, within MAX_EXCESS of it, a level-4 sample (16) is not.
    room = min((prov["crop_y1"] - prov["crop_y0"]) / 120, (prov["crop_x1"] - prov["crop_x0"]) / 64)
    assert 8 - MAX_EXCESS <= room < 16 - MAX_EXCESS
    assert prov["decode_scale"] == 0.125
    assert result.provenance["flipped"] is False
    want = 255 * expected_display(INNER, slope=1, intercept=0, center=2048, width=4096,
                                  function="LINEAR", monochrome1=False)
    assert abs(int(result.image[60, 6]) - want) <= 1
    box = tuple(prov[k] for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))
    full = preprocess_image(path, small.replace(reduced_resolution=False), crop_box=box)
    assert full.provenance["decode_scale"] == 1.0
    assert np.abs(full.image.astype(int) - result.image).mean() < 2.0


def test_window_formulas_match_the_standard() -> None:
    x = np.array([0.0, 1499.5, 2047.5, 2048.0, 2600.0, 4095.0], dtype=np.float32)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        got = apply_window(x, 2048.0, 1100.0, function)
        want = [expected_display(v, slope=1, intercept=0, center=2048.0, width=1100.0,
                                 function=function, monochrome1=False) for v in x]
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="unknown VOI LUT function"):
        apply_window(x, 1, 1, "GAMMA")


def test_voi_lut_sequence_and_percentile_fallback(tmp_path: Path) -> None:
    pixels, _ = breast_phantom(artefacts=False)
    lut = np.arange(4096, dtype=np.uint16) // 16  # 8-bit output LUT starting at stored 0
    path = write_mammogram_dicom(tmp_path / "lut.dcm", pixels, voi_lut=(0, 8, lut))
    image = read_dicom(path)
    window = choose_window(image, rescale(image.decode(), 1.0, 0.0))
    assert window.function == "LUT_SEQUENCE"
    display = window.apply(np.array([INNER, OUTER], dtype=np.float32), image)
    np.testing.assert_allclose(display, [(INNER // 16) / 255, (OUTER // 16) / 255], atol=1e-6)

    bare = read_dicom(write_mammogram_dicom(tmp_path / "bare.dcm", pixels))
    choice = choose_window(bare, rescale(bare.decode(), 1.0, 0.0), percentiles=(0.5, 99.5))
    assert choice.function == "PERCENTILE"
    low, high = np.percentile(pixels, [0.5, 99.5])
    assert choice.center == pytest.approx((low + high) / 2)
    assert choice.width == pytest.approx(high - low)


def test_corrupt_dicoms_raise_named_errors(tmp_path: Path) -> None:
    pixels, _ = breast_phantom(artefacts=False)
    good = write_mammogram_dicom(tmp_path / "good.dcm", pixels, transfer_syntax="jpeg2000")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-200])
    not_dicom = tmp_path / "text.dcm"
    not_dicom.write_text("hello, not a DICOM")
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    ds = pydicom.dcmread(write_mammogram_dicom(tmp_path / "e.dcm", pixels))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"  # HTJ2K: not supported
    ds.PixelData = encapsulate([ds.PixelData])
    ds.save_as(tmp_path / "htj2k.dcm")
    cases = {
        truncated: ("read", "truncated"), not_dicom: ("read", "not a DICOM"),
        tmp_path / "nopixels.dcm": ("read", "no pixel data"),
        tmp_path / "htj2k.dcm": ("decode", "unsupported transfer syntax"),
    }
    for path, (stage, words) in cases.items():
        with pytest.raises(ImageReadError, match=words) as info:
            image = read_dicom(path)
            image.decode()
        assert info.value.stage == stage and str(path) in str(info.value)
    assert is_dicom_file(good) and not is_dicom_file(not_dicom)


def test_real_rsna_dicom_decode(rsna_dicom: Path) -> None:
    image = read_dicom(rsna_dicom)
    assert (image.rows, image.columns, image.photometric) == (2776, 2082, "MONOCHROME2")
    assert image.transfer_syntax == "1.2.840.10008.1.2.4.90"
    levels, precision = jpeg2000_header(image._frame())
    assert levels == image.resolution_levels >= 2 and precision >= image.bits_stored
    full = image.decode(0)
    np.testing.assert_array_equal(full, image.dataset.pixel_array)
    half = image.decode(1)
    assert half.shape == (1388, 1041)
    # The LL band approximates a 2x2 mean of the full image.
    pooled = full[:2776, :2082].reshape(1388, 2, 1041, 2).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - pooled).mean() < 0.02 * float(full.max())


def test_real_rsna_reduced_resolution_psnr(rsna_dicom: Path) -> None:
    for size in ((512, 256), (256, 128)):
        config = PreprocessConfig(image_size=size, bits=16)
        fast = preprocess_image(rsna_dicom, config)
        box = tuple(fast.provenance[k] for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))
        full = preprocess_image(rsna_dicom, config.replace(reduced_resolution=False),
                                crop_box=box)
        assert fast.provenance["decode_scale"] < 1.0 and full.provenance["decode_scale"] == 1.0
        assert fast.image.shape == full.image.shape == size
        assert psnr(fast.image, full.image) >= 40.0, size
