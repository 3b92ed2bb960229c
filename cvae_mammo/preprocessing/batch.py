"""A dataset folder from many files: :func:`preprocess_dataset`.

A process pool over the inputs writes ``images/<patient_id>/<image_id>.png``
atomically and one provenance record per image in ``records/`` (after its PNG,
with the PNG's size, so a killed run resumes where it stopped and a damaged PNG
is remade), then ``manifest.csv``, ``failures.csv``, ``unmatched.csv``
(metadata rows without image and images without metadata row) and
``preprocess.json`` (settings, summary, package versions).

The folder is the union of its runs: ``manifest.csv`` lists every record in
``records/`` whose PNG is intact (one row per image), whatever subset of the
inputs this run was given, and ``failures.csv`` keeps the failures of files
not retried since. Ids come from the metadata, the RSNA layout, DICOM tags or
the file name, made file-name safe and reversible by
:func:`~cvae_mammo.preprocessing.manifest.safe_id`; two files with one image id
are a failure, never a merge.

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
from cvae_mammo.preprocessing.manifest import (
    Metadata,
    build_manifest,
    load_metadata,
    original_id,
    safe_id,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- inputs and ids


def discover_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Expand files and folders (recursively) into the image and DICOM files to process.

    Folders contribute files with an image suffix, ``.dcm`` files, and files
    without a suffix that carry the DICOM preamble. Files named explicitly
    are always kept (a bad one is then recorded as a failure). Paths are
    made absolute here, once: records and failures name files by them.
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(os.path.abspath(item))
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


def path_ids(path: Path, lookup: dict[str, str]) -> tuple[str, str] | None:
    """Ids known without opening the file: the metadata (by file stem), then the RSNA layout."""
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if lookup.get(stem):
        return safe_id(stem), safe_id(lookup[stem])
    if path.parent.name.isdigit() and stem.isdigit():
        return stem, path.parent.name
    return None


def _ids_from_file(path: Path, lookup: dict[str, str]) -> tuple[str, str, bool]:
    """``(image_id, patient_id, own_patient)``; ``own_patient`` when no patient id was found."""
    known = path_ids(path, lookup)
    if known:
        return (*known, False)
    stem = path.stem if path.suffix.lower() in IMAGE_SUFFIXES | {".dcm"} else path.name
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        try:
            import pydicom

            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["PatientID", "SOPInstanceUID"])
            patient = str(header.get("PatientID", "")).strip()
            uid = str(header.get("SOPInstanceUID", "")).strip()
            if patient:
                return safe_id(stem if stem in lookup or not uid else uid), safe_id(patient), False
        except Exception:  # unreadable header: the file name gives the ids, decoding will fail
            log.debug("no DICOM header ids in %s", path)
    return safe_id(stem), safe_id(stem), True


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


def _image_path(patient_id: str, image_id: str) -> str:
    """Where an image's PNG goes, relative to the dataset folder."""
    return f"images/{patient_id}/{image_id}.png"


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk that closes every PNG


def png_intact(path: Path, size: int | None = None) -> bool:
    """Whether ``path`` starts and ends like a whole PNG (and has ``size`` bytes when given).

    Cheap enough for every image of a resumed run: one stat, two short reads.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_PNG_SIGNATURE))
            handle.seek(-len(_PNG_END), os.SEEK_END)
            tail = handle.read()
            length = handle.tell()
    except OSError:  # missing, unreadable, or shorter than the IEND chunk
        return False
    return head == _PNG_SIGNATURE and tail == _PNG_END and size in (None, length)


def _work(task: tuple[str, str, str]) -> dict[str, Any]:
    """Process one (file, image_id, patient_id) in a worker; returns a result dict, never raises."""
    path_text, image_id, patient_id = task
    path = Path(path_text)
    config: PreprocessConfig = _WORKER["config"]
    out_dir: Path = _WORKER["out_dir"]
    stage = "ids"
    try:
        record_file = _record_path(out_dir, patient_id, image_id)
        relative = _image_path(patient_id, image_id)
        previous = _read_record(record_file)
        if previous is not None:
            if _holder(previous) not in (None, path_text):  # another file has this id
                return _failure(path_text, "ids", f"duplicate image_id {image_id} (patient "
                                f"{patient_id}) already produced from "
                                f"{previous.get('source_file')}", image_id)
            if (previous.get("source_file") == path_text
                    and previous.get("settings_hash") == _WORKER["hash"]
                    and png_intact(out_dir / relative, previous.get("png_bytes"))):
                return {"status": "resumed", "record": previous}
        stage = "process"
        processed = preprocess_image(path, config, view=_WORKER["views"].get(original_id(image_id)))
        stage = "write"
        write_png(out_dir / relative, processed.image)
        record = {
            "image_id": image_id, "patient_id": patient_id, "path": relative,
            **processed.provenance, "source_file": path_text,
            "laterality_tag": processed.tags["laterality"], "view_tag": processed.tags["view"],
            "settings_hash": _WORKER["hash"], "png_bytes": (out_dir / relative).stat().st_size,
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


def _holder(record: dict[str, Any]) -> str | None:
    """The file that holds a record's image id: its source, unless that file is gone (moved)."""
    source = record.get("source_file")
    return source if source and os.path.exists(source) else None


def _read_record(path: Path) -> dict[str, Any] | None:
    """A provenance record, or None when it is missing or unreadable (the image is then redone)."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "image_id" in record else None


# --------------------------------------------------------------------------- dataset


@dataclasses.dataclass
class PreprocessSummary:
    """Counts of one :func:`preprocess_dataset` run."""

    out_dir: str
    total: int = 0
    processed: int = 0
    resumed: int = 0
    failed: int = 0
    in_manifest: int = 0
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
                f"({rate:.2f} images/s) -> {self.out_dir} ({self.in_manifest} images in "
                "manifest.csv)")
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


def _records_on_disk(out_dir: Path) -> dict[Path, dict[str, Any]]:
    """Every readable provenance record under ``out_dir/records``, by file."""
    found = {}
    for record_file in sorted((out_dir / "records").rglob("*.json")):
        record = _read_record(record_file)
        if record is not None:
            found[record_file] = record
    return found


def _remove_superseded(out_dir: Path, current: list[dict[str, Any]],
                       on_disk: dict[Path, dict[str, Any]]) -> None:
    """Delete earlier output that this run's records replace.

    That is the output of a file this run wrote under other ids (e.g. new
    metadata), and of an image id whose earlier source file is gone (moved
    inputs) and that this run wrote from its new place.
    """
    by_source = {r["source_file"]: _record_path(out_dir, r["patient_id"], r["image_id"])
                 for r in current}
    by_image = {r["image_id"]: _record_path(out_dir, r["patient_id"], r["image_id"])
                for r in current}
    for record_file, record in on_disk.items():
        kept = by_source.get(record.get("source_file"))
        if kept is None and _holder(record) is None:
            kept = by_image.get(record["image_id"])
        if kept is not None and kept != record_file:
            earlier_png = _image_path(record["patient_id"], record["image_id"])
            log.info("%s is replaced by %s (its file under new ids, or moved); removing %s",
                     record_file.relative_to(out_dir), kept.relative_to(out_dir), earlier_png)
            (out_dir / earlier_png).unlink(missing_ok=True)
            record_file.unlink(missing_ok=True)


def _union(out_dir: Path, current: list[dict[str, Any]]
           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The dataset's records (this run's first, then every other one on disk) and failures.

    A record from an earlier run whose PNG is missing or damaged, or whose
    image id another record already has, is left out and reported as a failure.
    """
    records = {r["image_id"]: r for r in current}
    failures = []
    for record_file, record in _records_on_disk(out_dir).items():
        image_id, source = record["image_id"], str(record.get("source_file", record_file))
        if records.get(image_id, {}).get("source_file") == source:
            continue
        if image_id in records:
            failures.append(_failure(source, "ids", f"duplicate image_id {image_id}: also "
                                     f"produced from {records[image_id]['source_file']}; "
                                     f"{record_file.relative_to(out_dir)} left out",
                                     image_id)["failure"])
        elif not png_intact(out_dir / str(record.get("path", "")), record.get("png_bytes")):
            failures.append(_failure(source, "write", f"{record.get('path')} is missing or "
                                     "damaged; rerun with this file to remake it",
                                     image_id)["failure"])
        else:
            records[image_id] = record
    return list(records.values()), failures


def preprocess_dataset(
    inputs: Sequence[PathLike] | PathLike,
    out_dir: PathLike,
    config: PreprocessConfig | None = None,
    metadata: PathLike | pd.DataFrame | None = None,
    workers: int | None = None,
    shard: tuple[int, int] | str | None = None,
    limit: int | None = None,
    progress: bool = True,
    keep_columns: Sequence[str] = (),
) -> PreprocessSummary:
    """Preprocess files and folders of mammograms into the dataset folder ``out_dir``.

    ``workers`` defaults to all cores; ``shard=(i, N)`` processes every N-th
    input starting at i; ``limit`` caps this run's images. Images already
    written with the same pixel settings are skipped (resume). Bad files are
    recorded in ``failures.csv`` and the run goes on. The manifest lists every
    image in ``out_dir`` (this run's and earlier runs' or shards'), so a rerun
    on a subset of the inputs loses nothing. ``keep_columns`` names metadata
    columns to copy besides the allow-list
    (:data:`~cvae_mammo.preprocessing.manifest.PASSTHROUGH_COLUMNS`).
    """
    started = time.perf_counter()
    config = config or PreprocessConfig()
    out_dir = Path(out_dir)
    meta = (load_metadata(metadata, config.label_column, keep_columns)
            if metadata is not None else None)
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
    out_dir.mkdir(parents=True, exist_ok=True)
    on_disk = _records_on_disk(out_dir)
    earlier = {r["image_id"]: _holder(r) for r in on_disk.values() if _holder(r)}

    failures: list[dict[str, Any]] = []
    todo: list[tuple[str, str, str]] = []
    seen: dict[str, Path] = {}
    own_patients = 0
    for path in work:
        image_id, patient_id, own_patient = _ids_from_file(path, lookup)
        other = seen.get(image_id) or earlier.get(image_id)
        if other is not None and str(other) != str(path):
            failures.append(_failure(str(path), "ids", f"duplicate image_id {image_id} (patient "
                                     f"{patient_id}); also from {other}", image_id))
            continue
        seen[image_id] = path
        own_patients += own_patient
        todo.append((str(path), image_id, patient_id))
    if own_patients:
        log.warning("%d image(s) have no patient id (not in the metadata, the RSNA layout or "
                    "DICOM tags): each is its own patient, so splits cannot group a woman's "
                    "images", own_patients)
    workers = max(1, min(int(workers or os.cpu_count() or 1), max(1, len(todo))))
    init_args = (config.to_dict(), str(out_dir), views, workers > 1)
    results = failures + _run_workers(todo, init_args, workers, progress)

    current = [r["record"] for r in results if "record" in r]
    _remove_superseded(out_dir, current, on_disk)
    records, left_out = _union(out_dir, current)
    stale = sum(r.get("settings_hash") != config.settings_hash() for r in records)
    if stale:
        log.warning("%d image(s) in %s were made with other settings than this run's; rerun "
                    "with all their inputs to remake them alike", stale, out_dir)
    manifest = build_manifest(records, meta)
    atomic_write_csv(out_dir / "manifest.csv", manifest)
    failure_rows = pd.DataFrame([r["failure"] for r in results if r["status"] == "failed"]
                                + left_out, columns=["source", "stage", "reason"])
    if (out_dir / "failures.csv").is_file():
        retried = {str(p) for p in work} | {r["source_file"] for r in records}
        kept = pd.read_csv(out_dir / "failures.csv", dtype=str, keep_default_na=False)
        kept = kept[~kept["source"].isin(retried | set(failure_rows["source"]))]
        failure_rows = pd.concat([kept, failure_rows], ignore_index=True)
    atomic_write_csv(out_dir / "failures.csv", failure_rows)

    summary = PreprocessSummary(
        out_dir=str(out_dir), total=len(work),
        processed=sum(r["status"] == "processed" for r in results),
        resumed=sum(r["status"] == "resumed" for r in results),
        failed=sum(r["status"] == "failed" for r in results),
        in_manifest=len(manifest),
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
        "keep_columns": list(keep_columns),
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
    seen = {original_id(r["image_id"]) for r in records}
    seen |= {original_id(r["image_id"]) for r in results if r.get("image_id")}
    rows = [{"kind": "metadata_without_image", "image_id": image_id,
             "patient_id": meta.frame.at[image_id, "patient_id"]
             if "patient_id" in meta.frame.columns else "", "source_file": ""}
            for image_id in meta.frame.index if image_id not in seen]
    rows += [{"kind": "image_without_metadata", "image_id": r["image_id"],
              "patient_id": r["patient_id"], "source_file": r["source_file"]}
             for r in records if original_id(r["image_id"]) not in meta.frame.index]
    return pd.DataFrame(rows, columns=["kind", "image_id", "patient_id", "source_file"])
