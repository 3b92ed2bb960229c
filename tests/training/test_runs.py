"""Run folders: resume refuses other data, damaged or unsafe model files are named errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.collect import check_split_hashes
from cvae_mammo.fileio import file_sha256, read_json
from cvae_mammo.training.runs import prepare_run_dir, run_config, write_run_metadata

CONFIG = run_config("cvae", (64, 32), {"filters": [8]}, {"epochs": 1})


def _dataset(folder: Path, split: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"image_id": ["1", "2"], "patient_id": ["a", "b"]}).to_csv(
        folder / "manifest.csv", index=False)
    pd.DataFrame({"image_id": ["1", "2"], "patient_id": ["a", "b"], "split": ["train", split],
                  "fold": [-1, -1]}).to_csv(folder / "splits.csv", index=False)
    return folder


def _started_run(tmp_path: Path, data: Path) -> Path:
    run = prepare_run_dir(tmp_path / "run", CONFIG, dataset_dir=data)
    write_run_metadata(run, data, seed=0, command=["fit-cvae"])
    return run


def test_resume_on_another_split_is_refused_and_metadata_kept(tmp_path: Path) -> None:
    data, other = _dataset(tmp_path / "ds", "val"), _dataset(tmp_path / "ds2", "test")
    run = _started_run(tmp_path, data)
    before = (run / "metadata.json").read_bytes()
    assert prepare_run_dir(run, CONFIG, resume=True, dataset_dir=data) == run  # same data: fine
    with pytest.raises(InputError, match=r"metadata\.json: this run was trained on other data"
                       ) as refused:
        prepare_run_dir(run, CONFIG, resume=True, dataset_dir=other)
    message = str(refused.value)
    # Only the split file differs (same manifest content), and the way out is named.
    assert "ds2/splits.csv" in message and "manifest.csv" not in message
    assert "--allow-data-change" in message
    assert (run / "metadata.json").read_bytes() == before


def test_allowed_data_change_keeps_the_earlier_split_for_the_report(tmp_path: Path) -> None:
    data, other = _dataset(tmp_path / "ds", "val"), _dataset(tmp_path / "ds2", "test")
    run = _started_run(tmp_path, data)
    prepare_run_dir(run, CONFIG, resume=True, dataset_dir=other, allow_data_change=True)
    write_run_metadata(run, other, seed=0, command=["fit-cvae", "--resume"])
    metadata = read_json(run / "metadata.json")
    assert metadata["splits_sha256"] == file_sha256(other / "splits.csv")
    assert metadata["earlier_data"] == [{
        "dataset_dir": str(data.resolve()), "manifest_sha256": file_sha256(data / "manifest.csv"),
        "splits_sha256": file_sha256(data / "splits.csv")}]
    with pytest.raises(InputError, match="also trained on other split files"):
        check_split_hashes([run], other)


def test_damaged_run_files_and_unsafe_models_are_named_errors(tmp_path: Path) -> None:
    keras = pytest.importorskip("keras")
    from cvae_mammo.training.runs import load_keras_model, read_run_config

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.save(tmp_path / "good.keras")
    whole = (tmp_path / "good.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[: len(whole) // 2])
    assert load_keras_model(tmp_path / "good.keras").count_params() == 10
    with pytest.raises(InputError, match=r"cut\.keras: not a complete \.keras model file"):
        load_keras_model(tmp_path / "cut.keras")
    lambda_model = keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2)])
    lambda_model.save(tmp_path / "lambda.keras")
    with pytest.raises(InputError, match=r"lambda\.keras: refused by Keras safe mode"):
        load_keras_model(tmp_path / "lambda.keras")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model_type": "cvae", ')
    with pytest.raises(InputError, match=r"config\.json: damaged run file"):
        read_run_config(tmp_path / "run")
