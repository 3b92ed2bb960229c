"""Package version (single source for setup.cfg and run metadata)."""

__version__ = "0.1.0"
