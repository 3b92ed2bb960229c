"""One training-options base for both model configs; config files of earlier versions still load."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.models.training_options import TrainingOptions

#: The CVAE config needs TensorFlow (its module builds the model); the classifier's does not.
CONFIGS = ("ClassifierConfig", "CVAEConfig")


def _config_class(name: str) -> type[TrainingOptions]:
    if name == "ClassifierConfig":
        return ClassifierConfig
    pytest.importorskip("keras")
    from cvae_mammo.models.cvae import CVAEConfig

    return CVAEConfig


@pytest.mark.parametrize("name", CONFIGS)
def test_both_configs_declare_each_training_option_once_with_the_base_type(name: str) -> None:
    cls = _config_class(name)
    base = typing.get_type_hints(TrainingOptions)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(TrainingOptions):
        assert hints[field.name] == base[field.name], field.name
    model, training = cls().split()
    assert set(training) == set(cls.training_fields())
    assert not set(model) & set(training)
    assert {"seed", "precision", "xla", "strategy", "early_stopping_patience"} <= set(training)
    assert "patience" not in model and "model_type" not in model
    rebuilt = cls.from_run({"model": model, "training": {**training, "dtype_policy": "float32"}})
    assert rebuilt == cls()


@pytest.mark.parametrize("name", CONFIGS)
def test_training_options_are_checked_by_name(name: str) -> None:
    cls = _config_class(name)
    for change, message in (({"precision": "half"}, "precision 'half'"),
                            ({"strategy": "ring"}, "strategy 'ring'"),
                            ({"xla": "yes"}, "xla 'yes'"),
                            ({"batch_size": 0}, "batch_size 0"),
                            ({"early_stopping_patience": 0}, "early_stopping_patience 0")):
        with pytest.raises(ValueError, match=f"{cls.__name__}: {message}"):
            cls(**change)
    assert cls(early_stopping_patience=None).early_stopping_patience is None


def test_a_classifier_run_config_of_an_earlier_version_still_loads() -> None:
    # config.json as written before the shared base: model_type inside "model", the
    # early-stopping option named "patience", xla saved as str(bool).
    model, training = ClassifierConfig(backbone="EfficientNetB0", weights=None).split()
    training.pop("early_stopping_patience")
    training.pop("strategy")
    legacy = {"model_type": "classifier", "image_size": [512, 256],
              "model": {"model_type": "classifier", **model},
              "training": {**training, "patience": 4, "xla": "False", "seed": 3,
                           "dtype_policy": "float32", "train": "train split, known labels"}}
    config = ClassifierConfig.from_run(json.loads(json.dumps(legacy)))
    assert config.early_stopping_patience == 4 and config.xla == "off" and config.seed == 3
    assert config.strategy == "auto"


def test_a_config_file_with_an_earlier_name_loads_and_both_names_are_refused(
        tmp_path: Path) -> None:
    (tmp_path / "old.yaml").write_text("model_type: classifier\npatience: 2\nweights: null\n")
    assert ClassifierConfig.load(tmp_path / "old.yaml").early_stopping_patience == 2
    (tmp_path / "both.yaml").write_text("patience: 2\nearly_stopping_patience: 3\n")
    with pytest.raises(ValueError, match="'patience' is the earlier name of "
                                         "'early_stopping_patience'"):
        ClassifierConfig.load(tmp_path / "both.yaml")


def test_a_cvae_model_config_of_an_earlier_version_still_loads() -> None:
    pytest.importorskip("keras")
    from cvae_mammo.models.cvae import CVAEConfig

    # model.keras stores the whole CVAEConfig; earlier ones had an integer warm-up and
    # neither seed, precision, xla nor strategy.
    values = CVAEConfig.small().to_dict()
    for name in ("seed", "precision", "xla", "strategy"):
        values.pop(name)
    values["warmup_epochs"] = 1
    config = CVAEConfig.from_dict(json.loads(json.dumps(values)))
    assert config.warmup_epochs == 1 and config.precision == "float32"
