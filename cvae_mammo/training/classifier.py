"""Train the transfer-learning classifier: :func:`fit_classifier` (``cvae-mammo fit-classifier``).

Reads the SAME dataset folder and split file as the CVAE: the train split's
images with a known label (positives and negatives) for fitting, the val
split's for validation. Batches come from :func:`cvae_mammo.data.pipeline.build_pipeline`
with the ``classifier`` augmentation policy and, optionally, positives
oversampled to ``positive_fraction`` of each batch.

Two phases: the backbone is frozen for ``freeze_epochs`` epochs (only the
head learns), then unfrozen (all of it, or from the layer named by
``unfreeze_from``) with a fresh AdamW + warm-up/cosine schedule. The
shared callbacks of :mod:`cvae_mammo.training.common` keep per-epoch checkpoints
(``--resume``), ``history.csv``, TensorBoard logs and early stopping on
the validation ROC-AUC or pF1 (minimised as ``val_monitor_deficit`` =
1 - metric, since the shared callbacks minimise).

The run folder has the CVAE's layout (:mod:`cvae_mammo.training.runs`) plus
``predictions_val.csv`` (image_id, label, probability of the final model)
and ``validation.json`` (ROC-AUC and pF1 on the val split).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from cvae_mammo.config import parse_image_size
from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.data.pipeline import build_pipeline
from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.metrics import probabilistic_f1, roc_auc
from cvae_mammo.fileio import PathLike, atomic_write_csv, atomic_write_json
from cvae_mammo.models.classifier import (
    ClassifierConfig,
    build_classifier,
    compile_classifier,
    encode_aux_target,
    set_backbone_trainable,
    split_config,
)
from cvae_mammo.training.common import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    configure_precision,
    distribution_strategy,
    make_optimizer,
    resolve_xla,
    resume_point,
    set_global_seed,
    standard_callbacks,
)
from cvae_mammo.training.runs import (
    MODEL_NAME,
    load_keras_model,
    prepare_run_dir,
    run_config,
    write_run_metadata,
)

LOGGER = logging.getLogger(__name__)
MONITOR_KEY = "val_monitor_deficit"


def resolve_config(config: ClassifierConfig | PathLike | None) -> ClassifierConfig:
    """A :class:`ClassifierConfig` from an instance, None (defaults) or a JSON/YAML file."""
    if config is None:
        return ClassifierConfig()
    if isinstance(config, ClassifierConfig):
        return config
    path = Path(config)
    if not path.is_file():
        raise InputError(f"{path}: classifier config file not found")
    return ClassifierConfig.load(path)  # content problems: InputError naming the file


def labelled_frames(dataset: MammoDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train-split and val-split images with a known label (unknown labels are left out)."""
    frames = []
    for split in ("train", "val"):
        rows = dataset.subset(split=split)
        frames.append(rows[rows["label"].notna()])
    train, val = frames
    if train.empty or train["label"].nunique() < 2:
        raise InputError(f"{dataset.splits_path}: the train split needs labelled positives and "
                         f"negatives (has {int((train['label'] == 1).sum())} positive, "
                         f"{int((train['label'] == 0).sum())} negative)")
    return train, val


class MaximiseAsDeficit(keras.callbacks.Callback):
    """Add ``logs[MONITOR_KEY] = 1 - (validation metric)`` so min-mode callbacks maximise it.

    ``metric`` is "auc" or "pf1"; Keras logs it as ``val_label_<metric>`` when
    the model has auxiliary heads and ``val_<metric>`` when ``label`` is its
    only output. Must come first in the callback list: later callbacks see
    the same logs dictionary.
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.sources = (f"val_label_{metric}", f"val_{metric}")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        """Insert the deficit of this epoch's validation metric."""
        for source in self.sources:
            if logs is not None and source in logs:
                logs[MONITOR_KEY] = 1.0 - float(logs[source])
                return


def _target_mapper(
    cfg: ClassifierConfig, frames: list[pd.DataFrame]
) -> Any:
    """Map a pipeline batch dict to ``(inputs, targets)`` for the classifier.

    Auxiliary targets are looked up by ``image_id`` in a table built from ``frames``.
    """
    aux_names = list(cfg.aux_targets)
    table = values = None
    if aux_names:
        rows = pd.concat(frames).drop_duplicates("image_id")
        keys = rows["image_id"].astype(str).to_numpy()
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, np.arange(len(keys), dtype=np.int64)), -1)
        matrix = np.stack([encode_aux_target(rows, name) for name in aux_names], axis=1)
        values = tf.constant(np.concatenate([matrix, -np.ones((1, len(aux_names)), np.float32)]))

    def to_model(batch: dict[str, tf.Tensor]) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        inputs = {"image": batch["image"]}
        if cfg.tabular_features:
            inputs["tabular"] = batch["condition"]
        targets = {"label": tf.reshape(batch["label"], (-1, 1))}
        if table is not None:
            index = table.lookup(batch["image_id"])
            index = tf.where(index < 0, tf.cast(tf.shape(values)[0] - 1, tf.int64), index)
            gathered = tf.gather(values, index)
            for column, name in enumerate(aux_names):
                targets[name] = gathered[:, column]
        return inputs, targets

    return to_model


def classifier_pipelines(
    dataset: MammoDataset,
    cfg: ClassifierConfig,
    encoder: MetadataEncoder | None,
    seed: int,
) -> tuple[tf.data.Dataset, tf.data.Dataset | None, int]:
    """Training and validation datasets of ``(inputs, targets)`` and steps per epoch."""
    train, val = labelled_frames(dataset)
    mapper = _target_mapper(cfg, [train, val])
    common = {"image_size": cfg.image_size, "batch_size": cfg.batch_size,
              "conditioning": encoder, "include_ids": bool(cfg.aux_targets)}
    train_ds = build_pipeline(train, dataset.root, augment=cfg.augment, shuffle=True, seed=seed,
                              positive_fraction=cfg.positive_fraction, **common)
    per_epoch = len(train)
    if cfg.positive_fraction:
        per_epoch = math.ceil(int((train["label"] == 0).sum()) / (1.0 - cfg.positive_fraction))
    val_ds = None
    if not val.empty:
        val_ds = build_pipeline(val, dataset.root, seed=seed, **common).map(mapper)
    return train_ds.map(mapper), val_ds, math.ceil(per_epoch / cfg.batch_size)


def _compile_phase(model: keras.Model, cfg: ClassifierConfig, frozen: bool, steps: int,
                   jit_compile: bool, run_eagerly: bool) -> None:
    """Set the backbone's trainable layers for a phase and compile with a fresh schedule."""
    # Batch-norm statistics are only worth freezing when they were learnt (pretrained weights).
    freeze_bn = cfg.freeze_batchnorm and cfg.weights is not None
    count = set_backbone_trainable(model, not frozen, cfg.unfreeze_from, freeze_bn)
    epochs = cfg.freeze_epochs if frozen else cfg.epochs - cfg.freeze_epochs
    LOGGER.info("%s backbone: %d trainable backbone layers, %d epoch(s)",
                "frozen" if frozen else "fine-tuning", count, epochs)
    total = max(1, steps * epochs)
    optimizer = make_optimizer(cfg.learning_rate, total_steps=total,
                               warmup_steps=min(round(steps * cfg.warmup_epochs), total // 3),
                               weight_decay=cfg.weight_decay, clipnorm=cfg.clipnorm)
    compile_classifier(model, cfg, optimizer, run_eagerly=run_eagerly, jit_compile=jit_compile)


def fit_classifier(
    data_dir: PathLike,
    out_dir: PathLike,
    config: ClassifierConfig | PathLike | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    image_size: tuple[int, int] | str | None = None,
    seed: int = 0,
    resume: bool = False,
    loss: str | None = None,
    freeze_epochs: int | None = None,
    precision: str | None = None,
    xla: str | bool = "auto",
    run_eagerly: bool = False,
    command: list[str] | None = None,
    allow_data_change: bool = False,
) -> Path:
    """Train the classifier on ``data_dir``'s labelled train split; return the run folder.

    ``config`` is a :class:`ClassifierConfig` or a JSON/YAML file; the other
    arguments override it (``weights="none"`` for random initialisation).
    ``resume=True`` continues ``out_dir`` from its last per-epoch checkpoint
    (``epochs`` counts from the start of the run), on the same manifest and
    split file unless ``allow_data_change``. Inputs are checked before
    ``out_dir`` is created. Raises
    :class:`~cvae_mammo.errors.TrainingDivergedError` on a NaN/inf loss.
    """
    cfg = resolve_config(config).replace(
        backbone=backbone, weights=weights, epochs=epochs, batch_size=batch_size,
        image_size=None if image_size is None else parse_image_size(image_size),
        loss=loss, freeze_epochs=freeze_epochs, precision=precision)
    cfg = cfg.replace(seed=seed, freeze_epochs=min(cfg.freeze_epochs, cfg.epochs))
    if cfg.weights not in (None, "imagenet") and not Path(cfg.weights).is_file():
        raise InputError(f"{cfg.weights}: backbone weights file not found "
                         "(use --weights imagenet, none, or a local weights file)")
    set_global_seed(seed)
    policy = configure_precision(cfg.precision)
    dataset = MammoDataset.open(data_dir)
    encoder = dataset.encoder(cfg.tabular_features) if cfg.tabular_features else None
    if encoder is not None:
        cfg = cfg.replace(tabular_dim=encoder.dim)
    model_part, training_part = split_config(cfg)
    training_part.update(dtype_policy=policy, xla=str(xla), train="train split, known labels",
                         validation="val split, known labels")
    train_frame, val_frame = labelled_frames(dataset)
    run_dir = prepare_run_dir(out_dir, run_config("classifier", cfg.image_size, model_part,
                                                  training_part, encoder), resume=resume,
                              dataset_dir=data_dir, allow_data_change=allow_data_change)
    write_run_metadata(run_dir, data_dir, seed, command if command is not None else sys.argv)

    train_ds, val_ds, steps = classifier_pipelines(dataset, cfg, encoder, seed)
    LOGGER.info("fit-classifier %s: %d train (%d positive), %d val, %s, %d steps/epoch, run %s",
                cfg.backbone, len(train_frame), int((train_frame["label"] == 1).sum()),
                len(val_frame), "x".join(map(str, cfg.image_size)), steps, run_dir)
    jit = resolve_xla(xla)
    point = resume_point(run_dir) if resume else None
    initial_epoch = point.epoch if point is not None else 0
    with distribution_strategy().scope():
        if point is not None:
            LOGGER.info("resuming from %s after epoch %d", point.checkpoint, point.epoch)
            model = load_keras_model(point.checkpoint)
        else:
            model = build_classifier(cfg)
    monitored = val_ds is not None
    phases = [(True, cfg.freeze_epochs), (False, cfg.epochs)]
    if point is not None and point.stopped_early:
        LOGGER.info("early stopping ended this run after epoch %d: nothing to resume", point.epoch)
        phases = []
    for (frozen, end), start in zip(phases, (0, cfg.freeze_epochs)):
        if initial_epoch >= end:
            continue
        # A checkpoint from inside this phase carries its compiled optimizer: keep it.
        continuing = point is not None and initial_epoch == point.epoch and initial_epoch > start
        if not continuing:
            with distribution_strategy().scope():
                _compile_phase(model, cfg, frozen, steps, jit, run_eagerly)
        state = resume_point(run_dir).state if initial_epoch else None
        callbacks = standard_callbacks(
            run_dir, cfg.batch_size, steps, cfg.epochs, initial_epoch=initial_epoch,
            patience=None if frozen or not monitored else cfg.patience,
            monitor=MONITOR_KEY if monitored else "loss", state=state)
        model.fit(train_ds, validation_data=val_ds, epochs=end, initial_epoch=initial_epoch,
                  callbacks=[MaximiseAsDeficit(cfg.monitor), *callbacks], verbose=0)
        initial_epoch = resume_point(run_dir).epoch
        if initial_epoch < end:  # early stopping ended the run
            break
    return _finish(run_dir, model, dataset, val_frame, cfg, encoder)


def _finish(run_dir: Path, model: keras.Model, dataset: MammoDataset, val_frame: pd.DataFrame,
            cfg: ClassifierConfig, encoder: MetadataEncoder | None) -> Path:
    """Keep the best checkpoint as model.keras; write val predictions and validation.json."""
    best = run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    if best.is_file():
        temporary = run_dir / f".{MODEL_NAME}.tmp.keras"
        shutil.copyfile(best, temporary)
        os.replace(temporary, run_dir / MODEL_NAME)
        model = keras.models.load_model(run_dir / MODEL_NAME)
    else:
        model.save(run_dir / MODEL_NAME)
    if val_frame.empty:
        return run_dir
    ids, probabilities = [], []
    for batch in build_pipeline(val_frame, dataset.root, image_size=cfg.image_size,
                                batch_size=cfg.batch_size, conditioning=encoder,
                                include_ids=True):
        inputs = {"image": batch["image"]}
        if cfg.tabular_features:
            inputs["tabular"] = batch["condition"]
        probabilities.append(np.asarray(model(inputs, training=False)["label"]).reshape(-1))
        ids += [value.decode("utf-8") for value in batch["image_id"].numpy()]
    scored = pd.DataFrame({"image_id": ids, "probability": np.concatenate(probabilities)})
    scored = scored.merge(val_frame[["image_id", "label"]].astype({"image_id": str}), on="image_id")
    atomic_write_csv(run_dir / "predictions_val.csv", scored[["image_id", "label", "probability"]])
    labels, probs = scored["label"].to_numpy(float), scored["probability"].to_numpy(float)
    summary: dict[str, Any] = {"images": len(labels), "positives": int(labels.sum())}
    if 0 < labels.sum() < len(labels):
        summary.update(roc_auc=roc_auc(labels, probs), pf1=probabilistic_f1(labels, probs))
    atomic_write_json(run_dir / "validation.json", summary)
    LOGGER.info("validation: %s", {k: round(v, 4) if isinstance(v, float) else v
                                   for k, v in summary.items()})
    return run_dir
