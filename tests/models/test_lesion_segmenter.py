"""The bilateral lesion segmenter model: shapes at any size, its loss, saving and loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_any_image_size_gives_a_map_of_that_size() -> None:
    from cvae_mammo.models.lesion_segmenter import build_lesion_segmenter, lesion_probability

    model = build_lesion_segmenter((50, 30), filters=(4, 8))
    images = np.random.default_rng(0).uniform(0, 1, (3, 50, 30, 1)).astype(np.float32)
    assert model.predict(np.concatenate([images, images], -1), verbose=0).shape == (3, 50, 30, 1)
    alone = lesion_probability(model, images, None)
    paired = lesion_probability(model, images, images)
    assert alone.shape == (3, 50, 30) and (alone > 0).all() and (alone < 1).all()
    assert not np.allclose(alone, paired)  # the other breast is an input


def test_a_pair_flipped_top_bottom_gets_the_flipped_map() -> None:
    from cvae_mammo.models.lesion_segmenter import build_lesion_segmenter, lesion_probability

    model = build_lesion_segmenter((32, 16), filters=(4, 8))
    rng = np.random.default_rng(2)
    images, partners = rng.uniform(0, 1, (2, 3, 32, 16)).astype(np.float32)
    direct = lesion_probability(model, images, partners)
    flipped = lesion_probability(model, images[:, ::-1], partners[:, ::-1])
    np.testing.assert_allclose(flipped[:, ::-1], direct, rtol=1e-5, atol=1e-7)
    one_pass = 1 / (1 + np.exp(-model.predict(np.stack([images, partners], -1), verbose=0)[..., 0]))
    assert not np.allclose(one_pass, direct, atol=1e-4)  # the map averages both passes


def test_loss_is_lower_for_the_right_mask() -> None:
    from cvae_mammo.models.lesion_segmenter import segmentation_loss

    targets = np.zeros((2, 16, 8, 1), np.float32)
    targets[0, 4:8, 2:5] = 1.0
    right = np.where(targets > 0, 8.0, -8.0).astype(np.float32)
    wrong = -right
    flat = np.full_like(targets, -4.0)
    losses = [float(segmentation_loss(targets, logits)) for logits in (right, flat, wrong)]
    assert all(np.isfinite(losses))
    assert losses[0] < losses[1] < losses[2]


def test_saved_segmenter_loads_without_custom_objects(tmp_path: Path) -> None:
    from cvae_mammo.models.lesion_segmenter import (
        SEGMENTER_FILE,
        build_lesion_segmenter,
        lesion_probability,
        load_lesion_segmenter,
    )

    assert load_lesion_segmenter(tmp_path) is None
    model = build_lesion_segmenter((32, 16), filters=(4,))
    model.save(tmp_path / SEGMENTER_FILE)
    images = np.random.default_rng(1).uniform(0, 1, (2, 32, 16)).astype(np.float32)
    np.testing.assert_allclose(lesion_probability(load_lesion_segmenter(tmp_path), images, images),
                               lesion_probability(model, images, images), rtol=1e-5)


def test_an_ensemble_averages_its_members_probabilities_and_saves_as_one_model(
        tmp_path: Path) -> None:
    from cvae_mammo.models.lesion_segmenter import (
        SEGMENTER_FILE,
        build_lesion_segmenter,
        ensemble_members,
        ensemble_of,
        lesion_probability,
        load_lesion_segmenter,
    )

    members = [build_lesion_segmenter((32, 16), filters=(4,), name=f"member_{i}") for i in range(3)]
    ensemble = ensemble_of(members)
    rng = np.random.default_rng(3)
    images, partners = rng.uniform(0, 1, (2, 2, 32, 16)).astype(np.float32)
    each = [lesion_probability(member, images, partners) for member in members]
    assert not np.allclose(each[0], each[1], atol=1e-4)  # differently initialised members
    np.testing.assert_allclose(lesion_probability(ensemble, images, partners),
                               np.mean(each, axis=0), rtol=1e-5, atol=1e-7)
    ensemble.save(tmp_path / SEGMENTER_FILE)
    loaded = load_lesion_segmenter(tmp_path)
    assert loaded.output.shape[-1] == 3
    np.testing.assert_allclose(lesion_probability(loaded, images, partners),
                               np.mean(each, axis=0), rtol=1e-5, atol=1e-7)
    members_back = ensemble_members(loaded)
    assert [m.name for m in members_back] == ["member_0", "member_1", "member_2"]
    np.testing.assert_allclose(lesion_probability(ensemble_of(members_back[:2]), images, partners),
                               np.mean(each[:2], axis=0), rtol=1e-5, atol=1e-7)
    assert ensemble_members(members[0]) == [members[0]]  # a plain segmenter is its own member
