"""The life of a training run, shared by :func:`~cvae_mammo.training.cvae.fit_cvae` and
:func:`~cvae_mammo.training.classifier.fit_classifier`.

1. :func:`start_session`: the tf.distribute strategy first (MultiWorkerMirroredStrategy
   must exist before any other TensorFlow work), then the seed and the precision policy,
   the global batch and the scaled learning rate (:mod:`cvae_mammo.training.distribute`).
2. :meth:`Session.open_run`: the chief creates (or checks, on resume) the run folder and
   writes ``config.json`` and ``metadata.json``; other workers write nothing.
3. :meth:`Session.resume_point`: where a resumed run continues, read from the chief's
   checkpoints by every worker.
4. :func:`fit_epochs`: ``model.fit`` on repeated datasets with explicit steps per epoch
   (the pipelines skip unreadable images, so their length is unknown to Keras), sharded
   by DATA over the workers.
5. :func:`keep_best_model`: the best checkpoint becomes ``model.keras``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cvae_mammo.errors import InputError
from cvae_mammo.fileio import PathLike
from cvae_mammo.models.training_options import TrainingOptions
from cvae_mammo.tf_startup import keras, tf
from cvae_mammo.training.common import (
    BEST_CHECKPOINT,
    CHECKPOINT_DIR,
    ResumePoint,
    configure_precision,
    resume_point,
    set_global_seed,
)
from cvae_mammo.training.distribute import (
    describe,
    global_batch,
    is_chief,
    make_strategy,
    scaled_learning_rate,
    shard_by_data,
)
from cvae_mammo.training.runs import (
    CONFIG_NAME,
    MODEL_NAME,
    prepare_run_dir,
    write_run_metadata,
)

LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass
class Pipelines:
    """One pass of the training and validation images, and the batches each pass holds."""

    train: tf.data.Dataset
    steps: int
    validation: tf.data.Dataset | None
    validation_steps: int


@dataclasses.dataclass
class Session:
    """A started training run: its strategy, this process's role and the scaled batch and rate."""

    strategy: tf.distribute.Strategy
    chief: bool
    global_batch: int
    learning_rate: float
    dtype_policy: str

    def open_run(self, out_dir: PathLike, config: dict[str, Any], *, resume: bool,
                 dataset_dir: PathLike, allow_data_change: bool, seed: int,
                 command: list[str]) -> Path:
        """The run folder: made (or checked for resume) and described by the chief only."""
        if not self.chief:
            return Path(out_dir)
        run_dir = prepare_run_dir(out_dir, config, resume=resume, dataset_dir=dataset_dir,
                                  allow_data_change=allow_data_change)
        write_run_metadata(run_dir, dataset_dir, seed, command)
        return run_dir

    def resume_point(self, run_dir: Path, resume: bool) -> ResumePoint | None:
        """The chief's last checkpoint when resuming (None for a fresh run or none saved yet).

        A worker that cannot see the chief's run folder would start over while the
        chief continues, so that is an error.
        """
        if not resume:
            return None
        if not self.chief and not (run_dir / CONFIG_NAME).is_file():
            raise InputError(f"{run_dir}: this worker cannot see the run to resume; put --out "
                             "on storage that every worker shares")
        return resume_point(run_dir)

    def training_options(self, config: TrainingOptions) -> dict[str, Any]:
        """The run's training section: the config's training options and how they were applied."""
        _, training = config.split()
        training.update(dtype_policy=self.dtype_policy, replicas=self.replicas,
                        global_batch=self.global_batch, scaled_learning_rate=self.learning_rate)
        return training

    @property
    def replicas(self) -> int:
        """Replicas training in sync (devices over all workers)."""
        return int(self.strategy.num_replicas_in_sync)


def start_session(config: TrainingOptions) -> Session:
    """Create the strategy, seed everything, set the precision policy; log the set-up."""
    strategy = make_strategy(config.strategy)
    set_global_seed(config.seed)
    policy = configure_precision(config.precision)
    session = Session(strategy=strategy, chief=is_chief(strategy),
                      global_batch=global_batch(config.batch_size, strategy),
                      learning_rate=scaled_learning_rate(config.learning_rate, strategy),
                      dtype_policy=policy)
    LOGGER.info("%s; global batch %d, learning rate %.3g", describe(strategy),
                session.global_batch, session.learning_rate)
    return session


def fit_epochs(model: keras.Model, train: tf.data.Dataset, steps: int,
               validation: tf.data.Dataset | None, validation_steps: int, *, epochs: int,
               initial_epoch: int, callbacks: Sequence[keras.callbacks.Callback]
               ) -> keras.callbacks.History:
    """``model.fit`` over ``steps`` batches of ``train`` per epoch and ``validation_steps``
    of ``validation``; both datasets are repeated, so an epoch never runs out of data."""
    return model.fit(
        shard_by_data(train.repeat()), steps_per_epoch=steps,
        validation_data=None if validation is None else shard_by_data(validation.repeat()),
        validation_steps=validation_steps if validation is not None else None,
        epochs=epochs, initial_epoch=initial_epoch, callbacks=list(callbacks), verbose=0,
        shuffle=False)  # the pipelines shuffle themselves


def epochs_done(history: keras.callbacks.History, initial_epoch: int) -> int:
    """Epochs finished after a ``fit`` that started at ``initial_epoch`` (early stopping may
    end it before its last epoch)."""
    return history.epoch[-1] + 1 if history.epoch else initial_epoch


def keep_best_model(run_dir: Path, model: keras.Model) -> keras.Model:
    """Copy the best checkpoint to ``model.keras`` (or save ``model`` when there is none)
    and return the model in that file."""
    best = run_dir / CHECKPOINT_DIR / BEST_CHECKPOINT
    if not best.is_file():
        model.save(run_dir / MODEL_NAME)
        return model
    temporary = run_dir / f".{MODEL_NAME}.tmp.keras"
    shutil.copyfile(best, temporary)
    os.replace(temporary, run_dir / MODEL_NAME)
    return keras.models.load_model(run_dir / MODEL_NAME)
