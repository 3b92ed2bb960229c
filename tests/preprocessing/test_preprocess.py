"""The preprocessing batch runner and CLI: dataset folder, metadata join, resume, shards, bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from cvae_mammo.cli import main
from cvae_mammo.errors import InputError
from cvae_mammo.preprocessing.batch import preprocess_dataset
from cvae_mammo.preprocessing.image import PreprocessConfig
from cvae_mammo.preprocessing.imageio import read_grayscale
from cvae_mammo.preprocessing.manifest import CORE_COLUMNS, PROVENANCE_COLUMNS
from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom
from tests.preprocessing.test_dicom import breast_phantom

SMALL = PreprocessConfig(image_size=(64, 32))


def test_preprocessing_never_imports_tensorflow() -> None:
    code = ("import sys, cvae_mammo.preprocessing.batch, cvae_mammo.cli.preprocess; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_round_trip_and_validation(tmp_path: Path) -> None:
    config = PreprocessConfig(image_size="128x64", bits=16, resize="keep-aspect")
    config.save(tmp_path / "c.json")
    assert PreprocessConfig.load(tmp_path / "c.json") == config
    assert config.settings_hash() == config.replace(label_column="cancer").settings_hash()
    assert config.settings_hash() != config.replace(bits=8).settings_hash()
    with pytest.raises(InputError, match="bits"):
        PreprocessConfig(bits=12)
    with pytest.raises(InputError, match="HEIGHTxWIDTH"):
        PreprocessConfig(image_size="big")


def _mias_subset(mias_dir: Path, tmp_path: Path) -> list[Path]:
    names = ("mdb001", "mdb002", "mdb009", "mdb010")
    return [mias_dir / "images" / f"{name}.png" for name in names]


def test_mini_mias_dataset_with_generic_metadata(mias_dir: Path, tmp_path: Path) -> None:
    files = _mias_subset(mias_dir, tmp_path)
    metadata = pd.DataFrame({
        "image_id": ["mdb001", "mdb002", "mdb009", "mdb999"],
        "patient_id": ["w1", "w1", "w5", "w9"],
        "label": ["1", "0", "", "0"],
        "background_tissue": ["G", "G", "F", "D"],
        "tissue_note": ["x", "y", "z", "w"],
        "PatientName": ["Doe^Jane"] * 4,
    })
    metadata.to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "ds"
    summary = preprocess_dataset(files, out, config=SMALL, metadata=tmp_path / "meta.csv",
                                 workers=1, progress=False)
    assert (summary.processed, summary.failed) == (4, 0)
    assert (summary.metadata_without_image, summary.images_without_metadata) == (1, 1)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(manifest.columns) == [*CORE_COLUMNS, "background_tissue", *PROVENANCE_COLUMNS]
    assert "PatientName" not in manifest.columns and "tissue_note" not in manifest.columns
    assert "Doe" not in (out / "manifest.csv").read_text()
    rows = manifest.set_index("image_id")
    assert rows.loc["mdb001", "patient_id"] == "w1" and rows.loc["mdb010", "patient_id"] == "mdb010"
    assert rows["label"].to_dict() == {"mdb001": "1", "mdb002": "0", "mdb009": "", "mdb010": ""}
    assert rows.loc["mdb009", "background_tissue"] == "F"
    # Laterality is not recorded for mini-MIAS: it comes from the pixels, opposite in a pair.
    assert set(rows["laterality_source"]) == {"pixels"}
    assert rows.loc["mdb001", "laterality"] != rows.loc["mdb002", "laterality"]
    assert rows.loc["mdb001", "prediction_id"] == f"w1_{rows.loc['mdb001', 'laterality']}"
    for image_id, row in rows.iterrows():
        image = read_grayscale(out / row["path"])
        assert image.shape == (64, 32) and image.dtype == np.uint8
        assert row["path"] == f"images/{row['patient_id']}/{image_id}.png"
        # Every breast now has its chest wall (the heavier side) on the left.
        assert image[:, :16].sum() > image[:, 16:].sum()
    unmatched = pd.read_csv(out / "unmatched.csv", dtype=str)
    assert sorted(zip(unmatched["kind"], unmatched["image_id"])) == [
        ("image_without_metadata", "mdb010"), ("metadata_without_image", "mdb999")]
    settings = json.loads((out / "preprocess.json").read_text())
    assert settings["config"]["image_size"] == [64, 32]
    assert settings["package_versions"]["pydicom"]
    assert settings["summary"]["processed"] == 4


def test_resume_skips_finished_images_and_survives_a_killed_run(mias_dir: Path,
                                                               tmp_path: Path) -> None:
    files = _mias_subset(mias_dir, tmp_path)
    out = tmp_path / "ds"
    first = preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    assert first.processed == 4
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    second = preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    assert (second.processed, second.resumed) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # A run killed after writing a PNG but before its record: only that image is redone.
    (out / "records" / "mdb002" / "mdb002.json").unlink()
    third = preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    assert (third.processed, third.resumed) == (1, 3)
    assert len(pd.read_csv(out / "manifest.csv")) == 4
    # Different pixel settings: everything is redone.
    fourth = preprocess_dataset(files, out, config=SMALL.replace(bits=16), workers=1,
                                progress=False)
    assert fourth.processed == 4
    assert read_grayscale(out / "images" / "mdb001" / "mdb001.png").dtype == np.uint16


def _bad_inputs(folder: Path) -> dict[str, str]:
    """Write one good DICOM and one file per kind of bad input; returns name -> failing stage."""
    folder.mkdir(parents=True)
    pixels, _ = breast_phantom()
    good = write_mammogram_dicom(folder / "good.dcm", pixels, transfer_syntax="jpeg2000",
                                 window=(2048, 4096), patient_id="p1", image_id="i1")
    shutil.copy(good, folder / "noextension")  # DICOM without suffix: found by its preamble
    cut = write_mammogram_dicom(folder / "truncated.dcm", pixels, transfer_syntax="jpeg2000",
                                patient_id="p2", image_id="i2")
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # cut mid-pixel-data
    (folder / "notes.dcm").write_text("not a DICOM at all")
    (folder / "README").write_text("ignored: no suffix and no DICOM preamble")
    ds = pydicom.dcmread(good)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    del ds.PixelData
    ds.save_as(folder / "nopixels.dcm")
    plain = write_mammogram_dicom(folder / "plain.dcm", pixels)
    ds = pydicom.dcmread(plain)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not supported
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    ds.save_as(folder / "mpeg.dcm")
    ds = pydicom.dcmread(plain)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = np.repeat(pixels[..., None], 3, axis=2).tobytes()
    ds.save_as(folder / "rgb.dcm")
    ds = pydicom.dcmread(plain)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.NumberOfFrames = 2
    ds.PixelData = pixels.tobytes() * 2
    ds.save_as(folder / "frames.dcm")
    rgb = np.zeros((40, 30, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(folder / "colour.png")
    Image.fromarray(np.zeros((40, 30), dtype=np.uint8)).save(folder / "blank.png")
    plain.unlink()
    return {"truncated.dcm": "read", "notes.dcm": "read", "nopixels.dcm": "read",
            "mpeg.dcm": "decode", "rgb.dcm": "read", "frames.dcm": "read",
            "colour.png": "read", "blank.png": "crop"}


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    stages = _bad_inputs(tmp_path / "in")
    out = tmp_path / "ds"
    status = main(["preprocess", str(tmp_path / "in"), "--out", str(out), "--size", "64x32",
                   "--workers", "2", "--no-progress"])
    assert status == 0
    line = capsys.readouterr().out
    assert "1 processed" in line and f"{len(stages) + 1} failed" in line
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert list(failures.columns) == ["source", "stage", "reason"]
    got = {Path(source).name: stage for source, stage in zip(failures["source"],
                                                            failures["stage"])}
    # noextension is a copy of good.dcm: same ids from its tags, so it is a duplicate.
    assert got.pop("noextension") == "ids"
    assert got == stages
    reasons = dict(zip(failures["source"].map(lambda s: Path(s).name), failures["reason"]))
    assert "truncated" in reasons["truncated.dcm"] and "colour" in reasons["rgb.dcm"]
    assert "multi-frame" in reasons["frames.dcm"] and "unsupported" in reasons["mpeg.dcm"]
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 1 and manifest.loc[0, "patient_id"] == "p1"
    assert manifest.loc[0, "transfer_syntax"] == "1.2.840.10008.1.2.4.90"

    only_bad = [str(tmp_path / "in" / name) for name in stages]
    assert main(["preprocess", *only_bad, "--out", str(tmp_path / "bad"),
                 "--no-progress"]) == 1
    assert main(["preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2


def test_rsna_dicom_with_train_csv(rsna_dicom: Path, rsna_train_csv: Path,
                                   tmp_path: Path) -> None:
    out = tmp_path / "ds"
    summary = preprocess_dataset([rsna_dicom.parent], out,
                                 config=PreprocessConfig(image_size=(256, 128)),
                                 metadata=rsna_train_csv, workers=1, progress=False)
    assert summary.processed == 1 and summary.images_without_metadata == 0
    assert summary.metadata_without_image == 54_705
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    row = manifest.iloc[0]
    truth = pd.read_csv(rsna_train_csv, dtype=str, keep_default_na=False)
    truth = truth[truth["image_id"] == "200779059"].iloc[0]
    assert (row["image_id"], row["patient_id"], row["laterality"], row["view"]) == (
        "200779059", "36", truth["laterality"], truth["view"])
    assert row["label"] == truth["cancer"] and row["prediction_id"] == "36_R"
    for column in ("age", "site_id", "machine_id", "BIRADS", "density", "biopsy",
                   "difficult_negative_case"):
        assert row[column] == truth[column]
    assert (row["flipped"], row["laterality_tag_disagrees"]) == ("1", "0")
    assert (row["original_height"], row["original_width"]) == ("2776", "2082")
    # The coarsest JPEG 2000 level whose crop still covers the 256x128 output.
    crop_h = int(row["crop_y1"]) - int(row["crop_y0"])
    crop_w = int(row["crop_x1"]) - int(row["crop_x0"])
    # (Pillow's OpenJPEG cannot reduce this file by 8, so level 2 is the coarsest it offers.)
    level = min(2, math.floor(math.log2(min(crop_h / 256, crop_w / 128))))
    assert float(row["decode_scale"]) == 0.5**level and level >= 1
    image = read_grayscale(out / row["path"])
    assert image.shape == (256, 128) and image[:, :64].sum() > image[:, 64:].sum()


def test_shards_workers_and_ids(tmp_path: Path) -> None:
    pixels, _ = breast_phantom()
    inputs = tmp_path / "rsna_layout"
    for patient, image in (("10", "100"), ("10", "101"), ("11", "110"), ("12", "120")):
        write_mammogram_dicom(inputs / patient / f"{image}.dcm", pixels,
                              transfer_syntax="jpeg-lossless", window=(2048, 4096),
                              laterality="L", view="MLO", patient_id="tag", image_id=image)
    tagged = write_mammogram_dicom(tmp_path / "other" / "scan.dcm", pixels, patient_id="P-7",
                                   image_id="x", transfer_syntax="rle")
    out = tmp_path / "ds"
    first = preprocess_dataset([inputs, tagged.parent], out, config=SMALL, shard="0/2",
                               workers=2, progress=False)
    assert first.processed == 3
    assert len(pd.read_csv(out / "manifest.csv")) == 3
    second = preprocess_dataset([inputs, tagged.parent], out, config=SMALL, shard=(1, 2),
                                workers=1, progress=False)
    assert second.processed == 2
    manifest = pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)
    assert len(manifest) == 5
    layout = manifest[manifest["patient_id"] != "P-7"]
    assert sorted(layout["image_id"]) == ["100", "101", "110", "120"]
    assert set(layout["laterality_source"]) == {"dicom"} and set(layout["view"]) == {"MLO"}
    # Outside the RSNA layout, the ids come from the DICOM tags.
    other = manifest[manifest["patient_id"] == "P-7"].iloc[0]
    assert other["image_id"] == pydicom.dcmread(tagged).SOPInstanceUID


def test_keep_aspect_16_bit_and_pectoral(mias_dir: Path, tmp_path: Path) -> None:
    config = PreprocessConfig(image_size=(64, 64), bits=16, resize="keep-aspect",
                              remove_pectoral=True)
    out = tmp_path / "ds"
    preprocess_dataset([mias_dir / "images" / "mdb001.png"], out, config=config, workers=1,
                       progress=False)
    row = pd.read_csv(out / "manifest.csv").iloc[0]
    image = read_grayscale(out / row["path"])
    assert image.dtype == np.uint16 and image.shape == (64, 64)
    # A tall breast keeps its aspect: the columns away from the chest wall are padding.
    assert image[:, -8:].max() == 0 and image[:, :8].max() > 0
    assert row["pectoral_removed"] == 1
    # The masked wedge leaves the top-left corner dark.
    assert image[:4, :4].max() == 0


def test_workers_fall_back_when_main_cannot_be_reimported(tmp_path: Path) -> None:
    # Code piped to python on stdin has a __main__ that worker processes cannot import;
    # the run must finish in-process instead of respawning dead workers forever.
    pixels, _ = breast_phantom()
    for image in ("1", "2"):
        write_mammogram_dicom(tmp_path / "in" / "5" / f"{image}.dcm", pixels,
                              window=(2048, 4096))
    code = (
        "from cvae_mammo.preprocessing.batch import PreprocessConfig, preprocess_dataset\n"
        f"s = preprocess_dataset([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, "
        "PreprocessConfig(image_size=(64, 32)), workers=2, progress=False)\n"
        "assert s.processed == 2, s\n"
    )
    subprocess.run([sys.executable, "-"], input=code, text=True, check=True, timeout=300,
                   capture_output=True)
    assert len(pd.read_csv(tmp_path / "out" / "manifest.csv")) == 2


def _phantom_pngs(folder: Path, names: list[str]) -> list[Path]:
    """8-bit PNG breast phantoms (each a little different) named ``<name>.png``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        pixels, _ = breast_phantom(120 + 8 * index, 90)
        path = folder / f"{name}.png"
        Image.fromarray((pixels >> 4).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_rerun_on_a_subset_or_on_copies_keeps_every_image(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "in", ["i1", "i2", "i3", "i4"])
    out = tmp_path / "ds"
    assert preprocess_dataset(files, out, config=SMALL, workers=1, progress=False).processed == 4
    subset = preprocess_dataset(files[:1], out, config=SMALL, workers=1, progress=False)
    assert (subset.resumed, subset.in_manifest) == (1, 4)
    assert sorted(pd.read_csv(out / "manifest.csv", dtype=str)["image_id"]) == [
        "i1", "i2", "i3", "i4"]
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in files[2:]:
        shutil.copy(path, copies / path.name)
    rerun = preprocess_dataset([copies], out, config=SMALL, workers=1, progress=False)
    assert (rerun.failed, rerun.in_manifest) == (2, 4)
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert set(failures["stage"]) == {"ids"} and failures["reason"].str.contains("duplicate").all()
    assert len(pd.read_csv(out / "manifest.csv")) == 4


def test_new_metadata_moves_an_image_to_its_patient_without_leaving_a_copy(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "in", ["i1", "i2"])
    out = tmp_path / "ds"
    preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    metadata = pd.DataFrame({"image_id": ["i1", "i2"], "patient_id": ["w", "w"]})
    summary = preprocess_dataset(files, out, config=SMALL, metadata=metadata, workers=1,
                                 progress=False)
    assert summary.in_manifest == 2
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == [
        "images/w/i1.png", "images/w/i2.png"]
    assert set(pd.read_csv(out / "manifest.csv", dtype=str)["patient_id"]) == {"w"}


def test_distinct_ids_are_never_merged(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "in", ["乳腺1", "乳房1", "a b", "a_b"])
    metadata = pd.DataFrame({"image_id": ["乳腺1", "乳房1", "a b", "a_b"],
                             "patient_id": ["a/b", "a/b", "a_b", "a_b"]})
    out = tmp_path / "ds"
    summary = preprocess_dataset(files, out, config=SMALL, metadata=metadata, workers=2,
                                 progress=False)
    assert (summary.processed, summary.failed, summary.images_without_metadata) == (4, 0, 0)
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert manifest["image_id"].nunique() == 4 and manifest["patient_id"].nunique() == 2
    for _, row in manifest.iterrows():
        assert (out / row["path"]).is_file()
        assert Path(row["path"]).parent.parent.name == "images"  # no id left its folder


def test_resume_remakes_a_damaged_png_and_leaves_out_one_it_cannot(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "in", ["i1", "i2", "i3"])
    out = tmp_path / "ds"
    preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    png = out / "images" / "i1" / "i1.png"
    good = png.read_bytes()
    png.write_bytes(good[: len(good) // 2])  # cut by a full disk or a kill during a copy
    again = preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    assert (again.processed, again.resumed) == (1, 2)
    assert png.read_bytes() == good
    # Damaged while its source is not part of the rerun: left out of the manifest and reported.
    (out / "images" / "i2" / "i2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    subset = preprocess_dataset(files[2:], out, config=SMALL, workers=1, progress=False)
    assert subset.in_manifest == 2
    failures = pd.read_csv(out / "failures.csv", dtype=str)
    assert failures["reason"].str.contains("images/i2/i2.png is missing or damaged").any()
    fixed = preprocess_dataset(files[1:2], out, config=SMALL, workers=1, progress=False)
    assert (fixed.processed, fixed.in_manifest) == (1, 3)
    assert pd.read_csv(out / "failures.csv").empty


def test_bad_metadata_fails_before_the_dataset_folder_is_made(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "in", ["i1"])
    metadata = pd.DataFrame({"image_id": ["i1", "i1"], "patient_id": ["p1", "p2"]})
    with pytest.raises(InputError, match="image i1 is listed with patient_id"):
        preprocess_dataset(files, tmp_path / "ds", config=SMALL, metadata=metadata,
                           workers=1, progress=False)
    assert not (tmp_path / "ds").exists()


def test_moved_inputs_take_over_their_ids(tmp_path: Path) -> None:
    files = _phantom_pngs(tmp_path / "old", ["i1", "i2"])
    out = tmp_path / "ds"
    preprocess_dataset(files, out, config=SMALL, workers=1, progress=False)
    (tmp_path / "old").rename(tmp_path / "new")
    moved = preprocess_dataset([tmp_path / "new"], out, config=SMALL, workers=1, progress=False)
    assert (moved.processed, moved.failed, moved.in_manifest) == (2, 0, 2)
    sources = pd.read_csv(out / "manifest.csv", dtype=str)["source_file"]
    assert all(Path(source).parent == tmp_path / "new" for source in sources)
