"""The classifier's configuration and option names; TensorFlow-free.

:class:`ClassifierConfig` holds everything needed to rebuild, train and apply
the classifier (:mod:`cvae_mammo.models.classifier` builds it); the option
constants here let the command line and config validation run without Keras.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from cvae_mammo.models.training_options import TrainingOptions

#: Backbone name -> family. Every name but ``LesionSegmenter`` is a ``keras.applications``
#: constructor; ``LesionSegmenter`` is a CVAE run's trained lesion segmenter
#: (:mod:`cvae_mammo.models.segmenter_classifier`), named by ``weights``.
BACKBONES: dict[str, str] = {
    "LesionSegmenter": "lesion_segmenter",
    "ConvNeXtTiny": "convnext",
    "ConvNeXtSmall": "convnext",
    "EfficientNetB0": "efficientnet",
    "EfficientNetB1": "efficientnet",
    "EfficientNetB2": "efficientnet",
    "EfficientNetB3": "efficientnet",
    "EfficientNetB4": "efficientnet",
    "EfficientNetV2B0": "efficientnetv2",
    "EfficientNetV2B1": "efficientnetv2",
    "EfficientNetV2B2": "efficientnetv2",
    "EfficientNetV2B3": "efficientnetv2",
    "EfficientNetV2S": "efficientnetv2",
}

#: The backbones that are ``keras.applications`` constructors.
APPLICATION_BACKBONES: tuple[str, ...] = tuple(
    name for name, family in BACKBONES.items() if family != "lesion_segmenter")

#: Auxiliary target -> number of classes (1 = binary, sigmoid; >1 = softmax).
AUX_TARGETS: dict[str, int] = {
    "invasive": 1,
    "difficult_negative_case": 1,
    "biopsy": 1,
    "BIRADS": 3,
    "density": 4,
    "view": 1,
    "laterality": 1,
}

#: Metadata columns the tabular branch may read (encoded by a train-fitted
#: :class:`~cvae_mammo.data.metadata.MetadataEncoder`). Outcome columns such as
#: biopsy or BIRADS are deliberately absent: as inputs they would leak the label.
TABULAR_FEATURES: tuple[str, ...] = ("age", "view", "laterality", "implant")

POOLINGS: tuple[str, ...] = ("avg", "max", "gem")
LOSSES: tuple[str, ...] = ("focal", "bce")
#: Validation metric that early stopping and the best checkpoint follow.
MONITORS: tuple[str, ...] = ("auc", "pf1")


@dataclasses.dataclass
class ClassifierConfig(TrainingOptions):
    """Everything needed to rebuild, train and apply the classifier.

    Model: ``backbone``, ``weights`` ("imagenet", a local weights file or
    None), ``image_size`` (height, width), ``pooling``, ``dropout``,
    ``aux_targets`` (target -> loss weight), ``tabular_features`` (metadata
    columns) with ``tabular_dim`` (their encoded width, set by training).
    Loss: ``loss`` ("focal" or "bce"), focal ``focal_alpha`` /
    ``focal_gamma`` / ``label_smoothing``; ``pos_weight`` weighs positives in
    BCE. Training: the options of :class:`TrainingOptions` and, used by
    :mod:`cvae_mammo.training.classifier`, ``freeze_epochs`` (epochs with the
    backbone frozen), ``freeze_batchnorm``, ``positive_fraction`` (oversampling); ``unfreeze_from`` names the first backbone layer to fine-tune (None = all),
    ``monitor`` is "auc" or "pf1" on the validation split.

    ``backbone="LesionSegmenter"`` builds on a CVAE run's lesion segmenter: ``weights`` is
    that run folder (or its ``lesion_segmenter.keras``), the model also takes the other
    breast, and it pools the top ``top_percent`` % of the lesion map inside the breast
    (pixels above ``mask_threshold``); ``pooling``, ``dropout``, auxiliary targets and the
    tabular branch do not apply to it.
    """

    backbone: str = "EfficientNetB0"
    weights: str | None = "imagenet"
    image_size: tuple[int, int] = (512, 256)
    pooling: str = "gem"
    gem_p: float = 3.0
    dropout: float = 0.3
    aux_targets: dict[str, float] = dataclasses.field(default_factory=dict)
    tabular_features: tuple[str, ...] = ()
    tabular_dim: int = 0
    tabular_units: int = 16
    loss: str = "focal"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    pos_weight: float = 1.0
    # training: the shared options (defaults changed here) and the classifier's own
    learning_rate: float = 3e-4
    early_stopping_patience: int | None = 5
    augment: str | None = "classifier"
    freeze_epochs: int = 1
    unfreeze_from: str | None = None
    freeze_batchnorm: bool = True
    positive_fraction: float | None = 0.25
    monitor: str = "auc"
    top_percent: float = 1.0
    mask_threshold: float = 0.04

    EXTRA_TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        "freeze_epochs", "unfreeze_from", "freeze_batchnorm", "positive_fraction", "monitor")
    RETIRED: ClassVar[tuple[str, ...]] = ("model_type",)

    def __post_init__(self) -> None:
        """Validate choices so a bad config fails before any model is built."""
        super().__post_init__()
        self.image_size = tuple(int(v) for v in self.image_size)
        self.tabular_features = tuple(self.tabular_features)
        if self.weights in ("none", "None", ""):
            self.weights = None
        checks = [
            (self.backbone in BACKBONES, f"backbone {self.backbone!r}; known: {', '.join(BACKBONES)}"),
            (self.pooling in POOLINGS, f"pooling {self.pooling!r}; known: {', '.join(POOLINGS)}"),
            (self.loss in LOSSES, f"loss {self.loss!r}; known: {', '.join(LOSSES)}"),
            (self.monitor in MONITORS, f"monitor {self.monitor!r}; known: {', '.join(MONITORS)}"),
            (0.0 <= self.dropout < 1.0, f"dropout {self.dropout}: must be in [0, 1)"),
        ]
        unknown_aux = sorted(set(self.aux_targets) - set(AUX_TARGETS))
        checks.append((not unknown_aux, f"aux target(s) {unknown_aux}; known: {', '.join(AUX_TARGETS)}"))
        unknown_tab = sorted(set(self.tabular_features) - set(TABULAR_FEATURES))
        checks.append(
            (not unknown_tab, f"tabular feature(s) {unknown_tab}; known: {', '.join(TABULAR_FEATURES)}")
        )
        checks.append((0.0 < self.top_percent <= 100.0,
                       f"top_percent {self.top_percent}: must be in (0, 100]"))
        if self.needs_partners:
            checks += [
                (self.weights not in (None, "imagenet"), f"weights {self.weights!r} for "
                 "LesionSegmenter: it needs a CVAE run folder with a lesion segmenter"),
                (not self.aux_targets and not self.tabular_features, "aux_targets or "
                 "tabular_features with LesionSegmenter: it has a single label head"),
            ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ClassifierConfig: unknown or invalid {message}")

    @property
    def needs_partners(self) -> bool:
        """Whether the model also takes the other breast (the ``LesionSegmenter`` backbone)."""
        return BACKBONES.get(self.backbone) == "lesion_segmenter"
