"""The package's public surface: every exported name resolves, and light paths stay light."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cvae_mammo


@pytest.mark.parametrize("name", sorted(cvae_mammo._EXPORTS))
def test_every_public_name_resolves(name: str) -> None:
    assert getattr(cvae_mammo, name) is not None
    assert name in dir(cvae_mammo)


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        _ = cvae_mammo.no_such_thing


@pytest.mark.parametrize("statement", [
    "import cvae_mammo",
    "import cvae_mammo; cvae_mammo.preprocess_dataset; cvae_mammo.make_splits",
    "from cvae_mammo.cli import main; main(['preprocess', '--help'])",
])
def test_light_paths_do_not_import_tensorflow(statement: str) -> None:
    code = f"{statement}\nimport sys\nassert 'tensorflow' not in sys.modules, 'tensorflow loaded'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_lists_commands_and_rejects_unknown() -> None:
    listed = subprocess.run([sys.executable, "-m", "cvae_mammo", "--help"],
                            capture_output=True, text=True)
    assert listed.returncode == 0
    for command in ("preprocess", "split", "fit-cvae", "calibrate", "fit-classifier",
                    "predict", "report", "demo"):
        assert command in listed.stdout
    unknown = subprocess.run([sys.executable, "-m", "cvae_mammo", "frobnicate"],
                             capture_output=True, text=True)
    assert unknown.returncode == 2
    assert "unknown command 'frobnicate'" in unknown.stderr
