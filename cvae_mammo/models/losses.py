"""Reconstruction likelihoods inside the breast, KL terms and the breast mask.

All functions take and return TensorFlow tensors of images ``[B, H, W, 1]``
in ``[0, 1]`` (numpy arrays are accepted) and work inside ``tf.function``.

- :func:`breast_mask`: tissue = pixels above a small threshold, cleaned by
  a morphological opening (removes specks and scanner noise) and closing
  (fills small holes). Scoring reuses it so that errors are measured on the
  same pixels the model was trained on.
- :func:`pixel_nll`: per-pixel negative log-likelihood of the image under
  the decoder's mean: ``"gaussian"`` (MSE), ``"laplace"`` (L1) or
  ``"ssim"`` (Laplace mixed with a local-SSIM dissimilarity; a
  pseudo-likelihood, not normalised).
- :func:`masked_reconstruction_nll`: per-image sums and means of the
  per-pixel NLL over the breast mask only (background is ignored).
- :func:`kl_per_image`, :func:`free_bits_kl`, :func:`beta_at`: KL of the
  posterior against the prior, its free-bits floor and the warm-up of beta.
"""

from __future__ import annotations

from typing import Any

from cvae_mammo.tf_startup import tf, tfp

tfd = tfp.distributions

#: Reconstruction likelihoods understood by :func:`pixel_nll`.
RECON_LOSSES: tuple[str, ...] = ("gaussian", "laplace", "ssim")

_SSIM_C1 = 0.01**2
_SSIM_C2 = 0.03**2


def _as_images(images: Any) -> tf.Tensor:
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.float32:
        images = tf.cast(images, tf.float32)
    if images.shape.rank == 3:
        images = images[..., None]
    return images


def _mask_kernel(images: tf.Tensor) -> int:
    """Odd structuring-element size: about 1/64 of the shorter side, at least 3."""
    height, width = images.shape[1], images.shape[2]
    if height is None or width is None:
        return 5
    size = max(3, round(min(height, width) / 64))
    return size if size % 2 else size + 1


def _dilate(mask: tf.Tensor, size: int) -> tf.Tensor:
    return tf.nn.max_pool2d(mask, ksize=size, strides=1, padding="SAME")


def _erode(mask: tf.Tensor, size: int) -> tf.Tensor:
    return -tf.nn.max_pool2d(-mask, ksize=size, strides=1, padding="SAME")


def breast_mask(images: Any, threshold: float = 0.04) -> tf.Tensor:
    """Float mask ``[B, H, W, 1]`` (1 = breast tissue) of images in ``[0, 1]``.

    Pixels above ``threshold`` count as tissue; an opening then a closing
    with a square element of ~1/64 of the shorter side removes isolated
    specks and fills pinholes. A ``[B, H, W]`` input gives a ``[B, H, W, 1]`` mask.
    """
    images = _as_images(images)
    size = _mask_kernel(images)
    mask = tf.cast(images > threshold, tf.float32)
    mask = _dilate(_erode(mask, size), size)  # opening
    return _erode(_dilate(mask, size), size)  # closing


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> tf.Tensor:
    coords = tf.range(size, dtype=tf.float32) - (size - 1) / 2.0
    weights = tf.exp(-(coords**2) / (2.0 * sigma**2))
    weights = weights / tf.reduce_sum(weights)
    return tf.reshape(tf.tensordot(weights, weights, axes=0), (size, size, 1, 1))


def ssim_map(images: Any, reconstructions: Any, window: int = 11) -> tf.Tensor:
    """Local SSIM ``[B, H, W, 1]`` (Gaussian window, sigma 1.5) for data range 1."""
    x = _as_images(images)
    y = _as_images(reconstructions)
    kernel = _gaussian_window(window)

    def blur(t: tf.Tensor) -> tf.Tensor:
        return tf.nn.conv2d(t, kernel, strides=1, padding="SAME")

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    numerator = (2 * mu_x * mu_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
    denominator = (mu_x**2 + mu_y**2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)
    return numerator / denominator


def pixel_nll(
    images: Any,
    means: Any,
    kind: str = "laplace",
    scale: Any = 0.05,
    ssim_weight: float = 0.5,
) -> tf.Tensor:
    """Per-pixel negative log-likelihood ``[B, H, W, 1]`` of ``images`` given decoder ``means``.

    ``scale`` is the Gaussian sigma or the Laplace b: a number, or a tensor
    broadcastable to the images (a heteroscedastic decoder's per-pixel scale). ``"ssim"`` returns
    ``(1 - w) * laplace_nll + w * (1 - SSIM) / (2 * scale)``.
    """
    if kind not in RECON_LOSSES:
        raise ValueError(f"reconstruction loss {kind!r}: choose one of {', '.join(RECON_LOSSES)}")
    x = _as_images(images)
    mean = _as_images(means)
    if kind == "gaussian":
        return -tfd.Normal(loc=mean, scale=scale).log_prob(x)
    laplace = -tfd.Laplace(loc=mean, scale=scale).log_prob(x)
    if kind == "laplace":
        return laplace
    dissimilarity = (1.0 - ssim_map(x, mean)) / (2.0 * scale)
    return (1.0 - ssim_weight) * laplace + ssim_weight * dissimilarity


def masked_reconstruction_nll(
    images: Any,
    means: Any,
    mask: Any | None = None,
    kind: str = "laplace",
    scale: Any = 0.05,
    ssim_weight: float = 0.5,
    mask_threshold: float = 0.04,
    weights: Any | None = None,
) -> dict[str, tf.Tensor]:
    """Per-image reconstruction NLL over the breast mask.

    Returns ``{"recon_nll": sum over mask pixels [B], "recon_nll_per_pixel":
    mean over mask pixels [B], "mask_pixels": [B]}``. The mask defaults to
    :func:`breast_mask` of ``images``; an empty mask gives zeros, not NaN.
    ``weights`` (broadcastable to the images) multiplies each pixel's NLL, as
    beta-NLL does with the predicted scale.
    """
    x = _as_images(images)
    mask = breast_mask(x, mask_threshold) if mask is None else _as_images(mask)
    nll = pixel_nll(x, means, kind=kind, scale=scale, ssim_weight=ssim_weight)
    if weights is not None:
        nll = nll * weights
    total = tf.reduce_sum(nll * mask, axis=[1, 2, 3])
    pixels = tf.reduce_sum(mask, axis=[1, 2, 3])
    return {
        "recon_nll": total,
        "recon_nll_per_pixel": total / tf.maximum(pixels, 1.0),
        "mask_pixels": pixels,
    }


def kl_elements(posterior: tfd.Distribution, prior: tfd.Distribution) -> tf.Tensor:
    """Analytic elementwise KL(posterior || prior), same shape as the latent."""
    return tfd.kl_divergence(posterior, prior)


def _sum_non_batch(values: tf.Tensor) -> tf.Tensor:
    return tf.reduce_sum(tf.reshape(values, (tf.shape(values)[0], -1)), axis=1)


def kl_per_image(posterior: tfd.Distribution, prior: tfd.Distribution) -> tf.Tensor:
    """KL(posterior || prior) summed over the latent, one value per image ``[B]``."""
    return _sum_non_batch(kl_elements(posterior, prior))


def free_bits_kl(posterior: tfd.Distribution, prior: tfd.Distribution, free_bits: float) -> tf.Tensor:
    """KL per image with a floor of ``free_bits`` nats per latent channel (batch-averaged).

    The KL of each latent channel (summed over positions, averaged over the
    batch) is raised to at least ``free_bits`` times the number of positions,
    so the optimiser gains nothing by collapsing a channel below that.
    Returns ``[B]`` values whose batch mean is the floored KL.
    """
    kl = kl_elements(posterior, prior)
    if free_bits <= 0:
        return _sum_non_batch(kl)
    flat = tf.reshape(kl, (tf.shape(kl)[0], -1, tf.shape(kl)[-1]))  # [B, positions, channels]
    per_channel = tf.reduce_sum(flat, axis=1)  # [B, channels]
    floor = free_bits * tf.cast(tf.shape(flat)[1], kl.dtype)
    batch_mean = tf.reduce_mean(per_channel, axis=0, keepdims=True)
    # Below the floor a channel contributes a constant (no gradient), as in Kingma et al. 2016.
    floored = tf.where(batch_mean < floor, tf.stop_gradient(per_channel) * 0.0 + floor, per_channel)
    return tf.reduce_sum(floored, axis=1)


def beta_at(step: Any, beta: float, warmup_steps: int) -> tf.Tensor:
    """KL weight at optimiser ``step``: linear warm-up from 0 to ``beta`` over ``warmup_steps``."""
    step = tf.cast(step, tf.float32)
    if warmup_steps <= 0:
        return tf.constant(beta, tf.float32)
    return beta * tf.minimum(1.0, step / float(warmup_steps))
