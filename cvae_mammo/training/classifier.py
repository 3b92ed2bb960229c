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
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.config import parse_image_size
from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.metadata import MetadataEncoder
from cvae_mammo.data.pairing import with_partners
from cvae_mammo.data.pipeline import build_pipeline
from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.metrics import probabilistic_f1, roc_auc
from cvae_mammo.fileio import PathLike, atomic_write_csv, atomic_write_json
from cvae_mammo.models.classifier import (
    build_classifier,
    compile_classifier,
    encode_aux_target,
    set_backbone_trainable,
)
from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.models.segmenter_classifier import segmenter_file
from cvae_mammo.tf_startup import keras, tf
from cvae_mammo.training.common import (
    ResumePoint,
    make_optimizer,
    resolve_xla,
    resume_point,
    standard_callbacks,
    xla_mode,
)
from cvae_mammo.training.runs import dataset_preprocessing, load_keras_model, run_config
from cvae_mammo.training.session import (
    Pipelines,
    Session,
    epochs_done,
    fit_epochs,
    keep_best_model,
    start_session,
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


def labelled_frames(dataset: MammoDataset, partners: bool = False
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train-split and val-split images with a known label (unknown labels are left out);
    with ``partners``, each paired with its other breast from the same split
    (:func:`~cvae_mammo.data.pairing.with_partners`)."""
    frames = []
    for split in ("train", "val"):
        rows = dataset.subset(split=split)
        labelled = rows[rows["label"].notna()]
        frames.append(with_partners(labelled, within=rows) if partners and len(labelled)
                      else labelled)
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


def model_inputs(cfg: ClassifierConfig, batch: dict[str, Any]) -> dict[str, Any]:
    """The classifier's inputs from a pipeline batch: the image, and the other breast
    (``partner``) or the encoded metadata (``tabular``) when the model takes them."""
    inputs = {"image": batch["image"]}
    if cfg.needs_partners:
        inputs["partner"] = batch["partner"]
    if cfg.tabular_features:
        inputs["tabular"] = batch["condition"]
    return inputs


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
        inputs = model_inputs(cfg, batch)
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
    batch_size: int | None = None,
) -> Pipelines:
    """Training and validation datasets of ``(inputs, targets)`` in batches of ``batch_size``
    (default: the config's; the global batch when training on several replicas)."""
    train, val = labelled_frames(dataset, cfg.needs_partners)
    batch_size = batch_size or cfg.batch_size
    mapper = _target_mapper(cfg, [train, val])
    common = {"image_size": cfg.image_size, "batch_size": batch_size, "conditioning": encoder,
              "include_ids": bool(cfg.aux_targets), "partners": cfg.needs_partners}
    train_ds = build_pipeline(train, dataset.root, augment=cfg.augment, shuffle=True,
                              seed=cfg.seed, positive_fraction=cfg.positive_fraction, **common)
    per_epoch = len(train)
    if cfg.positive_fraction:
        per_epoch = math.ceil(int((train["label"] == 0).sum()) / (1.0 - cfg.positive_fraction))
    val_ds = None
    if not val.empty:
        val_ds = build_pipeline(val, dataset.root, seed=cfg.seed, **common).map(mapper)
    return Pipelines(train_ds.map(mapper), math.ceil(per_epoch / batch_size), val_ds,
                     math.ceil(len(val) / batch_size))


def _compile_phase(model: keras.Model, cfg: ClassifierConfig, session: Session, frozen: bool,
                   steps: int, run_eagerly: bool) -> None:
    """Set the backbone's trainable layers for a phase and compile with a fresh schedule."""
    # Batch-norm statistics are only worth freezing when they were learnt (pretrained weights).
    freeze_bn = cfg.freeze_batchnorm and cfg.weights is not None
    count = set_backbone_trainable(model, not frozen, cfg.unfreeze_from, freeze_bn)
    epochs = cfg.freeze_epochs if frozen else cfg.epochs - cfg.freeze_epochs
    LOGGER.info("%s backbone: %d trainable backbone layers, %d epoch(s)",
                "frozen" if frozen else "fine-tuning", count, epochs)
    total = max(1, steps * epochs)
    optimizer = make_optimizer(session.learning_rate, total_steps=total,
                               warmup_steps=min(round(steps * cfg.warmup_epochs), total // 3),
                               weight_decay=cfg.weight_decay, clipnorm=cfg.clipnorm)
    with session.strategy.scope():
        compile_classifier(model, cfg, optimizer, run_eagerly=run_eagerly,
                           jit_compile=resolve_xla(cfg.xla))


def fit_classifier(
    data_dir: PathLike,
    out_dir: PathLike,
    config: ClassifierConfig | PathLike | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    image_size: tuple[int, int] | str | None = None,
    seed: int | None = None,
    resume: bool = False,
    loss: str | None = None,
    freeze_epochs: int | None = None,
    precision: str | None = None,
    xla: str | bool | None = None,
    run_eagerly: bool = False,
    command: list[str] | None = None,
    allow_data_change: bool = False,
    strategy: str | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Path:
    """Train the classifier on ``data_dir``'s labelled train split; return the run folder.

    ``config`` is a :class:`ClassifierConfig` or a JSON/YAML file; the other
    arguments override it (``weights="none"`` for random initialisation;
    ``batch_size`` is per replica; ``strategy`` as in
    :mod:`cvae_mammo.training.distribute`). ``resume=True`` continues
    ``out_dir`` from its last per-epoch checkpoint (``epochs`` counts from the
    start of the run), on the same manifest and split file unless
    ``allow_data_change``. Inputs are checked before ``out_dir`` is created.
    ``callbacks`` are extra Keras callbacks for ``fit``. Under several workers
    only the chief writes ``out_dir``. Raises
    :class:`~cvae_mammo.errors.TrainingDivergedError` on a NaN/inf loss.
    """
    try:
        cfg = resolve_config(config).replace(
            backbone=backbone, weights=weights, epochs=epochs, batch_size=batch_size,
            image_size=None if image_size is None else parse_image_size(image_size),
            loss=loss, freeze_epochs=freeze_epochs, precision=precision, seed=seed,
            xla=xla_mode(xla), strategy=strategy)
    except ValueError as error:  # an invalid combination of options: the user's input
        raise InputError(str(error)) from error
    cfg = cfg.replace(freeze_epochs=min(cfg.freeze_epochs, cfg.epochs))
    if cfg.needs_partners:
        segmenter_file(cfg.weights)  # InputError naming the path when there is none
    elif cfg.weights not in (None, "imagenet") and not Path(cfg.weights).is_file():
        raise InputError(f"{cfg.weights}: backbone weights file not found "
                         "(use --weights imagenet, none, or a local weights file)")
    session = start_session(cfg)
    dataset = MammoDataset.open(data_dir)
    encoder = dataset.encoder(cfg.tabular_features) if cfg.tabular_features else None
    if encoder is not None:
        cfg = cfg.replace(tabular_dim=encoder.dim)
    model_part, _ = cfg.split()
    training_part = session.training_options(cfg)
    training_part.update(train="train split, known labels", validation="val split, known labels")
    train_frame, val_frame = labelled_frames(dataset, cfg.needs_partners)
    run_dir = session.open_run(
        out_dir, run_config("classifier", cfg.image_size, model_part, training_part, encoder,
                   preprocessing=dataset_preprocessing(data_dir)),
        resume=resume, dataset_dir=data_dir, allow_data_change=allow_data_change,
        seed=cfg.seed, command=command if command is not None else sys.argv)

    data = classifier_pipelines(dataset, cfg, encoder, session.global_batch)
    LOGGER.info("fit-classifier %s: %d train (%d positive), %d val, %s, %d steps/epoch, run %s",
                cfg.backbone, len(train_frame), int((train_frame["label"] == 1).sum()),
                len(val_frame), "x".join(map(str, cfg.image_size)), data.steps, run_dir)
    point = session.resume_point(run_dir, resume)
    initial_epoch = point.epoch if point is not None else 0
    with session.strategy.scope():
        if point is not None:
            LOGGER.info("resuming from %s after epoch %d", point.checkpoint, point.epoch)
            model = load_keras_model(point.checkpoint)
        else:
            model = build_classifier(cfg)
    monitored = data.validation is not None
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
            _compile_phase(model, cfg, session, frozen, data.steps, run_eagerly)
        fit_callbacks = standard_callbacks(
            run_dir, session.global_batch, data.steps, cfg.epochs, initial_epoch=initial_epoch,
            patience=None if frozen or not monitored else cfg.early_stopping_patience,
            monitor=MONITOR_KEY if monitored else "loss",
            state=_phase_state(session, run_dir, point, initial_epoch), chief=session.chief)
        history = fit_epochs(model, data.train, data.steps, data.validation,
                             data.validation_steps, epochs=end, initial_epoch=initial_epoch,
                             callbacks=[MaximiseAsDeficit(cfg.monitor), *fit_callbacks,
                                        *callbacks])
        initial_epoch = epochs_done(history, initial_epoch)
        if initial_epoch < end:  # early stopping ended the run
            break
    if not session.chief:
        return run_dir
    return _finish(run_dir, model, dataset, val_frame, cfg, encoder)


def _phase_state(session: Session, run_dir: Path, point: ResumePoint | None,
                 initial_epoch: int) -> dict[str, Any] | None:
    """Callback state (best value, early-stopping counter) a phase starting at
    ``initial_epoch`` continues from: the chief's latest; another worker, which writes no
    state, the one it resumed from (the frozen phase keeps no early-stopping state)."""
    if not initial_epoch:
        return None
    if session.chief:
        return resume_point(run_dir).state
    return point.state if point is not None else None


def _finish(run_dir: Path, model: keras.Model, dataset: MammoDataset, val_frame: pd.DataFrame,
            cfg: ClassifierConfig, encoder: MetadataEncoder | None) -> Path:
    """Keep the best checkpoint as model.keras; write val predictions and validation.json."""
    model = keep_best_model(run_dir, model)
    if val_frame.empty:
        return run_dir
    ids, probabilities = [], []
    for batch in build_pipeline(val_frame, dataset.root, image_size=cfg.image_size,
                                batch_size=cfg.batch_size, conditioning=encoder,
                                include_ids=True, partners=cfg.needs_partners):
        inputs = model_inputs(cfg, batch)
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
