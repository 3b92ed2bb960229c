"""Shared training callbacks: early-stopping state saved with the epoch it belongs to."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

keras = pytest.importorskip("keras")

from cvae_mammo.training.common import resume_point, standard_callbacks  # noqa: E402

#: val_loss per epoch: best at epochs 2 and 4 (1-based), then no improvement.
VAL_LOSS = (5.0, 4.0, 4.5, 3.0, 3.5, 3.6, 3.7, 3.8, 3.9, 4.0)
PATIENCE = 2


class ScriptedValLoss(keras.callbacks.Callback):
    """Puts a given validation loss into each epoch's logs (first in the list, like a metric)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs["val_loss"] = VAL_LOSS[epoch]


def _fit(run_dir: Path, epochs: int, resume: bool = False) -> None:
    point = resume_point(run_dir) if resume else None
    if point is None:
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    else:
        model = keras.models.load_model(point.checkpoint)
    initial = point.epoch if point else 0
    callbacks = standard_callbacks(run_dir, 4, 1, epochs, initial_epoch=initial,
                                   patience=PATIENCE, monitor="val_loss",
                                   state=point.state if point else None, tensorboard=False)
    model.fit(np.zeros((4, 2)), np.zeros((4, 1)), epochs=epochs, initial_epoch=initial,
              callbacks=[ScriptedValLoss(), *callbacks], verbose=0)


def stopped_epochs(tmp_path: Path, interrupt_after: int | None) -> int:
    """Epochs a run trains with early stopping, uninterrupted or killed after some epochs."""
    run_dir = tmp_path / f"run_{interrupt_after}"
    if interrupt_after is not None:
        _fit(run_dir, interrupt_after)
    _fit(run_dir, len(VAL_LOSS), resume=interrupt_after is not None)
    return len(pd.read_csv(run_dir / "history.csv"))


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    uninterrupted = stopped_epochs(tmp_path, None)
    assert uninterrupted == 6
    state = resume_point(tmp_path / "run_None").state
    assert (state["best"], state["best_value"], state["wait"]) == (3.0, 3.0, PATIENCE)
    assert resume_point(tmp_path / "run_None").stopped_early
    for interrupt_after in (2, 4, 5):
        assert stopped_epochs(tmp_path, interrupt_after) == uninterrupted, interrupt_after


def test_checkpoint_state_belongs_to_its_epoch(tmp_path: Path) -> None:
    _fit(tmp_path, 3)
    state = resume_point(tmp_path).state
    # After epoch 3 (val_loss 4.5): best 4.0 from epoch 2, one epoch without improvement.
    assert (state["epoch"], state["best"], state["best_value"], state["wait"]) == (3, 4.0, 4.0, 1)
    assert not resume_point(tmp_path).stopped_early
