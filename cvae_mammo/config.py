"""Typed configuration helpers shared by every stage.

Each stage defines its own ``@dataclass`` that inherits :class:`ConfigBase`
and so gains ``to_dict`` / ``from_dict`` / ``save`` / ``load`` (JSON or
YAML by file extension) with unknown keys rejected by name and values checked
against the fields' type hints, so a bad config file fails when it is read, with
one line naming the file, the option and the problem.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from cvae_mammo.errors import InputError
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
        """Build a config from a dictionary, rejecting unknown keys and ill-typed values by name.

        A value must match its field's type hint (an int where a float is
        expected is fine, a bool is not an int, a list stands for a tuple).
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(fields))}"
            )
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _matches(value, hints[name]):
                raise ValueError(f"{cls.__name__}: option {name!r} must be "
                                 f"{_describe(hints[name])}, got {value!r}"
                                 f"{_yaml_hint(value, hints[name])}")
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
        """Read a config written by :meth:`save` (JSON or YAML).

        Every problem with the file's content is an :class:`InputError` naming the file.
        """
        values = load_mapping(path)
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as error:
            raise InputError(f"{path}: {error}") from error


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as read from JSON/YAML) fits the type hint ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(item, args[0]) for item in value)
        return len(value) == len(args) and all(map(_matches, value, args))
    if origin is list:
        return isinstance(value, list | tuple) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, origin or hint)


def _describe(hint: Any) -> str:
    """A type hint in words: ``int``, ``a list of 2 int``, ``str or None`` ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)} {' and '.join(sorted({_describe(a) for a in args}))}"
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is dict:
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}"
    return getattr(hint, "__name__", str(hint))


def _yaml_hint(value: Any, hint: Any) -> str:
    """Why YAML may have read a number as text (``1e-3`` is text in YAML 1.1)."""
    if isinstance(value, str) and _matches(1.0, hint):
        try:
            float(value)
        except ValueError:
            return ""
        return " (text: YAML reads 1e-3 as text; write 1.0e-3 or 0.001)"
    return ""


def load_mapping(path: PathLike) -> dict[str, Any]:
    """Read a JSON or YAML file that must hold a mapping.

    Raises :class:`FileNotFoundError` when it is missing and
    :class:`~cvae_mammo.errors.InputError` (one line naming the file and
    the line) when it is not valid JSON/YAML or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    if path.suffix.lower() in {".yaml", ".yml"}:
        import yaml

        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as error:
            raise InputError(f"{path}: not UTF-8 text ({error.reason})") from error
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(error, "problem", None) or type(error).__name__
            raise InputError(f"{path}: not valid YAML ({where}{problem})") from error
    else:
        values = read_json(path)  # a damaged file: InputError naming it
    if not isinstance(values, dict):
        raise InputError(f"{path}: expected a mapping of option names to values")
    return values
