"""The classifier built on a trained lesion segmenter (backbone ``"LesionSegmenter"``).

From random weights, an ImageNet architecture trained on ~100 labelled mini-MIAS images sits at
chance (ROC-AUC 0.49 on unseen women). This backbone starts instead from what the CVAE run's
bilateral lesion segmenter (:mod:`cvae_mammo.models.lesion_segmenter`) learnt from synthetic
lesions in normal breasts, and fine-tunes it on the labels:

    image, other breast -> segmenter(image, other) -> lesion map (mean member probability,
    zero outside the breast) -> mean of its top ``top_percent`` % -> own
    other, image        -> segmenter(other, image) -> ... -> other's
    Dense(1, sigmoid)([own, other])  ("label")

The ``label`` unit starts with weights ``+s`` and ``-s``: before any training the classifier
ranks images exactly as the segmenter's own top-1% score minus the other breast's (the
library's default detector score, without its smoothing and flip averaging). The frozen
phase then fits only the head; fine-tuning adapts the segmenter itself to real findings.
``weights`` names the CVAE run folder (or its ``lesion_segmenter.keras``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cvae_mammo.errors import InputError
from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.models.lesion_segmenter import SEGMENTER_FILE
from cvae_mammo.models.losses import breast_mask
from cvae_mammo.tf_startup import keras

#: Initial weight of the own and (negated) other breast's score in the ``label`` unit.
HEAD_SCALE = 10.0
#: Name of the layer whose output is the lesion map of the image (its anomaly map).
LESION_MAP_LAYER = "lesion_map"


def segmenter_file(weights: str | Path | None) -> Path:
    """The segmenter file that ``weights`` names: a CVAE run folder (its
    ``lesion_segmenter.keras``) or the ``.keras`` file itself; InputError otherwise."""
    if weights in (None, "imagenet"):
        raise InputError(f"backbone LesionSegmenter needs --weights RUN_DIR (a CVAE run folder "
                         f"with {SEGMENTER_FILE}) or the .keras file; got {weights!r}")
    path = Path(weights)
    if path.is_dir():
        path = path / SEGMENTER_FILE
    if not path.is_file():
        raise InputError(f"{path}: no lesion segmenter there (train one with fit-cvae and "
                         "lesion_steps > 0, then pass its run folder as --weights)")
    return path


def load_segmenter_backbone(weights: str | Path | None, image_size: tuple[int, int]
                            ) -> keras.Model:
    """The trained segmenter (or ensemble) that ``weights`` names, checked against
    ``image_size`` (height, width): InputError naming the file when it cannot serve."""
    path = segmenter_file(weights)
    try:
        model = keras.saving.load_model(path, compile=False)
    except (ValueError, OSError, KeyError) as error:
        raise InputError(f"{path}: cannot load the lesion segmenter ({error})") from error
    expected = (*image_size, 2)
    found = tuple(model.inputs[0].shape[1:])
    if found != expected:
        raise InputError(f"{path}: the segmenter takes {found[0]}x{found[1]} image pairs, the "
                         f"classifier {image_size[0]}x{image_size[1]}; set --image-size "
                         f"{found[0]}x{found[1]}")
    return model


@keras.saving.register_keras_serializable(package="cvae_mammo")
class MaskedLesionMap(keras.layers.Layer):
    """``(logits [B, H, W, M], image [B, H, W, 1])`` -> the members' mean probability
    ``[B, H, W, 1]``, zero outside the breast (:func:`~cvae_mammo.models.losses.breast_mask`)."""

    def __init__(self, mask_threshold: float = 0.04, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask_threshold = float(mask_threshold)

    def call(self, inputs: list[Any]) -> Any:
        """Mean sigmoid over the member channels times the breast mask."""
        logits, image = inputs
        probability = keras.ops.mean(keras.ops.sigmoid(logits), axis=-1, keepdims=True)
        return probability * breast_mask(image, self.mask_threshold)

    def compute_output_shape(self, input_shapes: list[tuple]) -> tuple:
        """``[B, H, W, 1]``."""
        return (*input_shapes[0][:-1], 1)

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {**super().get_config(), "mask_threshold": self.mask_threshold}


@keras.saving.register_keras_serializable(package="cvae_mammo")
class TopPercentPooling(keras.layers.Layer):
    """``(map [B, H, W, 1], image [B, H, W, 1])`` -> ``[B, 1]``: the mean of the largest
    ``percent`` % of the map inside the breast (at least one pixel; 0 for an empty breast,
    e.g. a missing other breast), as :func:`~cvae_mammo.inference.scoring.top_percent_mean`."""

    def __init__(self, percent: float = 1.0, mask_threshold: float = 0.04, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.percent = float(percent)
        self.mask_threshold = float(mask_threshold)

    def call(self, inputs: list[Any]) -> Any:
        """Sort each map's breast pixels and average the top share."""
        ops = keras.ops
        values, image = inputs
        batch = ops.shape(values)[0]
        inside = ops.reshape(breast_mask(image, self.mask_threshold), (batch, -1))
        flat = ops.where(inside > 0.5, ops.reshape(values, (batch, -1)), -1.0)
        descending = ops.flip(ops.sort(flat, axis=-1), axis=-1)
        count = ops.maximum(ops.ceil(ops.sum(inside, axis=-1, keepdims=True) * self.percent / 100),
                            1.0)
        ranks = ops.cast(ops.arange(ops.shape(flat)[-1]), values.dtype)[None, :]
        chosen = ops.cast(ranks < count, values.dtype) * ops.maximum(descending, 0.0)
        return ops.sum(chosen, axis=-1, keepdims=True) / count

    def compute_output_shape(self, input_shapes: list[tuple]) -> tuple:
        """``[B, 1]``."""
        return (input_shapes[0][0], 1)

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {**super().get_config(), "percent": self.percent,
                "mask_threshold": self.mask_threshold}


def build_segmenter_classifier(config: ClassifierConfig) -> keras.Model:
    """The classifier of the module docstring for ``config`` (``backbone="LesionSegmenter"``,
    ``weights`` a run folder or segmenter file). Inputs ``{"image", "partner"}``, both
    ``[B, H, W, 1]`` in [0, 1] (the partner all zero when there is none); output
    ``{"label"}``. The segmenter is one nested model, shared by both passes."""
    height, width = config.image_size
    image = keras.Input((height, width, 1), name="image")
    partner = keras.Input((height, width, 1), name="partner")
    segmenter = load_segmenter_backbone(config.weights, config.image_size)
    lesion_map = MaskedLesionMap(config.mask_threshold, name=LESION_MAP_LAYER)
    pool = TopPercentPooling(config.top_percent, config.mask_threshold, name="top_percent_pool")
    own_logits = segmenter(keras.layers.Concatenate(name="image_first")([image, partner]))
    other_logits = segmenter(keras.layers.Concatenate(name="partner_first")([partner, image]))
    own_map = lesion_map([own_logits, image])
    other_map = MaskedLesionMap(config.mask_threshold, name="partner_lesion_map")(
        [other_logits, partner])
    pooled = keras.layers.Concatenate(name="own_and_other")([pool([own_map, image]),
                                                              pool([other_map, partner])])
    label = keras.layers.Dense(
        1, activation="sigmoid", dtype="float32", name="label",
        kernel_initializer=keras.initializers.Constant([[HEAD_SCALE], [-HEAD_SCALE]]))(pooled)
    return keras.Model({"image": image, "partner": partner}, {"label": label},
                       name="classifier_lesionsegmenter")


def lesion_map_model(model: keras.Model) -> keras.Model:
    """A model from a segmenter classifier's inputs to its image's lesion map ``[B, H, W, 1]``
    (the classifier's anomaly map, in place of Grad-CAM)."""
    return keras.Model(model.inputs, model.get_layer(LESION_MAP_LAYER).output)
