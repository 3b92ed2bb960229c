"""cvae_mammo: anomaly detection on screening mammograms.

The public API is imported lazily, so ``import cvae_mammo`` is cheap and
never loads TensorFlow; a name is imported from its module the first time it
is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from cvae_mammo._version import __version__

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cvae_mammo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
