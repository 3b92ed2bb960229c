"""Typed configuration helpers shared by every stage.

Each stage defines its own ``@dataclass`` that inherits :class:`ConfigBase`
and so gains ``to_dict`` / ``from_dict`` / ``save`` / ``load`` (JSON or
YAML by file extension) with unknown keys rejected by name.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, TypeVar

from cvae_mammo.fileio import PathLike, atomic_write_json, atomic_write_text, read_json

ConfigT = TypeVar("ConfigT", bound="ConfigBase")

#: Default output size as (height, width): cropped breasts have a median aspect of ~2.1.
DEFAULT_IMAGE_SIZE: tuple[int, int] = (1456, 728)


def parse_image_size(text: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    """Parse ``"1456x728"`` (height x width) into ``(1456, 728)``.

    Tuples and lists pass through after validation.
    """
    if isinstance(text, list | tuple):
        values = tuple(int(v) for v in text)
    else:
        match = re.fullmatch(r"\s*(\d+)\s*[xX,]\s*(\d+)\s*", str(text))
        if not match:
            raise ValueError(f"image size {text!r}: expected HEIGHTxWIDTH, e.g. 1456x728")
        values = (int(match.group(1)), int(match.group(2)))
    if len(values) != 2 or min(values) < 8:
        raise ValueError(f"image size {text!r}: need two sides of at least 8 pixels")
    return values[0], values[1]


def format_image_size(size: tuple[int, int]) -> str:
    """Inverse of :func:`parse_image_size`."""
    return f"{size[0]}x{size[1]}"


@dataclasses.dataclass
class ConfigBase:
    """Mixin giving dataclass configs dictionary and file round trips."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of the config (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[ConfigT], values: dict[str, Any]) -> ConfigT:
        """Build a config from a dictionary, rejecting unknown keys by name."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        converted = {}
        for name, value in values.items():
            default = fields[name].default
            if isinstance(default, tuple) and isinstance(value, list):
                value = tuple(value)
            converted[name] = value
        return cls(**converted)

    def replace(self: ConfigT, **changes: Any) -> ConfigT:
        """Copy of the config with ``changes`` applied (None values ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def save(self, path: PathLike) -> None:
        """Write the config as JSON (or YAML for ``.yaml`` / ``.yml``) atomically."""
        path = Path(path)
        if path.suffix.lower() in {".yaml", ".yml"}:
            import yaml

            atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[ConfigT], path: PathLike) -> ConfigT:
        """Read a config written by :meth:`save` (JSON or YAML)."""
        return cls.from_dict(load_mapping(path))


def load_mapping(path: PathLike) -> dict[str, Any]:
    """Read a JSON or YAML file that must hold a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.suffix.lower() in {".yaml", ".yml"}:
        import yaml

        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    else:
        values = read_json(path)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return values
