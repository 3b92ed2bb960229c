"""The command line's error contract: one line naming the file, exit status 2, traceback only with -v."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd


def _cvae_mammo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cvae_mammo", *args], capture_output=True,
                          text=True, timeout=120)


def test_a_user_error_is_one_line_without_traceback_unless_verbose(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(b"not read: the metadata fails first")
    csv = tmp_path / "meta.csv"
    pd.DataFrame({"image_id": ["x", "x"], "patient_id": ["p1", "p2"]}).to_csv(csv, index=False)
    args = ["preprocess", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), "--metadata",
            str(csv)]
    quiet = _cvae_mammo(*args)
    assert quiet.returncode == 2
    assert quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith(f"cvae-mammo preprocess: error: {csv}: image x is listed "
                                   "with patient_id 'p1' and 'p2'")
    for verbose in (["-v", *args], [*args, "--verbose"]):
        loud = _cvae_mammo(*verbose)
        assert loud.returncode == 2
        assert "Traceback" in loud.stderr and loud.stderr.rstrip().endswith(
            quiet.stderr.rstrip())
    assert not (tmp_path / "ds").exists()


def test_every_command_help_answers_without_tensorflow() -> None:
    """Each parser is built, and each ``--help`` printed, without importing TensorFlow or Keras
    (timings: benchmarks/bench_cli.py)."""
    code = """
import contextlib, io, sys
from cvae_mammo.cli import COMMANDS, build_parser, main
for command in COMMANDS:
    build_parser(command)
    assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, command
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            main([command, '--help'])
        except SystemExit as stop:
            assert stop.code == 0, (command, stop.code)
    assert f'usage: cvae-mammo {command}' in printed.getvalue(), command
    assert 'tensorflow' not in sys.modules, command
print('checked', len(COMMANDS))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "checked 8"


def test_strategy_option_parses_for_both_training_commands() -> None:
    from cvae_mammo.cli import build_parser

    for command in ("fit-cvae", "fit-classifier"):
        parser, _ = build_parser(command)
        args = parser.parse_args(["--data", "d", "--out", "o", "--strategy", "multi-worker"])
        assert args.strategy == "multi-worker" and args.seed is None and args.precision is None
