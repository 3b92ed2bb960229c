"""Train the bilateral lesion segmenter of a CVAE run: :func:`fit_lesion_segmenter`.

``fit-cvae`` calls it after the CVAE when ``CVAEConfig.lesion_steps`` is above 0; it
can also add a segmenter to a finished CVAE run. Training samples are the train-split
negatives (the same images the CVAE learns from). Each sample is the image and the
other breast of the same view (looked up among all train-split images: the other
breast's label is never read; zeros for ``partner_dropout`` of the samples and when
there is none), both flipped top-bottom half the time and given one random gamma
(0.8-1.25). ``lesion_rate`` of the samples get one synthetic lesion
(:mod:`cvae_mammo.synthetic.lesions`, in the seed's style, :func:`seed_styles`), and the other
breast is misaligned (:func:`~cvae_mammo.synthetic.lesions.jitter`) so that misalignment
counts as normal.
The target is the lesion's mask; no real lesion or abnormal image is used. The saved
model is an ensemble (:func:`~cvae_mammo.models.lesion_segmenter.ensemble_of`) of
``lesion_snapshots`` snapshots taken over the second half of training
(:func:`snapshot_steps`): on mini-MIAS validation women, single snapshots of one run ranked
images very differently (ROC-AUC 0.75, 0.78, 0.74 at steps 800, 1200, 1600), their average
better than any (0.79).

Writes into the run folder ``lesion_segmenter.keras``, ``lesion_validation.json``
(pixel ROC-AUC of synthetic lesions pasted into the val negatives, loss curves, the
settings and the split file's SHA-256) and
``scoring.json`` selecting the ``lesion_topk`` score (mean of the top 1% lesion
probability inside the breast, minus the other breast's), which ``calibrate`` then
standardises; a ``threshold.json`` set for the run's previous score is removed. A seed
whose segmenter the run already holds, trained with the same settings, style and split file
(:func:`reusable_seeds`), is kept rather than trained again: changing ``lesion_seeds`` or
``lesion_style`` retrains only the seeds that change. Logs
progress every ``log_every`` steps; stops with
:class:`~cvae_mammo.errors.TrainingDivergedError` on a NaN/inf loss.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cvae_mammo.data.dataset import MammoDataset
from cvae_mammo.data.pairing import with_partners
from cvae_mammo.data.pipeline import read_image
from cvae_mammo.errors import InputError, TrainingDivergedError
from cvae_mammo.fileio import PathLike, atomic_write_json, read_json
from cvae_mammo.inference.predict import THRESHOLD_FILE
from cvae_mammo.inference.scoring import SCORING_FILE, segmenter_scoring
from cvae_mammo.models.cvae import MIXED_STYLE, CVAEConfig
from cvae_mammo.models.lesion_segmenter import (
    SEGMENTER_FILE,
    build_lesion_segmenter,
    ensemble_of,
    lesion_probability,
    load_lesion_segmenter,
    member_name,
    members_of_seed,
    segmentation_loss,
)
from cvae_mammo.synthetic.lesions import LESION_STYLES, add_synthetic_lesion, jitter
from cvae_mammo.tf_startup import keras
from cvae_mammo.training.common import save_model_atomically
from cvae_mammo.training.runs import METADATA_NAME, dataset_hashes, read_run_config

LOGGER = logging.getLogger(__name__)
VALIDATION_FILE = "lesion_validation.json"
#: Bytes of decoded images kept in memory between batches.
_CACHE_BYTES = 2 * 1024**3


class PairedImages:
    """Images of a frame with ``path`` / ``partner_path``, read on demand and cached."""

    def __init__(self, frame: pd.DataFrame, root: Path, image_size: tuple[int, int]) -> None:
        self.frame = frame.reset_index(drop=True)
        self.root = root
        self.image_size = image_size
        self._cache: dict[str, np.ndarray] = {}
        self._limit = max(16, _CACHE_BYTES // (4 * image_size[0] * image_size[1]))

    def read(self, relative: str) -> np.ndarray:
        """One image ``[H, W]`` in [0, 1]; zeros for a blank path."""
        if not relative:
            return np.zeros(self.image_size, np.float32)
        if relative not in self._cache:
            if len(self._cache) >= self._limit:
                self._cache.pop(next(iter(self._cache)))
            self._cache[relative] = read_image(os.fspath(self.root / relative),
                                               self.image_size)[..., 0]
        return self._cache[relative]

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image, other breast) of row ``index``."""
        row = self.frame.iloc[index]
        return self.read(str(row["path"])), self.read(str(row.get("partner_path", "") or ""))


def training_batch(pairs: PairedImages, batch_size: int, config: CVAEConfig,
                   rng: np.random.Generator, style: str, lesion_rate: float = 0.7
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Inputs ``[B, H, W, 2]`` (image, other breast) and lesion masks ``[B, H, W, 1]``, the
    lesions drawn in ``style`` (one of :data:`~cvae_mammo.synthetic.lesions.LESION_STYLES`)."""
    inputs = np.zeros((batch_size, *config.image_size, 2), np.float32)
    targets = np.zeros((batch_size, *config.image_size, 1), np.float32)
    for i in range(batch_size):
        image, other = pairs.pair(int(rng.integers(len(pairs.frame))))
        if rng.random() < config.partner_dropout:
            other = np.zeros_like(other)
        if rng.random() < 0.5:
            image, other = image[::-1], other[::-1]
        gamma = rng.uniform(0.8, 1.25)
        image, other = image ** gamma, other ** gamma
        if rng.random() < lesion_rate:
            image, targets[i, ..., 0] = add_synthetic_lesion(image, rng, config.mask_threshold,
                                                             style=style)
        inputs[i, ..., 0], inputs[i, ..., 1] = image, jitter(other, rng)
    return inputs, targets


def segmenter_frames(dataset: MammoDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train- and val-split negatives, each with its other breast from the same split."""
    frames = []
    for split in ("train", "val"):
        negatives = dataset.subset(split=split, label=0)
        frames.append(with_partners(negatives, within=dataset.subset(split=split))
                      if not negatives.empty else negatives)
    if frames[0].empty:
        raise InputError(f"{dataset.splits_path}: the train split has no negative images to "
                         "train the lesion segmenter on")
    return frames[0], frames[1]


def synthetic_lesion_auc(model: keras.Model, pairs: PairedImages, config: CVAEConfig,
                         seed: int, style: str, samples: int = 24) -> float:
    """Pixel ROC-AUC of the segmenter on ``style`` synthetic lesions pasted into ``pairs``'
    images."""
    from sklearn.metrics import roc_auc_score

    inputs, targets = training_batch(pairs, samples, config, np.random.default_rng(seed + 1),
                                     style)
    probability = lesion_probability(model, inputs[..., 0], inputs[..., 1])
    if targets.min() == targets.max():
        return float("nan")
    return float(roc_auc_score(targets.ravel() > 0.5, probability.ravel()))


def snapshot_steps(steps: int, snapshots: int) -> list[int]:
    """The training steps whose weights the saved ensemble keeps: ``snapshots`` evenly
    spaced over the second half of ``steps``, the last at ``steps`` (fewer when ``steps``
    is too short to tell them apart)."""
    if snapshots < 2:
        return [steps]
    return sorted({max(1, round(steps / 2 + i * steps / (2 * (snapshots - 1))))
                   for i in range(snapshots)})


def segmenter_seeds(config: CVAEConfig) -> list[int]:
    """The seeds of the segmenters a run averages: ``seed``, ``seed + 1``, ... (``lesion_seeds``)."""
    return [config.seed + k for k in range(config.lesion_seeds)]


def seed_styles(config: CVAEConfig) -> dict[int, str]:
    """The synthetic-lesion style each seed's segmenter learns from: ``lesion_style``, or for
    ``mixed`` the :data:`~cvae_mammo.synthetic.lesions.LESION_STYLES` in turn (``seed``
    itself ``shapes``, ``seed + 1`` ``tissue``, ...)."""
    seeds = segmenter_seeds(config)
    if config.lesion_style != MIXED_STYLE:
        return dict.fromkeys(seeds, config.lesion_style)
    return {seed: LESION_STYLES[k % len(LESION_STYLES)] for k, seed in enumerate(seeds)}


#: The settings every member of a segmenter ensemble shares.
_SHARED_SETTINGS = ("steps", "batch_size", "filters", "learning_rate", "snapshots")


def segmenter_settings(config: CVAEConfig) -> dict[str, object]:
    """The options a trained segmenter is recorded with (in ``lesion_validation.json``)."""
    return {"steps": config.lesion_steps, "batch_size": config.lesion_batch_size,
            "filters": list(config.lesion_filters), "learning_rate": config.lesion_learning_rate,
            "snapshots": snapshot_steps(config.lesion_steps, config.lesion_snapshots),
            "seed": config.seed, "seeds": segmenter_seeds(config), "style": config.lesion_style,
            "styles": {str(seed): style for seed, style in seed_styles(config).items()}}


def recorded_settings(run_dir: PathLike) -> dict[str, object] | None:
    """The settings ``run_dir``'s saved segmenter was trained with (None without one), with
    the defaults of runs saved before seed ensembles (one seed), lesion styles (``shapes``)
    and per-seed styles (the run's style for every seed)."""
    run_dir = Path(run_dir)
    report = run_dir / VALIDATION_FILE
    if not (run_dir / SEGMENTER_FILE).is_file() or not report.is_file():
        return None
    recorded = read_json(report)
    recorded.setdefault("seeds", [recorded.get("seed")])
    recorded.setdefault("style", "shapes")
    recorded.setdefault("styles", {str(seed): recorded["style"] for seed in recorded["seeds"]})
    if "splits_sha256" not in recorded and (run_dir / METADATA_NAME).is_file():
        recorded["splits_sha256"] = read_json(run_dir / METADATA_NAME).get("splits_sha256")
    return recorded


def _member(weights: list[np.ndarray], config: CVAEConfig, seed: int, step: int) -> keras.Model:
    member = build_lesion_segmenter(config.image_size, config.lesion_filters,
                                    name=member_name(seed, step))
    member.set_weights(weights)
    return member


def segmenter_done(run_dir: PathLike, config: CVAEConfig) -> bool:
    """Whether ``run_dir`` already holds a segmenter trained with ``config``'s settings."""
    recorded = recorded_settings(run_dir)
    return recorded is not None and all(recorded.get(key) == value for key, value
                                        in segmenter_settings(config).items())


def reusable_seeds(recorded: dict[str, object] | None, config: CVAEConfig,
                   splits_sha256: str) -> list[int]:
    """The seeds of a saved segmenter (``recorded``, from :func:`recorded_settings`) that
    ``config`` would train again on the split file hashed ``splits_sha256``: the same shared
    settings and split file, and that seed with the same style. Empty when there are none."""
    wanted = segmenter_settings(config)
    if (recorded is None or any(recorded.get(key) != wanted[key] for key in _SHARED_SETTINGS)
            or recorded.get("splits_sha256") != splits_sha256):
        return []
    styles = recorded["styles"]
    return [seed for seed, style in seed_styles(config).items()
            if seed in recorded["seeds"] and styles.get(str(seed)) == style]


def train_segmenter_snapshots(pairs: PairedImages, config: CVAEConfig, seed: int, style: str,
                              label: str = "lesion segmenter", log_every: int = 50
                              ) -> tuple[dict[int, list[np.ndarray]], list[float]]:
    """Train one segmenter from ``seed`` for ``config.lesion_steps`` steps on ``pairs``, its
    synthetic lesions in ``style``.

    Returns the weights at each :func:`snapshot_steps` step and the loss of every step;
    raises :class:`~cvae_mammo.errors.TrainingDivergedError` on a NaN/inf loss.
    """
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_lesion_segmenter(config.image_size, config.lesion_filters)
    model.compile(keras.optimizers.AdamW(config.lesion_learning_rate, weight_decay=1e-4,
                                         clipnorm=1.0), loss=segmentation_loss)
    keep = set(snapshot_steps(config.lesion_steps, config.lesion_snapshots))
    started, losses, snapshots = time.perf_counter(), [], {}
    for step in range(1, config.lesion_steps + 1):
        loss = float(model.train_on_batch(*training_batch(pairs, config.lesion_batch_size,
                                                          config, rng, style)))
        if not np.isfinite(loss):
            raise TrainingDivergedError(f"{label} loss is {loss} at step {step}; nothing was "
                                        "saved")
        losses.append(loss)
        if step in keep:
            snapshots[step] = model.get_weights()
        if step % log_every == 0 or step == config.lesion_steps:
            elapsed = time.perf_counter() - started
            LOGGER.info("%s step %d/%d: loss %.4f (mean of last %d), %.0f s, about %.0f s left",
                        label, step, config.lesion_steps,
                        float(np.mean(losses[-log_every:])), min(log_every, len(losses)),
                        elapsed, elapsed / step * (config.lesion_steps - step))
    return snapshots, losses


def fit_lesion_segmenter(run_dir: PathLike, data_dir: PathLike,
                         config: CVAEConfig | None = None, log_every: int = 50) -> Path:
    """Train the run's lesion segmenter(s) for ``config.lesion_steps`` steps; returns its file.

    ``config`` defaults to the run's own (``config.json``); its ``image_size``,
    ``seed``, ``mask_threshold``, ``partner_dropout`` and ``lesion_*`` options are used.
    With ``lesion_seeds`` above 1, one segmenter is trained per seed (:func:`segmenter_seeds`;
    the first is the one a single-seed run trains) and the saved ensemble averages the
    snapshots of all of them.
    """
    run_dir = Path(run_dir)
    if config is None:
        config = CVAEConfig.from_run(read_run_config(run_dir))
    if config.lesion_steps < 1:
        raise InputError(f"{run_dir}: lesion_steps is {config.lesion_steps}; nothing to train")
    dataset = MammoDataset.open(data_dir)
    train, val = segmenter_frames(dataset)
    pairs = PairedImages(train, dataset.root, config.image_size)
    styles = seed_styles(config)
    seeds = list(styles)
    LOGGER.info("lesion segmenter: %d train negatives (%d with the other breast), %d steps of %d, "
                "seeds %s", len(train), int(train["has_partner"].sum()), config.lesion_steps,
                config.lesion_batch_size, styles)
    splits_sha256 = dataset_hashes(data_dir)["splits_sha256"]
    earlier = recorded_settings(run_dir)
    reused = reusable_seeds(earlier, config, splits_sha256)
    saved = load_lesion_segmenter(run_dir) if reused else None
    started, members, curves = time.perf_counter(), [], {}
    for seed, style in styles.items():
        if seed in reused:
            LOGGER.info("%s: lesion segmenter (seed %d, %s) already trained with these settings: "
                        "kept", run_dir, seed, style)
            members += members_of_seed(saved, seed)
            curves[str(seed)] = _earlier_curve(earlier, seed)
            continue
        label = f"{run_dir}: lesion segmenter (seed {seed}, {style})"
        snapshots, losses = train_segmenter_snapshots(pairs, config, seed, style, label,
                                                      log_every)
        members += [_member(weights, config, seed, step) for step, weights in snapshots.items()]
        curves[str(seed)] = _every_50(losses)
    model = ensemble_of(members)
    save_model_atomically(model, run_dir / SEGMENTER_FILE)
    report = {**segmenter_settings(config), "seconds": round(time.perf_counter() - started, 1),
              "reused_seeds": sorted(reused), "train_negatives": len(train),
              "splits_sha256": splits_sha256,
              "loss_every_50": curves[str(seeds[0])]}
    if len(seeds) > 1:
        report["loss_every_50_per_seed"] = curves
    if not val.empty:
        report["val_negatives"] = len(val)
        val_pairs = PairedImages(val, dataset.root, config.image_size)
        per_style = {style: synthetic_lesion_auc(model, val_pairs, config, config.seed, style)
                     for style in dict.fromkeys(styles.values())}
        report["synthetic_lesion_pixel_roc_auc"] = float(np.mean(list(per_style.values())))
        report["synthetic_lesion_pixel_roc_auc_per_style"] = per_style
        LOGGER.info("lesion segmenter: synthetic lesions in the val negatives, pixel ROC-AUC %s",
                    ", ".join(f"{auc:.3f} ({style})" for style, auc in per_style.items()))
    atomic_write_json(run_dir / VALIDATION_FILE, report)
    segmenter_scoring().save(run_dir / SCORING_FILE)
    stale = run_dir / THRESHOLD_FILE
    if stale.is_file():  # calibrated on the score this run had before
        stale.unlink()
        LOGGER.warning("%s: removed %s, set for the previous score; run calibrate again",
                       run_dir, THRESHOLD_FILE)
    return run_dir / SEGMENTER_FILE


def _earlier_curve(recorded: dict[str, object], seed: int) -> list[float]:
    """Seed ``seed``'s loss curve as an earlier report recorded it (empty when it did not)."""
    per_seed = recorded.get("loss_every_50_per_seed") or {}
    if str(seed) in per_seed:
        return per_seed[str(seed)]
    return recorded.get("loss_every_50", []) if recorded["seeds"][0] == seed else []


def _every_50(losses: list[float]) -> list[float]:
    return [round(float(np.mean(losses[i:i + 50])), 5) for i in range(0, len(losses), 50)]
