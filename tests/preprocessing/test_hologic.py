"""Real Hologic geometry (a narrow breast in a 5355x4915 or 4096x3328 frame): level, crop, quality."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvae_mammo.preprocessing.image import (
    MAX_EXCESS,
    PreprocessConfig,
    ProcessedImage,
    choose_level,
    coarse_level,
    preprocess_image,
)
from cvae_mammo.preprocessing.imageio import psnr
from tests.preprocessing.conftest import HologicFile

CONFIG = PreprocessConfig(bits=16)  # the default 1456x728 output


def _box(result: ProcessedImage) -> tuple[int, int, int, int]:
    return tuple(result.provenance[k] for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))


def _psnr_to_full_resolution(path: Path, result: ProcessedImage) -> float:
    full = preprocess_image(path, CONFIG.replace(reduced_resolution=False),
                            crop_box=_box(result))
    assert full.provenance["decode_scale"] == 1.0
    return psnr(result.image, full.image)


def test_choose_level_bounds_how_far_a_sample_exceeds_an_output_pixel() -> None:
    assert MAX_EXCESS == 1.5
    # The three real Hologic crops (height, width): 1.5-1.7 original pixels per output pixel
    # across, so a level-1 sample (2 pixels) qualifies and a level-2 one (4) does not.
    for crop in ((4232, 1219), (3328, 1091), (3504, 1200)):
        assert choose_level(*crop, CONFIG, 5) == 1
    # The 2776x2082 RSNA file's crop: 0.76 pixels per output pixel; 2 - 0.76 <= 1.5.
    assert choose_level(1760, 554, CONFIG, 5) == 1
    # Narrower still (0.41): a level-1 sample would exceed an output pixel by 1.59.
    assert choose_level(1760, 300, CONFIG, 5) == 0
    # A small output leaves more room: 9.4 pixels per output pixel -> level 3 (8 pixels) ...
    small = CONFIG.replace(image_size=(256, 128))
    assert choose_level(3504, 1200, small, 5) == 3
    # ... but never beyond the levels the file has.
    assert choose_level(3504, 1200, small, 2) == 2
    # keep-aspect fits the whole crop: the axis with more room decides.
    assert choose_level(3504, 1200, CONFIG.replace(resize="keep-aspect"), 5) == 1
    assert choose_level(3504, 600, CONFIG.replace(resize="keep-aspect"), 5) == 1


def test_coarse_level_is_a_thumbnail_or_what_the_whole_frame_allows() -> None:
    # Hologic frames are located on 1/8 (670x615, 512x416); the 2776x2082 file on 1/4.
    assert coarse_level(5355, 4915, CONFIG, 5) == 3
    assert coarse_level(4096, 3328, CONFIG, 5) == 3
    assert coarse_level(2776, 2082, CONFIG, 5) == 2
    # A frame smaller than the thumbnail: the level the whole frame would need.
    assert coarse_level(240, 180, CONFIG.replace(image_size=(64, 32)), 5) == 2
    assert coarse_level(240, 180, CONFIG, 5) == 0


def test_synthetic_hologic_files_crop_the_narrow_breast_at_half_resolution(
        hologic_files: list[HologicFile]) -> None:
    for hologic in hologic_files:
        result = preprocess_image(hologic.path, CONFIG)
        prov = result.provenance
        assert prov["decode_scale"] == 0.5, hologic.path
        assert prov["flipped"] is (hologic.laterality == "R")
        # The breast plus its 2% margin: not the frame, not out to the line artefact.
        x0, y0, x1, y1 = hologic.box
        for got, want, span in zip(_box(result), hologic.box,
                                   (x1 - x0, y1 - y0, x1 - x0, y1 - y0)):
            assert abs(got - want) <= 0.02 * span + 16, (hologic.path, _box(result), hologic.box)
        # Chest wall on the left of the output.
        image = result.image.astype(float)
        assert image[:, :364].sum() > 1.5 * image[:, 364:].sum()
        assert _psnr_to_full_resolution(hologic.path, result) >= 40.0


@pytest.mark.shared_data
def test_real_hologic_file_half_resolution_within_40_db(rsna_hologic_dicom: Path) -> None:
    result = preprocess_image(rsna_hologic_dicom, CONFIG)
    prov = result.provenance
    assert prov["decode_scale"] == 0.5 and prov["flipped"] is False
    x0, y0, x1, y1 = _box(result)
    # The breast fills about a quarter of the 4915-pixel width, against the left edge.
    assert x0 == 0 and 1100 <= x1 <= 1300 and 3300 <= y1 - y0 <= 3700
    assert _psnr_to_full_resolution(rsna_hologic_dicom, result) >= 40.0
