"""The package's public surface: every exported name resolves, and light paths stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


def test_no_library_module_imports_the_command_line() -> None:
    package = Path(cvae_mammo.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "cli" or path.name == "__main__.py":  # the command line itself
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(package)}: {name}" for name in names
                          if name == "cvae_mammo.cli" or name.startswith("cvae_mammo.cli.")]
    assert not offenders
