"""The ``cvae-mammo`` command line.

Each subcommand lives in its own module under ``cvae_mammo.cli`` exposing
``add_arguments(parser)`` and ``run(args) -> int``. Only the chosen
command's module is imported, and no parser needs TensorFlow, so every
``--help`` and ``cvae-mammo preprocess`` / ``split`` never load it. The
commands that train or score start TensorFlow quietly first
(:func:`cvae_mammo.tf_startup.start_tensorflow`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from cvae_mammo._version import __version__
from cvae_mammo.errors import InputError
from cvae_mammo.tf_startup import start_tensorflow

#: Exceptions that mean bad input (a file, a column, an option): one line, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (
    InputError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
    PermissionError,
)

#: command name -> (module, one-line help), in pipeline order.
COMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("cvae_mammo.cli.preprocess", "DICOM/PNG/PGM mammograms -> clean dataset folder"),
    "split": ("cvae_mammo.cli.split", "patient-grouped, stratified train/val/test splits"),
    "fit-cvae": ("cvae_mammo.cli.fit_cvae", "train the conditional VAE on negative images"),
    "calibrate": ("cvae_mammo.cli.calibrate", "choose and save a decision threshold for a run"),
    "fit-classifier": ("cvae_mammo.cli.fit_classifier", "train the transfer-learning classifier"),
    "predict": ("cvae_mammo.cli.predict", "score a split with a run; optional anomaly/CAM maps"),
    "report": ("cvae_mammo.cli.report", "side-by-side ROC / F1 report of several runs"),
    "demo": ("cvae_mammo.cli.demo", "the whole pipeline on built-in synthetic phantoms"),
}

#: Commands that always load TensorFlow (``report`` does only to score a run without scores).
TENSORFLOW_COMMANDS: frozenset[str] = frozenset(
    {"fit-cvae", "calibrate", "fit-classifier", "predict", "demo"})


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        f"cvae-mammo {__version__}: anomaly detection on screening mammograms",
        "",
        "usage: cvae-mammo [-v] COMMAND [options]   (cvae-mammo COMMAND --help for its options)",
        "",
        "  -v, --verbose  debug logging, and the traceback of an error",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def build_parser(command: str) -> tuple[argparse.ArgumentParser, object]:
    """The argument parser of one subcommand and the module that runs it."""
    module_name, help_text = COMMANDS[command]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"cvae-mammo {command}",
        description=(module.__doc__ or help_text).strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the traceback of an error")
    module.add_arguments(parser)
    return parser, module


def one_line(error: BaseException) -> str:
    """An exception's message on one line (Keras and YAML messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cvae-mammo``; returns the process exit status.

    A user error (bad input file, option or config; exit status 2) and an
    unexpected failure (exit status 1) are reported on one line of stderr;
    ``-v`` before or after the command adds debug logging and the traceback.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    verbose = bool(args_list) and args_list[0] in {"-v", "--verbose"}
    if verbose:
        args_list = args_list[1:]
    if not args_list or args_list[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args_list[0] == "--version":
        print(__version__)
        return 0
    command = args_list[0]
    if command not in COMMANDS:
        print(f"cvae-mammo: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser, module = build_parser(command)
    args = parser.parse_args(args_list[1:])
    args.verbose = verbose = verbose or args.verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if command in TENSORFLOW_COMMANDS:
            start_tensorflow()
        return int(module.run(args) or 0)
    except USER_ERRORS as error:
        return _report(command, error, 2, f"error: {one_line(error)}", verbose)
    except KeyboardInterrupt as error:
        return _report(command, error, 130, "interrupted", verbose)
    except Exception as error:  # a bug, not the user's input: say so, on one line
        hint = "" if verbose else " (run with -v for the traceback)"
        return _report(command, error, 1, f"internal error: {type(error).__name__}: "
                                          f"{one_line(error)}{hint}", verbose)


def _report(command: str, error: BaseException, status: int, text: str, verbose: bool) -> int:
    """Print the traceback (verbose only) and the one-line message; return the exit status."""
    if verbose:
        traceback.print_exception(error)
    print(f"cvae-mammo {command}: {text}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
