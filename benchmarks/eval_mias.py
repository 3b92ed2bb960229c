"""Image-level ROC-AUC of every anomaly-score option on mini-MIAS, patient-disjoint.

For each seed: crop (largest bright component), orient (chest wall left) and resize the
mini-MIAS mammograms from ../shared/data/mini_mias into a dataset folder, split the women
60/20/20 (train/val/test, seeded, patient-grouped), train a CPU-sized CVAE on the train
normals with ``fit_cvae``, then score val and test with every option:

* non-learned baselines: mean / 99th-percentile intensity, Laplacian-of-Gaussian blob
  response (top 0.5%), each alone and contralateral (minus the other breast of the woman);
* CVAE: L1 / L2 / SSIM / L1+SSIM maps pooled by mean, top-k%, max; negative ELBO; each
  alone and contralateral; plus map-level asymmetry (top-k of this breast's map minus the
  other breast's map, pixel by pixel, both breasts in the same orientation);
* the library default (:class:`cvae_mammo.scoring.ScoringConfig` defaults).

Abnormal = any non-NORM finding. Prints a table (test AUC with a patient-level bootstrap
95% CI, and val AUC) per seed and the mean over seeds, calibrates the default on val
(``calibration.calibrate``, Youden) and reports test sensitivity/specificity, and draws
overlays of three malignant cases with the annotated circle under ``--out``.

Run: ``python benchmarks/eval_mias.py --out /work/runs/eval_mias [--seeds 0 1 2]``.
MIAS: Suckling J. et al., Excerpta Medica Int. Congress Series 1069, 1994, pp. 375-378.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from cvae_mammo.breast import locate_breast
from cvae_mammo.fileio import atomic_write_bytes, atomic_write_csv, atomic_write_json
from cvae_mammo.metrics import roc_with_ci
from cvae_mammo.scoring import (
    ScoringConfig,
    anomaly_map,
    contralateral_scores,
    final_scores,
    fit_reference,
    image_scores,
    partner_indices,
    top_percent_mean,
)
from cvae_mammo.splits import make_splits, write_splits

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini_mias"
MAP_KINDS = ("l1", "l2", "ssim", "l1_ssim")
POOLS = ("mean", "topk", "max")


def load_labels(mias: Path) -> pd.DataFrame:
    """One row per image: patient, tissue, label (any non-NORM), malignant flag, findings."""
    rows = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    images = rows.groupby("image_id", sort=True).agg(
        patient_id=("patient_id", "first"),
        background_tissue=("background_tissue", "first"),
        label=("abnormality", lambda v: int((v != "NORM").any())),
        malignant=("severity", lambda v: int("M" in set(v))),
    ).reset_index()
    return images


def build_dataset(mias: Path, out: Path, size: tuple[int, int], seed: int) -> pd.DataFrame:
    """Crop/orient/resize every image into ``out`` (manifest.csv, splits.csv); returns manifest."""
    labels = load_labels(mias)
    height, width = size
    records = []
    for row in labels.itertuples(index=False):
        pixels = cv2.imread(str(mias / "images" / f"{row.image_id}.png"), cv2.IMREAD_GRAYSCALE)
        image = pixels.astype(np.float32) / 255.0
        region = locate_breast(image)
        x0, y0, x1, y1 = region.box
        crop = np.where(region.mask, image, 0.0)[y0:y1, x0:x1]
        if region.chest_wall_right:
            crop = crop[:, ::-1]
        small = cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)
        relative = f"images/{row.image_id}.png"
        ok, encoded = cv2.imencode(".png", np.round(small * 255).astype(np.uint8))
        if not ok:
            raise RuntimeError(f"cannot encode {relative}")
        atomic_write_bytes(out / relative, encoded.tobytes())
        records.append({
            "image_id": row.image_id, "patient_id": row.patient_id, "laterality": "",
            "view": "MLO", "prediction_id": f"{row.patient_id}_{row.image_id}", "path": relative,
            "label": row.label, "malignant": row.malignant,
            "background_tissue": row.background_tissue, "crop_x0": x0, "crop_y0": y0,
            "crop_x1": x1, "crop_y1": y1, "flipped": bool(region.chest_wall_right),
            "original_size": f"{pixels.shape[0]}x{pixels.shape[1]}",
        })
    manifest = pd.DataFrame.from_records(records)
    atomic_write_csv(out / "manifest.csv", manifest)
    write_splits(make_splits(manifest, val=0.2, test=0.2, seed=seed), out / "splits.csv")
    return manifest


def baseline_scores(image: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Non-learned scores: intensity statistics and a blob detector inside the breast."""
    inside = image[mask]
    sigma = max(1.0, image.shape[0] / 128)
    blob = -ndimage.gaussian_laplace(image.astype(np.float64), sigma) * sigma**2
    return {
        "intensity_mean": float(inside.mean()),
        "intensity_p99": float(np.percentile(inside, 99)),
        "log_blob_top0.5": top_percent_mean(blob, mask, 0.5),
    }


def map_asymmetry(maps: dict[str, np.ndarray], masks: dict[str, np.ndarray],
                  frame: pd.DataFrame, percent: float) -> pd.Series:
    """Top-k% of ``max(0, map - other breast's map)`` pixel by pixel (same orientation)."""
    partners = partner_indices(frame)
    values = {}
    for index, image_id in frame["image_id"].items():
        others = [frame.at[i, "image_id"] for i in partners[index]]
        if not others:
            values[index] = top_percent_mean(maps[image_id], masks[image_id], percent)
            continue
        other = np.mean([maps[o] for o in others], axis=0)
        excess = np.clip(maps[image_id] - other, 0.0, None)
        values[index] = top_percent_mean(excess, masks[image_id], percent)
    return pd.Series(values)


def score_table(run_dir: Path, data: Path, manifest: pd.DataFrame, split_of: pd.Series,
                top_percent: float) -> tuple[pd.DataFrame, dict[str, dict[str, np.ndarray]]]:
    """Every option's own score for the val and test images, plus the L1 maps (for overlays)."""
    from cvae_mammo.data import read_image
    from cvae_mammo.losses import breast_mask
    from cvae_mammo.runs import load_run_model

    model = load_run_model(run_dir)
    rows = manifest[split_of.reindex(manifest["image_id"]).isin(["val", "test"]).to_numpy()]
    rows = rows.reset_index(drop=True)
    size = tuple(int(v) for v in model.config.image_size)
    images = np.stack([read_image(str(data / p), size) for p in rows["path"]])
    recon = model.reconstruct(images)
    terms = model.elbo_terms(images)
    masks = np.asarray(breast_mask(images, model.config.mask_threshold))[..., 0] > 0.5
    table = rows[["image_id", "patient_id", "laterality", "label", "malignant"]].copy()
    table["split"] = split_of.reindex(rows["image_id"]).to_numpy()
    kept: dict[str, dict[str, np.ndarray]] = {"image": {}, "mask": {}}
    maps_by_kind: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in MAP_KINDS}
    for i, image_id in enumerate(rows["image_id"]):
        for name, value in baseline_scores(images[i, ..., 0], masks[i]).items():
            table.loc[i, name] = value
        for kind in MAP_KINDS:
            config = ScoringConfig(map_kind=kind, top_percent=top_percent)
            amap = anomaly_map(images[i], recon[i], masks[i], config)
            maps_by_kind[kind][image_id] = amap
            for pool, value in image_scores(amap, masks[i], config).items():
                if pool in POOLS:
                    table.loc[i, f"cvae_{kind}_{pool}"] = value
        table.loc[i, "cvae_neg_elbo"] = float(terms["recon_nll_per_pixel"][i]
                                              + terms["kl"][i] / max(terms["mask_pixels"][i], 1))
        kept["image"][image_id] = images[i, ..., 0]
        kept["mask"][image_id] = masks[i]
    for kind in MAP_KINDS:
        table[f"cvae_{kind}_asym"] = map_asymmetry(maps_by_kind[kind], kept["mask"], table,
                                                   top_percent)
    kept["map"] = maps_by_kind["l1"]
    kept["recon"] = {image_id: recon[i, ..., 0] for i, image_id in enumerate(rows["image_id"])}
    return table, kept


def option_scores(table: pd.DataFrame) -> pd.DataFrame:
    """Own and contralateral version of every option, computed within each split."""
    options = [c for c in table.columns
               if c.startswith(("intensity_", "log_", "cvae_")) and not c.endswith("_asym")]
    result = {}
    for split, part in table.groupby("split"):
        columns = {}
        for option in options:
            columns[option] = part[option]
            columns[f"{option} contra"] = contralateral_scores(part, option, 1.0, fallback=0.0)
        for asym in [c for c in table.columns if c.endswith("_asym")]:
            columns[asym] = part[asym]
        result[split] = pd.DataFrame(columns)
    return pd.concat(result.values()).loc[table.index]


def default_scores(table: pd.DataFrame, config: ScoringConfig) -> pd.Series:
    """``config`` on the CVAE's pooled scores, standardised on the val normals (as calibrate)."""
    pooled = pd.DataFrame({
        "patient_id": table["patient_id"], "laterality": table["laterality"],
        "mean": table[f"cvae_{config.map_kind}_mean"],
        "topk": table[f"cvae_{config.map_kind}_topk"],
        "max": table[f"cvae_{config.map_kind}_max"], "neg_elbo": table["cvae_neg_elbo"],
    })
    normals = pooled[(table["split"] == "val") & (table["label"] == 0)]
    config = config.replace(reference=fit_reference(normals, tuple(config.weights)))
    out = pd.Series(np.nan, index=table.index)
    for _, part in pooled.groupby(table["split"]):
        out[part.index] = final_scores(part, config)
    return out


def auc_rows(table: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """Test AUC with bootstrap CI and val AUC of every option column."""
    rows = []
    test = table["split"] == "test"
    val = table["split"] == "val"
    for option in scores.columns:
        band = roc_with_ci(table.loc[test, "label"], scores.loc[test, option],
                           groups=table.loc[test, "patient_id"], n_bootstrap=1000, seed=0)
        val_band = roc_with_ci(table.loc[val, "label"], scores.loc[val, option], n_bootstrap=1)
        rows.append({"option": option, "test_auc": band.auc, "ci_low": band.auc_ci[0],
                     "ci_high": band.auc_ci[1], "val_auc": val_band.auc})
    return pd.DataFrame(rows)


def draw_overlays(out: Path, manifest: pd.DataFrame, kept: dict[str, dict[str, np.ndarray]],
                  table: pd.DataFrame, mias: Path, count: int = 3) -> list[str]:
    """Three malignant cases: image | reconstruction | L1 anomaly map, annotated circle(s) in green."""
    from cvae_mammo.predict import overlay, save_png

    findings = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    chosen = table[(table["malignant"] == 1)].sort_values("split", ascending=False)
    written = []
    for image_id in chosen["image_id"]:
        circles = findings[(findings.image_id == image_id) & (findings.x != "")]
        if circles.empty:
            continue
        meta = manifest.set_index("image_id").loc[image_id]
        image = kept["image"][image_id]
        height, width = image.shape
        scale = 4  # draw at 4x the model size so the circle is visible
        big = (height * scale, width * scale)
        panels = [overlay(image, np.zeros_like(image), size=big),
                  overlay(kept["recon"][image_id], np.zeros_like(image), size=big),
                  overlay(image, kept["map"][image_id], size=big, alpha=0.8)]
        x0, y0, x1, y1 = (int(meta[k]) for k in ("crop_x0", "crop_y0", "crop_x1", "crop_y1"))
        sx, sy = width * scale / (x1 - x0), height * scale / (y1 - y0)
        for circle in circles.itertuples(index=False):
            col, row = float(circle.x), 1024.0 - float(circle.y)
            cx = (col - x0) * sx
            if bool(meta["flipped"]):
                cx = width * scale - 1 - cx
            cy = (row - y0) * sy
            axes = (max(2, round(float(circle.radius) * sx)),
                    max(2, round(float(circle.radius) * sy)))
            for panel in (panels[0], panels[2]):
                cv2.ellipse(panel, (round(cx), round(cy)), axes, 0, 0, 360, (0, 255, 0), 2)
        split = table.set_index("image_id").at[image_id, "split"]
        path = out / f"overlay_{image_id}_{split}.png"
        save_png(path, np.concatenate(panels, axis=1))
        written.append(str(path))
        if len(written) == count:
            break
    return written


def run_seed(args: argparse.Namespace, seed: int) -> tuple[pd.DataFrame, dict]:
    """Build, train, score and evaluate one seed; returns the AUC table and a summary."""
    from cvae_mammo.calibration import calibrate
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.train_cvae import fit_cvae

    size = (args.height, args.width)
    seed_dir = args.out / f"seed{seed}"
    data = seed_dir / "data"
    manifest = build_dataset(args.mias, data, size, seed)
    splits = pd.read_csv(data / "splits.csv").set_index("image_id")["split"]
    run_dir = seed_dir / "cvae"
    started = time.perf_counter()
    if not (run_dir / "model.keras").is_file():
        config = CVAEConfig.small(image_size=size, epochs=args.epochs, batch_size=8,
                                  conditioning=tuple(args.conditioning), recon_every=10)
        fit_cvae(data, run_dir, config=config, seed=seed, xla=False,
                 command=[sys.executable, *sys.argv])
    train_seconds = time.perf_counter() - started
    table, kept = score_table(run_dir, data, manifest, splits, args.top_percent)
    scores = option_scores(table)
    scores["DEFAULT (ScoringConfig())"] = default_scores(table, ScoringConfig())
    aucs = auc_rows(table, scores)
    val_rows = table["split"] == "val"
    calib = calibrate(table[val_rows].assign(score=scores.loc[val_rows, "DEFAULT (ScoringConfig())"],
                                             prediction_id=table.loc[val_rows, "image_id"]),
                      method="youden", split="val")
    test_rows = table["split"] == "test"
    predicted = calib.predict(scores.loc[test_rows, "DEFAULT (ScoringConfig())"])
    truth = table.loc[test_rows, "label"].to_numpy()
    summary = {
        "seed": seed, "train_seconds": round(train_seconds, 1),
        "n_test": int(test_rows.sum()), "n_test_abnormal": int(truth.sum()),
        "n_val": int(val_rows.sum()), "threshold": calib.value,
        "test_sensitivity": float(predicted[truth == 1].mean()),
        "test_specificity": float(1 - predicted[truth == 0].mean()),
    }
    atomic_write_csv(seed_dir / "scores.csv", pd.concat([table, scores.add_prefix("opt: ")], axis=1))
    atomic_write_csv(seed_dir / "auc.csv", aucs)
    if seed == args.seeds[0]:
        summary["overlays"] = draw_overlays(args.out, manifest, kept, table, args.mias)
    return aucs, summary


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mias", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=Path("/work/runs/eval_mias"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--top-percent", type=float, default=1.0)
    parser.add_argument("--conditioning", nargs="*", default=[])
    args = parser.parse_args(argv)
    if not (args.mias / "labels.csv").is_file():
        print(f"mini-MIAS not found at {args.mias}", file=sys.stderr)
        return 2
    tables, summaries = [], []
    for seed in args.seeds:
        aucs, summary = run_seed(args, seed)
        tables.append(aucs.assign(seed=seed))
        summaries.append(summary)
        print(f"\n== seed {seed}: {summary}")
        print(aucs.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    combined = pd.concat(tables)
    mean = combined.groupby("option", sort=False)[["test_auc", "val_auc"]].mean()
    if len(args.seeds) > 1:
        print(f"\n== mean over seeds {args.seeds}")
        print(mean.sort_values("test_auc", ascending=False).to_string(
            float_format=lambda v: f"{v:.3f}"))
    atomic_write_csv(args.out / "auc_all_seeds.csv", combined)
    atomic_write_json(args.out / "summary.json", {"summaries": summaries,
                                                  "args": {k: str(v) for k, v in vars(args).items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
