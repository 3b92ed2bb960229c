"""Issue 15 replayed: every fault found by probing the commands, as a user met it.

Real commands (``cvae_mammo.cli.main``, the code behind ``cvae-mammo``) on a tiny
synthetic data set: 20 PNG breast phantoms of 10 women, preprocessed to 32x16,
and a 1-epoch CVAE. One test per item of the issue, numbered like it.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cvae_mammo.cli import main
from cvae_mammo.fileio import read_json
from tests.preprocessing.test_dicom import breast_phantom

WOMEN = 10
POSITIVE_WOMEN = (0, 3, 6)
TINY_CVAE = """\
image_size: [32, 16]
filters: [4, 8]
latent_channels: 2
batch_size: 4
epochs: 1
warmup_epochs: 0
beta_warmup_steps: 10
recon_every: 1
recon_images: 2
early_stopping_patience: 2
augment: null
"""


def _phantom_png(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels, _ = breast_phantom(112 + 4 * (seed % 5), 84, chest_wall=("left", "right")[seed % 2])
    noisy = (pixels >> 4).astype(np.int16) + rng.integers(-6, 7, pixels.shape)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)


def _preprocess(out: Path, *inputs: Path | str, metadata: Path | None = None) -> int:
    extra = ["--metadata", str(metadata)] if metadata else []
    return main(["preprocess", *map(str, inputs), "--out", str(out), "--size", "32x16",
                 "--workers", "1", "--no-progress", *extra])


def _one_line_error(capsys: pytest.CaptureFixture, *naming: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("cvae-mammo ") and ": error: " in err, err
    for text in naming:
        assert text in err, (text, err)
    return err


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ (20 phantoms), meta.csv, ds/ (preprocessed + splits.csv), tiny.yaml."""
    root = tmp_path_factory.mktemp("faults")
    (root / "images").mkdir()
    rows = []
    for woman in range(WOMEN):
        for side, laterality in enumerate("LR"):
            image_id = f"img{2 * woman + side:02d}"
            _phantom_png(root / "images" / f"{image_id}.png", 2 * woman + side)
            rows.append({"image_id": image_id, "patient_id": f"woman{woman}",
                         "laterality": laterality, "view": "MLO",
                         "cancer": int(woman in POSITIVE_WOMEN and side == 0)})
    pd.DataFrame(rows).to_csv(root / "meta.csv", index=False)
    assert _preprocess(root / "ds", root / "images", metadata=root / "meta.csv") == 0
    assert main(["split", str(root / "ds"), "--val", "0.2", "--test", "0.2", "--seed", "0"]) == 0
    (root / "tiny.yaml").write_text(TINY_CVAE)
    return root


@pytest.fixture(scope="module")
def trained_run(work: Path) -> Path:
    """A finished 1-epoch CVAE run on ``ds``."""
    pytest.importorskip("keras")
    run = work / "runs" / "cvae"
    assert main(["fit-cvae", "--data", str(work / "ds"), "--out", str(run), "--config",
                 str(work / "tiny.yaml"), "--xla", "off"]) == 0
    return run


def test_1_rerun_on_fewer_inputs_or_copies_loses_nothing(work: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    assert _preprocess(ds, work / "images") == 0
    assert _preprocess(ds, *sorted((work / "images").glob("*.png"))[:2]) == 0
    assert len(pd.read_csv(ds / "manifest.csv")) == 2 * WOMEN
    copies = tmp_path / "copies"
    copies.mkdir()
    for path in sorted((work / "images").glob("*.png"))[:2]:
        shutil.copy(path, copies / path.name)
    assert _preprocess(ds, copies) == 1  # nothing new could be processed
    assert len(pd.read_csv(ds / "manifest.csv")) == 2 * WOMEN
    assert len(list((ds / "images").rglob("*.png"))) == 2 * WOMEN


def test_2_split_with_a_relative_path(work: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(work / "ds", tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    assert main(["split", "ds", "--val", "0.2", "--test", "0.2"]) == 0
    assert (tmp_path / "ds" / "splits.csv").is_file()


def test_3_resume_on_other_data_is_refused(work: Path, trained_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "ds"
    shutil.copytree(work / "ds", other)
    assert main(["split", str(other), "--val", "0.2", "--test", "0.2", "--seed", "7"]) == 0
    capsys.readouterr()
    before = (trained_run / "metadata.json").read_bytes()
    assert main(["fit-cvae", "--data", str(other), "--out", str(trained_run), "--config",
                 str(work / "tiny.yaml"), "--epochs", "2", "--resume"]) == 2
    _one_line_error(capsys, "metadata.json", "splits.csv", "--allow-data-change")
    assert (trained_run / "metadata.json").read_bytes() == before


def test_4_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    pytest.importorskip("keras")
    from tests.training.test_common import stopped_epochs

    uninterrupted = stopped_epochs(tmp_path, None)
    assert [stopped_epochs(tmp_path, k) for k in (2, 4, 5)] == [uninterrupted] * 3


def test_5_errors_are_one_line_naming_the_file(work: Path, trained_run: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import keras

    cut = tmp_path / "cut"
    shutil.copytree(trained_run, cut)
    whole = (cut / "model.keras").read_bytes()
    (cut / "model.keras").write_bytes(whole[: len(whole) // 3])
    assert main(["predict", "--run", str(cut), "--data", str(work / "ds")]) == 2
    _one_line_error(capsys, f"{cut / 'model.keras'}: not a complete .keras model file")

    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    shutil.copy(trained_run / "config.json", unsafe / "config.json")
    keras.Sequential([keras.Input((32, 16, 1)), keras.layers.Lambda(lambda x: x * 2)]).save(
        unsafe / "model.keras")
    assert main(["predict", "--run", str(unsafe), "--data", str(work / "ds")]) == 2
    _one_line_error(capsys, "model.keras: refused by Keras safe mode")

    (tmp_path / "syntax.yaml").write_text("epochs: 2\n  batch_size: [4\n")
    (tmp_path / "types.yaml").write_text('epochs: "two"\n')
    for name, problem in (("syntax.yaml", "not valid YAML (line 2"),
                          ("types.yaml", "option 'epochs' must be int, got 'two'")):
        assert main(["fit-cvae", "--data", str(work / "ds"), "--out", str(tmp_path / name),
                     "--config", str(tmp_path / name)]) == 2
        _one_line_error(capsys, f"{tmp_path / name}: ", problem)


def test_6_a_failed_start_leaves_no_run_folder(work: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("keras")
    (tmp_path / "types.yaml").write_text('epochs: "two"\n')
    out = tmp_path / "run"
    assert main(["fit-cvae", "--data", str(work / "ds"), "--out", str(out), "--config",
                 str(tmp_path / "types.yaml")]) == 2
    assert not out.exists()
    positives = tmp_path / "positives"
    shutil.copytree(work / "ds", positives)
    manifest = pd.read_csv(positives / "manifest.csv", dtype=str)
    manifest.assign(label="1").to_csv(positives / "manifest.csv", index=False)
    capsys.readouterr()
    for command in ("fit-cvae", "fit-classifier"):
        assert main([command, "--data", str(positives), "--out", str(out), "--epochs", "1",
                     "--image-size", "32x16"]) == 2
        _one_line_error(capsys, "splits.csv: the train split")
        assert not out.exists()


def test_7_distinct_ids_are_never_merged(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    names = ["乳腺1", "乳房1", "scan 1", "scan_1"]
    for seed, name in enumerate(names):
        _phantom_png(tmp_path / "in" / f"{name}.png", seed)
    pd.DataFrame({"image_id": names, "patient_id": ["a/b", "a/b", "a_b", "a_b"],
                  "laterality": ["L", "R", "L", "R"]}).to_csv(tmp_path / "meta.csv", index=False)
    assert _preprocess(tmp_path / "ds", tmp_path / "in", metadata=tmp_path / "meta.csv") == 0
    manifest = pd.read_csv(tmp_path / "ds" / "manifest.csv", dtype=str)
    assert manifest["image_id"].nunique() == 4 and manifest["patient_id"].nunique() == 2
    assert manifest["prediction_id"].nunique() == 4  # four breasts, none pooled
    assert pd.read_csv(tmp_path / "ds" / "failures.csv").empty


def test_8_only_allowed_metadata_columns_reach_the_manifest(
        work: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meta = pd.read_csv(work / "meta.csv", dtype=str).assign(
        dob="1961-02-03", name="Jane Roe", **{"Patient Name": "Roe^Jane"},
        patient_birth_date="19610203", site_id="2", BIRADS="1")
    meta.to_csv(tmp_path / "meta.csv", index=False)
    with caplog.at_level(logging.WARNING):
        assert _preprocess(tmp_path / "ds", work / "images", metadata=tmp_path / "meta.csv") == 0
    text = (tmp_path / "ds" / "manifest.csv").read_text()
    for leaked in ("1961", "Roe", "dob", "Patient Name", "patient_birth_date", ",name"):
        assert leaked not in text
    assert {"site_id", "BIRADS", "cancer"} <= set(pd.read_csv(tmp_path / "ds" / "manifest.csv"))
    assert "dob, name, Patient Name, patient_birth_date" in caplog.text
    assert "1961" not in caplog.text and "Roe" not in caplog.text


def test_9_metadata_conflicts_are_loud(work: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture,
                                       caplog: pytest.LogCaptureFixture) -> None:
    meta = pd.read_csv(work / "meta.csv", dtype=str)
    second = meta.iloc[[4]].assign(patient_id="woman9")
    pd.concat([meta, second]).to_csv(tmp_path / "conflict.csv", index=False)
    assert _preprocess(tmp_path / "ds", work / "images", metadata=tmp_path / "conflict.csv") == 2
    _one_line_error(capsys, "conflict.csv: image img04 is listed with patient_id 'woman2' and "
                            "'woman9'")
    meta.drop(columns="patient_id").to_csv(tmp_path / "nopatient.csv", index=False)
    with caplog.at_level(logging.WARNING):
        assert _preprocess(tmp_path / "ds", work / "images",
                           metadata=tmp_path / "nopatient.csv") == 0
    assert "no patient_id column" in caplog.text and "its own patient" in caplog.text


def test_10_resume_checks_the_png_and_calibrate_checks_method_first(
        work: Path, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(work / "ds", ds)
    png = ds / pd.read_csv(ds / "manifest.csv", dtype=str)["path"].iloc[0]
    whole = png.read_bytes()
    png.write_bytes(whole[:-20])
    assert _preprocess(ds, work / "images", metadata=work / "meta.csv") == 0
    assert "1 processed, 19 skipped" in capsys.readouterr().out
    assert png.read_bytes() == whole
    # The model file is damaged too: the bad --method is reported before anything is scored.
    cut = tmp_path / "cut"
    shutil.copytree(trained_run, cut)
    (cut / "model.keras").write_bytes(b"PK")
    assert main(["calibrate", "--run", str(cut), "--data", str(work / "ds"), "--method",
                 "bogus"]) == 2
    err = _one_line_error(capsys, "bogus")
    assert "model.keras" not in err


def test_10_a_dicom_cut_inside_its_header_is_reported_as_truncated(tmp_path: Path) -> None:
    from cvae_mammo.synthetic.dicom_writer import write_mammogram_dicom

    pixels, _ = breast_phantom()
    path = write_mammogram_dicom(tmp_path / "in" / "cut.dcm", pixels, patient_id="p",
                                 image_id="i")
    path.write_bytes(path.read_bytes()[:400])
    assert _preprocess(tmp_path / "ds", path) == 1
    reason = pd.read_csv(tmp_path / "ds" / "failures.csv", dtype=str)["reason"].iloc[0]
    assert "truncated" in reason and "no pixel data" not in reason


def test_10_jpeg_bytes_in_a_png_file_are_recorded_as_jpeg(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pixels, _ = breast_phantom()
    encoded = io.BytesIO()
    Image.fromarray((pixels >> 4).astype(np.uint8)).save(encoded, "JPEG")
    (tmp_path / "in" / "photo.png").write_bytes(encoded.getvalue())
    assert _preprocess(tmp_path / "ds", tmp_path / "in") == 0
    assert read_json(tmp_path / "ds" / "records" / "photo" / "photo.json")[
        "transfer_syntax"] == "jpeg"
