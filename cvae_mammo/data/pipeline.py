"""Decoding dataset images, and the tf.data pipelines both models read.

:func:`build_pipeline` turns a subset of a :class:`~cvae_mammo.data.dataset.MammoDataset`
into a ``tf.data.Dataset`` of dict batches:

- ``image``: float32 ``[B, H, W, 1]`` in [0, 1] (8- and 16-bit PNGs);
- ``condition``: float32 ``[B, C]`` when a :class:`MetadataEncoder` is given;
- ``label``: float32 ``[B]``, NaN where unknown;
- ``image_id``: string ``[B]`` when ``include_ids``;
- ``partner``: float32 ``[B, H, W, 1]``, the other breast's image (all zero where
  there is none), when ``partners`` is true; the frame then needs the
  ``partner_path`` column of :func:`cvae_mammo.data.pairing.with_partners`. An
  image and its partner get the same augmentation, so the pair stays aligned.

An image that is missing or unreadable when the pipeline reads it is logged
once with its path and skipped; the run goes on. TensorFlow is imported only
inside :func:`build_pipeline`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from cvae_mammo.data.augment import Augmenter, element_seed
from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike

if TYPE_CHECKING:
    import tensorflow as tf

LOGGER = logging.getLogger(__name__)
#: Shuffle buffer (images) when decoded images are cached: shuffling indices before decoding
#: needs no buffer, but a cache holds decoded images, so the buffer is bounded (~1 GB at 1456x728).
CACHED_SHUFFLE_BUFFER = 512
# ----------------------------------------------------------------------------- decoding

_reported_lock = threading.Lock()
_reported: set[str] = set()


def _report_once(path: str, reason: str) -> None:
    with _reported_lock:
        if path in _reported:
            return
        _reported.add(path)
    LOGGER.warning("skipping image %s: %s", path, reason)


def read_pixels(path: str, size: tuple[int, int]) -> np.ndarray:
    """Read an 8- or 16-bit PNG (or any cv2-readable image) as ``uint8``/``uint16`` ``[H, W]``.

    Colour images become grey; the image is resized to ``size`` (H, W) by
    :func:`fit_pixels`. Raises ``OSError`` when the file is missing, cannot be
    decoded or has another pixel type.
    """
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise OSError("file not found" if not os.path.exists(path) else "cannot decode")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
    if image.dtype not in (np.uint8, np.uint16):
        raise OSError(f"unsupported pixel type {image.dtype}")
    return fit_pixels(image, size)


def fit_pixels(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``uint8``/``uint16`` ``[H, W]`` pixels at ``size`` (H, W): area interpolation when
    shrinking, linear when enlarging, unchanged when the size already matches.

    Every path into a model goes through here (dataset PNGs and images preprocessed
    in memory by :class:`~cvae_mammo.inference.detector.Detector`), so both give the
    same input for the same pixels.
    """
    height, width = size
    if pixels.shape == (height, width):
        return pixels
    shrink = pixels.shape[0] > height or pixels.shape[1] > width
    return cv2.resize(pixels, (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """``uint8``/``uint16`` pixels as float32 ``[..., 1]`` in [0, 1] (divided by 255 or 65535)."""
    scale = np.float32(1.0 / np.iinfo(pixels.dtype).max)
    return (pixels.astype(np.float32) * scale).reshape(*pixels.shape[:2], 1)


def read_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """Read an 8- or 16-bit image as float32 ``[H, W, 1]`` in [0, 1] at ``size`` (H, W)."""
    return to_unit_float(read_pixels(path, size))


def _decode_or_skip(path: bytes, height: int, width: int) -> tuple[np.ndarray, np.float32, bool]:
    """Pixels in a uint16 container with their full-scale value (255 or 65535), and success."""
    text = path.decode("utf-8")
    try:
        pixels = read_pixels(text, (int(height), int(width)))
    except OSError as error:
        _report_once(text, str(error))
        return np.zeros((int(height), int(width), 1), np.uint16), np.float32(1), False
    full = np.float32(np.iinfo(pixels.dtype).max)
    return pixels.astype(np.uint16)[..., None], full, True


def _decode_partner(path: bytes, height: int, width: int
                    ) -> tuple[np.ndarray, np.float32, np.float32]:
    """A partner image like :func:`_decode_or_skip`, and 1.0 when it exists and was read, else 0.0
    (the partner input is then all zero, whatever the augmentation does to it)."""
    if not path:
        return np.zeros((int(height), int(width), 1), np.uint16), np.float32(255), np.float32(0)
    pixels, full, ok = _decode_or_skip(path, height, width)
    return pixels, full, np.float32(ok)


def _augment_pixels(augmenter: Augmenter, pixels: np.ndarray, full: np.float32,
                    seed: int) -> np.ndarray:
    """Augment ``[H, W, 1]`` pixels in their own bit depth and return them in the uint16 container.

    8-bit images are augmented as uint8, where albumentations is fastest (look-up
    tables for brightness, contrast and gamma); 16-bit ones as float32, then
    re-quantised to 16 bits. The float conversion stays in TensorFlow.
    """
    if full == 255:
        return augmenter(pixels.astype(np.uint8), seed).astype(np.uint16)
    out = augmenter(pixels.astype(np.float32) * np.float32(1 / 65535), seed)
    return (out * np.float32(65535) + np.float32(0.5)).astype(np.uint16)


# ----------------------------------------------------------------------------- pipeline


def build_pipeline(
    frame: pd.DataFrame,
    root: PathLike,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    conditioning: MetadataEncoder | None = None,
    augment: str | None = None,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    cache: bool | str = False,
    positive_fraction: float | None = None,
    negative_fraction: float | None = None,
    include_ids: bool = False,
    drop_remainder: bool = False,
    threads: int | None = None,
    partners: bool = False,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of dict batches from ``frame`` (rows of a :class:`MammoDataset`).

    ``augment``: an :mod:`cvae_mammo.data.augment` policy name (None = none).
    ``positive_fraction``: oversample positives to this expected share of
    each batch (labels must be known). ``negative_fraction``: use this share
    of the negatives, redrawn every epoch. ``cache``: True caches decoded
    images in memory, a string caches them in files with that prefix (then
    shuffling uses a buffer of :data:`CACHED_SHUFFLE_BUFFER` decoded images).
    ``threads``: private thread-pool size (default: TensorFlow's). The
    order, the sampling and every augmentation are fixed by ``seed``.
    """
    from cvae_mammo.tf_startup import tf

    if "path" not in frame.columns:
        raise InputError("build_pipeline: the frame has no 'path' column (metadata-only manifest?)")
    if len(frame) == 0:
        raise InputError("build_pipeline: the frame has no rows")
    if batch_size < 1:
        raise InputError(f"batch_size {batch_size}: must be at least 1")
    height, width = int(image_size[0]), int(image_size[1])
    root = Path(root)
    paths = np.asarray([os.fspath(root / p) for p in frame["path"].astype(str)], dtype=object)
    labels = (frame["label"].astype("float64").to_numpy(np.float32) if "label" in frame.columns
              else np.full(len(frame), np.nan, np.float32))
    tables: dict[str, tf.Tensor] = {"path": tf.constant(paths.astype(str)),
                                    "label": tf.constant(labels)}
    if conditioning is not None:
        tables["condition"] = tf.constant(conditioning.transform(frame))
    if partners:
        if "partner_path" not in frame.columns:
            raise InputError("build_pipeline(partners=True): the frame has no 'partner_path' "
                             "column (pair it with cvae_mammo.data.pairing.with_partners)")
        tables["partner_path"] = tf.constant(np.asarray(
            [os.fspath(root / p) if p else "" for p in frame["partner_path"].fillna("").astype(str)],
            dtype=object).astype(str))
    if include_ids:
        tables["image_id"] = tf.constant(frame["image_id"].astype(str).to_numpy().astype(str))
    augmenter = Augmenter(augment) if augment and augment != "none" else None

    def decode(index: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels, full, ok = tf.numpy_function(
            _decode_or_skip, [tf.gather(tables["path"], index), height, width],
            [tf.uint16, tf.float32, tf.bool], stateful=False)
        pixels.set_shape((height, width, 1))
        full.set_shape(())
        element = {"index": index, "pixels": pixels, "full": full, "ok": ok}
        if partners:
            partner, partner_full, present = tf.numpy_function(
                _decode_partner, [tf.gather(tables["partner_path"], index), height, width],
                [tf.uint16, tf.float32, tf.float32], stateful=False)
            partner.set_shape((height, width, 1))
            partner_full.set_shape(())
            present.set_shape(())
            element.update(partner=partner, partner_full=partner_full, partner_present=present)
        return element

    def decoded(ds: tf.data.Dataset) -> tf.data.Dataset:
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.filter(lambda element: element["ok"])

    def branch(indices: np.ndarray, name: str, take: int | None, forever: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int64))
        if cache:
            ds = decoded(ds).cache(f"{cache}_{name}" if isinstance(cache, str) else "")
        if shuffle or take is not None:
            buffer = min(len(indices), CACHED_SHUFFLE_BUFFER) if cache else len(indices)
            ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
        if take is not None:
            ds = ds.take(take)
        return ds.repeat() if forever else ds

    everything = np.arange(len(frame))
    if positive_fraction is None and negative_fraction is None:
        ds = branch(everything, "all", None, repeat)
    else:
        if np.isnan(labels).any():
            raise InputError(f"positive_fraction/negative_fraction need known labels; "
                             f"{int(np.isnan(labels).sum())} row(s) have none (select label 0/1 first)")
        positives, negatives = everything[labels == 1], everything[labels == 0]
        if len(negatives) == 0:
            raise InputError("negative_fraction/positive_fraction: the frame has no negatives")
        kept = len(negatives)
        if negative_fraction is not None:
            if not 0 < negative_fraction <= 1:
                raise InputError(f"negative_fraction {negative_fraction}: must be in (0, 1]")
            kept = max(1, round(negative_fraction * len(negatives)))
        if positive_fraction is None:
            ds = branch(positives, "pos", None, False).concatenate(
                branch(negatives, "neg", kept, False))
            buffer = len(positives) + kept
            ds = ds.shuffle(min(buffer, CACHED_SHUFFLE_BUFFER) if cache else buffer, seed=seed + 1,
                            reshuffle_each_iteration=True)
            ds = ds.repeat() if repeat else ds
        else:
            if not 0 < positive_fraction < 1:
                raise InputError(f"positive_fraction {positive_fraction}: must be in (0, 1)")
            if len(positives) == 0:
                raise InputError("positive_fraction: the frame has no positives to oversample")
            ds = tf.data.Dataset.sample_from_datasets(
                [branch(positives, "pos", None, True), branch(negatives, "neg", kept, True)],
                weights=[positive_fraction, 1.0 - positive_fraction], seed=seed,
                stop_on_empty_dataset=False)
            if not repeat:
                ds = ds.take(math.ceil(kept / (1.0 - positive_fraction)))
    if not cache:
        ds = decoded(ds)

    def finish(counter: tf.Tensor, element: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        def augmented(pixels: tf.Tensor, full: tf.Tensor) -> tf.Tensor:
            if augmenter is None:
                return pixels
            pixels = tf.numpy_function(
                lambda px, scale, i: _augment_pixels(augmenter, px, scale,
                                                     element_seed(seed, int(i))),
                [pixels, full, counter], tf.uint16, stateful=False)
            pixels.set_shape((height, width, 1))
            return pixels

        out = {"image": tf.cast(augmented(element["pixels"], element["full"]), tf.float32)
               / element["full"]}
        if partners:
            out["partner"] = (tf.cast(augmented(element["partner"], element["partner_full"]),
                                      tf.float32) / element["partner_full"]
                              * element["partner_present"])
        index = element["index"]
        out["label"] = tf.gather(tables["label"], index)
        if "condition" in tables:
            out["condition"] = tf.gather(tables["condition"], index)
        if "image_id" in tables:
            out["image_id"] = tf.gather(tables["image_id"], index)
        return out

    ds = ds.enumerate().map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if threads is not None:
        options.threading.private_threadpool_size = int(threads)
    return ds.with_options(options)
