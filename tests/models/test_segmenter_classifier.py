"""The classifier built on a lesion segmenter: its start equals the segmenter's own-minus-other
top-1% score, it saves and loads, and bad weights fail with the path named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cvae_mammo.errors import InputError
from cvae_mammo.models.classifier import (
    backbone_of,
    build_classifier,
    predict_proba,
    set_backbone_trainable,
)
from cvae_mammo.models.classifier_config import ClassifierConfig
from cvae_mammo.models.lesion_segmenter import (
    SEGMENTER_FILE,
    build_lesion_segmenter,
    ensemble_members,
    ensemble_of,
)
from cvae_mammo.models.segmenter_classifier import lesion_map_model
from cvae_mammo.tf_startup import keras

SIZE = (64, 32)


@pytest.fixture(scope="module")
def segmenter_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder holding a two-member segmenter ensemble (random weights, a real model)
    whose output bias is moved off its prior so maps differ from pixel to pixel."""
    keras.utils.set_random_seed(0)
    members = [build_lesion_segmenter(SIZE, (8, 16), name=f"lesion_segmenter_seed_0_{i}")
               for i in range(2)]
    for member in members:
        logits = member.get_layer("lesion_logits")
        kernel, _ = logits.get_weights()
        logits.set_weights([kernel * 20, np.zeros(1, np.float32)])
    run = tmp_path_factory.mktemp("cvae_run")
    ensemble_of(members).save(run / SEGMENTER_FILE)
    return run


def _images(seed: int, count: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.1, 1.0, (count, *SIZE, 1)).astype(np.float32)
    images[:, :, SIZE[1] // 2:] = 0.0  # a breast on the left half, background on the right
    return images


def _top_percent(values: np.ndarray, mask: np.ndarray, percent: float = 1.0) -> float:
    inside = values[mask]
    if inside.size == 0:
        return 0.0
    count = max(1, int(np.ceil(inside.size * percent / 100)))
    return float(np.sort(inside)[-count:].mean())


def test_before_training_it_ranks_as_the_segmenter_own_minus_other(segmenter_run: Path) -> None:
    from cvae_mammo.models.losses import breast_mask

    config = ClassifierConfig(backbone="LesionSegmenter", weights=str(segmenter_run),
                              image_size=SIZE)
    model = build_classifier(config)
    images, partners = _images(1), _images(2)
    partners[-1] = 0.0  # the last image has no other breast
    probability = predict_proba(model, {"image": images, "partner": partners})

    segmenter = keras.saving.load_model(segmenter_run / SEGMENTER_FILE)
    expected = []
    for own, other in zip(images, partners):
        maps = []
        for first, second in ((own, other), (other, own)):
            logits = segmenter.predict(np.concatenate([first, second], -1)[None], verbose=0)[0]
            mask = np.asarray(breast_mask(first[None]))[0, ..., 0] > 0.5
            maps.append(_top_percent((1 / (1 + np.exp(-logits))).mean(-1), mask))
        expected.append(maps[0] - maps[1])
    expected = np.asarray(expected)
    assert expected[-1] > 0 and np.ptp(expected) > 1e-3  # scores differ: the test can fail
    assert np.argsort(probability).tolist() == np.argsort(expected).tolist()
    head = 1 / (1 + np.exp(-10 * expected))  # the label unit starts at +10 / -10, bias 0
    np.testing.assert_allclose(probability, head, atol=1e-4)


def test_it_saves_loads_and_maps_lesions(segmenter_run: Path, tmp_path: Path) -> None:
    config = ClassifierConfig(backbone="LesionSegmenter", weights=str(segmenter_run),
                              image_size=SIZE, top_percent=5.0)
    model = build_classifier(config)
    inputs = {"image": _images(3), "partner": _images(4)}
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(predict_proba(loaded, inputs), predict_proba(model, inputs),
                               atol=1e-6)
    maps = lesion_map_model(loaded).predict(inputs, verbose=0)
    assert maps.shape == (6, *SIZE, 1)
    assert maps.min() >= 0 and maps.max() <= 1 and np.all(maps[:, :, SIZE[1] // 2 + 4:] == 0)


def test_fine_tuning_reaches_into_every_member_but_batch_norm(segmenter_run: Path) -> None:
    model = build_classifier(ClassifierConfig(backbone="LesionSegmenter",
                                              weights=str(segmenter_run), image_size=SIZE))
    head_only = set_backbone_trainable(model, False)
    assert head_only == 0 and len(model.trainable_weights) == 2  # the label unit
    tuned = set_backbone_trainable(model, True, freeze_batchnorm=True)
    batch_norms = [w for w in model.weights if "batch_normalization" in w.path]
    assert tuned > 0 and batch_norms
    trainable = {id(w) for w in model.trainable_weights}
    assert not any(id(w) in trainable for w in batch_norms)
    members = ensemble_members(backbone_of(model))
    assert len(members) == 2 and all(member.trainable_weights for member in members)


def test_bad_weights_name_the_path_and_the_fix(segmenter_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LesionSegmenter"):
        ClassifierConfig(backbone="LesionSegmenter", weights=None, image_size=SIZE)
    empty = tmp_path / "no_segmenter"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{SEGMENTER_FILE}: no lesion segmenter"):
        build_classifier(ClassifierConfig(backbone="LesionSegmenter", weights=str(empty),
                                          image_size=SIZE))
    with pytest.raises(InputError, match="set --image-size 64x32"):
        build_classifier(ClassifierConfig(backbone="LesionSegmenter",
                                          weights=str(segmenter_run), image_size=(128, 64)))
