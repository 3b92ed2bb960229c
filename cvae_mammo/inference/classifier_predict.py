"""Scoring with a classifier run: :class:`ClassifierPredictor` and Grad-CAM maps.

:mod:`cvae_mammo.inference.predict` builds :class:`ClassifierPredictor` for runs whose
``config.json`` says ``"model_type": "classifier"`` (its registry names this
module), so ``calibrate`` and ``predict`` work on classifier runs through the
shared per-breast aggregation, threshold and ``scores_<split>.csv`` code;
``predict --maps`` writes Grad-CAM overlays.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cvae_mammo.models.classifier import backbone_of, predict_proba
from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.models.segmenter_classifier import lesion_map_model
from cvae_mammo.tf_startup import keras


def grad_cam(model: keras.Model, inputs: dict[str, Any]) -> np.ndarray:
    """Grad-CAM maps ``[B, H, W]`` in [0, 1] of ``label`` on the backbone's last feature map.

    The map is the ReLU of the feature channels weighted by their mean
    gradient, upsampled bilinearly to the input size and scaled per image
    to a maximum of 1 (all zeros when no feature pushes the score up).
    """
    from cvae_mammo.tf_startup import tf

    images = tf.convert_to_tensor(inputs["image"], tf.float32)
    backbone = backbone_of(model)
    features = backbone(model.get_layer("backbone_input")(images), training=False)
    pool = next(layer for layer in model.layers if layer.name in ("gem_pool", "avg_pool", "max_pool"))
    with tf.GradientTape() as tape:
        tape.watch(features)
        pooled = pool(features)
        if "tabular" in inputs:
            branch = model.get_layer("tabular_dense")(tf.convert_to_tensor(inputs["tabular"]))
            pooled = model.get_layer("join_tabular")([pooled, branch])
        score = model.get_layer("label")(pooled)
    gradients = tape.gradient(score, features)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * tf.cast(features, tf.float32), axis=-1))
    cam = tf.image.resize(cam[..., None], tf.shape(images)[1:3], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    return (cam / tf.maximum(peak, 1e-12)).numpy()


class ClassifierPredictor:
    """Scores (and optional Grad-CAM maps) of a classifier run for :mod:`cvae_mammo.inference.predict`.

    ``score`` returns a ``probability`` column (the model's positive-class
    probability) and, when ``maps`` is true, Grad-CAM maps (for the
    ``LesionSegmenter`` backbone: its lesion map, and the model also takes the
    other breast); ``finalise`` makes ``probability`` the run's ``score``.
    Metadata for the tabular branch is encoded with the run's saved,
    train-fitted encoder.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], maps: bool = True) -> None:
        from cvae_mammo.training.runs import load_run_encoder, load_run_model

        self.model = load_run_model(run_dir)
        self.config = ClassifierConfig.from_run(config)
        self.encoder = load_run_encoder(run_dir)
        self.image_size = (int(config["image_size"][0]), int(config["image_size"][1]))
        self.maps = maps
        self.needs_partners = self.config.needs_partners
        self.map_model = lesion_map_model(self.model) if self.needs_partners else None

    def inputs(self, images: np.ndarray, rows: pd.DataFrame, partners: np.ndarray | None = None
               ) -> dict[str, np.ndarray]:
        """The model's input dict for images in [0, 1], their metadata rows and, for a model
        that takes them, their other breasts (zeros where there is none)."""
        inputs = {"image": np.asarray(images, np.float32)}
        if self.needs_partners:
            inputs["partner"] = (np.zeros_like(inputs["image"]) if partners is None
                                 else np.asarray(partners, np.float32))
        if self.config.tabular_features:
            if self.encoder is None:
                raise ValueError("classifier run has tabular_features but no saved encoder")
            inputs["tabular"] = self.encoder.transform(rows)
        return inputs

    def score(self, images: np.ndarray, rows: pd.DataFrame, partners: np.ndarray | None = None
              ) -> tuple[pd.DataFrame, np.ndarray | None]:
        """``probability`` per image (same order as ``rows``) and Grad-CAM maps or None."""
        inputs = self.inputs(images, rows, partners)
        table = pd.DataFrame({"probability": predict_proba(self.model, inputs)}, index=rows.index)
        if not self.maps:
            return table, None
        if self.map_model is not None:
            maps = self.map_model.predict(inputs, verbose=0)[..., 0]
            return table, np.asarray(maps, np.float32)
        return table, grad_cam(self.model, inputs)

    def finalise(self, scores: pd.DataFrame) -> pd.Series:
        """The image score is the predicted probability."""
        return scores["probability"].astype(float)
