"""Train the CVAE on negative images: :func:`fit_cvae` (``cvae-mammo fit-cvae``).

Training reads the train-split negatives only (positives and unknown labels
never reach a batch), validates on the val-split negatives, augments with
the ``cvae`` policy, and writes a run folder (see :mod:`cvae_mammo.training.runs`):
``model.keras`` (weights of the best validation epoch), ``config.json``,
``metadata.json``, ``history.csv``, ``logs/`` (TensorBoard),
``checkpoints/`` (per epoch, for ``resume=True``), ``reconstructions/``
(PNG grids of fixed validation images: original | reconstruction | 4x
absolute error inside the breast), ``feature_density.npz`` (the Gaussian of the
encoder features of the train negatives, :mod:`cvae_mammo.models.density`) and
``validation.json`` (reconstruction quality of the final model on the val
negatives: SSIM and MAE inside the breast), and, with ``lesion_steps`` > 0, the
bilateral lesion segmenter (:mod:`cvae_mammo.training.lesion_segmenter`). A bilateral model
(``CVAEConfig.bilateral``) trains each normal breast conditioned on its normal
other breast (:mod:`cvae_mammo.data.pairing`).

Load a finished run with ``cvae_mammo.training.runs.load_run_model(run_dir)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from cvae_mammo.config import parse_image_size
from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.data.pairing import with_partners
from cvae_mammo.data.pipeline import build_pipeline, read_image
from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike, atomic_write_bytes, atomic_write_json
from cvae_mammo.models.cvae import ConvVAE, CVAEConfig, build_cvae
from cvae_mammo.models.density import DENSITY_FILE, FeatureDensity, grid_mask
from cvae_mammo.models.losses import breast_mask, ssim_map
from cvae_mammo.tf_startup import keras, tf
from cvae_mammo.training.common import (
    make_optimizer,
    resolve_xla,
    standard_callbacks,
    xla_mode,
)
from cvae_mammo.training.runs import dataset_preprocessing, load_keras_model, run_config
from cvae_mammo.training.session import Pipelines, fit_epochs, keep_best_model, start_session

LOGGER = logging.getLogger(__name__)
PRESETS = {"default": CVAEConfig, "small": CVAEConfig.small}


def resolve_config(config: CVAEConfig | PathLike | None) -> CVAEConfig:
    """A :class:`CVAEConfig` from an instance, a preset name (default/small) or a JSON/YAML file."""
    if config is None:
        return CVAEConfig()
    if isinstance(config, CVAEConfig):
        return config
    if str(config) in PRESETS:
        return PRESETS[str(config)]()
    path = Path(config)
    if not path.is_file():
        raise InputError(f"{path}: CVAE config file not found (or use a preset: "
                         f"{', '.join(PRESETS)})")
    return CVAEConfig.load(path)  # content problems: InputError naming the file


def training_frames(dataset: MammoDataset, bilateral: bool = False
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train-split and val-split negatives (label 0); positives and unknown labels excluded.

    With ``bilateral``, each image is paired with its other breast among the
    negatives of the same split (:func:`~cvae_mammo.data.pairing.with_partners`):
    a normal breast is conditioned on a normal partner only, and one whose partner
    is abnormal or missing trains the single-image path (``has_partner`` = 0).
    """
    train = dataset.subset(split="train", label=0)
    val = dataset.subset(split="val", label=0)
    if train.empty:
        raise InputError(f"{dataset.splits_path}: the train split has no negative images to fit on")
    if bilateral:
        train = with_partners(train)
        val = with_partners(val) if not val.empty else val
    return train, val


def _negatives_only(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    tf.debugging.assert_equal(batch["label"], tf.zeros_like(batch["label"]),
                              message="a non-negative image reached a CVAE training batch")
    return batch


def cvae_pipelines(
    dataset: MammoDataset,
    config: CVAEConfig,
    encoder: MetadataEncoder | None,
    batch_size: int | None = None,
) -> Pipelines:
    """Training (shuffled, augmented, full batches, asserted negative-only) and validation
    pipelines in batches of ``batch_size`` (default: the config's; the global batch when
    training on several replicas)."""
    train, val = training_frames(dataset, config.bilateral)
    batch_size = batch_size or config.batch_size
    common = {"image_size": config.image_size, "batch_size": batch_size,
              "conditioning": encoder, "partners": config.bilateral}
    # Full batches only: steadier batch-norm statistics, and one static training shape
    # (TF 2.21's oneDNN kernels crashed on a ragged last batch of some small models).
    full = len(train) >= batch_size
    train_ds = build_pipeline(train, dataset.root, augment=config.augment, shuffle=True,
                              seed=config.seed, drop_remainder=full, **common
                              ).map(_negatives_only)
    val_ds = None if val.empty else build_pipeline(val, dataset.root, seed=config.seed, **common)
    return Pipelines(train_ds, len(train) // batch_size if full else 1, val_ds,
                     math.ceil(len(val) / batch_size))


@dataclasses.dataclass
class ModelInputs:
    """Images of a frame with what the model needs beside them (metadata condition, partners)."""

    images: np.ndarray
    condition: np.ndarray | None = None
    partners: np.ndarray | None = None

    @classmethod
    def load(cls, frame: pd.DataFrame, root: Path, config: CVAEConfig,
             encoder: MetadataEncoder | None) -> ModelInputs:
        """Read ``frame``'s images (and ``partner_path`` images, zero where blank)."""
        size = config.image_size

        def read(relative: str) -> np.ndarray:
            if not relative:
                return np.zeros((*size, 1), np.float32)
            return read_image(os.fspath(root / relative), size)

        images = np.stack([read(p) for p in frame["path"].astype(str)])
        partners = None
        if config.bilateral:
            partners = np.stack([read(p) for p in frame["partner_path"].fillna("").astype(str)])
        condition = encoder.transform(frame) if encoder is not None else None
        return cls(images, condition, partners)

    def reconstruct(self, model: ConvVAE) -> np.ndarray:
        """The model's posterior-mean reconstructions of these images."""
        return model.reconstruct(self.images, self.condition, partners=self.partners)


def reconstruction_grid(images: np.ndarray, reconstructions: np.ndarray,
                        threshold: float = 0.04) -> np.ndarray:
    """uint8 grid, one row per image: original | reconstruction | 4x |error| inside the breast."""
    mask = breast_mask(images, threshold).numpy()
    error = np.clip(4.0 * np.abs(images - reconstructions) * mask, 0.0, 1.0)
    gap = np.ones((images.shape[1], 4), np.float32)
    rows = [np.concatenate([images[i, ..., 0], gap, reconstructions[i, ..., 0], gap,
                            error[i, ..., 0]], axis=1) for i in range(len(images))]
    spacer = np.ones((4, rows[0].shape[1]), np.float32)
    stacked = np.concatenate([part for row in rows for part in (row, spacer)][:-1], axis=0)
    return np.round(stacked * 255.0).astype(np.uint8)


def write_grid(path: Path, grid: np.ndarray) -> None:
    """Encode a uint8 grid as PNG and write it atomically."""
    ok, encoded = cv2.imencode(".png", grid)
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    atomic_write_bytes(path, encoded.tobytes())


class ReconstructionSnapshots(keras.callbacks.Callback):
    """Save ``reconstructions/epoch_NNN.png`` of fixed validation images every ``every`` epochs."""

    def __init__(self, folder: Path, inputs: ModelInputs, every: int, threshold: float) -> None:
        super().__init__()
        self.folder, self.inputs = folder, inputs
        self.every, self.threshold = max(1, int(every)), threshold

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        write_grid(self.folder / f"epoch_{epoch + 1:03d}.png",
                   reconstruction_grid(self.inputs.images, self.inputs.reconstruct(self.model),
                                       self.threshold))


def reconstruction_quality(model: ConvVAE, inputs: ModelInputs) -> dict[str, Any]:
    """Mean SSIM and MAE inside the breast mask of posterior-mean reconstructions."""
    images = inputs.images
    recon = inputs.reconstruct(model)
    mask = breast_mask(images, model.config.mask_threshold).numpy()
    pixels = np.maximum(mask.sum(axis=(1, 2, 3)), 1.0)
    ssim = (ssim_map(images, recon).numpy() * mask).sum(axis=(1, 2, 3)) / pixels
    mae = (np.abs(images - recon) * mask).sum(axis=(1, 2, 3)) / pixels
    return {"images": len(images), "ssim_breast_mean": float(ssim.mean()),
            "ssim_breast_min": float(ssim.min()), "mae_breast_mean": float(mae.mean()),
            "ssim_breast_per_image": [round(float(v), 5) for v in ssim]}


def fit_cvae(
    data_dir: PathLike,
    out_dir: PathLike,
    config: CVAEConfig | PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    image_size: tuple[int, int] | str | None = None,
    seed: int | None = None,
    resume: bool = False,
    precision: str | None = None,
    xla: str | bool | None = None,
    conditioning: list[str] | tuple[str, ...] | None = None,
    command: list[str] | None = None,
    allow_data_change: bool = False,
    strategy: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    lesion_steps: int | None = None,
) -> Path:
    """Train a CVAE on ``data_dir``'s train negatives and return the run folder ``out_dir``.

    ``config`` is a :class:`CVAEConfig`, a preset name (``default`` for
    1456x728, ``small`` for CPU) or a JSON/YAML file; ``epochs``,
    ``batch_size`` (per replica), ``image_size``, ``seed``, ``precision``,
    ``xla``, ``strategy`` (:mod:`cvae_mammo.training.distribute`) and
    ``conditioning`` (metadata columns) and ``lesion_steps`` (the lesion segmenter
    trained after the CVAE, 0 for none) override it. ``resume=True`` continues
    ``out_dir`` from its last per-epoch checkpoint (``epochs`` counts from the
    start of the run), on the same manifest and split file unless
    ``allow_data_change``. Inputs are checked before ``out_dir`` is created.
    ``callbacks`` are extra Keras callbacks for ``fit``. Under several workers
    only the chief writes ``out_dir``. Raises
    :class:`~cvae_mammo.errors.TrainingDivergedError` on a NaN/inf loss.
    """
    cfg = resolve_config(config).replace(
        epochs=epochs, batch_size=batch_size,
        image_size=None if image_size is None else parse_image_size(image_size),
        conditioning=None if conditioning is None else tuple(conditioning), seed=seed,
        precision=precision, xla=xla_mode(xla), strategy=strategy, lesion_steps=lesion_steps)
    session = start_session(cfg)
    dataset = MammoDataset.open(data_dir)
    encoder = dataset.encoder(cfg.conditioning) if cfg.conditioning else None
    cfg = cfg.replace(condition_dim=encoder.dim if encoder is not None else 0)
    model_options, _ = cfg.split()
    training = session.training_options(cfg)
    training.update(train="train split, label 0", validation="val split, label 0")
    payload = run_config("cvae", cfg.image_size, model_options, training, encoder,
                         preprocessing=dataset_preprocessing(data_dir))
    train_frame, val_frame = training_frames(dataset, cfg.bilateral)
    run_dir = session.open_run(out_dir, payload, resume=resume, dataset_dir=data_dir,
                               allow_data_change=allow_data_change, seed=cfg.seed,
                               command=command if command is not None else sys.argv)

    data = cvae_pipelines(dataset, cfg, encoder, session.global_batch)
    LOGGER.info("fit-cvae: %d train negatives, %d val negatives, %s, %d steps/epoch, run %s",
                len(train_frame), len(val_frame), "x".join(map(str, cfg.image_size)),
                data.steps, run_dir)
    point = session.resume_point(run_dir, resume)
    with session.strategy.scope():
        if point is not None:
            LOGGER.info("resuming from %s after epoch %d", point.checkpoint, point.epoch)
            model = load_keras_model(point.checkpoint)
        else:
            model = build_cvae(cfg, seed=cfg.seed)
            model.compile(optimizer=make_optimizer(
                session.learning_rate, total_steps=data.steps * cfg.epochs,
                warmup_steps=round(data.steps * cfg.warmup_epochs),
                weight_decay=cfg.weight_decay, clipnorm=cfg.clipnorm),
                jit_compile=resolve_xla(cfg.xla))
    initial_epoch = point.epoch if point is not None else 0

    snapshot_frame = (val_frame if not val_frame.empty else train_frame).head(cfg.recon_images)
    snapshots = ModelInputs.load(snapshot_frame, dataset.root, cfg, encoder)
    fit_callbacks = standard_callbacks(
        run_dir, session.global_batch, data.steps, cfg.epochs, initial_epoch=initial_epoch,
        patience=cfg.early_stopping_patience,
        monitor="val_loss" if data.validation is not None else "loss",
        state=point.state if point is not None else None, chief=session.chief)
    if session.chief:
        fit_callbacks.append(ReconstructionSnapshots(run_dir / "reconstructions", snapshots,
                                                     cfg.recon_every, cfg.mask_threshold))
    if point is not None and point.stopped_early:
        LOGGER.info("early stopping ended this run after epoch %d: nothing to resume", point.epoch)
    elif initial_epoch < cfg.epochs:
        fit_epochs(model, data.train, data.steps, data.validation, data.validation_steps,
                   epochs=cfg.epochs, initial_epoch=initial_epoch,
                   callbacks=[*fit_callbacks, *callbacks])
    if not session.chief:
        return run_dir
    _finish(run_dir, model, train_frame, val_frame, dataset.root, cfg, encoder, snapshots)
    if cfg.lesion_steps > 0:
        from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter, segmenter_done

        if not (resume and segmenter_done(run_dir, cfg)):
            fit_lesion_segmenter(run_dir, data_dir, cfg)
    return run_dir


def fit_feature_density(model: ConvVAE, inputs: ModelInputs) -> FeatureDensity:
    """The Gaussian of the encoder features of ``inputs`` (normal images) inside their breasts."""
    analysis = model.analyse(inputs.images, inputs.partners, inputs.condition)
    masks = breast_mask(inputs.images, model.config.mask_threshold).numpy()[..., 0]
    cells = grid_mask(masks, analysis["features"].shape[1:3])
    return FeatureDensity.fit(analysis["features"], cells)


def _finish(run_dir: Path, model: ConvVAE, train_frame: pd.DataFrame, val_frame: pd.DataFrame,
            root: Path, cfg: CVAEConfig, encoder: MetadataEncoder | None,
            snapshots: ModelInputs) -> Path:
    """Keep the best checkpoint as model.keras; fit the feature density; write
    validation.json and the final figure."""
    model = keep_best_model(run_dir, model)
    write_grid(run_dir / "reconstructions" / "final.png",
               reconstruction_grid(snapshots.images, snapshots.reconstruct(model),
                                   cfg.mask_threshold))
    density = fit_feature_density(model, ModelInputs.load(train_frame, root, cfg, encoder))
    density.save(run_dir / DENSITY_FILE)
    if not val_frame.empty:
        quality = reconstruction_quality(model, ModelInputs.load(val_frame, root, cfg, encoder))
        quality["image_ids"] = val_frame["image_id"].astype(str).tolist()
        atomic_write_json(run_dir / "validation.json", quality)
        LOGGER.info("validation negatives: SSIM inside the breast %.4f (min %.4f), MAE %.4f",
                    quality["ssim_breast_mean"], quality["ssim_breast_min"],
                    quality["mae_breast_mean"])
    return run_dir
