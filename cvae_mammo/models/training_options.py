"""Training options shared by every model's config; TensorFlow-free.

:class:`TrainingOptions` is the base of
:class:`~cvae_mammo.models.cvae.CVAEConfig` and
:class:`~cvae_mammo.models.classifier_config.ClassifierConfig`, so an option
has one name, one type and one check in both; a subclass only changes
defaults and adds options of its own (listed in ``EXTRA_TRAINING_FIELDS``).
:meth:`TrainingOptions.split` separates what rebuilds the model from what only
steers training (the two sections of a run's ``config.json``), and
:meth:`TrainingOptions.from_run` joins them again.

Config files written by earlier versions still load: names in ``RENAMED``
are read as their new name, values in ``RENAMED_VALUES`` as their new value,
and names in ``RETIRED`` are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, TypeVar

from cvae_mammo.config import ConfigBase

OptionsT = TypeVar("OptionsT", bound="TrainingOptions")

#: ``float32``, or ``mixed`` (float16 compute on a GPU, bfloat16 on a CPU).
PRECISIONS: tuple[str, ...] = ("float32", "mixed")
#: XLA compilation: ``auto`` turns it on only when a GPU is visible.
XLA_MODES: tuple[str, ...] = ("auto", "on", "off")
#: tf.distribute strategies (:func:`cvae_mammo.training.distribute.make_strategy`).
STRATEGIES: tuple[str, ...] = ("auto", "one", "mirrored", "multi-worker")


@dataclasses.dataclass
class TrainingOptions(ConfigBase):
    """Options that steer training but not the model (free to change on ``--resume``).

    ``epochs`` and ``warmup_epochs`` (linear learning-rate warm-up, may be a
    fraction) count whole passes over the training images; ``batch_size`` is
    the global batch, split over the replicas of ``strategy``;
    ``early_stopping_patience`` is the number of epochs without a better
    monitored value before training stops (None: never); ``augment`` names a
    :mod:`cvae_mammo.data.augment` policy (None: no augmentation);
    ``precision``, ``xla`` and ``strategy`` choose the numeric precision, XLA
    compilation and the tf.distribute strategy; ``seed`` seeds everything random.
    """

    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    clipnorm: float = 1.0
    warmup_epochs: float = 1.0
    early_stopping_patience: int | None = 10
    augment: str | None = None
    precision: str = "float32"
    xla: str = "auto"
    strategy: str = "auto"
    seed: int = 0

    #: Training-only options a subclass adds to the ones above.
    EXTRA_TRAINING_FIELDS: ClassVar[tuple[str, ...]] = ()
    #: Option names of earlier versions -> their name now.
    RENAMED: ClassVar[dict[str, str]] = {"patience": "early_stopping_patience"}
    #: Options of earlier versions that no longer exist (ignored when read).
    RETIRED: ClassVar[tuple[str, ...]] = ()
    #: Values earlier versions wrote -> their value now (``xla`` was saved as str(bool)).
    RENAMED_VALUES: ClassVar[dict[str, dict[Any, Any]]] = {"xla": {"True": "on", "False": "off"}}

    def __post_init__(self) -> None:
        """Check the training options, so a bad config fails before anything is built."""
        checks = (
            (self.epochs >= 1, f"epochs {self.epochs}: must be at least 1"),
            (self.batch_size >= 1, f"batch_size {self.batch_size}: must be at least 1"),
            (self.learning_rate > 0, f"learning_rate {self.learning_rate}: must be positive"),
            (self.warmup_epochs >= 0, f"warmup_epochs {self.warmup_epochs}: must be >= 0"),
            (self.early_stopping_patience is None or self.early_stopping_patience >= 1,
             f"early_stopping_patience {self.early_stopping_patience}: at least 1, or None"),
            (self.precision in PRECISIONS,
             f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}"),
            (self.xla in XLA_MODES, f"xla {self.xla!r}: choose one of {', '.join(XLA_MODES)}"),
            (self.strategy in STRATEGIES,
             f"strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{type(self).__name__}: {message}")

    @classmethod
    def training_fields(cls) -> tuple[str, ...]:
        """Names of the options that only steer training."""
        shared = tuple(field.name for field in dataclasses.fields(TrainingOptions))
        return shared + cls.EXTRA_TRAINING_FIELDS

    @classmethod
    def from_dict(cls: type[OptionsT], values: dict[str, Any]) -> OptionsT:
        """Build the config from a dictionary, reading the names of earlier versions too."""
        values = {key: value for key, value in values.items() if key not in cls.RETIRED}
        for old, new in cls.RENAMED.items():
            if old in values:
                if new in values:
                    raise ValueError(f"{cls.__name__}: {old!r} is the earlier name of {new!r}; "
                                     "give only one of them")
                values[new] = values.pop(old)
        for name, renamed in cls.RENAMED_VALUES.items():
            if isinstance(values.get(name), str) and values[name] in renamed:
                values[name] = renamed[values[name]]
        return super().from_dict(values)

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model options, training options) as plain JSON values: the ``model`` and
        ``training`` sections of a run's ``config.json``."""
        values = json.loads(json.dumps(self.to_dict()))
        training = {name: values.pop(name) for name in self.training_fields()}
        return values, training

    @classmethod
    def from_run(cls: type[OptionsT], run_config: dict[str, Any]) -> OptionsT:
        """The config of a run from its ``config.json`` content (``model`` + ``training``).

        The training section's other entries (dtype policy, data description) are skipped.
        """
        known = set(cls.training_fields()) | set(cls.RENAMED)
        training = {key: value for key, value in run_config.get("training", {}).items()
                    if key in known}
        return cls.from_dict({**run_config["model"], **training})
