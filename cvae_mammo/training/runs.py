"""Run folders, shared by the CVAE and the classifier (contract in DESIGN.md).

A run folder holds::

    config.json     everything needed to rebuild the model and its preprocessing:
                    model_type ("cvae" | "classifier"), image_size [H, W],
                    normalisation, conditioning {columns, encoder}, model, training
    metadata.json   package versions, sha256 of the dataset's manifest.csv and
                    splits.csv, seed, command line, creation time
    model.keras     the trained model (keras.models.load_model round-trips)
    history.csv, logs/ (TensorBoard), checkpoints/ (per-epoch, for --resume)

:func:`prepare_run_dir` refuses to reuse a folder that already holds a run
unless resuming that same run. :func:`load_run_model` and
:func:`load_run_encoder` rebuild what predict needs from the folder alone.
TensorFlow is imported only by :func:`load_run_model`.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_json, file_sha256, package_versions, read_json

CONFIG_NAME = "config.json"
METADATA_NAME = "metadata.json"
MODEL_NAME = "model.keras"

#: model_type -> module whose import registers the model's Keras objects.
MODEL_MODULES: dict[str, str] = {
    "cvae": "cvae_mammo.models.cvae",
    "classifier": "cvae_mammo.models.classifier",
}

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
) -> dict[str, Any]:
    """The ``config.json`` payload of a run."""
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
    }


def prepare_run_dir(out_dir: PathLike, config: dict[str, Any], resume: bool = False) -> Path:
    """Create ``out_dir`` and write ``config.json``; on resume check it matches the saved one.

    Raises :class:`FileExistsError` when the folder already holds a run (or
    other files) and ``resume`` is false, and :class:`InputError` when
    resuming with a different model type, image size, normalisation, model
    or conditioning; the ``training`` section may differ and is rewritten.
    """
    run_dir = Path(out_dir)
    config_path = run_dir / CONFIG_NAME
    if config_path.is_file():
        if not resume:
            raise FileExistsError(
                f"{run_dir}: already holds a run ({CONFIG_NAME} exists); pass --resume to "
                "continue it or choose another --out")
        saved = read_json(config_path)
        wanted = json.loads(json.dumps(config))  # tuples -> lists, as saved
        for key in ("model_type", "image_size", "normalisation", "model", "conditioning"):
            if saved.get(key) != wanted.get(key):
                raise InputError(
                    f"{config_path}: cannot resume, '{key}' differs from this run's "
                    f"(saved {saved.get(key)!r}, now {wanted.get(key)!r})")
        atomic_write_json(config_path, config)  # the training section may change (e.g. epochs)
        return run_dir
    if resume:
        raise InputError(f"{run_dir}: nothing to resume ({CONFIG_NAME} not found)")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: folder exists and is not empty; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(config_path, config)
    return run_dir


def write_run_metadata(
    run_dir: PathLike,
    dataset_dir: PathLike | None,
    seed: int,
    command: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``metadata.json``: versions, dataset/split hashes, seed and command line."""
    run_dir = Path(run_dir)
    hashes: dict[str, str | None] = {"manifest_sha256": None, "splits_sha256": None}
    if dataset_dir is not None:
        for key, name in (("manifest_sha256", "manifest.csv"), ("splits_sha256", "splits.csv")):
            path = Path(dataset_dir) / name
            hashes[key] = file_sha256(path) if path.is_file() else None
    payload = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "package_versions": package_versions(),
        "python": sys.version.split()[0],
        "dataset_dir": None if dataset_dir is None else str(Path(dataset_dir).resolve()),
        **hashes,
        "seed": int(seed),
        "command": shlex.join(command if command is not None else sys.argv),
        **(extra or {}),
    }
    atomic_write_json(run_dir / METADATA_NAME, payload)
    return payload


def read_run_config(run_dir: PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run folder (FileNotFoundError naming it when absent)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a run folder ({CONFIG_NAME} missing)")
    config = read_json(path)
    if config.get("model_type") not in MODEL_MODULES:
        raise InputError(f"{path}: unknown model_type {config.get('model_type')!r}")
    return config


def load_run_encoder(run_dir: PathLike) -> MetadataEncoder | None:
    """The fitted metadata encoder of a conditioned run, None when unconditioned."""
    described = read_run_config(run_dir)["conditioning"].get("encoder")
    return None if described is None else MetadataEncoder.from_dict(described)


def load_run_model(run_dir: PathLike, model_file: PathLike | None = None) -> Any:
    """Load ``run_dir/model.keras`` (or ``model_file``) with the run's custom objects registered."""
    import keras

    config = read_run_config(run_dir)
    importlib.import_module(MODEL_MODULES[config["model_type"]])
    path = Path(model_file) if model_file is not None else Path(run_dir) / MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found (training not finished?)")
    return keras.models.load_model(path)
