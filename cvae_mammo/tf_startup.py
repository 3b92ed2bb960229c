"""Start TensorFlow without its C++ start-up lines on the terminal.

TensorFlow 2.21 writes absl, ``cudart_stub``, ``cpu_feature_guard`` and
``cuInit`` lines to the process's standard error when it is imported and when
it first looks for GPUs; ``TF_CPP_MIN_LOG_LEVEL`` does not silence them
(tensorflow/tensorflow#100442). :func:`start_tensorflow` imports TensorFlow and
lists its devices once with file descriptor 2 pointed at ``/dev/null``, then
restores it, so Python exceptions and every later message still reach the
terminal. It also sets ``TF_CPP_MIN_LOG_LEVEL=1`` (TensorFlow's C++ INFO
lines hidden, warnings and errors shown) unless that variable is already set.

Set :data:`SHOW_LOGS_VARIABLE` (``CVAE_MAMMO_TF_LOGS=1``) to see TensorFlow's
start-up exactly as it is.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

#: Environment variable that, set to anything but ``0`` or empty, keeps TensorFlow's start-up lines.
SHOW_LOGS_VARIABLE = "CVAE_MAMMO_TF_LOGS"

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
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")
    _started = True
