"""Run folders of the CVAE and the classifier (layout: the README's "Folder formats").

A run folder holds::

    config.json     everything needed to rebuild the model and its preprocessing:
                    model_type ("cvae" | "classifier"), image_size [H, W],
                    normalisation, conditioning {columns, encoder}, model, training
    metadata.json   package versions, sha256 of the dataset's manifest.csv and
                    splits.csv, seed, command line, creation time
    model.keras     the trained model (keras.models.load_model round-trips)
    history.csv, logs/ (TensorBoard), checkpoints/ (per-epoch, for --resume)

:func:`prepare_run_dir` refuses to reuse a folder that already holds a run
unless resuming that same run on the same data: a resume whose dataset
manifest or split file differs from the ones in ``metadata.json`` is refused
unless ``allow_data_change`` (``--allow-data-change``), and then
``metadata.json`` keeps the earlier hashes under ``earlier_data`` so the
report's split check still sees them. :func:`load_run_model` and
:func:`load_run_encoder` rebuild what predict needs from the folder alone.
TensorFlow is imported only by :func:`load_keras_model`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import shlex
import sys
import zipfile
from pathlib import Path
from typing import Any

from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_json, file_sha256, package_versions, read_json

LOGGER = logging.getLogger(__name__)
CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"
MODEL_NAME = "model.keras"

#: model_type -> module whose import registers the model's Keras objects.
MODEL_MODULES: dict[str, str] = {
    "cvae": "cvae_mammo.models.cvae",
    "classifier": "cvae_mammo.models.classifier",
}

#: metadata.json keys holding the dataset's file hashes -> the file each hashes.
DATA_FILES: dict[str, str] = {"manifest_sha256": "manifest.csv", "splits_sha256": "splits.csv"}

#: How images reach the models: PNG pixels divided by the dtype's maximum (data.read_image).
DEFAULT_NORMALISATION: dict[str, Any] = {
    "input_range": [0.0, 1.0],
    "method": "pixel / dtype max (255 for 8-bit, 65535 for 16-bit PNG)",
    "channels": 1,
}


def run_config(
    model_type: str,
    image_size: tuple[int, int],
    model: dict[str, Any],
    training: dict[str, Any],
    encoder: MetadataEncoder | None = None,
    normalisation: dict[str, Any] | None = None,
    preprocessing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` payload of a run.

    ``preprocessing`` is the training dataset's preprocessing settings
    (:func:`dataset_preprocessing`), so a :class:`~cvae_mammo.inference.detector.Detector`
    preprocesses raw files exactly as the training images were.
    """
    if model_type not in MODEL_MODULES:
        raise ValueError(f"model_type {model_type!r}: choose one of {', '.join(MODEL_MODULES)}")
    return {
        "model_type": model_type,
        "image_size": [int(image_size[0]), int(image_size[1])],
        "normalisation": dict(normalisation or DEFAULT_NORMALISATION),
        "conditioning": {
            "columns": list(encoder.columns) if encoder is not None else [],
            "encoder": encoder.to_dict() if encoder is not None else None,
        },
        "model": model,
        "training": training,
        "preprocessing": preprocessing,
    }


def dataset_preprocessing(dataset_dir: PathLike) -> dict[str, Any] | None:
    """The ``config`` section of a dataset folder's ``preprocess.json``; None when it has none
    (a dataset made by other tools)."""
    path = Path(dataset_dir) / "preprocess.json"
    return read_json(path).get("config") if path.is_file() else None


def prepare_run_dir(out_dir: PathLike, config: dict[str, Any], resume: bool = False,
                    dataset_dir: PathLike | None = None,
                    allow_data_change: bool = False) -> Path:
    """Create ``out_dir`` and write ``config.json``; on resume check it matches the saved one.

    Everything is checked before anything is written. Raises
    :class:`FileExistsError` when the folder already holds a run (or other
    files) and ``resume`` is false, and :class:`InputError` when resuming with
    a different model type, image size, normalisation, model or conditioning,
    or (given ``dataset_dir``) on a dataset whose manifest or split file
    differs from the run's, unless ``allow_data_change``. The ``training``
    section may differ and is rewritten.
    """
    run_dir = Path(out_dir)
    config_path = run_dir / CONFIG_NAME
    if config_path.is_file():
        if not resume:
            raise FileExistsError(
                f"{run_dir}: already holds a run ({CONFIG_NAME} exists); pass --resume to "
                "continue it or choose another --out")
        saved = _read_run_json(config_path)
        wanted = json.loads(json.dumps(config))  # tuples -> lists, as saved
        for key in ("model_type", "image_size", "normalisation", "model", "conditioning"):
            if saved.get(key) != wanted.get(key):
                raise InputError(
                    f"{config_path}: cannot resume, '{key}' differs from this run's "
                    f"(saved {saved.get(key)!r}, now {wanted.get(key)!r})")
        if dataset_dir is not None:
            _check_same_data(run_dir, dataset_dir, allow_data_change)
        atomic_write_json(config_path, config)  # the training section may change (e.g. epochs)
        return run_dir
    if resume:
        raise InputError(f"{run_dir}: nothing to resume ({CONFIG_NAME} not found)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: folder exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, config)
    return run_dir


def dataset_hashes(dataset_dir: PathLike | None) -> dict[str, str | None]:
    """SHA-256 of the dataset's ``manifest.csv`` and ``splits.csv`` (None when absent)."""
    hashes: dict[str, str | None] = dict.fromkeys(DATA_FILES)
    if dataset_dir is not None:
        for key, name in DATA_FILES.items():
            path = Path(dataset_dir) / name
            hashes[key] = file_sha256(path) if path.is_file() else None
    return hashes


def _check_same_data(run_dir: Path, dataset_dir: PathLike, allow_data_change: bool) -> None:
    """Refuse to resume on another manifest or split file than the run was trained on."""
    metadata_path = run_dir / METADATA_NAME
    saved = _read_run_json(metadata_path) if metadata_path.is_file() else {}
    now = dataset_hashes(dataset_dir)
    changed = [f"{Path(dataset_dir) / DATA_FILES[key]} (sha256 {str(saved.get(key))[:12]} in "
               f"{METADATA_NAME}, now {str(value)[:12]})"
               for key, value in now.items() if saved.get(key) != value]
    if not changed:
        return
    text = f"{metadata_path}: this run was trained on other data: {'; '.join(changed)}"
    if not allow_data_change:
        raise InputError(f"{text}; cannot resume (pass --allow-data-change to continue on the "
                         "new data anyway)")
    LOGGER.warning("%s; resuming anyway (--allow-data-change): %s keeps the earlier hashes",
                   text, METADATA_NAME)


def write_run_metadata(
    run_dir: PathLike,
    dataset_dir: PathLike | None,
    seed: int,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metadata.json``: versions, dataset/split hashes, seed and command line.

    When the run already had a ``metadata.json`` with other dataset hashes (a
    resume allowed to change its data), those are appended to ``earlier_data``.
    """
    run_dir = Path(run_dir)
    path = run_dir / METADATA_NAME
    previous = _read_run_json(path) if path.is_file() else {}
    hashes = dataset_hashes(dataset_dir)
    earlier = list(previous.get("earlier_data", []))
    if previous and any(previous.get(key) != value for key, value in hashes.items()):
        earlier.append({key: previous.get(key) for key in ("dataset_dir", *DATA_FILES)})
    payload = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_versions": package_versions(),
        "python": sys.version.split()[0],
        "dataset_dir": None if dataset_dir is None else str(Path(dataset_dir).resolve()),
        **hashes,
        "seed": int(seed),
        "command": shlex.join(command if command is not None else sys.argv),
        **({"earlier_data": earlier} if earlier else {}),
        **(extra or {}),
    }
    atomic_write_json(path, payload)
    return payload


def _read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's JSON file; a damaged one is an :class:`InputError` naming it."""
    try:
        values = read_json(path)
    except InputError as error:
        raise InputError(f"{path}: damaged run file ({' '.join(str(error).split())})") from error
    if not isinstance(values, dict):
        raise InputError(f"{path}: damaged run file (expected a JSON object)")
    return values


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run folder (FileNotFoundError naming it when absent)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder ({CONFIG_NAME} missing)")
    config = _read_run_json(path)
    if config.get("model_type") not in MODEL_MODULES:
        raise InputError(f"{path}: unknown model_type {config.get('model_type')!r}")
    return config


def read_run_metadata(run_dir: PathLike) -> dict[str, Any]:
    """The ``metadata.json`` of a run folder (FileNotFoundError naming it when absent)."""
    path = Path(run_dir) / METADATA_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: run metadata missing (is {run_dir} a run folder?)")
    return _read_run_json(path)


def load_run_encoder(run_dir: PathLike) -> MetadataEncoder | None:
    """The fitted metadata encoder of a conditioned run, None when unconditioned."""
    described = read_run_config(run_dir)["conditioning"].get("encoder")
    return None if described is None else MetadataEncoder.from_dict(described)


def load_keras_model(path: PathLike) -> Any:
    """Load a ``.keras`` file in Keras safe mode.

    A missing, truncated or damaged file, or one that safe mode refuses (e.g.
    a ``Lambda`` layer with Python code), is reported naming the file:
    :class:`FileNotFoundError` or :class:`InputError`.
    """
    from cvae_mammo.tf_startup import keras

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (training not finished?)")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a complete .keras model file (truncated or damaged); "
                         "retrain, or --resume from the checkpoints")
    try:
        return keras.models.load_model(path)
    except ValueError as error:
        message = " ".join(str(error).split())
        if "safe_mode" in message:
            raise InputError(f"{path}: refused by Keras safe mode (it holds Python code such "
                             f"as a Lambda layer, which could run anything): {message}") from error
        raise InputError(f"{path}: cannot load the model ({message})") from error


def load_run_model(run_dir: PathLike, model_file: PathLike | None = None) -> Any:
    """Load ``run_dir/model.keras`` (or ``model_file``) with the run's custom objects registered."""
    config = read_run_config(run_dir)
    importlib.import_module(MODEL_MODULES[config["model_type"]])
    return load_keras_model(model_file if model_file is not None else Path(run_dir) / MODEL_NAME)
