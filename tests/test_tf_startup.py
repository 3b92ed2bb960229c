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
#: A script using the library's TensorFlow modules directly, without start_tensorflow().
LIBRARY_CODE = """
import sys
from cvae_mammo.training.cvae import fit_cvae
from cvae_mammo.models.cvae import CVAEConfig, build_cvae
from cvae_mammo.inference.detector import Detector
model = build_cvae(CVAEConfig(image_size=(32, 16), filters=(4, 8), latent_channels=2))
print('built', model.name, file=sys.stderr)
"""


def _start(code: str = CODE, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("CVAE_MAMMO_TF_LOGS", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**environment, **env}, timeout=120)


def test_start_up_lines_are_silenced_and_stderr_works_afterwards() -> None:
    quiet = _start()
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "after start\n"  # no absl / cudart_stub / cpu_feature_guard lines


def test_the_environment_variable_keeps_them() -> None:
    loud = _start(CVAE_MAMMO_TF_LOGS="1")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.endswith("after start\n") and loud.stderr != "after start\n"


def test_library_modules_start_tensorflow_quietly_in_a_plain_script() -> None:
    script = _start(LIBRARY_CODE)
    assert script.returncode == 0, script.stderr
    assert script.stderr.startswith("built ") and script.stderr.count("\n") == 1, script.stderr
