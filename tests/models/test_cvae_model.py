"""The CVAE model, its blocks and losses: shapes, save/load, conditioning, masked loss, learning."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from cvae_mammo.data.dataset import MammoDataset  # noqa: E402
from cvae_mammo.data.pipeline import build_pipeline  # noqa: E402
from cvae_mammo.models.cvae import ConvVAE, CVAEConfig, build_cvae  # noqa: E402
from cvae_mammo.models.losses import (  # noqa: E402
    beta_at,
    breast_mask,
    free_bits_kl,
    kl_per_image,
    masked_reconstruction_nll,
    pixel_nll,
)


def _phantom(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A half-ellipse 'breast' against the left edge with texture, plus background specks."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    inside = ((rows - height / 2) / (0.45 * height)) ** 2 + (cols / (0.8 * width)) ** 2 < 1
    image = np.where(inside, 0.4 + 0.2 * rng.random((height, width)), 0.0)
    image[2, width - 3] = 0.9  # isolated speck in the background
    return image.astype(np.float32)[None, ..., None]


def test_full_size_1456x728_predicts_same_shape_in_unit_range():
    model = build_cvae(CVAEConfig())
    image = np.random.default_rng(0).random((1, 1456, 728, 1), dtype=np.float32)
    recon = model.reconstruct(image)
    assert recon.shape == image.shape
    assert recon.min() >= 0.0 and recon.max() <= 1.0
    # 1456x728 pads to 1472x736 inside the model: latent 46x23 with the default 5 stages.
    assert model.encode(model._pad(image)[0]).loc.shape == (1, 46, 23, 8)


@pytest.mark.parametrize("latent", ["spatial", "dense"])
def test_odd_size_100x60_round_trips_shape_and_gives_finite_elbo_terms(latent):
    config = CVAEConfig.small(image_size=(100, 60), latent=latent, latent_dim=16)
    model = build_cvae(config)
    images = np.random.default_rng(1).random((3, 100, 60, 1), dtype=np.float32)
    assert model.reconstruct(images).shape == (3, 100, 60, 1)
    assert model.reconstruct(images[..., 0]).shape == (3, 100, 60)
    terms = model.elbo_terms(images, batch_size=2)
    assert set(terms) == {"recon_nll", "recon_nll_per_pixel", "kl", "neg_elbo", "mask_pixels"}
    for values in terms.values():
        assert values.shape == (3,) and np.isfinite(values).all()
    np.testing.assert_allclose(terms["neg_elbo"], terms["recon_nll"] + terms["kl"], rtol=1e-6)


def test_small_preset_stays_small_and_rejects_bad_options():
    assert build_cvae(CVAEConfig.small()).count_params() < 500_000
    with pytest.raises(ValueError, match="latent"):
        CVAEConfig(latent="vector")
    with pytest.raises(ValueError, match="recon_loss"):
        CVAEConfig(recon_loss="bce")
    with pytest.raises(ValueError, match="lesion_style 'real': choose one of shapes, tissue"):
        CVAEConfig(lesion_style="real")


def test_save_and_load_give_identical_outputs(tmp_path):
    config = CVAEConfig.small(image_size=(64, 32), condition_dim=2, conditioning=("a", "b"))
    model = build_cvae(config, seed=3)
    images = _phantom(64, 32)
    condition = np.array([[1.0, 0.0]], np.float32)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(loaded, ConvVAE) and loaded.config == model.config
    np.testing.assert_array_equal(model.reconstruct(images, condition),
                                  loaded.reconstruct(images, condition))
    np.testing.assert_array_equal(model.elbo_terms(images, condition)["neg_elbo"],
                                  loaded.elbo_terms(images, condition)["neg_elbo"])


def test_conditioning_changes_the_output_and_is_required():
    model = build_cvae(CVAEConfig.small(image_size=(64, 32), condition_dim=3))
    rng = np.random.default_rng(0)
    films = [layer for layer in model._flatten_layers() if layer.__class__.__name__ == "FiLM"]
    assert len(films) == 2 * len(model.config.filters)  # one per encoder and decoder block
    for film in films:  # FiLM starts as the identity; give it the weights training would
        film.set_weights([0.5 * rng.standard_normal(w.shape).astype(np.float32)
                          for w in film.get_weights()])
    images = np.repeat(_phantom(64, 32), 2, axis=0)
    first = model.reconstruct(images, np.array([[1, 0, 0], [1, 0, 0]], np.float32))
    np.testing.assert_array_equal(first[0], first[1])
    other = model.reconstruct(images[:1], np.array([[0, 1, 0]], np.float32))
    assert np.abs(first[:1] - other).mean() > 1e-3
    with pytest.raises(ValueError, match="conditioning"):
        model.reconstruct(images)


def test_breast_mask_drops_background_specks_and_keeps_tissue():
    image = _phantom(128, 64)
    mask = breast_mask(image).numpy()
    assert mask.shape == image.shape
    assert mask[0, 2, 61, 0] == 0.0  # the speck
    assert mask[0, 64, 5, 0] == 1.0  # tissue
    assert abs(mask.mean() - (image > 0.04).mean()) < 0.05


def test_reconstruction_loss_ignores_the_background():
    image = _phantom(128, 64)
    mask = breast_mask(image)
    recon = np.clip(image + 0.05, 0, 1)
    base = masked_reconstruction_nll(image, recon, mask, kind="laplace")["recon_nll"].numpy()
    background = recon.copy()
    background[mask.numpy() == 0] = 1.0
    same = masked_reconstruction_nll(image, background, mask, kind="laplace")["recon_nll"].numpy()
    np.testing.assert_allclose(base, same, rtol=1e-6)
    inside = recon.copy()
    inside[0, 60:70, 5:15, 0] = 1.0
    worse = masked_reconstruction_nll(image, inside, mask, kind="laplace")["recon_nll"].numpy()
    assert worse[0] > base[0]


@pytest.mark.parametrize("kind", ["gaussian", "laplace", "ssim"])
def test_pixel_nll_is_lowest_for_a_perfect_reconstruction(kind):
    image = _phantom(64, 32)
    perfect = pixel_nll(image, image, kind=kind).numpy().sum()
    noisy = pixel_nll(image, np.clip(image + 0.1, 0, 1), kind=kind).numpy().sum()
    assert perfect < noisy


def test_kl_free_bits_and_beta_warm_up():
    import tensorflow_probability as tfp

    tfd = tfp.distributions
    posterior = tfd.Normal(loc=np.zeros((2, 4, 2, 3), np.float32),
                           scale=np.ones((2, 4, 2, 3), np.float32))
    prior = tfd.Normal(loc=np.zeros((2, 4, 2, 3), np.float32),
                       scale=np.ones((2, 4, 2, 3), np.float32))
    np.testing.assert_allclose(kl_per_image(posterior, prior).numpy(), [0.0, 0.0], atol=1e-6)
    # every channel is below a 0.5-nat floor: 3 channels x 8 positions x 0.5
    np.testing.assert_allclose(free_bits_kl(posterior, prior, 0.5).numpy(), [12.0, 12.0])
    assert float(beta_at(0, 2.0, 100)) == 0.0
    assert float(beta_at(50, 2.0, 100)) == pytest.approx(1.0)
    assert float(beta_at(500, 2.0, 100)) == pytest.approx(2.0)


@pytest.mark.shared_data
def test_loss_falls_on_a_few_steps_of_mini_mias_normals(mias_dataset):
    keras.utils.set_random_seed(0)
    dataset = MammoDataset.open(mias_dataset)
    normals = dataset.subset(split="train", label=0)
    batches = build_pipeline(normals, dataset.root, image_size=(128, 64), batch_size=8,
                             shuffle=True, seed=0)
    fixed = next(iter(build_pipeline(normals.head(8), dataset.root, image_size=(128, 64),
                                     batch_size=8)))["image"].numpy()
    model = build_cvae(CVAEConfig.small(image_size=(128, 64), beta_warmup_steps=20))
    model.compile(optimizer=keras.optimizers.AdamW(2e-3), run_eagerly=True)
    before = model.elbo_terms(fixed)["neg_elbo"].mean()
    history = model.fit(batches, epochs=3, verbose=0)
    after = model.elbo_terms(fixed)["neg_elbo"].mean()
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.8 * before


# --- heteroscedastic decoder and bilateral conditioning (issue 11) -------------------------------

def test_learned_scale_grows_where_the_texture_cannot_be_reconstructed():
    """Left half flat, right half fresh noise each time: the decoder learns a wider scale there."""
    config = CVAEConfig.small(image_size=(32, 16), filters=(8, 16), latent_channels=2,
                              likelihood_scale="learned", beta_warmup_steps=0)
    model = build_cvae(config, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.default_rng(0)
    images = np.full((64, 32, 16, 1), 0.5, np.float32)
    images[:, :, 8:, 0] = rng.uniform(0.2, 0.8, (64, 32, 8))
    model.fit(images, batch_size=16, epochs=15, verbose=0)
    out = model.analyse(images[:4])
    assert out["scale"].min() >= config.min_scale
    flat, noisy = out["scale"][:, :, :6].mean(), out["scale"][:, :, 10:].mean()
    assert noisy > 2 * flat
    # the NLL of a bright blob on the flat half stands out; on the noisy half it is diluted
    blob = images[:1].copy()
    blob[0, 14:18, 2:6] += 0.4
    blob[0, 14:18, 10:14] += 0.4
    nll = model.analyse(np.clip(blob, 0, 1))["nll"][0] - out["nll"][0]
    assert nll[14:18, 2:6].mean() > nll[14:18, 10:14].mean()


def test_bilateral_model_reads_the_partner_and_scores_a_single_image():
    config = CVAEConfig.small(image_size=(32, 16), filters=(8, 16), latent_channels=2,
                              bilateral=True, likelihood_scale="learned")
    model = build_cvae(config, seed=0)
    rng = np.random.default_rng(1)
    images = rng.random((2, 32, 16, 1), dtype=np.float32)
    partners = rng.random((2, 32, 16, 1), dtype=np.float32)
    with_partner = model.reconstruct(images, partners=partners)
    assert not np.allclose(with_partner, model.reconstruct(images, partners=partners[::-1]))
    # no partner is an all-zero partner: the single-image path
    np.testing.assert_array_equal(model.reconstruct(images),
                                  model.reconstruct(images, partners=np.zeros_like(images)))
    analysis = model.analyse(images, partners)
    assert analysis["nll"].shape == (2, 32, 16) and analysis["kl"].shape == (2, 8, 4)
    assert np.isfinite(analysis["nll"]).all()
    with pytest.raises(ValueError, match="partners"):
        model.reconstruct(images, partners=partners[:1])


def test_bilateral_model_trains_saves_and_reloads(tmp_path):
    config = CVAEConfig.small(image_size=(32, 16), filters=(8, 16), latent_channels=2,
                              bilateral=True, likelihood_scale="learned", partner_dropout=0.5)
    model = build_cvae(config, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    rng = np.random.default_rng(2)
    images = rng.random((8, 32, 16, 1), dtype=np.float32)
    batches = tf.data.Dataset.from_tensor_slices(
        {"image": images, "partner": images[::-1]}).batch(4)
    history = model.fit(batches, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.analyse(images, images[::-1])["nll"],
                               model.analyse(images, images[::-1])["nll"], rtol=1e-5, atol=1e-6)
    # partner dropout acts in training only: inference is deterministic
    np.testing.assert_array_equal(model.reconstruct(images, partners=images[::-1]),
                                  model.reconstruct(images, partners=images[::-1]))


def test_config_rejects_a_learned_scale_with_the_ssim_loss():
    with pytest.raises(ValueError, match="learned"):
        CVAEConfig(likelihood_scale="learned", recon_loss="ssim")
    with pytest.raises(ValueError, match="partner_dropout"):
        CVAEConfig(partner_dropout=1.0)
