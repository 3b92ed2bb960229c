"""TensorFlow starts without its C++ start-up lines unless CVAE_MAMMO_TF_LOGS asks for them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("tensorflow")

CODE = """
import sys
from cvae_mammo.tf_startup import start_tensorflow
start_tensorflow()
print('after start', file=sys.stderr)
"""


def _start(**env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CVAE_MAMMO_TF_LOGS", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          env={**environment, **env}, timeout=120)


def test_start_up_lines_are_silenced_and_stderr_works_afterwards() -> None:
    quiet = _start()
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "after start\n"  # no absl / cudart_stub / cpu_feature_guard lines


def test_the_environment_variable_keeps_them() -> None:
    loud = _start(CVAE_MAMMO_TF_LOGS="1")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.endswith("after start\n") and loud.stderr != "after start\n"
