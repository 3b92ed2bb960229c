"""Convolutional (conditional) VAE for normal mammograms.

Architecture
    encoder: 3x3 stem, then one stage per entry of ``CVAEConfig.filters``,
    each a stride-2 pre-activation :class:`~cvae_mammo.models.layers.ResidualBlock`
    (+ ``blocks_per_stage - 1`` more at that width); the input is zero-padded
    to a multiple of the total stride ``2 ** len(filters)`` inside the model
    and the output cropped back, so any size works (1456x728 included).
    latent: ``"spatial"`` (default) a ``latent_channels``-deep map at
    1/stride resolution, or ``"dense"`` a ``latent_dim`` vector (input size
    then fixed to ``image_size``). Posterior ``Normal(mu, sigma)`` and prior
    ``Normal(0, 1)`` are tensorflow-probability distributions; the KL is analytic.
    decoder: mirror of the encoder with :class:`~cvae_mammo.models.layers.UpBlock`
    (transposed conv + residual refinement) and a sigmoid output in ``[0, 1]``.
    conditioning: when ``condition_dim > 0`` a metadata vector modulates every
    residual block of encoder and decoder by FiLM.
    loss: reconstruction NLL inside the breast mask
    (:func:`cvae_mammo.losses.masked_reconstruction_nll`) + beta * KL with
    linear warm-up and optional free bits.

Inference API (used by scoring)::

    model = cvae_mammo.runs.load_run_model("/work/runs/mias_cvae")
    recon = model.reconstruct(images)            # [B,H,W,1] float32 in [0, 1]
    terms = model.elbo_terms(images)             # dict of [B] float arrays

A mini-MIAS model trained on CPU (256x128, train-patient normals) is at
``/work/runs/mias_cvae`` on the team machine (not in the repository).

``images`` are float ``[B, H, W, 1]`` (or ``[B, H, W]``) in ``[0, 1]``;
``condition`` is ``[B, condition_dim]`` from the run's fitted metadata
encoder when the run was trained with conditioning, else None.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from cvae_mammo.config import ConfigBase
from cvae_mammo.losses import (
    RECON_LOSSES,
    beta_at,
    breast_mask,
    free_bits_kl,
    kl_per_image,
    masked_reconstruction_nll,
)
from cvae_mammo.models.layers import BN_MOMENTUM, PACKAGE, ResidualBlock, UpBlock

tfd = tfp.distributions

LATENT_KINDS: tuple[str, ...] = ("spatial", "dense")
#: CVAEConfig fields that only steer training (free to change on --resume).
TRAINING_FIELDS: tuple[str, ...] = (
    "epochs", "batch_size", "learning_rate", "weight_decay", "clipnorm", "warmup_epochs",
    "early_stopping_patience", "recon_every", "recon_images", "augment",
)


@dataclasses.dataclass
class CVAEConfig(ConfigBase):
    """Model, loss and training options of the CVAE; defaults target 1456x728 on a GPU."""

    image_size: tuple[int, int] = (1456, 728)
    filters: tuple[int, ...] = (32, 48, 64, 96, 128)
    blocks_per_stage: int = 1
    activation: str = "swish"
    latent: str = "spatial"
    latent_channels: int = 8
    latent_dim: int = 256
    conditioning: tuple[str, ...] = ()
    condition_dim: int = 0
    recon_loss: str = "laplace"
    recon_scale: float = 0.05
    ssim_weight: float = 0.5
    mask_threshold: float = 0.04
    beta: float = 1.0
    beta_warmup_steps: int = 2000
    free_bits: float = 0.0
    epochs: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    clipnorm: float = 1.0
    warmup_epochs: int = 2
    early_stopping_patience: int = 15
    recon_every: int = 5
    recon_images: int = 6
    augment: str | None = "cvae"

    def __post_init__(self) -> None:
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        self.filters = tuple(int(v) for v in self.filters)
        self.conditioning = tuple(str(v) for v in self.conditioning)
        if self.latent not in LATENT_KINDS:
            raise ValueError(f"latent {self.latent!r}: choose one of {', '.join(LATENT_KINDS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"recon_loss {self.recon_loss!r}: choose one of {', '.join(RECON_LOSSES)}"
            )
        if not self.filters:
            raise ValueError("filters: need at least one encoder stage")

    @classmethod
    def small(cls, **changes: Any) -> CVAEConfig:
        """CPU preset: 256x128, four narrow stages (stride 16), short warm-up."""
        values: dict[str, Any] = {
            "image_size": (256, 128),
            "filters": (16, 32, 48, 64),
            "latent_channels": 4,
            "batch_size": 8,
            "beta_warmup_steps": 300,
            "epochs": 40,
            "warmup_epochs": 1,
            "early_stopping_patience": 10,
            "recon_every": 2,
        }
        values.update(changes)
        return cls(**values)

    def split(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model and loss options, training-only options) as two dictionaries."""
        values = self.to_dict()
        training = {key: values.pop(key) for key in TRAINING_FIELDS}
        return values, training

    @property
    def total_stride(self) -> int:
        """Factor by which the encoder shrinks each side."""
        return 2 ** len(self.filters)

    def latent_grid(self) -> tuple[int, int]:
        """Latent map size for ``image_size`` (after padding to the stride)."""
        stride = self.total_stride
        return tuple(-(-side // stride) for side in self.image_size)  # type: ignore[return-value]


def _unpack(data: Any) -> tuple[tf.Tensor, tf.Tensor | None]:
    """Images and optional condition from a batch dict, a tuple or a bare tensor."""
    if isinstance(data, dict):
        return data["image"], data.get("condition")
    if isinstance(data, tuple | list):
        return data[0], (data[1] if len(data) > 1 else None)
    return data, None


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvVAE(keras.Model):
    """Convolutional VAE with a spatial (or dense) latent, FiLM conditioning and masked loss."""

    def __init__(self, config: CVAEConfig | dict[str, Any] | None = None, seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if config is None:
            config = CVAEConfig()
        self.config = config if isinstance(config, CVAEConfig) else CVAEConfig.from_dict(config)
        self.seed = int(seed)
        cfg = self.config
        self.conditioned = cfg.condition_dim > 0
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        act = cfg.activation
        self.stem = keras.layers.Conv2D(cfg.filters[0], 3, padding="same", name="stem")
        self.encoder_blocks = []
        for stage, width in enumerate(cfg.filters):
            for index in range(cfg.blocks_per_stage):
                self.encoder_blocks.append(ResidualBlock(
                    width, strides=2 if index == 0 else 1, activation=act,
                    conditioned=self.conditioned, name=f"enc_{stage}_{index}",
                ))
        self.head_norm = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="head_bn")
        self.act = keras.layers.Activation(act)
        if cfg.latent == "spatial":
            self.posterior_head = keras.layers.Conv2D(
                2 * cfg.latent_channels, 1, dtype="float32", name="posterior")
            self.latent_in = keras.layers.Conv2D(cfg.filters[-1], 3, padding="same",
                                                 name="latent_in")
        else:
            grid_h, grid_w = cfg.latent_grid()
            self.squeeze = keras.layers.Conv2D(cfg.latent_channels, 1, name="squeeze")
            self.posterior_head = keras.layers.Dense(2 * cfg.latent_dim, dtype="float32",
                                                     name="posterior")
            self.latent_in = keras.Sequential([
                keras.layers.Dense(grid_h * grid_w * cfg.latent_channels),
                keras.layers.Reshape((grid_h, grid_w, cfg.latent_channels)),
                keras.layers.Conv2D(cfg.filters[-1], 3, padding="same"),
            ], name="latent_in")
        self.decoder_blocks = []
        widths = [*cfg.filters[::-1][1:], cfg.filters[0]]
        for stage, width in enumerate(widths):
            self.decoder_blocks.append(UpBlock(width, activation=act,
                                               conditioned=self.conditioned, name=f"up_{stage}"))
            for index in range(1, cfg.blocks_per_stage):
                self.decoder_blocks.append(ResidualBlock(
                    width, activation=act, conditioned=self.conditioned,
                    name=f"dec_{stage}_{index}"))
        self.out_norm = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name="out_bn")
        self.output_conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                               dtype="float32", name="output")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.recon_tracker = keras.metrics.Mean(name="recon_nll")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.mae_tracker = keras.metrics.Mean(name="masked_mae")
        self.beta_tracker = keras.metrics.Mean(name="beta")
        self._elbo_function: Any = None
        self._build_weights()

    def _build_weights(self) -> None:
        """Create every weight with one forward pass on a dummy image."""
        cfg = self.config
        size = cfg.image_size if cfg.latent == "dense" else (cfg.total_stride,) * 2
        image = tf.zeros((1, *size, 1))
        condition = tf.zeros((1, cfg.condition_dim)) if self.conditioned else None
        self._forward(image, condition, training=False, sample=False)
        self.built = True

    # -- network ----------------------------------------------------------------------------
    def _apply(self, block: keras.layers.Layer, hidden: Any, condition: Any, training: Any) -> Any:
        if self.conditioned:
            return block((hidden, condition), training=training)
        return block(hidden, training=training)

    def _check_condition(self, condition: Any) -> Any:
        if self.conditioned:
            if condition is None:
                raise ValueError(
                    f"this CVAE was trained with conditioning on {list(self.config.conditioning)}"
                    f" ({self.config.condition_dim} values): pass `condition`")
            return tf.cast(condition, self.compute_dtype)
        return None

    def encode(self, images: Any, condition: Any = None, training: Any = False) -> tfd.Normal:
        """Posterior ``q(z | x, c)`` of images already padded to the total stride."""
        condition = self._check_condition(condition)
        hidden = self.stem(tf.cast(images, self.compute_dtype))
        for block in self.encoder_blocks:
            hidden = self._apply(block, hidden, condition, training)
        hidden = self.act(self.head_norm(hidden, training=training))
        if self.config.latent == "dense":
            hidden = keras.layers.Flatten()(self.squeeze(hidden))
        stats = self.posterior_head(hidden)
        loc, log_var = tf.split(tf.cast(stats, tf.float32), 2, axis=-1)
        scale = tf.exp(0.5 * tf.clip_by_value(log_var, -12.0, 8.0))
        return tfd.Normal(loc=loc, scale=scale)

    def prior(self, posterior: tfd.Normal) -> tfd.Normal:
        """Standard normal prior shaped like ``posterior``."""
        return tfd.Normal(loc=tf.zeros_like(posterior.loc), scale=tf.ones_like(posterior.scale))

    def decode(self, latent: Any, condition: Any = None, training: Any = False) -> tf.Tensor:
        """Mean image in ``[0, 1]`` (padded size) from a latent sample."""
        condition = self._check_condition(condition)
        hidden = self.latent_in(tf.cast(latent, self.compute_dtype))
        for block in self.decoder_blocks:
            hidden = self._apply(block, hidden, condition, training)
        hidden = self.act(self.out_norm(hidden, training=training))
        return self.output_conv(hidden)

    def _pad(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        images = tf.convert_to_tensor(images)
        if images.shape.rank == 3:
            images = images[..., None]
        images = tf.cast(images, tf.float32)
        stride = self.config.total_stride
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        pad_h = (stride - height % stride) % stride
        pad_w = (stride - width % stride) % stride
        padded = tf.pad(images, [[0, 0], [0, pad_h], [0, pad_w], [0, 0]])
        return padded, height, width

    def _forward(self, images: Any, condition: Any, training: Any,
                 sample: bool) -> dict[str, Any]:
        padded, height, width = self._pad(images)
        posterior = self.encode(padded, condition, training=training)
        if sample:
            noise = keras.random.normal(tf.shape(posterior.loc), seed=self.seed_generator)
            latent = posterior.loc + posterior.scale * noise
        else:
            latent = posterior.loc
        mean = self.decode(latent, condition, training=training)
        return {"image": padded[:, :height, :width, :], "mean": mean[:, :height, :width, :],
                "posterior": posterior}

    def call(self, inputs: Any, training: Any = None) -> tf.Tensor:
        """Deterministic reconstruction (posterior mean) of ``inputs`` (tensor or batch dict)."""
        images, condition = _unpack(inputs)
        return self._forward(images, condition, training=training, sample=False)["mean"]

    # -- loss -------------------------------------------------------------------------------
    def _terms(self, images: Any, condition: Any, training: bool) -> dict[str, tf.Tensor]:
        cfg = self.config
        out = self._forward(images, condition, training=training, sample=training)
        mask = breast_mask(out["image"], cfg.mask_threshold)
        recon = masked_reconstruction_nll(
            out["image"], out["mean"], mask, kind=cfg.recon_loss, scale=cfg.recon_scale,
            ssim_weight=cfg.ssim_weight)
        posterior = out["posterior"]
        prior = self.prior(posterior)
        kl = kl_per_image(posterior, prior)
        error = tf.abs(out["image"] - out["mean"])
        mask_pixels = tf.maximum(recon["mask_pixels"], 1.0)
        mae = tf.reduce_sum(error * mask, axis=[1, 2, 3]) / mask_pixels
        pixels = tf.cast(tf.shape(out["image"])[1] * tf.shape(out["image"])[2], tf.float32)
        if training:
            beta = beta_at(self.optimizer.iterations, cfg.beta, cfg.beta_warmup_steps)
            kl_loss = free_bits_kl(posterior, prior, cfg.free_bits)
        else:
            beta = tf.constant(cfg.beta, tf.float32)
            kl_loss = kl
        loss = tf.reduce_mean(recon["recon_nll"] + beta * kl_loss) / pixels
        return {"loss": loss, "recon_nll": recon["recon_nll"], "kl": kl, "mae": mae,
                "beta": beta, "recon_nll_per_pixel": recon["recon_nll_per_pixel"],
                "mask_pixels": recon["mask_pixels"]}

    def _track(self, terms: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        self.loss_tracker.update_state(terms["loss"])
        self.recon_tracker.update_state(terms["recon_nll"])
        self.kl_tracker.update_state(terms["kl"])
        self.mae_tracker.update_state(terms["mae"])
        self.beta_tracker.update_state(terms["beta"])
        return {metric.name: metric.result() for metric in self.metrics}

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return [self.loss_tracker, self.recon_tracker, self.kl_tracker, self.mae_tracker,
                self.beta_tracker]

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        images, condition = _unpack(data)
        with tf.GradientTape() as tape:
            terms = self._terms(images, condition, training=True)
            scaled = self.optimizer.scale_loss(terms["loss"])
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        return self._track(terms)

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        images, condition = _unpack(data)
        return self._track(self._terms(images, condition, training=False))

    # -- inference API ----------------------------------------------------------------------
    def reconstruct(self, images: Any, condition: Any = None, batch_size: int = 8) -> np.ndarray:
        """Posterior-mean reconstructions in ``[0, 1]``, same shape as ``images``."""
        array = np.asarray(images, dtype=np.float32)
        squeeze = array.ndim == 3
        batch = array[..., None] if squeeze else array
        parts = []
        for start in range(0, len(batch), batch_size):
            cond = None if condition is None else np.asarray(
                condition[start:start + batch_size], np.float32)
            out = self._forward(batch[start:start + batch_size], self._check_condition(cond),
                                training=False, sample=False)
            parts.append(out["mean"].numpy())
        result = np.concatenate(parts) if parts else np.zeros_like(batch)
        return result[..., 0] if squeeze else result

    def elbo_terms(self, images: Any, condition: Any = None,
                   batch_size: int = 8) -> dict[str, np.ndarray]:
        """Per-image negative-ELBO terms (nats), reconstruction at the posterior mean.

        Keys: ``recon_nll`` (sum over breast pixels), ``recon_nll_per_pixel``
        (mean over breast pixels), ``kl``, ``neg_elbo`` (recon_nll + kl),
        ``mask_pixels``. Each is a float array ``[B]``.
        """
        if self._elbo_function is None:
            self._elbo_function = tf.function(
                lambda x, c: self._terms(x, c, training=False), reduce_retracing=True)
        array = np.asarray(images, dtype=np.float32)
        if array.ndim == 3:
            array = array[..., None]
        keys = ("recon_nll", "recon_nll_per_pixel", "kl", "mask_pixels")
        collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for start in range(0, len(array), batch_size):
            cond = None if condition is None else np.asarray(
                condition[start:start + batch_size], np.float32)
            self._check_condition(cond)
            terms = self._elbo_function(array[start:start + batch_size], cond)
            for key in keys:
                collected[key].append(terms[key].numpy())
        result = {key: np.concatenate(values) if values else np.zeros(0, np.float32)
                  for key, values in collected.items()}
        result["neg_elbo"] = result["recon_nll"] + result["kl"]
        return result

    # -- serialisation ----------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "seed": self.seed, "name": self.name}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ConvVAE:
        return cls(**config)


def build_cvae(config: CVAEConfig, seed: int = 0) -> ConvVAE:
    """A freshly initialised :class:`ConvVAE` (weights built, not compiled)."""
    return ConvVAE(config, seed=seed, name="cvae")
