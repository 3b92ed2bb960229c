"""Training helpers shared by the CVAE and the classifier.

- Environment: :func:`set_global_seed`, :func:`configure_precision`
  (``float32`` / ``mixed``), :func:`resolve_xla` (``auto`` = on with a GPU); the
  tf.distribute strategy comes from :mod:`cvae_mammo.training.distribute`.
- Optimiser: :func:`make_optimizer` = AdamW with gradient-norm clipping and a
  linear warm-up + cosine decay learning rate.
- Callbacks: :class:`EpochCheckpoint` (``checkpoints/last.keras`` every
  epoch, ``checkpoints/best.keras`` on a better monitored value, and
  ``checkpoints/state.json`` for ``--resume``), :class:`NonFiniteLossGuard`
  (raises :class:`~cvae_mammo.errors.TrainingDivergedError` at the first
  NaN/inf loss; the last good checkpoint stays), :class:`HistoryCSV`
  (``history.csv`` rewritten atomically each epoch), :class:`ThroughputProgress`
  (tqdm bar with images/s and ETA), :class:`ResumableEarlyStopping`, and
  :func:`standard_callbacks` assembling them with TensorBoard (the writing ones on
  the chief only).
- Resume: :func:`resume_point` returns the checkpoint and epoch to continue from,
  with the early-stopping state of that same epoch (and whether it ended the run).

A typical loop::

    strategy = make_strategy(config.strategy)      # before any other TensorFlow work
    set_global_seed(config.seed); configure_precision(config.precision)
    with strategy.scope():
        point = resume_point(run_dir) if resume else None
        model = keras.models.load_model(point.checkpoint) if point else build(...)
        if not point: model.compile(optimizer=make_optimizer(...), jit_compile=resolve_xla(xla))
    model.fit(train.repeat(), steps_per_epoch=steps, validation_data=val.repeat(),
              validation_steps=val_steps, epochs=epochs, verbose=0, shuffle=False,
              initial_epoch=point.epoch if point else 0,
              callbacks=standard_callbacks(run_dir, batch_size, steps, state=point.state if point else None))
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.errors import InputError, TrainingDivergedError
from cvae_mammo.fileio import PathLike, atomic_write_csv, atomic_write_json, read_json
from cvae_mammo.models.training_options import PRECISIONS, XLA_MODES
from cvae_mammo.tf_startup import keras, tf

LOGGER = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.keras"
BEST_CHECKPOINT = "best.keras"
STATE_NAME = "state.json"
HISTORY_NAME = "history.csv"


def set_global_seed(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow (``keras.utils.set_random_seed``)."""
    keras.utils.set_random_seed(int(seed))


def gpu_count() -> int:
    """Number of GPUs TensorFlow can see."""
    return len(tf.config.list_physical_devices("GPU"))


def configure_precision(precision: str = "float32") -> str:
    """Set Keras' global dtype policy and return its name.

    ``mixed`` means ``mixed_float16`` on a GPU and ``mixed_bfloat16`` on a
    CPU (float16 is emulated and slow there). Call before building a model.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    policy = "float32"
    if precision == "mixed":
        policy = "mixed_float16" if gpu_count() else "mixed_bfloat16"
    keras.config.set_dtype_policy(policy)
    return policy


def xla_mode(xla: str | bool | None) -> str | None:
    """An ``xla`` argument as a config value: True/False become ``on``/``off``."""
    if isinstance(xla, bool):
        return "on" if xla else "off"
    return xla


def resolve_xla(xla: str | bool = "auto") -> bool:
    """``jit_compile`` flag: ``auto`` turns XLA on only when a GPU is visible."""
    xla = xla_mode(xla)
    if xla not in XLA_MODES:
        raise ValueError(f"xla {xla!r}: choose one of {', '.join(XLA_MODES)}")
    return gpu_count() > 0 if xla == "auto" else xla == "on"


def make_optimizer(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    weight_decay: float = 1e-4,
    clipnorm: float | None = 1.0,
) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up to ``learning_rate`` then cosine decay to 1% of it."""
    warmup_steps = max(0, min(int(warmup_steps), int(total_steps) - 1))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(1, int(total_steps) - warmup_steps),
        alpha=0.01,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )
    return keras.optimizers.AdamW(learning_rate=schedule, weight_decay=weight_decay,
                                  clipnorm=clipnorm)


def _finite_float(value: Any) -> float:
    return float(np.asarray(value, dtype=np.float64))


def save_model_atomically(model: keras.Model, path: Path) -> None:
    """Save ``model`` to ``path`` (``.keras``) through a temporary file, so a reader never
    sees a half-written model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.keras")
    model.save(temporary)
    os.replace(temporary, path)


@dataclasses.dataclass
class ResumePoint:
    """Where an interrupted run continues: checkpoint file, epochs done, saved callback state."""

    checkpoint: Path
    epoch: int
    state: dict[str, Any]

    @property
    def stopped_early(self) -> bool:
        """True when early stopping ended the run at :attr:`epoch`: there is nothing to continue."""
        return bool(self.state.get("stopped_early", False))


def resume_point(run_dir: PathLike) -> ResumePoint | None:
    """The last per-epoch checkpoint of ``run_dir``, or None when there is none yet."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    state_path = folder / STATE_NAME
    if not state_path.is_file() or not (folder / LAST_CHECKPOINT).is_file():
        return None
    try:
        state = read_json(state_path)
        epoch = int(state["epoch"])
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{state_path}: damaged checkpoint state ({error}); cannot resume"
                         ) from error
    return ResumePoint(checkpoint=folder / LAST_CHECKPOINT, epoch=epoch, state=state)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose best value and patience counter survive ``--resume``."""

    def __init__(self, state: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._resume_state = state or {}

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        super().on_train_begin(logs)
        if self._resume_state.get("best") is not None:
            self.best = float(self._resume_state["best"])
            self.wait = int(self._resume_state.get("wait", 0))


class EpochCheckpoint(keras.callbacks.Callback):
    """Save ``last.keras`` every epoch and ``best.keras`` on improvement, with ``state.json``.

    An epoch whose logs hold a non-finite value is not saved, so the last
    checkpoint on disk is always a good one. ``state.json`` records the
    early-stopping state after this epoch, so the callback must come AFTER
    ``early_stopping`` in the callback list (as :func:`standard_callbacks`
    puts it): Keras calls callbacks in list order.
    """

    def __init__(self, run_dir: PathLike, monitor: str = "val_loss",
                 early_stopping: ResumableEarlyStopping | None = None,
                 state: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.monitor = monitor
        self.early_stopping = early_stopping
        self.best = (state or {}).get("best_value")

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        values = {key: _finite_float(value) for key, value in logs.items()}
        if not all(math.isfinite(v) for v in values.values()):
            LOGGER.warning("epoch %d has non-finite metrics; checkpoint not saved", epoch + 1)
            return
        save_model_atomically(self.model, self.folder / LAST_CHECKPOINT)
        current = values.get(self.monitor, values.get("loss"))
        if current is not None and (self.best is None or current < self.best):
            self.best = current
            save_model_atomically(self.model, self.folder / BEST_CHECKPOINT)
        state = {"epoch": epoch + 1, "best_value": self.best, "monitor": self.monitor}
        if self.early_stopping is not None:
            best = self.early_stopping.best
            state.update(best=None if best is None else float(best),
                         wait=int(self.early_stopping.wait),
                         stopped_early=bool(self.model.stop_training))
        atomic_write_json(self.folder / STATE_NAME, state)


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stop at the first NaN/inf training loss with :class:`TrainingDivergedError`."""

    def __init__(self, run_dir: PathLike) -> None:
        super().__init__()
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = _finite_float((logs or {}).get("loss", 0.0))
        if math.isfinite(loss):
            return
        point = resume_point(self.folder.parent)
        kept = (f"the last good checkpoint is {point.checkpoint} (after epoch {point.epoch})"
                if point else "no checkpoint had been saved yet")
        raise TrainingDivergedError(
            f"training loss became {loss} at epoch {self.epoch + 1}, batch {batch + 1}; {kept}. "
            "Lower the learning rate or check the input images, then --resume.")


class HistoryCSV(keras.callbacks.Callback):
    """Rewrite ``history.csv`` atomically after every epoch (rows of earlier runs kept on resume)."""

    def __init__(self, path: PathLike, initial_epoch: int = 0) -> None:
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []
        if initial_epoch and self.path.is_file():
            previous = pd.read_csv(self.path)
            self.rows = previous[previous["epoch"] <= initial_epoch].to_dict("records")
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        row: dict[str, Any] = {"epoch": epoch + 1}
        row.update({key: _finite_float(value) for key, value in (logs or {}).items()})
        optimizer = self.model.optimizer
        learning_rate = optimizer.learning_rate
        if callable(learning_rate):
            learning_rate = learning_rate(optimizer.iterations)
        row["learning_rate"] = _finite_float(learning_rate)
        row["seconds"] = round(time.perf_counter() - self.started, 3)
        self.rows.append(row)
        atomic_write_csv(self.path, pd.DataFrame.from_records(self.rows))


class ThroughputProgress(keras.callbacks.Callback):
    """A tqdm bar per epoch with loss and images/s, and one log line per epoch."""

    def __init__(self, batch_size: int, steps_per_epoch: int | None, epochs: int) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.steps = steps_per_epoch
        self.epochs = int(epochs)
        self.bar: Any = None
        self.started = 0.0
        self.seen = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.steps, desc=f"epoch {epoch + 1}/{self.epochs}",
                        unit="batch", leave=False, mininterval=2.0)
        self.started = time.perf_counter()
        self.seen = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.seen += self.batch_size
        rate = self.seen / max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{_finite_float((logs or {}).get('loss', 0.0)):.4f}",
                             img_s=f"{rate:.1f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = time.perf_counter() - self.started
        self.bar.close()
        shown = " ".join(f"{k}={_finite_float(v):.4g}" for k, v in (logs or {}).items())
        LOGGER.info("epoch %d/%d %.1fs (%.1f images/s) %s", epoch + 1, self.epochs, seconds,
                    self.seen / max(seconds, 1e-9), shown)


def standard_callbacks(
    run_dir: PathLike,
    batch_size: int,
    steps_per_epoch: int | None,
    epochs: int,
    initial_epoch: int = 0,
    patience: int | None = 10,
    monitor: str = "val_loss",
    state: dict[str, Any] | None = None,
    tensorboard: bool = True,
    chief: bool = True,
) -> list[keras.callbacks.Callback]:
    """Guard, checkpoints, early stopping, history.csv, progress and TensorBoard for ``fit``.

    ``patience=None`` disables early stopping; ``state`` is
    :attr:`ResumePoint.state` when resuming. TensorBoard logs go to
    ``run_dir/logs`` when the ``tensorboard`` package is installed.
    ``chief=False`` (a worker other than the chief) leaves out everything that
    writes: the checkpoints, history.csv and TensorBoard. ``batch_size`` is the
    global batch (images per step over all replicas).
    """
    run_dir = Path(run_dir)
    callbacks: list[keras.callbacks.Callback] = [NonFiniteLossGuard(run_dir)]
    early = None
    if patience is not None:
        early = ResumableEarlyStopping(state=state, monitor=monitor, patience=int(patience),
                                       mode="min")
        callbacks.append(early)  # before the checkpoint, which saves its state of this epoch
    callbacks.append(ThroughputProgress(batch_size, steps_per_epoch, epochs))
    if not chief:
        return callbacks
    callbacks += [EpochCheckpoint(run_dir, monitor=monitor, early_stopping=early, state=state),
                  HistoryCSV(run_dir / HISTORY_NAME, initial_epoch)]
    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs"),
                                                     update_freq="epoch", write_graph=False))
    return callbacks
