"""Building blocks of the convolutional VAE (Keras 3 layers).

- :class:`FiLM`: feature-wise linear modulation ``x * (1 + gamma(c)) + beta(c)``
  from a metadata vector ``c``; initialised to the identity.
- :class:`ResidualBlock`: pre-activation residual block (BN -> activation ->
  conv, twice) with an identity shortcut, or a 1x1 projection shortcut when
  the stride or the width changes; optional FiLM after the second BN.
- :class:`UpBlock`: stride-2 transposed convolution followed by a residual
  refinement block.

Batch normalisation comes from :func:`batch_norm`: under a tf.distribute strategy
with several replicas its statistics are those of the global batch, so every
worker keeps the same moving averages.

Every layer is registered under the ``cvae_mammo`` package so a saved
``.keras`` file reloads with :func:`keras.models.load_model`.
"""

from __future__ import annotations

from typing import Any

from cvae_mammo.tf_startup import keras, tf

PACKAGE = "cvae_mammo"
#: Batch-norm momentum: 0.9 so moving statistics settle within an epoch of a small dataset.
BN_MOMENTUM = 0.9


def batch_norm(name: str) -> keras.layers.BatchNormalization:
    """Batch normalisation with :data:`BN_MOMENTUM`, synchronised over the replicas when
    built under a tf.distribute strategy that has several (so the workers' moving
    statistics stay equal); a plain one otherwise."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, synchronized=replicas > 1,
                                           name=name)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FiLM(keras.layers.Layer):
    """Scale and shift feature maps ``[B, H, W, C]`` by a condition vector ``[B, D]``."""

    def build(self, input_shape: Any) -> None:
        feature_shape, _ = input_shape
        channels = int(feature_shape[-1])
        self.projection = keras.layers.Dense(
            2 * channels, kernel_initializer="zeros", bias_initializer="zeros", name="gamma_beta"
        )
        self.projection.build(input_shape[1])
        self.channels = channels

    def call(self, inputs: Any) -> Any:
        features, condition = inputs
        gamma_beta = self.projection(keras.ops.cast(condition, self.compute_dtype))
        gamma = gamma_beta[:, None, None, : self.channels]
        beta = gamma_beta[:, None, None, self.channels :]
        return features * (1.0 + gamma) + beta


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual block; ``strides=2`` halves the spatial size."""

    def __init__(
        self,
        filters: int,
        strides: int = 1,
        activation: str = "swish",
        conditioned: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.strides = int(strides)
        self.activation_name = activation
        self.conditioned = bool(conditioned)
        self.norm1 = batch_norm("bn1")
        self.conv1 = keras.layers.Conv2D(
            self.filters, 3, strides=self.strides, padding="same", use_bias=False, name="conv1"
        )
        self.norm2 = batch_norm("bn2")
        self.conv2 = keras.layers.Conv2D(self.filters, 3, padding="same", name="conv2")
        self.act = keras.layers.Activation(activation)
        self.film = FiLM(name="film") if self.conditioned else None
        self.shortcut: keras.layers.Layer | None = None

    def build(self, input_shape: Any) -> None:
        feature_shape = input_shape[0] if self.conditioned else input_shape
        if int(feature_shape[-1]) != self.filters or self.strides != 1:
            self.shortcut = keras.layers.Conv2D(
                self.filters, 1, strides=self.strides, padding="same", name="projection"
            )
        super().build(input_shape)

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        features, condition = inputs if self.conditioned else (inputs, None)
        hidden = self.act(self.norm1(features, training=training))
        # The projection sees the pre-activated input, as in He et al. (2016) v2.
        shortcut = features if self.shortcut is None else self.shortcut(hidden)
        hidden = self.conv1(hidden)
        hidden = self.norm2(hidden, training=training)
        if self.film is not None:
            hidden = self.film((hidden, condition))
        hidden = self.conv2(self.act(hidden))
        return shortcut + hidden

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters,
            strides=self.strides,
            activation=self.activation_name,
            conditioned=self.conditioned,
        )
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class UpBlock(keras.layers.Layer):
    """Double the spatial size with a transposed convolution, then refine residually."""

    def __init__(
        self, filters: int, activation: str = "swish", conditioned: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.activation_name = activation
        self.conditioned = bool(conditioned)
        self.norm = batch_norm("bn")
        self.act = keras.layers.Activation(activation)
        self.upsample = keras.layers.Conv2DTranspose(
            self.filters, 4, strides=2, padding="same", name="upsample"
        )
        self.refine = ResidualBlock(
            self.filters, activation=activation, conditioned=conditioned, name="refine"
        )

    def call(self, inputs: Any, training: bool | None = None) -> Any:
        features, condition = inputs if self.conditioned else (inputs, None)
        hidden = self.upsample(self.act(self.norm(features, training=training)))
        if self.conditioned:
            return self.refine((hidden, condition), training=training)
        return self.refine(hidden, training=training)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            filters=self.filters, activation=self.activation_name, conditioned=self.conditioned
        )
        return config
