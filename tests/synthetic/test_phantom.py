"""Synthetic phantom mammograms: geometry, texture, artefacts, lesions and masks."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from cvae_mammo.synthetic.phantom import (
    LESION_KINDS,
    LesionSpec,
    make_phantom,
    power_law_noise,
    sample_lesion_spec,
)

SIZE = (256, 208)


def _phantom(seed: int = 0, **kwargs):
    return make_phantom(np.random.default_rng(seed), SIZE, **kwargs)


def test_same_seed_same_image_other_seed_other_image():
    a = _phantom(3, view="MLO", lesions=["spiculated"], line_artefact=True)
    b = _phantom(3, view="MLO", lesions=["spiculated"], line_artefact=True)
    c = _phantom(4, view="MLO", lesions=["spiculated"], line_artefact=True)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert a.lesions == b.lesions
    assert not np.array_equal(a.image, c.image)


def test_image_type_range_and_breast_geometry():
    phantom = _phantom(view="CC", laterality="L")
    assert phantom.image.shape == SIZE and phantom.image.dtype == np.float32
    assert phantom.image.min() >= 0.0 and phantom.image.max() <= 1.0
    breast = phantom.breast_mask
    assert 0.25 < breast.mean() < 0.6
    rows, cols = np.nonzero(breast)
    aspect = (rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1)
    assert 1.6 < aspect < 2.6  # a cropped breast is about twice as high as wide
    assert phantom.image[breast].mean() > 5 * phantom.image[~breast].mean()


@pytest.mark.parametrize("laterality", ["L", "R"])
def test_chest_wall_on_the_laterality_side(laterality):
    phantom = _phantom(1, laterality=laterality, view="MLO")
    breast = phantom.breast_mask
    left, right = breast[:, 0].sum(), breast[:, -1].sum()
    if laterality == "L":
        assert left > 0.5 * SIZE[0] and right == 0
    else:
        assert right > 0.5 * SIZE[0] and left == 0


def test_mlo_has_bright_pectoral_corner_cc_does_not():
    corner = (slice(0, SIZE[0] // 8), slice(0, SIZE[1] // 16))
    mlo = _phantom(5, view="MLO", density="A", markers=False)
    cc = _phantom(5, view="CC", density="A", markers=False)
    assert mlo.image[corner].mean() > 0.7
    assert cc.image[corner].mean() < 0.4  # background and fatty tissue


def test_density_classes_order_breast_brightness():
    means = []
    for density in "ABCD":
        phantom = _phantom(7, density=density, markers=False)
        means.append(phantom.image[phantom.breast_mask].mean())
    assert means == sorted(means) and means[-1] - means[0] > 0.1


def test_markers_and_line_artefact_lie_outside_the_breast_component():
    phantom = _phantom(2, laterality="L", line_artefact=True)
    foreground = (phantom.image > 0.2).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(foreground, connectivity=8)
    assert count >= 4  # background, breast, marker letters, the line
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    outside = (labels > 0) & (labels != largest)
    assert not (outside & phantom.breast_mask).any()
    # the marker is burnt in at full brightness in the top corner away from the chest wall
    top_right = phantom.image[: SIZE[0] // 8, SIZE[1] // 2 :]
    assert (top_right >= 0.999).sum() > 10
    # a thin, full-height vertical line near the edge away from the chest wall
    column_means = phantom.image[:, SIZE[1] - SIZE[1] // 20 :].mean(axis=0)
    assert column_means.max() > 0.5


@pytest.mark.parametrize("kind", LESION_KINDS)
@pytest.mark.parametrize("laterality", ["L", "R"])
def test_lesion_mask_box_and_contrast(kind, laterality):
    phantom = _phantom(11, laterality=laterality, view="MLO", lesions=[kind])
    (lesion,) = phantom.lesions
    mask = phantom.lesion_mask
    assert lesion.kind == kind and mask.any()
    assert not (mask & ~phantom.breast_mask).any()
    rows, cols = np.nonzero(mask)
    assert lesion.bbox == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
    r0, c0, r1, c1 = lesion.bbox
    assert r0 <= lesion.center[0] < r1 and c0 <= lesion.center[1] < c1
    # the same image without the lesion (same seed): the lesion only brightens its mask area
    clean = _phantom(11, laterality=laterality, view="MLO")
    added = phantom.image - clean.image
    assert added[mask].max() > 0.5 * lesion.contrast
    assert np.abs(added[~mask & phantom.breast_mask]).max() < 0.3 * lesion.contrast


def test_clean_image_has_empty_lesion_mask():
    phantom = _phantom()
    assert phantom.lesions == () and not phantom.lesion_mask.any()


def test_sampled_specs_are_valid_and_spec_validation():
    rng = np.random.default_rng(0)
    kinds = {sample_lesion_spec(rng).kind for _ in range(60)}
    assert kinds == set(LESION_KINDS)
    with pytest.raises(ValueError, match="lesion kind"):
        LesionSpec("cyst", 0.05, 0.2)
    with pytest.raises(ValueError, match="radius_fraction"):
        LesionSpec("mass", 0.5, 0.2)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [("view", "XCCL", "view"), ("laterality", "B", "laterality"), ("density", "E", "density")],
)
def test_bad_options_are_named(option, value, message):
    with pytest.raises(ValueError, match=message):
        _phantom(**{option: value})


def test_power_law_noise_spectrum_slope():
    field = power_law_noise(np.random.default_rng(0), (256, 256), beta=3.0)
    assert abs(field.mean()) < 1e-5 and abs(field.std() - 1.0) < 1e-3
    power = np.abs(np.fft.rfft2(field)) ** 2
    fy = np.fft.fftfreq(256)[:, None]
    fx = np.fft.rfftfreq(256)[None, :]
    freq = np.sqrt(fy**2 + fx**2)
    low = power[(freq > 0.02) & (freq < 0.04)].mean()
    high = power[(freq > 0.16) & (freq < 0.32)].mean()
    slope = np.log(low / high) / np.log(8.0)  # 8x the frequency ratio of the band centres
    assert 2.5 < slope < 3.5


# --- the DICOM data set -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom_set(tmp_path_factory):
    from cvae_mammo.synthetic.dataset import make_phantom_dataset

    out = tmp_path_factory.mktemp("phantoms")
    return make_phantom_dataset(out, n_patients=8, positive_fraction=0.25, size=(192, 156),
                                seed=4, progress=False)


def _display(path):
    """The display image of a DICOM as the pipeline's decoder sees it (first window)."""
    from cvae_mammo.preprocessing.dicom import choose_window, read_dicom, rescale

    image = read_dicom(path)
    values = rescale(image.decode(), image.slope, image.intercept)
    return image, choose_window(image, values).apply(values, image)


@pytest.mark.parametrize("unit_index", range(4))
def test_stored_values_read_back_as_the_display_image(tmp_path, unit_index):
    from cvae_mammo.synthetic.dataset import UNITS, display_to_stored, unit_windows
    from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom

    unit = UNITS[unit_index]
    display = np.tile(np.linspace(0.02, 0.98, 64, dtype=np.float32), (48, 1))
    windows = unit_windows(unit, np.random.default_rng(0))
    path = write_mammogram_dicom(
        tmp_path / "ramp.dcm", display_to_stored(display, unit, windows[0]),
        transfer_syntax=unit.transfer_syntax, photometric=unit.photometric, window=windows,
        voi_function=unit.voi_function, slope=unit.slope, intercept=unit.intercept,
        bits_stored=unit.bits_stored, jp2_header=unit.jp2_header,
    )
    image, back = _display(path)
    assert image.photometric == unit.photometric and len(image.windows) == unit.n_windows
    np.testing.assert_allclose(back, display, atol=0.004)


def test_dataset_layout_and_rsna_metadata(phantom_set):
    import pandas as pd

    from cvae_mammo.synthetic.dataset import RSNA_COLUMNS

    meta = pd.read_csv(phantom_set.metadata_csv)
    assert tuple(meta.columns) == RSNA_COLUMNS
    assert len(meta) == phantom_set.n_images == 32 and meta["image_id"].is_unique
    assert (meta.groupby("patient_id").size() == 4).all()
    assert set(zip(meta["laterality"], meta["view"])) == {
        ("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")}
    for row in meta.itertuples():
        assert (phantom_set.dicom_dir / str(row.patient_id) / f"{row.image_id}.dcm").is_file()
    # 2 of 8 women have cancer in exactly one breast, seen in both its views
    positives = meta[meta["cancer"] == 1]
    assert positives["patient_id"].nunique() == 2 and len(positives) == 4
    assert (positives.groupby("patient_id")["laterality"].nunique() == 1).all()
    assert (positives["biopsy"] == 1).all() and (positives["BIRADS"] == 0).all()
    assert set(meta["machine_id"]) == {49, 48, 29, 21}
    assert meta.groupby("patient_id")["machine_id"].nunique().max() == 1


def test_dataset_dicoms_cover_the_real_variants(phantom_set):
    import pydicom

    seen = set()
    for path in sorted(phantom_set.dicom_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seen.add((ds.file_meta.TransferSyntaxUID, ds.PhotometricInterpretation,
                  str(ds.get("VOILUTFunction", "LINEAR"))))
        assert ds.Modality == "MG" and ds.PatientID == path.parent.name
        assert "PatientName" not in ds
    assert {uid for uid, _, _ in seen} == {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.70"}
    assert {p for _, p, _ in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {f for _, _, f in seen} == {"SIGMOID", "LINEAR"}


def test_lesion_masks_mark_bright_areas_of_the_decoded_images(phantom_set):
    import pandas as pd

    from cvae_mammo.preprocessing.imageio import read_grayscale

    meta = pd.read_csv(phantom_set.metadata_csv)
    lesions = pd.read_csv(phantom_set.lesions_csv)
    assert sorted(lesions["image_id"]) == sorted(meta.loc[meta["cancer"] == 1, "image_id"])
    for row in lesions.itertuples():
        path = phantom_set.dicom_dir / str(row.patient_id) / f"{row.image_id}.dcm"
        _, display = _display(path)
        mask = read_grayscale(phantom_set.root / row.mask_path) > 127
        assert mask.shape == display.shape
        rows, cols = np.nonzero(mask)
        assert (row.bbox_row0, row.bbox_col0) == (rows.min(), cols.min())
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & ~mask
        ring &= display > 0.2  # breast only
        assert display[mask].max() > display[ring].mean() + 0.15


def test_dataset_is_reproducible(phantom_set, tmp_path):
    from cvae_mammo.synthetic.dataset import make_phantom_dataset

    again = make_phantom_dataset(tmp_path, n_patients=8, positive_fraction=0.25,
                                 size=(192, 156), seed=4, progress=False)
    assert again.metadata_csv.read_text() == phantom_set.metadata_csv.read_text()
    first = sorted(phantom_set.dicom_dir.rglob("*.dcm"))[0]
    _, a = _display(first)
    _, b = _display(again.dicom_dir / first.relative_to(phantom_set.dicom_dir))
    np.testing.assert_array_equal(a, b)


def test_finished_set_is_reused_and_a_different_one_refused(phantom_set):
    from cvae_mammo.synthetic.dataset import make_phantom_dataset

    again = make_phantom_dataset(phantom_set.root, n_patients=8, positive_fraction=0.25,
                                 size=(192, 156), seed=4, progress=False)
    assert again == phantom_set
    with pytest.raises(FileExistsError, match="dicom"):
        make_phantom_dataset(phantom_set.root, n_patients=3, size=(192, 156), seed=4,
                             progress=False)


def test_lesion_masks_follow_the_preprocessing_crop_and_flip(phantom_set, tmp_path):
    import pandas as pd

    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig
    from cvae_mammo.preprocessing.imageio import read_grayscale
    from cvae_mammo.synthetic.dataset import lesion_masks_in_dataset

    dataset = tmp_path / "dataset"
    preprocess_dataset(phantom_set.dicom_dir, dataset, PreprocessConfig(image_size=(128, 64)),
                       metadata=phantom_set.metadata_csv, workers=1, progress=False)
    folder = lesion_masks_in_dataset(phantom_set, dataset)
    manifest = pd.read_csv(dataset / "manifest.csv", dtype={"image_id": str})
    positives = manifest[manifest["label"] == 1]
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(positives["image_id"])
    assert positives["flipped"].astype(bool).any()  # R breasts: the flip is exercised
    for row in positives.itertuples():
        image = read_grayscale(dataset / row.path).astype(float) / 255
        mask = read_grayscale(folder / f"{row.image_id}.png") > 127
        assert mask.shape == image.shape == (128, 64)
        ring = cv2.dilate(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) & ~mask
        ring &= image > 0.1
        assert image[mask].max() > image[ring].mean() + 0.1
        # brighter where the mask says than in its mirror image (a wrong flip would swap them)
        assert image[mask].mean() > image[mask[:, ::-1]].mean() + 0.03
