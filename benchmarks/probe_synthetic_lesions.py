"""Probe for issue 11: a bilateral synthetic-lesion segmenter, out-of-fold on mini-MIAS.

Not yet part of the library: this measures whether the idea deserves to become the
detector. It reuses the folds and inner splits that ``benchmarks/eval_mias.py`` wrote
(``--eval-dir``, the folder given there as ``--out``), so its figures sit next to the
CVAE's and the bilateral rule's for the same women and images. Run it as a script (it
imports ``eval_mias`` from its own folder).

Per outer fold, a small U-Net (input: the image and the other breast, same view) is trained
only on the inner-train women's negative images. 70% of training samples get one synthetic
lesion pasted into the image (soft mass, spiculated mass, asymmetric density,
microcalcification cluster, or a local swirl distortion), the other breast is jittered
(scale, shift) so that misalignment is normal, and the target is the lesion's mask:
weighted BCE + soft Dice. No real lesion or label of an abnormal image is used.

Score (fixed before any result was seen): the mean of the top 1% predicted lesion
probabilities inside the breast (``top1``). Printed as secondary rows: the same minus the
other breast's (``-contra``), the mean and the max, and, from eval_mias's out-of-fold table
of the same images, the CVAE's default score and the bilateral rule. ROC-AUC over the pooled
out-of-fold scores with a 1000-resample patient bootstrap 95% CI, and per fold.

Run (after eval_mias.py has run its folds; about 10 min per fold on 2 CPU cores)::

    python benchmarks/probe_synthetic_lesions.py --eval-dir runs/eval_mias --config-name bilateral
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from eval_mias import DEFAULT_DATA, breakdown, located_findings, map_hit
from PIL import Image
from scipy import ndimage

from cvae_mammo.evaluation.metrics import roc_with_ci
from cvae_mammo.fileio import atomic_write_csv

BATCH = 12
MASK_THRESHOLD = 0.04
LESION_KINDS = ("mass", "spiculated", "calcifications", "asymmetry", "distortion")
LESION_ODDS = (0.25, 0.2, 0.2, 0.15, 0.2)
LESION_RATE = 0.7
SCORES = ("top1", "top1-contra", "mean", "mean-contra", "max", "max-contra")


def load_images(data: Path) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """The dataset's manifest (with each image's ``partner``) and its images in [0, 1]."""
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    images = {row.image_id: np.asarray(Image.open(data / row.path), np.float32) / 255.0
              for row in manifest.itertuples()}
    partner: dict[str, str] = {}
    for _, woman in manifest.groupby("patient_id"):
        ids = list(woman.image_id)
        if len(ids) == 2:
            partner[ids[0]], partner[ids[1]] = ids[1], ids[0]
    manifest["partner"] = manifest.image_id.map(partner)
    return manifest, images


def soft_ellipse(shape: tuple[int, int], centre: tuple[float, float], radii: tuple[float, float],
                 angle: float, power: float) -> np.ndarray:
    """A rotated ellipse profile, 1 at the centre falling to 0 at its rim."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = rows - centre[0], cols - centre[1]
    u = (dx * np.cos(angle) + dy * np.sin(angle)) / radii[0]
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / radii[1]
    return np.clip(1 - (u * u + v * v), 0, 1) ** power


def spicules(shape: tuple[int, int], centre: tuple[float, float], reach: float,
             rng: np.random.Generator) -> np.ndarray:
    """5-13 thin lines radiating from ``centre``, fading with distance (0-1)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    distance = np.hypot(rows - centre[0], cols - centre[1])
    lines = np.zeros(shape, np.float32)
    for direction in rng.uniform(-np.pi, np.pi, rng.integers(5, 14)):
        length = rng.uniform(1.5, 3.5) * reach
        off = np.angle(np.exp(1j * (angle - direction)))
        lines = np.maximum(lines, np.exp(-(distance * off) ** 2 / 0.8) * (distance < length)
                           * (1 - distance / length))
    return lines


def swirl(image: np.ndarray, centre: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """A local rotation that fades out within 6-18 px: an architectural-distortion stand-in."""
    rows, cols = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32)
    fall = np.clip(1 - np.hypot(rows - centre[0], cols - centre[1]) / rng.uniform(6, 18), 0, 1) ** 2
    turn = rng.uniform(0.8, 2.0) * rng.choice([-1, 1]) * fall
    dy, dx = rows - centre[0], cols - centre[1]
    source = [centre[0] + dy * np.cos(turn) - dx * np.sin(turn),
              centre[1] + dy * np.sin(turn) + dx * np.cos(turn)]
    return ndimage.map_coordinates(image, source, order=1, mode="nearest").astype(np.float32)


def add_lesion(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``image`` with one synthetic lesion inside the breast, and the lesion's mask."""
    breast = image > MASK_THRESHOLD
    inner = ndimage.binary_erosion(breast, iterations=6)
    rows, cols = np.nonzero(inner if inner.any() else breast)
    pick = rng.integers(len(rows))
    centre = (float(rows[pick]), float(cols[pick]))
    kind = rng.choice(LESION_KINDS, p=LESION_ODDS)
    if kind == "distortion":
        changed = swirl(image, centre, rng)
    elif kind == "calcifications":
        specks = np.zeros_like(image)
        count = rng.integers(3, 16)
        spread = rng.uniform(2, 8)
        for _ in range(count):
            row = int(np.clip(centre[0] + rng.normal(0, spread), 0, image.shape[0] - 1))
            col = int(np.clip(centre[1] + rng.normal(0, spread), 0, image.shape[1] - 1))
            specks[row, col] = rng.uniform(0.2, 0.6)
        changed = image + ndimage.gaussian_filter(specks, rng.uniform(0.3, 0.7)) * 3
    else:
        low, high = (8, 24) if kind == "asymmetry" else (2.5, 12)
        radii = (rng.uniform(low, high), rng.uniform(low, high))
        profile = soft_ellipse(image.shape, centre, radii, rng.uniform(0, np.pi), rng.uniform(0.5, 2))
        if kind == "spiculated":
            profile = np.maximum(profile, 0.7 * spicules(image.shape, centre, max(radii), rng))
        gain = rng.uniform(0.04, 0.12) if kind == "asymmetry" else rng.uniform(0.06, 0.25)
        changed = image + gain * profile * (1.3 - np.clip(image, 0.1, 1))
    changed = np.where(breast, np.clip(changed, 0, 1), image).astype(np.float32)
    return changed, ((np.abs(changed - image) > 0.02) & breast).astype(np.float32)


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rescale by up to 7% and shift by up to 6 x 4 px (the other breast's misalignment)."""
    scale = rng.uniform(0.93, 1.07)
    shift = [rng.uniform(-6, 6), rng.uniform(-4, 4)]
    return ndimage.affine_transform(image, [1 / scale, 1 / scale], offset=shift, order=1,
                                    output_shape=image.shape).astype(np.float32)


def training_batch(ids: list[str], manifest: pd.DataFrame, images: dict[str, np.ndarray],
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image, other breast) inputs and lesion-mask targets for one batch."""
    partner = dict(zip(manifest.image_id, manifest.partner))
    height, width = next(iter(images.values())).shape
    inputs = np.zeros((BATCH, height, width, 2), np.float32)
    targets = np.zeros((BATCH, height, width, 1), np.float32)
    for i in range(BATCH):
        image_id = ids[rng.integers(len(ids))]
        image = images[image_id]
        other = (images[partner[image_id]] if isinstance(partner.get(image_id), str)
                 else np.zeros_like(image))
        if rng.random() < 0.5:
            image, other = image[::-1], other[::-1]
        gamma = rng.uniform(0.8, 1.25)
        image, other = image ** gamma, other ** gamma
        mask = np.zeros_like(image)
        if rng.random() < LESION_RATE:
            image, mask = add_lesion(np.ascontiguousarray(image), rng)
        inputs[i, ..., 0], inputs[i, ..., 1] = image, jitter(np.ascontiguousarray(other), rng)
        targets[i, ..., 0] = mask
    return inputs, targets


def build_segmenter(shape: tuple[int, int]):
    """A four-level U-Net (16-64 filters, batch norm, swish) giving lesion logits."""
    import keras
    from keras import layers

    def conv(x, filters):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        return layers.Activation("swish")(layers.BatchNormalization()(x))

    inputs = keras.Input((*shape, 2))
    skips, x = [], inputs
    for filters in (16, 32, 48, 64):
        x = conv(conv(x, filters), filters)
        skips.append(x)
        x = layers.MaxPool2D()(x)
    x = layers.Conv2D(96, 3, padding="same", activation="swish")(x)
    for filters, skip in zip((64, 48, 32, 16), reversed(skips)):
        x = conv(layers.Concatenate()([layers.UpSampling2D()(x), skip]), filters)
    logits = layers.Conv2D(1, 1, bias_initializer=keras.initializers.Constant(-4.0))(x)
    return keras.Model(inputs, logits)


def segmentation_loss(targets, logits):
    """Lesion-weighted (10x) BCE plus soft Dice over the samples that have a lesion."""
    import keras.ops as ops

    bce = ops.mean((1 + 9 * targets) * ops.binary_crossentropy(targets, logits, from_logits=True))
    probability = ops.sigmoid(logits)
    overlap = ops.sum(targets * probability, axis=(1, 2, 3))
    area = ops.sum(targets, axis=(1, 2, 3))
    dice = 1 - (2 * overlap + 1) / (area + ops.sum(probability, axis=(1, 2, 3)) + 1)
    has_lesion = ops.cast(area > 0, "float32")
    return bce + ops.sum(dice * has_lesion) / (ops.sum(has_lesion) + 1e-6)


def lesion_probability(model, image_id: str, manifest: pd.DataFrame,
                       images: dict[str, np.ndarray]) -> np.ndarray:
    """The segmenter's lesion probability map for one image, given the other breast."""
    partner = dict(zip(manifest.image_id, manifest.partner))
    pair = np.stack([images[image_id], images[partner[image_id]]], -1)[None]
    return 1 / (1 + np.exp(-model.predict(pair, verbose=0)[0, ..., 0]))


def score_images(model, ids: list[str], manifest: pd.DataFrame,
                 images: dict[str, np.ndarray]) -> pd.DataFrame:
    """Top-1% mean, mean and max lesion probability inside each image's breast."""
    rows = []
    for image_id in ids:
        image = images[image_id]
        probability = lesion_probability(model, image_id, manifest, images)
        inside = np.sort(probability[image > MASK_THRESHOLD])[::-1]
        top = max(1, int(0.01 * len(inside)))
        rows.append({"image_id": image_id, "top1": float(inside[:top].mean()),
                     "mean": float(inside.mean()), "max": float(inside[0])})
    return pd.DataFrame(rows)


def fold_hits(fold: int, out: Path, test: list[str], manifest: pd.DataFrame,
              images: dict[str, np.ndarray], mias: Path) -> pd.DataFrame:
    """Localisation of the fold's saved model on its located abnormal test images (cached)."""
    import keras

    done = out / f"hits_fold{fold}.csv"
    if done.is_file():
        return pd.read_csv(done, dtype={"image_id": str})
    findings = located_findings(mias)
    model = keras.saving.load_model(out / f"model_fold{fold}.keras", compile=False)
    rows = manifest[manifest.image_id.isin(set(test) & set(findings.image_id))]
    hits = pd.DataFrame([map_hit(lesion_probability(model, row.image_id, manifest, images),
                                 images[row.image_id] > MASK_THRESHOLD, row, findings)
                         for _, row in rows.iterrows()], columns=["image_id", "hit", "chance"])
    atomic_write_csv(done, hits)
    return hits


def run_fold(fold: int, eval_dir: Path, out: Path, manifest: pd.DataFrame,
             images: dict[str, np.ndarray], steps: int) -> pd.DataFrame:
    """Train on one outer fold's inner-train negatives; its held-out women's scores (cached)."""
    import keras
    from sklearn.metrics import roc_auc_score

    done = out / f"scores_fold{fold}.csv"
    if done.is_file():
        return pd.read_csv(done, dtype={"image_id": str}).assign(fold=fold)
    keras.utils.set_random_seed(fold)
    rng = np.random.default_rng(fold)
    splits = pd.read_csv(eval_dir / f"fold{fold}" / "data" / "splits.csv",
                         dtype={"image_id": str}).merge(manifest[["image_id", "label"]], on="image_id")
    train = list(splits[(splits.split == "train") & (splits.label == 0)].image_id)
    val = list(splits[(splits.split == "val") & (splits.label == 0)].image_id)
    model = build_segmenter(next(iter(images.values())).shape)
    model.compile(keras.optimizers.AdamW(5e-4, weight_decay=1e-4, clipnorm=1.0),
                  loss=segmentation_loss)
    started = time.time()
    for step in range(steps):
        loss = model.train_on_batch(*training_batch(train, manifest, images, rng))
        if step % 50 == 0:
            print(f"fold {fold} step {step}/{steps} loss {float(loss):.4f} "
                  f"{time.time() - started:.0f} s", flush=True)
    model.save(out / f"model_fold{fold}.keras")
    inputs, targets = training_batch(val, manifest, images, np.random.default_rng(99))
    found = roc_auc_score(targets.ravel() > 0.5, model.predict(inputs, verbose=0).ravel())
    print(f"fold {fold}: synthetic lesions on validation negatives, pixel ROC-AUC {found:.3f}")
    test = list(splits[splits.split == "test"].image_id)
    scores = score_images(model, test, manifest, images).assign(fold=fold)
    atomic_write_csv(done, scores)
    print(f"fold {fold} done in {time.time() - started:.0f} s", flush=True)
    return scores


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, required=True,
                        help="eval_mias.py's --out folder (its folds and out-of-fold table)")
    parser.add_argument("--config-name", default="bilateral",
                        help="which eval_mias configuration's out-of-fold table to compare with")
    parser.add_argument("--mias", type=Path, default=DEFAULT_DATA, help="for the per-finding AUCs")
    parser.add_argument("--size", default="256x128")
    parser.add_argument("--out", type=Path, default=None, help="default: EVAL_DIR/synthetic_lesions")
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args(argv)
    out = args.out or args.eval_dir / "synthetic_lesions"
    out.mkdir(parents=True, exist_ok=True)
    manifest, images = load_images(args.eval_dir / f"data_{args.size}")
    scores = pd.concat([run_fold(fold, args.eval_dir, out, manifest, images, args.steps)
                        for fold in args.folds], ignore_index=True)
    partner = dict(zip(manifest.image_id, manifest.partner))
    for name in ("top1", "mean", "max"):
        scores[f"{name}-contra"] = scores[name] - scores.image_id.map(partner).map(
            dict(zip(scores.image_id, scores[name])))
    cvae = pd.read_csv(args.eval_dir / f"oof_{args.config_name}.csv", dtype={"image_id": str})
    compared = ["nll_mean-contra", "intensity_topk-contra"]
    table = scores.merge(cvae[["image_id", "patient_id", "label", "background_tissue", *compared]],
                         on="image_id")
    atomic_write_csv(out / "oof_synthetic_lesions.csv", table)
    print(f"{len(table)} images ({int(table.label.sum())} abnormal), folds {args.folds}")
    print(f"{'score':24s} ROC-AUC [95% CI]        per fold")
    for column in (*SCORES, *compared):
        band = roc_with_ci(table.label, table[column], groups=table.patient_id, seed=0)
        per_fold = " ".join(f"{roc_with_ci(part.label, part[column], n_bootstrap=0).auc:.2f}"
                            for _, part in table.groupby("fold"))
        print(f"{column:24s} {band.auc:.3f} [{band.auc_ci[0]:.3f}, {band.auc_ci[1]:.3f}]  {per_fold}")
    hits = pd.concat([fold_hits(fold, out, list(part.image_id), manifest, images, args.mias)
                      for fold, part in table.groupby("fold")], ignore_index=True)
    print(f"localisation: the top 1% of the map touches the annotated circle in "
          f"{hits.hit.mean():.1%} of {len(hits)} abnormal images (chance {hits.chance.mean():.1%})")
    for column in ("top1", *compared):
        print(f"{column} per finding / tissue:",
              {key: round(value, 3) for key, value in breakdown(table, column, args.mias).items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
