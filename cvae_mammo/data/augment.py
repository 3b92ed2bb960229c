"""Named, seeded albumentations policies for mammograms.

Policies (by name):

- ``"none"``: no augmentation.
- ``"cvae"``: mild, so the normal appearance the VAE learns stays normal:
  vertical flip (keeps the chest wall on its side after preprocessing's
  orientation), small shift/scale/rotate, brightness/contrast and gamma.
- ``"classifier"``: the mild policy plus horizontal flip, grid distortion and
  coarse dropout. (Grid rather than elastic distortion: at 1456x728 an
  elastic transform costs ~175 ms per image on one core, grid ~13 ms.)

An :class:`Augmenter` draws every random number from a seed given per call,
so the same (run seed, element index) always gives the same output, whatever
thread computes it. It works on uint8 images (fastest: photometric changes
become look-up tables) or float32 images in [0, 1] (16-bit data; about 3x
the uint8 cost, see benchmarks/bench_data.py), and never imports TensorFlow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import cv2
import numpy as np

from cvae_mammo.errors import InputError

POLICIES: tuple[str, ...] = ("none", "cvae", "classifier")


def _mild() -> list:
    import albumentations as A

    return [
        A.VerticalFlip(p=0.5),
        A.Affine(scale=(0.95, 1.05), translate_percent=(-0.03, 0.03), rotate=(-5, 5),
                 border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5),
        A.RandomGamma(gamma_limit=(85, 115), p=0.5),
    ]


def _strong() -> list:
    import albumentations as A

    return [
        A.HorizontalFlip(p=0.5),
        *_mild(),
        A.GridDistortion(num_steps=5, distort_limit=0.2, border_mode=cv2.BORDER_CONSTANT, fill=0,
                         p=0.3),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.04, 0.1),
                        hole_width_range=(0.04, 0.1), fill=0, p=0.3),
    ]


_BUILDERS: dict[str, Callable[[], list]] = {"cvae": _mild, "classifier": _strong}


def build_policy(name: str):
    """The albumentations ``Compose`` for a policy name, or None for ``"none"``."""
    if name not in POLICIES:
        raise InputError(f"augmentation policy {name!r} unknown; choose one of {', '.join(POLICIES)}")
    if name == "none":
        return None
    import albumentations as A

    return A.Compose(_BUILDERS[name](), seed=0)


def element_seed(run_seed: int, index: int) -> int:
    """A 32-bit seed for element ``index`` of a run, independent across indices."""
    return int(np.random.SeedSequence([int(run_seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


def _seed_tree(node, sequence: np.random.SeedSequence) -> None:
    """Give ``node`` and every transform below it its own seed drawn from ``sequence``.

    ``Compose.set_random_seed`` hands the SAME seed to every child, so their
    "apply with probability p" draws would all be equal (all or nothing);
    independent child seeds keep the decisions independent.
    """
    node.set_random_seed(int(sequence.generate_state(1)[0]))
    children = getattr(node, "transforms", None) or []
    for child, child_sequence in zip(children, sequence.spawn(len(children))):
        _seed_tree(child, child_sequence)


class Augmenter:
    """Apply a named policy to one image with a seed given per call (thread-safe)."""

    def __init__(self, policy: str) -> None:
        build_policy(policy)  # validates the name early
        self.policy = policy
        self._local = threading.local()

    def _compose(self):
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_policy(self.policy)
        return compose

    def __call__(self, image: np.ndarray, seed: int) -> np.ndarray:
        """Augmented copy of a uint8 image, or a float32 one in [0, 1] (clipped to [0, 1]).

        ``[H, W]`` and ``[H, W, 1]`` keep their shape and dtype.
        """
        if self.policy == "none":
            return image
        if image.dtype not in (np.uint8, np.float32):
            raise TypeError(f"Augmenter: uint8 or float32 images only, not {image.dtype}")
        compose = self._compose()
        _seed_tree(compose, np.random.SeedSequence(int(seed)))
        out = compose(image=np.ascontiguousarray(image))["image"]
        if out.dtype == np.float32:
            out = np.clip(out, 0.0, 1.0, out=out)
        return out.reshape(image.shape)

    def __repr__(self) -> str:
        return f"Augmenter({self.policy!r})"
