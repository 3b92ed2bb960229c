"""Start TensorFlow without its C++ start-up lines on the terminal.

TensorFlow 2.21 writes absl, ``cudart_stub``, ``cpu_feature_guard`` and
``cuInit`` lines to the process's standard error when it is imported and when
it first looks for GPUs; ``TF_CPP_MIN_LOG_LEVEL`` does not silence them
(tensorflow/tensorflow#100442). :func:`start_tensorflow` imports TensorFlow and
lists its devices once with file descriptor 2 pointed at ``/dev/null``, then
restores it, so Python exceptions and every later message still reach the
terminal. It also sets ``TF_CPP_MIN_LOG_LEVEL=1`` (TensorFlow's C++ INFO
lines hidden, warnings and errors shown) unless that variable is already set.

Library modules import TensorFlow, Keras and TensorFlow Probability from here,
``from cvae_mammo.tf_startup import keras, tf, tfp``, so whichever of them a
script, a notebook or the command line imports first, TensorFlow starts quietly.

Set :data:`SHOW_LOGS_VARIABLE` (``CVAE_MAMMO_TF_LOGS=1``) to see TensorFlow's
start-up exactly as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

__all__ = ["SHOW_LOGS_VARIABLE", "keras", "start_tensorflow", "tf", "tfp"]

#: Environment variable that, set to anything but ``0`` or empty, keeps TensorFlow's start-up lines.
SHOW_LOGS_VARIABLE = "CVAE_MAMMO_TF_LOGS"

#: Names this module hands out -> the module each stands for.
_MODULES = {"tf": "tensorflow", "keras": "keras", "tfp": "tensorflow_probability"}
_started = False


@contextlib.contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """Point file descriptor 2 (C++ code writes there too) at /dev/null, then restore it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def start_tensorflow() -> None:
    """Import TensorFlow and probe its devices quietly (once per process)."""
    global _started
    if _started:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    show = os.environ.get(SHOW_LOGS_VARIABLE, "0") not in ("", "0")
    with contextlib.nullcontext() if show else _stderr_to_devnull():
        import tensorflow

        tensorflow.config.list_physical_devices("GPU")
    _started = True


def __getattr__(name: str) -> ModuleType:
    """``tf``, ``keras`` and ``tfp``: the module, imported after :func:`start_tensorflow`."""
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    start_tensorflow()
    return importlib.import_module(_MODULES[name])
