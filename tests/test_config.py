"""Config files: values checked against the fields' types, bad YAML/JSON named with its line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cvae_mammo.config import ConfigBase
from cvae_mammo.errors import InputError


@dataclasses.dataclass
class Example(ConfigBase):
    """Fields of every kind the package's configs use."""

    epochs: int = 1
    rate: float = 0.1
    flag: bool = False
    name: str | None = None
    size: tuple[int, int] = (8, 8)
    filters: tuple[int, ...] = (4,)
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


def test_values_are_checked_against_the_field_types() -> None:
    good = Example.from_dict({"epochs": 3, "rate": 1, "flag": True, "name": "x", "size": [4, 2],
                              "filters": [8, 16], "weights": {"a": 0.5}})
    assert (good.size, good.filters, good.rate) == ((4, 2), (8, 16), 1)
    for values, message in (
        ({"epochs": "two"}, "option 'epochs' must be int, got 'two'"),
        ({"epochs": True}, "option 'epochs' must be int"),
        ({"rate": "1e-3"}, "YAML reads 1e-3 as text"),
        ({"flag": 1}, "option 'flag' must be bool"),
        ({"name": 3}, "option 'name' must be str or None"),
        ({"size": [4, 2, 1]}, "option 'size' must be a list of 2 int"),
        ({"filters": [8, "x"]}, "option 'filters' must be a list of int"),
        ({"weights": {"a": "heavy"}}, "a mapping of str to float"),
    ):
        with pytest.raises(ValueError, match=message):
            Example.from_dict(values)


def test_bad_files_are_input_errors_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "types.yaml").write_text("epochs: two\n")
    (tmp_path / "syntax.yaml").write_text("epochs: 3\n  rate: [0.1\n")
    (tmp_path / "list.yaml").write_text("- epochs\n")
    (tmp_path / "broken.json").write_text('{"epochs": ')
    for name, message in (("types.yaml", "types.yaml: Example: option 'epochs' must be int"),
                          ("syntax.yaml", r"syntax.yaml: not valid YAML \(line 2, column 7"),
                          ("list.yaml", "list.yaml: expected a mapping"),
                          ("broken.json", "broken.json: not valid JSON")):
        with pytest.raises(InputError, match=message):
            Example.load(tmp_path / name)
    Example(epochs=5).save(tmp_path / "ok.yaml")
    assert Example.load(tmp_path / "ok.yaml").epochs == 5
