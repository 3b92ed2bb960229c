"""Convolutional (conditional, bilateral) VAE for normal mammograms.

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
    (transposed conv + residual refinement); a sigmoid mean in ``[0, 1]`` and,
    with ``likelihood_scale="learned"``, a per-pixel scale (heteroscedastic
    decoder): dense texture gets a wide scale, so the NLL map measures error
    relative to what the model expects there.
    bilateral (``bilateral=True``): the woman's other breast (same view,
    already mirrored by preprocessing) is the condition. The encoder sees it as
    a second input channel; a partner encoder feeds its features at every scale
    into the decoder (concatenation + 1x1 convolution). The anomaly map is then
    the conditional NLL: what the other breast does not explain. Training drops
    the partner of a random ``partner_dropout`` share of images, so the same
    model also scores a single image (no partner: all-zero partner input).
    conditioning: when ``condition_dim > 0`` a metadata vector modulates every
    residual block of encoder and decoder by FiLM.
    loss: reconstruction NLL inside the breast mask
    (:func:`cvae_mammo.models.losses.masked_reconstruction_nll`) + beta * KL with
    linear warm-up and optional free bits.

Inference API (used by scoring)::

    model = cvae_mammo.training.runs.load_run_model(run_dir)
    out = model.analyse(images, partners)        # mean, scale, nll, kl map, features
    recon = model.reconstruct(images, partners=partners)
    terms = model.elbo_terms(images, partners=partners)

``images`` and ``partners`` are float ``[B, H, W, 1]`` (or ``[B, H, W]``) in
``[0, 1]``; a missing partner is an all-zero image. ``condition`` is
``[B, condition_dim]`` from the run's fitted metadata encoder when the run was
trained with conditioning, else None.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from cvae_mammo.models.layers import PACKAGE, ResidualBlock, UpBlock, batch_norm
from cvae_mammo.models.losses import (
    RECON_LOSSES,
    beta_at,
    breast_mask,
    free_bits_kl,
    kl_elements,
    kl_per_image,
    masked_reconstruction_nll,
    pixel_nll,
)
from cvae_mammo.models.training_options import TrainingOptions
from cvae_mammo.synthetic.lesions import LESION_STYLES
from cvae_mammo.tf_startup import keras, tf, tfp

tfd = tfp.distributions

LATENT_KINDS: tuple[str, ...] = ("spatial", "dense")
#: How the decoder's per-pixel scale is set: the constant ``recon_scale``, or predicted.
SCALE_KINDS: tuple[str, ...] = ("fixed", "learned")
#: ``lesion_style`` values: one synthetic-lesion style for every seed, or ``mixed``.
MIXED_STYLE = "mixed"
SEGMENTER_STYLES: tuple[str, ...] = (*LESION_STYLES, MIXED_STYLE)


@dataclasses.dataclass
class CVAEConfig(TrainingOptions):
    """Model, loss and training options of the CVAE; defaults target 1456x728 on a GPU.

    ``likelihood_scale="learned"`` makes the decoder predict a per-pixel scale
    (at least ``min_scale``, starting at ``recon_scale``), trained with beta-NLL
    (``nll_beta``: 1 gives the mean the gradient of a plain L1 loss, 0 is the
    plain NLL, whose mean stalls where the scale grows); ``"fixed"`` uses
    ``recon_scale`` everywhere.
    ``bilateral=True`` conditions on the woman's other breast (see the module
    docstring); ``partner_dropout`` is the share of training images whose
    partner is hidden so that single images can be scored too.
    ``lesion_steps`` above 0 trains, after the CVAE, the bilateral lesion segmenter
    (:mod:`cvae_mammo.models.lesion_segmenter`, ``lesion_filters``) for that many steps of
    ``lesion_batch_size`` at ``lesion_learning_rate``, and keeps ``lesion_snapshots`` snapshots
    of it from the second half of training, whose lesion probabilities are averaged;
    ``lesion_seeds`` above 1 trains that many segmenters from seeds ``seed``, ``seed + 1``,
    ... and averages all their snapshots (a seed ensemble: each single run ranks images
    differently). Default: 2 seeds x 800 steps, snapshots at 400, 600 and 800 of each. The top-1% lesion
    probability minus the other breast's becomes the run's score. ``lesion_style`` sets how
    the synthetic lesions it learns from draw their contrast
    (:data:`~cvae_mammo.synthetic.lesions.LESION_STYLES`: ``shapes``, fixed ranges, or
    ``tissue``, relative to the image's own local statistics); ``mixed`` gives the seeds of
    the ensemble ``shapes`` and ``tissue`` in turn (seed ``seed`` ``shapes``).
    """

    image_size: tuple[int, int] = (1456, 728)
    filters: tuple[int, ...] = (32, 48, 64, 96, 128)
    blocks_per_stage: int = 1
    activation: str = "swish"
    latent: str = "spatial"
    latent_channels: int = 8
    latent_dim: int = 256
    conditioning: tuple[str, ...] = ()
    condition_dim: int = 0
    bilateral: bool = False
    partner_dropout: float = 0.1
    recon_loss: str = "laplace"
    likelihood_scale: str = "fixed"
    recon_scale: float = 0.05
    min_scale: float = 0.005
    nll_beta: float = 1.0
    ssim_weight: float = 0.5
    mask_threshold: float = 0.04
    beta: float = 1.0
    beta_warmup_steps: int = 2000
    free_bits: float = 0.0
    # training: the shared options (defaults changed here) and the CVAE's own
    epochs: int = 100
    warmup_epochs: float = 2.0
    early_stopping_patience: int | None = 15
    augment: str | None = "cvae"
    recon_every: int = 5
    recon_images: int = 6
    # the bilateral lesion segmenter trained after the CVAE (cvae_mammo.training.lesion_segmenter)
    lesion_steps: int = 800
    lesion_batch_size: int = 12
    lesion_filters: tuple[int, ...] = (16, 32, 48, 64)
    lesion_learning_rate: float = 5e-4
    lesion_snapshots: int = 3
    lesion_seeds: int = 2
    lesion_style: str = "shapes"

    EXTRA_TRAINING_FIELDS: ClassVar[tuple[str, ...]] = (
        "recon_every", "recon_images", "lesion_steps", "lesion_batch_size", "lesion_filters",
        "lesion_learning_rate", "lesion_snapshots", "lesion_seeds", "lesion_style")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.image_size = tuple(int(v) for v in self.image_size)  # type: ignore[assignment]
        self.filters = tuple(int(v) for v in self.filters)
        self.lesion_filters = tuple(int(v) for v in self.lesion_filters)
        self.conditioning = tuple(str(v) for v in self.conditioning)
        self.bilateral = bool(self.bilateral)
        if self.latent not in LATENT_KINDS:
            raise ValueError(f"latent {self.latent!r}: choose one of {', '.join(LATENT_KINDS)}")
        if self.recon_loss not in RECON_LOSSES:
            raise ValueError(
                f"recon_loss {self.recon_loss!r}: choose one of {', '.join(RECON_LOSSES)}"
            )
        if self.likelihood_scale not in SCALE_KINDS:
            raise ValueError(f"likelihood_scale {self.likelihood_scale!r}: choose one of "
                             f"{', '.join(SCALE_KINDS)}")
        if self.likelihood_scale == "learned" and self.recon_loss == "ssim":
            raise ValueError("likelihood_scale 'learned' needs recon_loss laplace or gaussian "
                             "(the SSIM term has no scale to learn)")
        if not 0.0 <= self.partner_dropout < 1.0:
            raise ValueError(f"partner_dropout {self.partner_dropout}: must be in [0, 1)")
        if self.lesion_style not in SEGMENTER_STYLES:
            raise ValueError(f"lesion_style {self.lesion_style!r}: choose one of "
                             f"{', '.join(SEGMENTER_STYLES)}")
        if not self.filters:
            raise ValueError("filters: need at least one encoder stage")
        if (self.lesion_steps < 0 or self.lesion_batch_size < 1 or not self.lesion_filters
                or self.lesion_snapshots < 1 or self.lesion_seeds < 1):
            raise ValueError(f"lesion_steps {self.lesion_steps} (>= 0), lesion_batch_size "
                             f"{self.lesion_batch_size} (>= 1), lesion_filters "
                             f"{self.lesion_filters} (at least one stage), lesion_snapshots "
                             f"{self.lesion_snapshots} (>= 1) and lesion_seeds "
                             f"{self.lesion_seeds} (>= 1): out of range")

    @classmethod
    def small(cls, **changes: Any) -> CVAEConfig:
        """CPU preset: 256x128, four narrow stages (stride 16), short warm-up.

        Learning rate 3e-3 for 60 epochs: with ~100 training images an epoch is ~12 steps,
        and at 1e-3 for 40 epochs the reconstructions were still nearly flat (validation
        masked MAE 0.15; 0.025 now on mini-MIAS).
        """
        values: dict[str, Any] = {
            "image_size": (256, 128),
            "filters": (16, 32, 48, 64),
            "latent_channels": 4,
            "batch_size": 8,
            "learning_rate": 3e-3,
            "beta_warmup_steps": 300,
            "epochs": 60,
            "warmup_epochs": 1,
            "early_stopping_patience": 15,
            "recon_every": 2,
        }
        values.update(changes)
        return cls(**values)

    @property
    def total_stride(self) -> int:
        """Factor by which the encoder shrinks each side."""
        return 2 ** len(self.filters)

    def latent_grid(self) -> tuple[int, int]:
        """Latent map size for ``image_size`` (after padding to the stride)."""
        stride = self.total_stride
        return tuple(-(-side // stride) for side in self.image_size)  # type: ignore[return-value]


def _unpack(data: Any) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor | None]:
    """Images, optional condition and optional partner images from a batch."""
    if isinstance(data, dict):
        return data["image"], data.get("condition"), data.get("partner")
    if isinstance(data, tuple | list):
        return data[0], (data[1] if len(data) > 1 else None), (data[2] if len(data) > 2 else None)
    return data, None, None


def _as_batch(images: Any) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    return array[..., None] if array.ndim == 3 else array


@keras.saving.register_keras_serializable(package=PACKAGE)
class ConvVAE(keras.Model):
    """Convolutional VAE: spatial (or dense) latent, FiLM metadata, optional other-breast condition."""

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
        self.encoder_blocks = self._stages("enc", self.conditioned)
        if cfg.bilateral:
            self.partner_stem = keras.layers.Conv2D(cfg.filters[0], 3, padding="same",
                                                    name="partner_stem")
            self.partner_blocks = self._stages("partner", False)
            # one merge per decoder resolution, deepest first: latent grid, then each UpBlock
            widths = [cfg.filters[-1], *cfg.filters[::-1][1:], cfg.filters[0]]
            self.partner_merges = [keras.layers.Conv2D(width, 1, name=f"partner_merge_{i}")
                                   for i, width in enumerate(widths)]
        self.head_norm = batch_norm("head_bn")
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
        # Flat lists, blocks_per_stage blocks per stage (the first of each changes resolution).
        self.decoder_blocks = []
        widths = [*cfg.filters[::-1][1:], cfg.filters[0]]
        for stage, width in enumerate(widths):
            self.decoder_blocks.append(UpBlock(width, activation=act,
                                               conditioned=self.conditioned, name=f"up_{stage}"))
            for index in range(1, cfg.blocks_per_stage):
                self.decoder_blocks.append(ResidualBlock(
                    width, activation=act, conditioned=self.conditioned,
                    name=f"dec_{stage}_{index}"))
        self.out_norm = batch_norm("out_bn")
        self.output_conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid",
                                               dtype="float32", name="output")
        if cfg.likelihood_scale == "learned":
            # starts at recon_scale everywhere: a wide initial scale would damp the mean's
            # gradient (proportional to 1/scale) and the mean would never be learned
            start = float(np.log(np.expm1(max(cfg.recon_scale - cfg.min_scale, 1e-4))))
            self.scale_conv = keras.layers.Conv2D(
                1, 3, padding="same", dtype="float32", name="scale",
                kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(start))
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.recon_tracker = keras.metrics.Mean(name="recon_nll")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.mae_tracker = keras.metrics.Mean(name="masked_mae")
        self.beta_tracker = keras.metrics.Mean(name="beta")
        self._elbo_function: Any = None
        self._analyse_function: Any = None
        self._build_weights()

    def _stages(self, prefix: str, conditioned: bool) -> list[ResidualBlock]:
        """Encoder blocks, ``blocks_per_stage`` per stage (the first of each has stride 2)."""
        cfg = self.config
        return [ResidualBlock(width, strides=2 if index == 0 else 1, activation=cfg.activation,
                              conditioned=conditioned, name=f"{prefix}_{stage}_{index}")
                for stage, width in enumerate(cfg.filters)
                for index in range(cfg.blocks_per_stage)]

    def _per_stage(self, blocks: list[keras.layers.Layer]) -> list[list[keras.layers.Layer]]:
        per = self.config.blocks_per_stage
        return [blocks[start:start + per] for start in range(0, len(blocks), per)]

    def _build_weights(self) -> None:
        """Create every weight with one forward pass on a dummy image."""
        cfg = self.config
        size = cfg.image_size if cfg.latent == "dense" else (cfg.total_stride,) * 2
        image = tf.zeros((1, *size, 1))
        condition = tf.zeros((1, cfg.condition_dim)) if self.conditioned else None
        self._forward(image, condition, image if cfg.bilateral else None, training=False,
                      sample=False)
        self.built = True

    # -- network ----------------------------------------------------------------------------
    def _apply(self, block: keras.layers.Layer, hidden: Any, condition: Any, training: Any) -> Any:
        if block.conditioned:
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

    def _partner_features(self, partner: Any, training: Any) -> list[Any]:
        """Partner-encoder features at full, 1/2, ..., 1/stride resolution."""
        hidden = self.partner_stem(tf.cast(partner, self.compute_dtype))
        features = [hidden]
        for stage in self._per_stage(self.partner_blocks):
            for block in stage:
                hidden = block(hidden, training=training)
            features.append(hidden)
        return features

    def _merge(self, index: int, hidden: Any, features: list[Any] | None) -> Any:
        if features is None:
            return hidden
        partner = features[len(features) - 1 - index]
        return self.partner_merges[index](tf.concat([hidden, partner], axis=-1))

    def encoder_features(self, images: Any, condition: Any = None, partner: Any = None,
                         training: Any = False) -> tf.Tensor:
        """Encoder features before the posterior head (padded images), ``[B, h, w, C]``."""
        condition = self._check_condition(condition)
        inputs = tf.cast(images, self.compute_dtype)
        if self.config.bilateral:
            partner = tf.zeros_like(inputs) if partner is None else tf.cast(partner,
                                                                            self.compute_dtype)
            inputs = tf.concat([inputs, partner], axis=-1)
        hidden = self.stem(inputs)
        for block in self.encoder_blocks:
            hidden = self._apply(block, hidden, condition, training)
        return self.act(self.head_norm(hidden, training=training))

    def encode(self, images: Any, condition: Any = None, partner: Any = None,
               training: Any = False) -> tfd.Normal:
        """Posterior ``q(z | x, c, partner)`` of images already padded to the total stride."""
        return self._posterior(self.encoder_features(images, condition, partner, training))

    def prior(self, posterior: tfd.Normal) -> tfd.Normal:
        """Standard normal prior shaped like ``posterior``."""
        return tfd.Normal(loc=tf.zeros_like(posterior.loc), scale=tf.ones_like(posterior.scale))

    def decode(self, latent: Any, condition: Any = None, partner: Any = None,
               training: Any = False) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-pixel mean in ``[0, 1]`` and scale (padded size) from a latent sample."""
        condition = self._check_condition(condition)
        features = None
        if self.config.bilateral:
            features = self._partner_features(partner, training)
        hidden = self._merge(0, self.latent_in(tf.cast(latent, self.compute_dtype)), features)
        for index, stage in enumerate(self._per_stage(self.decoder_blocks), start=1):
            for block in stage:
                hidden = self._apply(block, hidden, condition, training)
            hidden = self._merge(index, hidden, features)
        hidden = self.act(self.out_norm(hidden, training=training))
        mean = self.output_conv(hidden)
        if self.config.likelihood_scale == "learned":
            scale = self.config.min_scale + tf.nn.softplus(self.scale_conv(hidden))
        else:
            scale = tf.fill(tf.shape(mean), tf.constant(self.config.recon_scale, tf.float32))
        return mean, scale

    def _pad(self, images: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
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

    def _partner_input(self, images: tf.Tensor, partner: Any, training: Any) -> tf.Tensor | None:
        """The padded partner batch (zeros where missing), with training-time partner dropout."""
        if not self.config.bilateral:
            return None
        if partner is None:
            return tf.zeros_like(images)
        padded, _, _ = self._pad(partner)
        if training and self.config.partner_dropout > 0:
            keep = keras.random.uniform((tf.shape(padded)[0], 1, 1, 1),
                                        seed=self.seed_generator) >= self.config.partner_dropout
            padded = padded * tf.cast(keep, padded.dtype)
        return padded

    def _forward(self, images: Any, condition: Any, partner: Any, training: Any,
                 sample: bool) -> dict[str, Any]:
        padded, height, width = self._pad(images)
        partner = self._partner_input(padded, partner, training)
        hidden = self.encoder_features(padded, condition, partner, training=training)
        posterior = self._posterior(hidden)
        if sample:
            noise = keras.random.normal(tf.shape(posterior.loc), seed=self.seed_generator)
            latent = posterior.loc + posterior.scale * noise
        else:
            latent = posterior.loc
        mean, scale = self.decode(latent, condition, partner, training=training)
        return {"image": padded[:, :height, :width, :], "mean": mean[:, :height, :width, :],
                "scale": scale[:, :height, :width, :], "posterior": posterior,
                "features": hidden}

    def _posterior(self, hidden: Any) -> tfd.Normal:
        if self.config.latent == "dense":
            hidden = keras.layers.Flatten()(self.squeeze(hidden))
        stats = self.posterior_head(hidden)
        loc, log_var = tf.split(tf.cast(stats, tf.float32), 2, axis=-1)
        return tfd.Normal(loc=loc, scale=tf.exp(0.5 * tf.clip_by_value(log_var, -12.0, 8.0)))

    def call(self, inputs: Any, training: Any = None) -> tf.Tensor:
        """Deterministic reconstruction (posterior mean) of ``inputs`` (tensor or batch dict)."""
        images, condition, partner = _unpack(inputs)
        return self._forward(images, condition, partner, training=training, sample=False)["mean"]

    # -- loss -------------------------------------------------------------------------------
    def _terms(self, images: Any, condition: Any, partner: Any,
               training: bool) -> dict[str, tf.Tensor]:
        cfg = self.config
        out = self._forward(images, condition, partner, training=training, sample=training)
        mask = breast_mask(out["image"], cfg.mask_threshold)
        recon = masked_reconstruction_nll(
            out["image"], out["mean"], mask, kind=cfg.recon_loss, scale=out["scale"],
            ssim_weight=cfg.ssim_weight)
        fitted = recon
        if training and cfg.likelihood_scale == "learned" and cfg.nll_beta > 0:
            # beta-NLL (Seitzer et al., ICLR 2022): each pixel's NLL weighted by its (fixed)
            # predicted scale, so the mean keeps an L1-sized gradient where the scale is wide
            weights = tf.stop_gradient(out["scale"] / cfg.recon_scale) ** cfg.nll_beta
            fitted = masked_reconstruction_nll(
                out["image"], out["mean"], mask, kind=cfg.recon_loss, scale=out["scale"],
                weights=weights)
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
        loss = tf.reduce_mean(fitted["recon_nll"] + beta * kl_loss) / pixels
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
        images, condition, partner = _unpack(data)
        with tf.GradientTape() as tape:
            terms = self._terms(images, condition, partner, training=True)
            # The optimizer sums the replicas' gradients (tf.distribute): divide each
            # replica's mean loss by their number, as Keras' own losses do.
            replicas = tf.distribute.get_replica_context().num_replicas_in_sync
            scaled = self.optimizer.scale_loss(terms["loss"] / replicas)
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply(gradients, self.trainable_weights)
        return self._track(terms)

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        images, condition, partner = _unpack(data)
        return self._track(self._terms(images, condition, partner, training=False))

    # -- inference API ----------------------------------------------------------------------
    def _batches(self, images: Any, condition: Any, partners: Any,
                 batch_size: int) -> Any:
        """(images, condition, partners) slices of at most ``batch_size`` images."""
        array = _as_batch(images)
        partner_array = None if partners is None else _as_batch(partners)
        if partner_array is not None and partner_array.shape != array.shape:
            raise ValueError(f"partners {partner_array.shape} must match images {array.shape}")
        for start in range(0, len(array), batch_size):
            stop = start + batch_size
            cond = None if condition is None else np.asarray(condition[start:stop], np.float32)
            self._check_condition(cond)
            yield (array[start:stop], cond,
                   None if partner_array is None else partner_array[start:stop])

    def reconstruct(self, images: Any, condition: Any = None, batch_size: int = 8,
                    partners: Any = None) -> np.ndarray:
        """Posterior-mean reconstructions in ``[0, 1]``, same shape as ``images``."""
        squeeze = np.asarray(images).ndim == 3
        parts = [self._forward(x, self._check_condition(c), p, training=False,
                               sample=False)["mean"].numpy()
                 for x, c, p in self._batches(images, condition, partners, batch_size)]
        result = np.concatenate(parts) if parts else np.zeros_like(_as_batch(images))
        return result[..., 0] if squeeze else result

    def analyse(self, images: Any, partners: Any = None, condition: Any = None,
                batch_size: int = 8) -> dict[str, np.ndarray]:
        """Everything scoring needs, at the posterior mean, as NumPy arrays.

        ``mean``, ``scale`` and ``nll`` (per-pixel negative log-likelihood of the
        image under the decoder) are ``[B, H, W]``; ``kl`` is the per-position KL
        of the posterior against the prior, ``[B, h, w]`` on the latent grid (spatial
        latent) or ``[B, 1, 1]`` (dense); ``features`` are the encoder features before
        the posterior head, ``[B, h, w, C]``.
        """
        if self._analyse_function is None:
            self._analyse_function = tf.function(self._analyse_batch, reduce_retracing=True)
        keys = ("mean", "scale", "nll", "kl", "features")
        collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for x, c, p in self._batches(images, condition, partners, batch_size):
            result = self._analyse_function(x, c, p)
            for key in keys:
                collected[key].append(result[key].numpy())
        return {key: np.concatenate(values) for key, values in collected.items()}

    def _analyse_batch(self, images: Any, condition: Any, partner: Any) -> dict[str, tf.Tensor]:
        cfg = self.config
        out = self._forward(images, self._check_condition(condition), partner, training=False,
                            sample=False)
        nll = pixel_nll(out["image"], out["mean"], kind=cfg.recon_loss, scale=out["scale"],
                        ssim_weight=cfg.ssim_weight)
        kl = kl_elements(out["posterior"], self.prior(out["posterior"]))
        kl = tf.reduce_sum(kl, axis=-1)
        if cfg.latent == "dense":
            kl = tf.reshape(tf.reduce_sum(kl, axis=-1), (-1, 1, 1))
        return {"mean": out["mean"][..., 0], "scale": out["scale"][..., 0], "nll": nll[..., 0],
                "kl": kl, "features": tf.cast(out["features"], tf.float32)}

    def elbo_terms(self, images: Any, condition: Any = None, batch_size: int = 8,
                   partners: Any = None) -> dict[str, np.ndarray]:
        """Per-image negative-ELBO terms (nats), reconstruction at the posterior mean.

        Keys: ``recon_nll`` (sum over breast pixels), ``recon_nll_per_pixel``
        (mean over breast pixels), ``kl``, ``neg_elbo`` (recon_nll + kl),
        ``mask_pixels``. Each is a float array ``[B]``.
        """
        if self._elbo_function is None:
            self._elbo_function = tf.function(
                lambda x, c, p: self._terms(x, c, p, training=False), reduce_retracing=True)
        keys = ("recon_nll", "recon_nll_per_pixel", "kl", "mask_pixels")
        collected: dict[str, list[np.ndarray]] = {key: [] for key in keys}
        for x, c, p in self._batches(images, condition, partners, batch_size):
            terms = self._elbo_function(x, c, p)
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
