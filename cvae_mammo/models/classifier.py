"""The supervised companion: a Keras transfer-learning classifier.

A ``keras.applications`` backbone (ConvNeXt, EfficientNet, EfficientNetV2)
under a small head: global pooling (average, max or GeM) -> dropout -> one
sigmoid unit named ``label``. Optional auxiliary heads predict metadata
targets (invasive, biopsy, BI-RADS, density, ...) with their own loss
weights, and an optional tabular branch (age, view, laterality, implant)
joins the pooled image features before the head.

Input scale is part of the model: it takes grayscale images in [0, 1]
(exactly what the data pipeline yields) and the first layer,
:class:`BackboneInput`, repeats them to three channels and multiplies by
255, the range Keras EfficientNet/ConvNeXt expect because they include
their own ImageNet rescaling. Training and inference therefore cannot feed
different scales; :func:`predict_proba` also refuses images outside [0, 1].
The configuration, :class:`~cvae_mammo.models.classifier_config.ClassifierConfig`,
lives in a module of its own that needs no TensorFlow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.errors import InputError
from cvae_mammo.models.classifier_config import (
    APPLICATION_BACKBONES,
    AUX_TARGETS,
    BACKBONES,
    ClassifierConfig,
)
from cvae_mammo.models.layers import BN_MOMENTUM
from cvae_mammo.tf_startup import keras, tf


@keras.saving.register_keras_serializable(package="cvae_mammo")
class BackboneInput(keras.layers.Layer):
    """Grayscale [0, 1] -> three channels in [0, scale] (255 for Keras applications)."""

    def __init__(self, scale: float = 255.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, images: Any) -> Any:
        """Repeat the single channel three times and rescale."""
        return keras.ops.repeat(images, 3, axis=-1) * keras.ops.cast(self.scale, images.dtype)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """Same shape with three channels."""
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="cvae_mammo")
class GeMPooling(keras.layers.Layer):
    """Generalised-mean pooling over height and width with a learnable exponent ``p``."""

    def __init__(self, p: float = 3.0, epsilon: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.epsilon = float(epsilon)

    def build(self, input_shape: tuple) -> None:
        """Create the exponent."""
        self.p = self.add_weight(
            name="p", shape=(), initializer=keras.initializers.Constant(self.initial_p)
        )

    def call(self, features: Any) -> Any:
        """``mean(max(x, eps) ** p) ** (1 / p)`` over the spatial axes."""
        p = keras.ops.cast(self.p, features.dtype)
        clipped = keras.ops.maximum(features, keras.ops.cast(self.epsilon, features.dtype))
        return keras.ops.power(keras.ops.mean(keras.ops.power(clipped, p), axis=(1, 2)), 1.0 / p)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        """``(batch, channels)``."""
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {**super().get_config(), "p": self.initial_p, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="cvae_mammo")
class ProbabilisticF1(keras.metrics.Metric):
    """RSNA probabilistic F1: pTP = sum of p on positives, pFP = on negatives.

    precision = pTP / (pTP + pFP), recall = pTP / number of positives.
    """

    def __init__(self, name: str = "pf1", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.p_tp = self.add_variable(shape=(), initializer="zeros", name="p_tp")
        self.p_fp = self.add_variable(shape=(), initializer="zeros", name="p_fp")
        self.positives = self.add_variable(shape=(), initializer="zeros", name="positives")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        """Accumulate the probability mass on positives and negatives."""
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "float32"), (-1,))
        y_pred = keras.ops.reshape(keras.ops.cast(y_pred, "float32"), (-1,))
        self.p_tp.assign_add(keras.ops.sum(y_pred * y_true))
        self.p_fp.assign_add(keras.ops.sum(y_pred * (1.0 - y_true)))
        self.positives.assign_add(keras.ops.sum(y_true))

    def result(self) -> Any:
        """pF1 so far (0 when nothing was predicted or no positive was seen)."""
        eps = keras.config.epsilon()
        precision = self.p_tp / keras.ops.maximum(self.p_tp + self.p_fp, eps)
        recall = self.p_tp / keras.ops.maximum(self.positives, eps)
        return 2.0 * precision * recall / keras.ops.maximum(precision + recall, eps)

    def reset_state(self) -> None:
        """Start a new epoch."""
        for variable in (self.p_tp, self.p_fp, self.positives):
            variable.assign(0.0)


@keras.saving.register_keras_serializable(package="cvae_mammo")
class WeightedBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy with positives weighted by ``pos_weight`` (class weighting)."""

    def __init__(
        self, pos_weight: float = 1.0, label_smoothing: float = 0.0, name: str = "weighted_bce",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.pos_weight = float(pos_weight)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-sample BCE times ``pos_weight`` where the label is positive."""
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        bce = keras.losses.binary_crossentropy(
            y_true, y_pred, label_smoothing=self.label_smoothing
        )
        weights = 1.0 + (self.pos_weight - 1.0) * keras.ops.squeeze(y_true, axis=-1)
        return bce * weights

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {
            **super().get_config(),
            "pos_weight": self.pos_weight,
            "label_smoothing": self.label_smoothing,
        }


@keras.saving.register_keras_serializable(package="cvae_mammo")
class MaskedAuxiliaryLoss(keras.losses.Loss):
    """Loss of an auxiliary head that ignores missing targets (encoded as -1).

    ``classes == 1``: binary cross-entropy; otherwise sparse categorical
    cross-entropy. The mean is over the samples whose target is known.
    """

    def __init__(self, classes: int = 1, name: str = "masked_aux", **kwargs: Any) -> None:
        super().__init__(name=name, **kwargs)
        self.classes = int(classes)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """Per-sample loss, zero where the target is missing, rescaled to the known mean."""
        y_true = keras.ops.reshape(keras.ops.cast(y_true, "float32"), (-1,))
        known = keras.ops.cast(y_true >= 0, "float32")
        safe = keras.ops.maximum(y_true, 0.0)
        y_pred = keras.ops.cast(y_pred, "float32")
        if self.classes == 1:
            per_sample = keras.losses.binary_crossentropy(keras.ops.expand_dims(safe, -1), y_pred)
        else:
            per_sample = keras.losses.sparse_categorical_crossentropy(keras.ops.cast(safe, "int32"), y_pred)
        batch = keras.ops.cast(keras.ops.shape(y_true)[0], "float32")
        return per_sample * known * batch / keras.ops.maximum(keras.ops.sum(known), 1.0)

    def get_config(self) -> dict[str, Any]:
        """Serialisable configuration."""
        return {**super().get_config(), "classes": self.classes}


def build_backbone(
    name: str, input_shape: tuple[int, int, int], weights: str | None = None
) -> keras.Model:
    """A headless ``keras.applications`` backbone that expects 0-255 RGB input.

    ``weights`` is "imagenet" (downloaded by Keras), the path of a local
    weights file saved from the same backbone, or None (random).
    """
    if name not in APPLICATION_BACKBONES:
        raise ValueError(f"not a keras.applications backbone: {name!r}; "
                         f"known: {', '.join(APPLICATION_BACKBONES)}")
    constructor = getattr(keras.applications, name)
    kwargs: dict[str, Any] = {"include_top": False, "weights": None, "input_shape": input_shape}
    if BACKBONES[name] != "efficientnet":  # v1 EfficientNet always includes its rescaling
        kwargs["include_preprocessing"] = True
    if weights == "imagenet":
        try:
            return constructor(**{**kwargs, "weights": "imagenet"})
        except Exception as error:  # keras.utils.get_file raises a bare Exception offline
            raise InputError(
                f"{name}: cannot fetch the ImageNet weights ({error}); offline, pass a local "
                "weights file (--weights PATH) or --weights none"
            ) from error
    backbone = constructor(**kwargs)
    if weights is not None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"{weights}: backbone weights file not found")
        try:
            backbone.load_weights(weights)
        except (ValueError, KeyError) as error:
            raise ValueError(f"{weights}: cannot load into {name} ({error})") from error
    return backbone


def build_classifier(config: ClassifierConfig) -> keras.Model:
    """Build the classifier for ``config``.

    Inputs: ``{"image": [B, H, W, 1] in [0, 1]}`` plus ``"tabular": [B, F]``
    (the encoded metadata, ``config.tabular_dim`` wide) when
    ``config.tabular_features`` is set. Outputs: a dict with ``"label"``
    (probability of the positive class) and one entry per auxiliary target.
    Batch normalisation in the backbone: from random weights its moving
    statistics follow :data:`~cvae_mammo.models.layers.BN_MOMENTUM` (0.9, not
    Keras' 0.99, so they settle within an epoch of a small dataset and
    validation scores mean something from the start); built under a
    tf.distribute strategy with several replicas it uses the statistics of the
    global batch, so every worker keeps the same moving averages.
    ``backbone="LesionSegmenter"`` builds
    :func:`~cvae_mammo.models.segmenter_classifier.build_segmenter_classifier` instead.
    """
    if config.needs_partners:
        from cvae_mammo.models.segmenter_classifier import build_segmenter_classifier

        return build_segmenter_classifier(config)
    height, width = config.image_size
    image = keras.Input((height, width, 1), name="image")
    inputs: dict[str, Any] = {"image": image}
    scaled = BackboneInput(name="backbone_input")(image)
    backbone = build_backbone(config.backbone, (height, width, 3), config.weights)
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = replicas > 1
            if config.weights is None:
                layer.momentum = BN_MOMENTUM
    features = backbone(scaled)
    if config.pooling == "gem":
        pooled = GeMPooling(p=config.gem_p, dtype="float32", name="gem_pool")(features)
    elif config.pooling == "max":
        pooled = keras.layers.GlobalMaxPooling2D(name="max_pool")(features)
    else:
        pooled = keras.layers.GlobalAveragePooling2D(name="avg_pool")(features)
    if config.tabular_features:
        if config.tabular_dim < 1:
            raise ValueError("ClassifierConfig: tabular_features need tabular_dim >= 1 "
                             "(the width of the fitted metadata encoder)")
        tabular = keras.Input((config.tabular_dim,), name="tabular")
        inputs["tabular"] = tabular
        branch = keras.layers.Dense(config.tabular_units, activation="relu", name="tabular_dense")(
            tabular
        )
        pooled = keras.layers.Concatenate(name="join_tabular")([pooled, branch])
    hidden = keras.layers.Dropout(config.dropout, name="head_dropout")(pooled)
    outputs = {
        "label": keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="label")(hidden)
    }
    for target in config.aux_targets:
        classes = AUX_TARGETS[target]
        outputs[target] = keras.layers.Dense(
            classes,
            activation="sigmoid" if classes == 1 else "softmax",
            dtype="float32",
            name=target,
        )(hidden)
    return keras.Model(inputs, outputs, name=f"classifier_{config.backbone.lower()}")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone model inside a classifier."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"{model.name}: no nested backbone model found")


def set_backbone_trainable(
    model: keras.Model, trainable: bool, from_layer: str | None = None, freeze_batchnorm: bool = True
) -> int:
    """Freeze or unfreeze the backbone; returns the number of trainable backbone layers.

    With ``from_layer`` only the layers from the first one whose name starts
    with it (e.g. "block6a" for EfficientNet, "convnext_tiny_stage_3") are
    unfrozen. With ``freeze_batchnorm`` batch-norm layers stay frozen (in
    inference mode), the usual choice for fine-tuning with small batches.
    Recompile the model after calling this.
    """
    backbone = backbone_of(model)
    backbone.trainable = True  # also every nested model (ensemble members) and its layers
    layers = _leaf_layers(backbone)
    start = 0
    if trainable and from_layer:
        matches = [i for i, layer in enumerate(layers) if layer.name.startswith(from_layer)]
        if not matches:
            raise ValueError(f"{backbone.name}: no layer name starts with {from_layer!r}")
        start = matches[0]
    count = 0
    for index, layer in enumerate(layers):
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = bool(trainable and index >= start and not (freeze_batchnorm and is_bn))
        count += int(layer.trainable and bool(layer.weights))
    return count


def _leaf_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers of ``model`` in order, nested models replaced by their own layers."""
    leaves: list[keras.layers.Layer] = []
    for layer in model.layers:
        leaves += _leaf_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return leaves


def classifier_losses(config: ClassifierConfig) -> tuple[dict[str, Any], dict[str, float]]:
    """Losses and loss weights per output (``label`` first, then auxiliary targets)."""
    if config.loss == "focal":
        label_loss: keras.losses.Loss = keras.losses.BinaryFocalCrossentropy(
            apply_class_balancing=True,
            alpha=config.focal_alpha,
            gamma=config.focal_gamma,
            label_smoothing=config.label_smoothing,
        )
    else:
        label_loss = WeightedBinaryCrossentropy(
            pos_weight=config.pos_weight, label_smoothing=config.label_smoothing
        )
    losses: dict[str, Any] = {"label": label_loss}
    weights = {"label": 1.0}
    for target, weight in config.aux_targets.items():
        losses[target] = MaskedAuxiliaryLoss(classes=AUX_TARGETS[target], name=f"{target}_loss")
        weights[target] = float(weight)
    return losses, weights


def compile_classifier(
    model: keras.Model,
    config: ClassifierConfig,
    optimizer: Any,
    run_eagerly: bool = False,
    jit_compile: bool = False,
) -> None:
    """Compile with the configured losses and ROC-AUC + pF1 metrics on ``label``."""
    losses, loss_weights = classifier_losses(config)
    metrics: dict[str, list[Any]] = {
        "label": [keras.metrics.AUC(name="auc"), ProbabilisticF1(name="pf1")]
    }
    model.compile(
        optimizer=optimizer,
        loss=losses,
        loss_weights=loss_weights,
        metrics=metrics,
        run_eagerly=run_eagerly,
        jit_compile=jit_compile,
    )


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    """A metadata column matched case-insensitively (blank when absent)."""
    for column in frame.columns:
        if column.lower() == name.lower():
            return frame[column]
    return pd.Series([np.nan] * len(frame), index=frame.index)


def encode_aux_target(frame: pd.DataFrame, target: str) -> np.ndarray:
    """Encode one auxiliary target as float32 ``[N]`` (class index or 0/1; -1 = missing).

    BIRADS 0/1/2 -> 0/1/2; density A-D -> 0-3; view MLO -> 1, CC -> 0;
    laterality R -> 1, L -> 0; binary columns 0/1.
    """
    values = _column(frame, target)
    if target == "density":
        codes = values.astype("string").str.strip().str.upper().map({"A": 0, "B": 1, "C": 2, "D": 3})
    elif target == "view":
        codes = values.astype("string").str.strip().str.upper().map({"CC": 0, "MLO": 1})
    elif target == "laterality":
        codes = values.astype("string").str.strip().str.upper().map({"L": 0, "R": 1})
    elif target in AUX_TARGETS:
        codes = pd.to_numeric(values, errors="coerce")
        codes = codes.where(codes.between(0, max(AUX_TARGETS[target] - 1, 1)))
    else:
        raise ValueError(f"unknown auxiliary target {target!r}; known: {', '.join(AUX_TARGETS)}")
    return pd.to_numeric(codes, errors="coerce").fillna(-1).to_numpy(dtype=np.float32)


def predict_proba(model: keras.Model, inputs: Any, batch_size: int = 8) -> np.ndarray:
    """Probability of the positive class for images in [0, 1] (``[N]`` float32).

    ``inputs`` is an image array ``[N, H, W, 1]`` or a dict of model inputs.
    Images outside [0, 1] are refused: they mean a caller scaled them to
    0-255 itself, which the model already does internally.
    """
    images = inputs["image"] if isinstance(inputs, dict) else inputs
    images = np.asarray(images)
    if images.size and (images.min() < -1e-6 or images.max() > 1.0 + 1e-6):
        raise ValueError(
            f"images must be in [0, 1] (got {images.min():.3g}..{images.max():.3g}); "
            "the classifier rescales to the backbone's 0-255 range itself"
        )
    feed = inputs if isinstance(inputs, dict) else {"image": images}
    outputs = model.predict(feed, batch_size=batch_size, verbose=0)
    return np.asarray(outputs["label"], dtype=np.float32).reshape(-1)

