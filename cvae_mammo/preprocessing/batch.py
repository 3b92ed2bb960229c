"""A dataset folder from many files: :func:`preprocess_dataset`.

A process pool over the inputs writes ``images/<patient_id>/<image_id>.png``
atomically and one provenance record per image in ``records/`` (after its PNG,
so a killed run resumes where it stopped), then ``manifest.csv``,
``failures.csv``, ``unmatched.csv`` (metadata rows without image and images
without metadata row) and ``preprocess.json`` (settings, summary, package
versions). Ids come from the metadata, the RSNA layout, DICOM tags or the file
name.

This module never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import pandas as pd

from cvae_mammo.errors import ImageReadError, InputError
from cvae_mammo.fileio import (
    PathLike,
    atomic_write_csv,
    atomic_write_json,
    package_versions,
    read_json,
)
from cvae_mammo.preprocessing.dicom import (
    is_dicom_file,
)
from cvae_mammo.preprocessing.image import PreprocessConfig, preprocess_image
from cvae_mammo.preprocessing.imageio import IMAGE_SUFFIXES, write_png
from cvae_mammo.preprocessing.manifest import Metadata, build_manifest, load_metadata

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- inputs and ids


def discover_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into the image and DICOM files to process.

    Folders contribute files with an image suffix, ``.dcm`` files, and files
    without a suffix that carry the DICOM preamble. Files named explicitly
    are always kept (a bad one is then recorded as a failure).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if not child.is_file() or child.name.startswith("."):
                    continue
                suffix = child.suffix.lower()
                if (suffix in IMAGE_SUFFIXES or suffix == ".dcm"
                        or (suffix == "" and is_dicom_file(child))):
                    found.append(child)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: input file or folder not found")
    unique = list(dict.fromkeys(found))
    return unique


def safe_id(text: str) -> str:
    """An id usable as a file name (characters other than ``A-Za-z0-9._-`` become ``_``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", str(text).strip()).strip(".")
    return cleaned or "unknown"


def path_ids(path: Path, lookup: dict[str, str]) -> tuple[str, str] | None:
    """Ids known without opening the file: the metadata (by file stem), then the RSNA layout."""
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if lookup.get(stem):
        return safe_id(stem), safe_id(lookup[stem])
    if path.parent.name.isdigit() and stem.isdigit():
        return stem, path.parent.name
    return None


def _ids_from_file(path: Path, lookup: dict[str, str]) -> tuple[str, str]:
    known = path_ids(path, lookup)
    if known:
        return known
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["PatientID", "SOPInstanceUID"])
            patient, uid = str(header.get("PatientID", "")), str(header.get("SOPInstanceUID", ""))
            if patient and uid:
                return safe_id(stem if stem in lookup else uid), safe_id(patient)
            if patient:
                return safe_id(stem), safe_id(patient)
        except Exception:  # unreadable header: the file name gives the ids, decoding will fail
            log.debug("no DICOM header ids in %s", path)
    return safe_id(stem), safe_id(stem)


# --------------------------------------------------------------------------- worker


_WORKER: dict[str, Any] = {}


def _init_worker(config: dict[str, Any], out_dir: str, views: dict[str, str],
                 single_thread: bool) -> None:
    if single_thread:
        cv2.setNumThreads(1)
    parsed = PreprocessConfig.from_dict(config)
    _WORKER.update(config=parsed, out_dir=Path(out_dir), views=views,
                   hash=parsed.settings_hash())


def _record_path(out_dir: Path, patient_id: str, image_id: str) -> Path:
    return out_dir / "records" / patient_id / f"{image_id}.json"


def _work(task: tuple[str, str, str]) -> dict[str, Any]:
    """Process one (file, image_id, patient_id) in a worker; returns a result dict, never raises."""
    path_text, image_id, patient_id = task
    path = Path(path_text)
    config: PreprocessConfig = _WORKER["config"]
    out_dir: Path = _WORKER["out_dir"]
    stage = "ids"
    try:
        record_file = _record_path(out_dir, patient_id, image_id)
        relative = f"images/{patient_id}/{image_id}.png"
        source = os.path.abspath(path_text)
        if record_file.is_file():
            previous = read_json(record_file)
            if previous.get("source_file") != source:
                return _failure(path_text, "ids", f"duplicate image_id {image_id} (patient "
                                f"{patient_id}) already produced from "
                                f"{previous.get('source_file')}", image_id)
            if previous.get("settings_hash") == _WORKER["hash"] and (out_dir / relative).is_file():
                return {"status": "resumed", "record": previous}
        stage = "process"
        processed = preprocess_image(path, config, view=_WORKER["views"].get(image_id))
        stage = "write"
        write_png(out_dir / relative, processed.image)
        record = {
            "image_id": image_id, "patient_id": patient_id, "path": relative,
            **processed.provenance, "source_file": source,
            "laterality_tag": processed.tags["laterality"], "view_tag": processed.tags["view"],
            "settings_hash": _WORKER["hash"],
        }
        atomic_write_json(record_file, record)
        return {"status": "processed", "record": record}
    except ImageReadError as error:
        return _failure(path_text, error.stage, error.reason, image_id)
    except Exception as error:
        return _failure(path_text, stage, f"{type(error).__name__}: {error}", image_id)


def _failure(source: str, stage: str, reason: str, image_id: str = "") -> dict[str, Any]:
    return {"status": "failed", "image_id": image_id,
            "failure": {"source": source, "stage": stage, "reason": reason.replace("\n", " ")}}



# --------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class PreprocessSummary:
    """Counts of one :func:`preprocess_dataset` run."""

    out_dir: str
    total: int = 0
    processed: int = 0
    resumed: int = 0
    failed: int = 0
    metadata_without_image: int = 0
    images_without_metadata: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when at least one image is in the dataset after this run."""
        return self.processed + self.resumed > 0

    def line(self) -> str:
        """The closing summary line."""
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        text = (f"preprocess: {self.processed} processed, {self.resumed} skipped (resumed), "
                f"{self.failed} failed of {self.total} in {self.seconds:.1f} s "
                f"({rate:.2f} images/s) -> {self.out_dir}")
        if self.metadata_without_image or self.images_without_metadata:
            text += (f"; {self.metadata_without_image} metadata rows without image, "
                     f"{self.images_without_metadata} images without metadata row "
                     "(see unmatched.csv)")
        return text


def _parse_shard(shard: tuple[int, int] | str | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not match:
            raise InputError(f"shard {shard!r}: expected i/N, e.g. 0/4")
        shard = (int(match.group(1)), int(match.group(2)))
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count}: need 0 <= i < N")
    return index, count


def _pool_context() -> multiprocessing.context.BaseContext:
    # Never plain fork: a child forked after OpenCV (or TensorFlow) started its thread
    # pool can deadlock. A fork server starts clean and forks cheap workers from there.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["cvae_mammo.preprocessing.batch"])
        return context
    return multiprocessing.get_context("spawn")


def _run_workers(tasks: list[tuple[str, str, str]], init_args: tuple[Any, ...], workers: int,
                 progress: bool) -> list[dict[str, Any]]:
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    results: dict[int, dict[str, Any]] = {}
    bar = tqdm(total=len(tasks), unit="img", desc="preprocess", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    try:
        if workers > 1 and len(tasks) > 1:
            try:
                with ProcessPoolExecutor(workers, mp_context=_pool_context(),
                                         initializer=_init_worker, initargs=init_args) as pool:
                    futures = {pool.submit(_work, task): i for i, task in enumerate(tasks)}
                    for future in as_completed(futures):
                        results[futures[future]] = future.result()
                        bar.update()
            except BrokenProcessPool as error:
                # e.g. a __main__ that worker processes cannot import (code read from stdin)
                log.warning("worker processes failed (%s); finishing in this process", error)
        _init_worker(*init_args[:-1], single_thread=False)
        for index, task in enumerate(tasks):
            if index not in results:
                results[index] = _work(task)
                bar.update()
    finally:
        bar.close()
    return [results[index] for index in range(len(tasks))]


def _gather_other_shards(out_dir: Path, sources: set[str], have: set[str]) -> list[dict]:
    records = []
    for record_file in sorted((out_dir / "records").rglob("*.json")):
        record = read_json(record_file)
        if record.get("source_file") in sources and record.get("source_file") not in have:
            records.append(record)
    return records


def preprocess_dataset(
    inputs: Sequence[PathLike] | PathLike,
    out_dir: PathLike,
    config: PreprocessConfig | None = None,
    metadata: PathLike | pd.DataFrame | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> PreprocessSummary:
    """Preprocess files and folders of mammograms into the dataset folder ``out_dir``.

    ``workers`` defaults to all cores; ``shard=(i, N)`` processes every N-th
    input starting at i (the manifest then gathers every shard finished so
    far in ``out_dir``); ``limit`` caps this run's images. Images already
    written with the same pixel settings are skipped (resume). Bad files are
    recorded in ``failures.csv`` and the run goes on.
    """
    started = time.perf_counter()
    config = config or PreprocessConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = load_metadata(metadata, config.label_column) if metadata is not None else None
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files = discover_inputs(inputs)
    if not files:
        raise InputError(f"no DICOM or image files found in {', '.join(map(str, inputs))}")
    shard = _parse_shard(shard)
    work = files[shard[0] :: shard[1]] if shard else files
    if limit is not None:
        work = work[: max(0, int(limit))]
    lookup = meta.lookup("patient_id") if meta else {}
    if meta is not None:
        lookup = {image_id: lookup.get(image_id, "") for image_id in meta.frame.index}
    views = meta.lookup("view") if meta else {}

    failures: list[dict[str, Any]] = []
    todo: list[tuple[str, str, str]] = []
    seen: dict[tuple[str, str], Path] = {}
    for path in work:
        ids = _ids_from_file(path, lookup)
        if ids in seen:
            failures.append(_failure(str(path), "ids", f"duplicate image_id {ids[0]} (patient "
                                     f"{ids[1]}); also from {seen[ids]}", ids[0]))
            continue
        seen[ids] = path
        todo.append((str(path), *ids))
    workers = max(1, min(int(workers or os.cpu_count() or 1), max(1, len(todo))))
    init_args = (config.to_dict(), str(out_dir), views, workers > 1)
    results = failures + _run_workers(todo, init_args, workers, progress)

    records = [r["record"] for r in results if "record" in r]
    if shard:
        sources = {os.path.abspath(p) for p in files}
        records += _gather_other_shards(out_dir, sources, {r["source_file"] for r in records})
    manifest = build_manifest(records, meta)
    atomic_write_csv(out_dir / "manifest.csv", manifest)
    failure_rows = pd.DataFrame([r["failure"] for r in results if r["status"] == "failed"],
                                columns=["source", "stage", "reason"])
    if shard and (out_dir / "failures.csv").is_file():
        earlier = pd.read_csv(out_dir / "failures.csv", dtype=str, keep_default_na=False)
        earlier = earlier[~earlier["source"].isin({str(p) for p in work})]
        failure_rows = pd.concat([earlier, failure_rows], ignore_index=True)
    atomic_write_csv(out_dir / "failures.csv", failure_rows)

    summary = PreprocessSummary(
        out_dir=str(out_dir), total=len(work),
        processed=sum(r["status"] == "processed" for r in results),
        resumed=sum(r["status"] == "resumed" for r in results),
        failed=sum(r["status"] == "failed" for r in results),
    )
    if meta is not None:
        unmatched = _unmatched(meta, records, results)
        atomic_write_csv(out_dir / "unmatched.csv", unmatched)
        counts = unmatched["kind"].value_counts()
        summary.metadata_without_image = int(counts.get("metadata_without_image", 0))
        summary.images_without_metadata = int(counts.get("image_without_metadata", 0))
    summary.seconds = time.perf_counter() - started
    atomic_write_json(out_dir / "preprocess.json", {
        "config": config.to_dict(),
        "settings_hash": config.settings_hash(),
        "inputs": [str(p) for p in inputs],
        "metadata": None if metadata is None else meta.source,
        "label_column": meta.label_column if meta else None,
        "workers": workers,
        "shard": list(shard) if shard else None,
        "limit": limit,
        "summary": dataclasses.asdict(summary),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "package_versions": package_versions(),
    })
    log.debug(summary.line())
    return summary


def _unmatched(meta: Metadata, records: list[dict[str, Any]],
               results: list[dict[str, Any]]) -> pd.DataFrame:
    seen = {r["image_id"] for r in records} | {r.get("image_id") for r in results}
    rows = [{"kind": "metadata_without_image", "image_id": image_id,
             "patient_id": meta.frame.at[image_id, "patient_id"]
             if "patient_id" in meta.frame.columns else "", "source_file": ""}
            for image_id in meta.frame.index if image_id not in seen]
    rows += [{"kind": "image_without_metadata", "image_id": r["image_id"],
              "patient_id": r["patient_id"], "source_file": r["source_file"]}
             for r in records if r["image_id"] not in meta.frame.index]
    return pd.DataFrame(rows, columns=["kind", "image_id", "patient_id", "source_file"])
