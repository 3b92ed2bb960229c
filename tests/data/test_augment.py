"""Seeded augmentation policies, alone and inside the tf.data pipeline, on real mini-MIAS images."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cvae_mammo.data.augment import POLICIES, Augmenter, build_policy, element_seed
from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.pipeline import build_pipeline, read_image
from cvae_mammo.errors import InputError

pytestmark = pytest.mark.shared_data
SIZE = (128, 64)


@pytest.fixture(scope="module")
def dataset(mias_dataset) -> MammoDataset:
    return MammoDataset.open(mias_dataset)


@pytest.fixture(scope="module")
def image(dataset) -> np.ndarray:
    return read_image(str(dataset.root / dataset.frame["path"].iloc[0]), SIZE)


@pytest.mark.parametrize("policy", ["cvae", "classifier"])
def test_same_seed_same_image_other_seed_other_image(image, policy):
    augmenter = Augmenter(policy)
    outputs = [augmenter(image, element_seed(7, i)) for i in range(6)]
    again = [augmenter(image, element_seed(7, i)) for i in range(6)]
    for a, b in zip(outputs, again):
        np.testing.assert_array_equal(a, b)
    for a in outputs:
        assert a.shape == image.shape and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
    other = [augmenter(image, element_seed(8, i)) for i in range(6)]
    assert sum(not np.array_equal(a, b) for a, b in zip(outputs, other)) >= 5
    assert sum(not np.array_equal(a, image) for a in outputs) >= 5


def test_classifier_policy_is_stronger(image):
    def mean_change(policy: str) -> float:
        augmenter = Augmenter(policy)
        return float(np.mean([np.abs(augmenter(image, s) - image).mean() for s in range(40)]))

    assert mean_change("classifier") > mean_change("cvae") > 0.0


def test_none_policy_and_unknown_name(image):
    assert build_policy("none") is None
    assert Augmenter("none")(image, 3) is image
    assert set(POLICIES) == {"none", "cvae", "classifier"}
    with pytest.raises(InputError, match="policy 'strong' unknown"):
        Augmenter("strong")


def test_threads_give_the_same_result_as_serial(image):
    augmenter = Augmenter("classifier")
    serial = [augmenter(image, s) for s in range(24)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda s: augmenter(image, s), range(24)))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def _images(dataset: MammoDataset, seed: int, augment: str | None, batches: int = 4) -> np.ndarray:
    frame = dataset.subset(split="train", label=0)
    pipeline = build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=8, augment=augment,
                              shuffle=True, seed=seed, repeat=True)
    return np.stack([b["image"] for b in pipeline.take(batches).as_numpy_iterator()])


def test_pipeline_batches_repeat_under_a_seed_and_change_with_it(dataset):
    first = _images(dataset, 21, "cvae")
    np.testing.assert_array_equal(first, _images(dataset, 21, "cvae"))
    assert not np.array_equal(first, _images(dataset, 22, "cvae"))
    assert not np.array_equal(first, _images(dataset, 21, None))
    assert first.min() >= 0.0 and first.max() <= 1.0


def test_each_epoch_sees_new_augmentations(dataset):
    frame = dataset.subset(split="val", label=0)
    pipeline = build_pipeline(frame, dataset.root, image_size=SIZE, batch_size=len(frame),
                              augment="classifier", seed=4, repeat=True, include_ids=True)
    epoch1, epoch2 = list(pipeline.take(2).as_numpy_iterator())
    np.testing.assert_array_equal(epoch1["image_id"], epoch2["image_id"])  # no shuffle
    assert not np.array_equal(epoch1["image"], epoch2["image"])
