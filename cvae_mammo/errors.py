"""Exceptions that carry a message meant for the user (file name + problem)."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a file, a column or an option. The message names it and says what is wrong."""


class ImageReadError(InputError):
    """An image or DICOM file could not be read or decoded.

    ``stage`` names the pipeline step that failed (``read``, ``decode``,
    ``window``, ``crop``, ``write`` ...), for ``failures.csv``.
    """

    def __init__(self, source: str, reason: str, stage: str = "read") -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason
        self.stage = stage


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
