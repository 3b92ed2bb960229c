"""Density of the CVAE's own encoder features on normal breasts (PaDiM-like, position-free).

After training, the encoder features of the training normals (one vector per
latent-grid position inside the breast) are summarised by one Gaussian: their
mean and a Ledoit-Wolf shrunk covariance (scikit-learn), which stays well
conditioned with few images. An image's feature-density map is the Mahalanobis
distance of each of its positions to that Gaussian: high where the encoder sees
something it never saw in a normal breast. Pretrained ImageNet features would be
the usual choice (PaDiM); they cannot be downloaded offline, and the CVAE's
features are trained on mammograms.

Saved as ``feature_density.npz`` in the run folder. NumPy and scikit-learn only.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np

from cvae_mammo.fileio import PathLike, atomic_write_bytes

DENSITY_FILE = "feature_density.npz"


def grid_mask(masks: np.ndarray, grid: tuple[int, int], minimum: float = 0.5) -> np.ndarray:
    """``[B, h, w]`` bool: latent-grid cells whose share of breast pixels is at least ``minimum``.

    ``masks`` are ``[B, H, W]`` breast masks; the grid covers the image padded to a
    multiple of the grid (as the model pads it).
    """
    masks = np.asarray(masks, dtype=np.float32)
    batch, height, width = masks.shape
    grid_h, grid_w = grid
    cell_h, cell_w = -(-height // grid_h), -(-width // grid_w)
    padded = np.zeros((batch, grid_h * cell_h, grid_w * cell_w), np.float32)
    padded[:, :height, :width] = masks
    share = padded.reshape(batch, grid_h, cell_h, grid_w, cell_w).mean(axis=(2, 4))
    return share >= minimum


@dataclasses.dataclass
class FeatureDensity:
    """One Gaussian over encoder feature vectors: ``mean_`` ``[C]`` and ``precision_`` ``[C, C]``."""

    mean_: np.ndarray
    precision_: np.ndarray
    count_: int

    @classmethod
    def fit(cls, features: np.ndarray, masks: np.ndarray) -> FeatureDensity:
        """Fit on ``features`` ``[B, h, w, C]`` at the cells where ``masks`` ``[B, h, w]`` is true."""
        from sklearn.covariance import LedoitWolf

        vectors = np.asarray(features, np.float64)[np.asarray(masks, bool)]
        if len(vectors) < 2:
            raise ValueError("FeatureDensity.fit: fewer than two feature vectors inside breasts")
        estimate = LedoitWolf().fit(vectors)
        return cls(mean_=estimate.location_.astype(np.float32),
                   precision_=estimate.precision_.astype(np.float32), count_=len(vectors))

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of every position: ``[..., C]`` -> ``[...]``."""
        centred = np.asarray(features, np.float32) - self.mean_
        squared = np.einsum("...i,ij,...j->...", centred, self.precision_, centred)
        return np.sqrt(np.maximum(squared, 0.0))

    def save(self, path: PathLike) -> None:
        """Write the fitted Gaussian as an ``.npz`` file, atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean_, precision=self.precision_, count=self.count_)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: PathLike) -> FeatureDensity:
        """Read a file written by :meth:`save`."""
        with np.load(Path(path)) as stored:
            return cls(mean_=stored["mean"], precision_=stored["precision"],
                       count_=int(stored["count"]))
