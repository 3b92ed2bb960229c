"""Safe file output: atomic writes, content hashes and package versions.

Every file the pipeline writes goes through a temporary file in the same
folder followed by ``os.replace``, so an interrupted run never leaves a
half-written image, CSV or JSON behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import numpy as np

from cvae_mammo.errors import InputError

PathLike = str | os.PathLike[str]

#: Packages whose versions are recorded next to every output.
CORE_PACKAGES: tuple[str, ...] = (
    "cvae_mammo",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "pillow",
    "opencv-python-headless",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "imagecodecs",
    "tensorflow",
    "tensorflow-probability",
    "keras",
    "albumentations",
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing and rename it over ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes 0600; outputs are shared files
    try:
        with open(tmp_name, mode, **kwargs) as handle:
            yield handle
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def atomic_write_json(path: PathLike, payload: Any) -> None:
    """Write ``payload`` as indented JSON atomically (numpy scalars and paths allowed)."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def read_json(path: PathLike) -> Any:
    """Read a JSON file; a damaged one is an :class:`~cvae_mammo.errors.InputError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error})") from error
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({error.reason})") from error


def atomic_write_csv(path: PathLike, frame: Any, **kwargs: Any) -> None:
    """Write a pandas DataFrame to CSV atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        frame.to_csv(handle, **kwargs)


def file_sha256(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def package_versions(names: Iterable[str] = CORE_PACKAGES) -> dict[str, str | None]:
    """Installed versions of ``names`` (None for packages that are not installed).

    Reads distribution metadata only, so it never imports TensorFlow.
    """
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
