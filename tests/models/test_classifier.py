"""The transfer-learning classifier: backbones, input scale, losses, heads, weights files."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from cvae_mammo.data.metadata import MetadataEncoder, normalise_metadata
from cvae_mammo.models.classifier import (
    BackboneInput,
    MaskedAuxiliaryLoss,
    ProbabilisticF1,
    WeightedBinaryCrossentropy,
    backbone_of,
    build_backbone,
    build_classifier,
    classifier_losses,
    compile_classifier,
    encode_aux_target,
    predict_proba,
    set_backbone_trainable,
)
from cvae_mammo.models.classifier_config import (
    APPLICATION_BACKBONES,
    AUX_TARGETS,
    ClassifierConfig,
)
from cvae_mammo.models.layers import BN_MOMENTUM

TINY = (32, 32)


def _config(**changes) -> ClassifierConfig:
    values = {"backbone": "EfficientNetB0", "weights": None, "image_size": TINY}
    values.update(changes)
    return ClassifierConfig(**values)


def _images(n: int, size=TINY, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *size, 1), dtype=np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", APPLICATION_BACKBONES)
def test_every_backbone_builds_and_takes_a_training_step(backbone: str) -> None:
    config = _config(backbone=backbone, dropout=0.0)
    model = build_classifier(config)
    compile_classifier(model, config, keras.optimizers.AdamW(1e-3), run_eagerly=True)
    head_before = model.get_layer("label").get_weights()[0].copy()
    x = {"image": _images(2)}
    y = {"label": np.array([[0.0], [1.0]], dtype=np.float32)}
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert not np.allclose(model.get_layer("label").get_weights()[0], head_before)
    probs = predict_proba(model, x["image"])
    assert probs.shape == (2,) and np.all((probs >= 0) & (probs <= 1))


def test_input_scale_is_inside_the_model_and_same_for_training_and_inference() -> None:
    images = _images(3)
    scaled = keras.ops.convert_to_numpy(BackboneInput()(images))
    assert scaled.shape == (3, *TINY, 3)
    np.testing.assert_allclose(scaled, np.repeat(images, 3, axis=-1) * 255.0, rtol=1e-6)

    for name in ("EfficientNetB0", "EfficientNetV2B0", "ConvNeXtTiny"):
        model = build_classifier(_config(backbone=name))
        backbone = backbone_of(model)
        # The backbone does its own ImageNet rescaling of 0-255 input.
        assert any(isinstance(layer, keras.layers.Rescaling) for layer in backbone.layers) or any(
            isinstance(layer, keras.layers.Normalization) for layer in backbone.layers
        )
        # The classifier is head(backbone(255 * x)): scaled once, inside the model.
        features = backbone(np.repeat(images, 3, axis=-1) * 255.0)
        manual = model.get_layer("label")(model.get_layer("gem_pool")(features))
        forward = model({"image": images}, training=False)["label"]
        np.testing.assert_allclose(forward, manual, rtol=1e-4, atol=1e-5)
        # Inference helper == the forward pass the training step uses (training=False).
        forward = keras.ops.convert_to_numpy(forward).reshape(-1)
        np.testing.assert_allclose(predict_proba(model, images), forward, atol=1e-6)

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        predict_proba(model, images * 255.0)


def _hand_focal(y, p, alpha, gamma, smoothing):
    y = y * (1 - smoothing) + 0.5 * smoothing
    p = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    p_t = y * p + (1 - y) * (1 - p)
    weight = y * alpha + (1 - y) * (1 - alpha)
    return np.mean(weight * (1 - p_t) ** gamma * bce)


@pytest.mark.parametrize(("alpha", "gamma", "smoothing"), [(0.25, 2.0, 0.0), (0.6, 1.5, 0.1)])
def test_focal_loss_matches_hand_computation(alpha: float, gamma: float, smoothing: float) -> None:
    config = _config(focal_alpha=alpha, focal_gamma=gamma, label_smoothing=smoothing)
    loss = classifier_losses(config)[0]["label"]
    y = np.array([[1.0], [0.0], [1.0], [0.0], [1.0]], dtype=np.float32)
    p = np.array([[0.9], [0.2], [0.3], [0.7], [0.5]], dtype=np.float32)
    got = float(keras.ops.convert_to_numpy(loss(y, p)))
    assert got == pytest.approx(_hand_focal(y, p, alpha, gamma, smoothing), rel=1e-5)
    # gamma = 0 and alpha = 0.5 is half the plain BCE.
    plain = classifier_losses(_config(focal_alpha=0.5, focal_gamma=0.0))[0]["label"]
    bce = float(keras.ops.convert_to_numpy(keras.losses.BinaryCrossentropy()(y, p)))
    assert float(keras.ops.convert_to_numpy(plain(y, p))) == pytest.approx(0.5 * bce, rel=1e-5)


def test_weighted_bce_matches_hand_computation() -> None:
    loss = classifier_losses(_config(loss="bce", pos_weight=4.0))[0]["label"]
    assert isinstance(loss, WeightedBinaryCrossentropy)
    y = np.array([[1.0], [0.0], [0.0]], dtype=np.float32)
    p = np.array([[0.6], [0.1], [0.8]], dtype=np.float32)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).reshape(-1)
    expected = np.mean(bce * np.array([4.0, 1.0, 1.0]))
    assert float(keras.ops.convert_to_numpy(loss(y, p))) == pytest.approx(expected, rel=1e-5)


def test_probabilistic_f1_matches_definition() -> None:
    y = np.array([1, 0, 1, 0, 0], dtype=np.float32)
    p = np.array([0.8, 0.3, 0.4, 0.1, 0.6], dtype=np.float32)
    metric = ProbabilisticF1()
    metric.update_state(y[:2], p[:2])
    metric.update_state(y[2:], p[2:])
    p_tp, p_fp = 0.8 + 0.4, 0.3 + 0.1 + 0.6
    precision, recall = p_tp / (p_tp + p_fp), p_tp / 2
    expected = 2 * precision * recall / (precision + recall)
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)


def test_auxiliary_heads_and_tabular_branch() -> None:
    frame = normalise_metadata(
        pd.DataFrame(
            {
                "image_id": ["1", "2", "3", "4"],
                "patient_id": ["a", "a", "b", "b"],
                "age": [61.0, np.nan, 45.0, 70.0],
                "view": ["CC", "MLO", "AT", "MLO"],
                "laterality": ["L", "R", "R", "L"],
                "implant": [0, 1, 0, 0],
                "label": [0, 1, 0, 1],
                "biopsy": [0, 1, np.nan, 1],
                "density": ["A", "D", None, "C"],
                "BIRADS": [0, 2, 1, np.nan],
            }
        )
    )
    encoder = MetadataEncoder(["age", "view", "laterality", "implant"]).fit(frame)
    tabular = encoder.transform(frame)
    config = _config(
        aux_targets={"biopsy": 0.5, "density": 0.2, "BIRADS": 0.1},
        tabular_features=encoder.columns,
        tabular_dim=encoder.dim,
        pooling="avg",
        dropout=0.0,
    )
    model = build_classifier(config)
    assert set(model.output) == {"label", "biopsy", "density", "BIRADS"}
    assert model.output["density"].shape[-1] == AUX_TARGETS["density"] == 4
    assert model.input["tabular"].shape[-1] == tabular.shape[1]
    np.testing.assert_array_equal(encode_aux_target(frame, "density"), [0, 3, -1, 2])
    np.testing.assert_array_equal(encode_aux_target(frame, "biopsy"), [0, 1, -1, 1])
    np.testing.assert_array_equal(encode_aux_target(frame, "BIRADS"), [0, 2, 1, -1])
    np.testing.assert_array_equal(encode_aux_target(frame, "laterality"), [0, 1, 1, 0])

    images = _images(4)
    out_a = model({"image": images, "tabular": tabular}, training=False)
    out_b = model({"image": images, "tabular": np.zeros_like(tabular)}, training=False)
    assert not np.allclose(out_a["label"], out_b["label"])  # the tabular branch is wired in

    compile_classifier(model, config, keras.optimizers.AdamW(1e-3), run_eagerly=True)
    targets = {"label": np.array([[0], [1], [0], [1]], dtype=np.float32)}
    targets.update({name: encode_aux_target(frame, name) for name in config.aux_targets})
    logs = model.train_on_batch({"image": images, "tabular": tabular}, targets, return_dict=True)
    assert {"biopsy_loss", "density_loss", "BIRADS_loss", "label_loss"} <= set(logs)
    assert all(np.isfinite(value) for value in logs.values())
    with pytest.raises(ValueError, match="tabular_dim"):
        build_classifier(_config(tabular_features=("age",)))
    with pytest.raises(ValueError, match="tabular feature"):
        _config(tabular_features=("biopsy",))  # an outcome as input would leak the label


def test_masked_auxiliary_loss_ignores_missing_targets() -> None:
    loss = MaskedAuxiliaryLoss(classes=4)
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4], [0.25] * 4], dtype=np.float32)
    with_missing = float(loss(np.array([0, 3, -1], dtype=np.float32), probs))
    expected = -(np.log(0.7) + np.log(0.4)) / 2
    assert with_missing == pytest.approx(expected, rel=1e-5)
    binary = MaskedAuxiliaryLoss(classes=1)
    value = float(binary(np.array([1, -1], dtype=np.float32), np.array([[0.8], [0.1]], "float32")))
    assert value == pytest.approx(-np.log(0.8), rel=1e-5)


def test_aux_targets_on_real_rsna_metadata(rsna_train_csv) -> None:
    frame = normalise_metadata(pd.read_csv(rsna_train_csv, nrows=3000))
    density = encode_aux_target(frame, "density")
    assert set(np.unique(density)) <= {-1, 0, 1, 2, 3}
    raw = pd.read_csv(rsna_train_csv, nrows=3000)
    assert (density == -1).sum() == raw["density"].isna().sum()
    birads = encode_aux_target(frame, "BIRADS")
    assert (birads == -1).sum() == raw["BIRADS"].isna().sum()
    np.testing.assert_array_equal(encode_aux_target(frame, "invasive"), raw["invasive"])
    view = encode_aux_target(frame, "view")
    np.testing.assert_array_equal(view == -1, ~raw["view"].isin(["CC", "MLO"]))


def test_local_weights_file_loads_into_a_fresh_model(tmp_path) -> None:
    source = build_backbone("EfficientNetB0", (*TINY, 3), weights=None)
    path = tmp_path / "b0.weights.h5"
    source.save_weights(path)
    config = _config(weights=str(path))
    loaded = backbone_of(build_classifier(config))
    fresh = backbone_of(build_classifier(_config()))
    x = np.repeat(_images(2), 3, axis=-1) * 255.0
    # Random-init features are ~1e-7, so compare relative to their size.
    np.testing.assert_allclose(loaded(x), source(x), rtol=1e-4, atol=1e-12)
    assert not np.allclose(fresh(x), source(x), rtol=1e-2, atol=0)
    for got, want in zip(loaded.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(FileNotFoundError, match=r"missing\.weights\.h5"):
        build_backbone("EfficientNetB0", (*TINY, 3), weights=str(tmp_path / "missing.weights.h5"))
    with pytest.raises(ValueError, match=r"b0\.weights\.h5"):
        build_backbone("EfficientNetV2B0", (*TINY, 3), weights=str(path))


def test_random_start_batch_norm_settles_fast_and_pretrained_keeps_keras_momentum(
        tmp_path) -> None:
    norms = [layer for layer in backbone_of(build_classifier(_config())).layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and {(n.momentum, n.synchronized) for n in norms} == {(BN_MOMENTUM, False)}
    path = tmp_path / "b0.weights.h5"
    build_backbone("EfficientNetB0", (*TINY, 3), weights=None).save_weights(path)
    pretrained = backbone_of(build_classifier(_config(weights=str(path))))
    assert {layer.momentum for layer in pretrained.layers
            if isinstance(layer, keras.layers.BatchNormalization)} == {0.99}


def test_saved_model_round_trips_with_custom_layers(tmp_path) -> None:
    config = _config(
        pooling="gem", aux_targets={"invasive": 0.3}, tabular_features=("age",), tabular_dim=2
    )
    model = build_classifier(config)
    compile_classifier(model, config, keras.optimizers.AdamW(1e-3))
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    inputs = {"image": _images(3), "tabular": np.array([[0.5, 0], [0, 1], [0.7, 0]], "float32")}
    np.testing.assert_allclose(predict_proba(reloaded, inputs), predict_proba(model, inputs))


def test_freeze_and_unfreeze_from_a_named_block() -> None:
    model = build_classifier(_config())
    backbone = backbone_of(model)
    assert set_backbone_trainable(model, False) == 0
    assert not backbone.trainable_weights
    partial = set_backbone_trainable(model, True, from_layer="block6a")
    assert not backbone.get_layer("block1a_dwconv").trainable
    assert backbone.get_layer("block6a_expand_conv").trainable
    assert not backbone.get_layer("block6a_expand_bn").trainable  # batch norm stays frozen
    full = set_backbone_trainable(model, True)
    assert 0 < partial < full
    assert backbone.get_layer("block1a_dwconv").trainable
    with pytest.raises(ValueError, match="no layer name starts with 'block99'"):
        set_backbone_trainable(model, True, from_layer="block99")


def test_config_round_trip_and_validation(tmp_path) -> None:
    config = _config(aux_targets={"biopsy": 0.2}, tabular_features=("age", "implant"), tabular_dim=2)
    path = tmp_path / "config.json"
    config.save(path)
    assert ClassifierConfig.load(path) == config
    assert _config(weights="none").weights is None
    with pytest.raises(ValueError, match="backbone 'ResNet50'"):
        _config(backbone="ResNet50")
    with pytest.raises(ValueError, match="aux target"):
        _config(aux_targets={"cancer": 1.0})


def test_grad_cam_maps_cover_the_image_and_follow_the_gradient() -> None:
    from cvae_mammo.inference.classifier_predict import grad_cam

    config = _config(image_size=(64, 32), pooling="avg")
    model = build_classifier(config)
    images = _images(2, size=(64, 32))
    maps = grad_cam(model, {"image": images})
    assert maps.shape == (2, 64, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0 + 1e-6
    for cam in maps:
        assert cam.max() == pytest.approx(1.0, abs=1e-5) or not cam.any()
    # Flipping the label head's sign reverses which features count as evidence.
    kernel, bias = model.get_layer("label").get_weights()
    model.get_layer("label").set_weights([-kernel, bias])
    flipped = grad_cam(model, {"image": images})
    assert not np.allclose(maps, flipped)
