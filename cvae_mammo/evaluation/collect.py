"""Gather several runs' scores on one split, for the side-by-side report.

:func:`collect_runs` reads each run's ``scores_<split>.csv`` (scoring the split
with the run first when the file is missing) and ``threshold.json``, takes the
labels, patients and breasts from the dataset's ``manifest.csv``, keeps the
labelled images every run scored, and returns one
:class:`~cvae_mammo.evaluation.report.RunScores` per run for
:func:`~cvae_mammo.evaluation.report.write_report`. Runs trained on different
split files (``splits_sha256`` in ``metadata.json``) are refused unless
``allow_different_splits``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, file_sha256
from cvae_mammo.training.runs import read_run_config, read_run_metadata

if TYPE_CHECKING:
    from cvae_mammo.evaluation.report import RunScores

LOGGER = logging.getLogger(__name__)

_ID_COLUMNS = {"image_id": str, "patient_id": str, "prediction_id": str}
_ALLOW_HINT = "pass --allow-different-splits to compare them anyway"


def check_split_hashes(run_dirs: Sequence[Path], data_dir: Path,
                       allow_different: bool = False) -> list[str]:
    """Refuse runs whose split files differ from each other or from the dataset's splits.csv,
    or that were resumed on another split file (``earlier_data`` in metadata.json).

    Returns warnings (the mismatches when ``allow_different``, or missing hashes).
    """
    metadata = {run_dir: read_run_metadata(run_dir) for run_dir in run_dirs}
    hashes = {run_dir: values.get("splits_sha256") for run_dir, values in metadata.items()}
    splits_path = data_dir / "splits.csv"
    problems = []
    resumed = [d.name for d, values in metadata.items()
               if any(e.get("splits_sha256") != hashes[d] for e in values.get("earlier_data", []))]
    if resumed:
        problems.append(f"run(s) {', '.join(resumed)} were also trained on other split files "
                        "(resumed with --allow-data-change; see earlier_data in metadata.json)")
    known = {h for h in hashes.values() if h}
    if len(known) > 1:
        listing = ", ".join(f"{d.name}: {str(h)[:12]}" for d, h in hashes.items())
        problems.append(f"the runs were trained on different split files ({listing})")
    if splits_path.is_file() and known:
        current = file_sha256(splits_path)
        differing = [d.name for d, h in hashes.items() if h and h != current]
        if differing:
            problems.append(f"{splits_path} is not the split file that run(s) "
                            f"{', '.join(differing)} were trained with")
    missing = [d.name for d, h in hashes.items() if not h]
    if missing:
        problems.append(f"run(s) {', '.join(missing)} record no splits_sha256 in metadata.json, "
                        "so their split file cannot be checked")
    if problems and not allow_different:
        raise InputError("; ".join(problems) + f"; {_ALLOW_HINT}")
    return problems


def load_manifest(data_dir: Path) -> pd.DataFrame:
    """``image_id, patient_id, prediction_id, label`` of the dataset's manifest.csv."""
    path = data_dir / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: dataset manifest not found")
    manifest = pd.read_csv(path, dtype=_ID_COLUMNS, keep_default_na=False, na_values=[""])
    missing = [c for c in ("image_id", "patient_id", "prediction_id", "label")
               if c not in manifest]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    if manifest["image_id"].duplicated().any():
        raise InputError(f"{path}: image_id {manifest['image_id'][manifest['image_id'].duplicated()].iloc[0]!r} "
                         "appears twice")
    labels = pd.to_numeric(manifest["label"], errors="coerce")
    if not labels.dropna().isin([0, 1]).all():
        raise InputError(f"{path}: column 'label' holds values other than 0, 1 or blank")
    return manifest.assign(label=labels)[["image_id", "patient_id", "prediction_id", "label"]]


def load_scores(run_dir: Path, data_dir: Path, split: str) -> pd.DataFrame:
    """``image_id, score`` of a run's scores_<split>.csv, scoring the split first if needed."""
    path = run_dir / f"scores_{split}.csv"
    if not path.is_file():
        LOGGER.info("%s missing: scoring split %r with the run", path, split)
        from cvae_mammo.inference.predict import predict_split
        from cvae_mammo.tf_startup import start_tensorflow

        start_tensorflow()

        predict_split(run_dir, data_dir, split)
    scores = pd.read_csv(path, dtype=_ID_COLUMNS, keep_default_na=False, na_values=[""])
    for column in ("image_id", "score"):
        if column not in scores:
            raise InputError(f"{path}: missing column {column!r}")
    values = pd.to_numeric(scores["score"], errors="coerce")
    if values.isna().any():
        bad = scores.loc[values.isna(), "image_id"].iloc[0]
        raise InputError(f"{path}: image {bad!r} has no numeric score")
    if scores["image_id"].duplicated().any():
        raise InputError(f"{path}: image_id {scores['image_id'][scores['image_id'].duplicated()].iloc[0]!r} "
                         "appears twice")
    return scores.assign(score=values)[["image_id", "score"]]


def _unique_names(run_dirs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    if names:
        if len(names) != len(run_dirs):
            raise InputError(f"got {len(names)} --name for {len(run_dirs)} --run")
        chosen = list(names)
    else:
        chosen = [d.resolve().name for d in run_dirs]
        if len(set(chosen)) != len(chosen):
            chosen = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in run_dirs]
    if len(set(chosen)) != len(chosen):
        raise InputError(f"run names {chosen} are not unique; give --name for each --run")
    return chosen


def collect_runs(run_dirs: Sequence[PathLike], data_dir: PathLike, split: str = "test",
                 names: Sequence[str] | None = None,
                 maps_dirs: Sequence[PathLike] | None = None,
                 allow_different_splits: bool = False) -> tuple[list[RunScores], list[str]]:
    """Load the runs' scores on their common labelled images; returns (runs, warnings)."""
    from cvae_mammo.evaluation.calibration import Calibration
    from cvae_mammo.evaluation.report import RunScores

    run_paths = [Path(d) for d in run_dirs]
    data_dir = Path(data_dir)
    names = _unique_names(run_paths, names)
    if maps_dirs and len(maps_dirs) > len(run_paths):
        raise InputError(f"got {len(maps_dirs)} --maps for {len(run_paths)} --run")
    warnings = check_split_hashes(run_paths, data_dir, allow_different_splits)
    manifest = load_manifest(data_dir)
    scored = {}
    for name, run_dir in zip(names, run_paths):
        scores = load_scores(run_dir, data_dir, split)
        unknown = sorted(set(scores["image_id"]) - set(manifest["image_id"]))
        if unknown:
            raise InputError(f"{run_dir / f'scores_{split}.csv'}: {len(unknown)} image(s) not in "
                             f"{data_dir / 'manifest.csv'} (first: {unknown[0]!r})")
        scored[name] = scores
    common = set.intersection(*(set(s["image_id"]) for s in scored.values()))
    for name, scores in scored.items():
        if len(scores) != len(common):
            warnings.append(f"{name}: {len(scores) - len(common)} scored image(s) not scored by "
                            f"every run were left out")
    table = manifest[manifest["image_id"].isin(common)]
    unlabelled = int(table["label"].isna().sum())
    if unlabelled:
        warnings.append(f"{unlabelled} image(s) without a label were left out")
    table = table.dropna(subset=["label"])
    runs = []
    for index, (name, run_dir) in enumerate(zip(names, run_paths)):
        threshold_path = run_dir / "threshold.json"
        calibration = Calibration.load(threshold_path) if threshold_path.is_file() else None
        if calibration is None:
            warnings.append(f"{name}: no threshold.json, so no metrics at a threshold")
        images = table.merge(scored[name], on="image_id", how="left").sort_values("image_id")
        maps = maps_dirs[index] if maps_dirs and index < len(maps_dirs) else None
        runs.append(RunScores(name=name, images=images.reset_index(drop=True),
                              calibration=calibration, maps_dir=Path(maps) if maps else None,
                              model_type=read_run_config(run_dir).get("model_type"),
                              run_dir=str(run_dir)))
    return runs, warnings
