"""Out-of-fold detection figures on mini-MIAS: the README recipe under patient-grouped K-fold.

Every woman is held out once. For each outer fold the other women are split into
inner train / validation women (seeded, patient-grouped, stratified), and the README
recipe runs on that split file exactly as a user would run it:

    fit_cvae(config)  ->  calibrate_run(split="val", select_score=True)  ->  predict_split("test")

(``fit_cvae`` ends by training the lesion segmenter when the config's ``lesion_steps`` is
above 0; a fold whose CVAE is already trained gets only the segmenter added, the same step.)

so every choice (the score, its standardisation, epochs by early stopping, the
threshold) is made on the inner validation women only. The README recipe's default
score (``calibrate`` without ``--select-score``: the lesion segmenter's top-1% probability
minus the other breast's in a run that has one, else mean NLL minus the other breast's,
``DEFAULT_SCORES``) is printed from the same models. The held-out fold's scores
are standardised by the inner validation normals (``scoring.json`` reference), so
the folds' scores can be pooled into one out-of-fold ROC-AUC with a patient-bootstrap
95% CI. Printed side by side, from the same models and images:

* each CVAE configuration's ``--select-score`` score (what it chose on val) and its
  default score;
* every candidate score (each map's mean / top-k, -ELBO, with or without the other
  breast's, alone or plus the brightest-tissue rule), each standardised the same way;
* the one-line bilateral rule: 99th-percentile-like brightest tissue (top 1% mean)
  minus the other breast's (``intensity_topk-contra``);
* for a bilateral model, the ablation of its condition: the same model with every
  partner zeroed (``unpaired ...``, standardised by val normals scored the same way).

Then, for the recipe score of each configuration: AUC per finding (CALC, CIRC, SPIC,
MISC, ARCH, ASYM: that finding's images against all normal images) and per tissue
(F, G, D), and localisation: the share of abnormal images with coordinates whose
top-1% map region touches the annotated circle (mapped into the dataset geometry),
next to the share expected by chance (circle area / breast area).

Screening: ``--folds-to-run 0`` runs one fold only (AUCs over that fold's women).

Run::

    python benchmarks/eval_mias.py --out runs/eval_mias \\
        --config bilateral=examples/configs/mini_mias_cpu.yaml [--config other=FILE ...]

MIAS: Suckling J. et al., Excerpta Medica Int. Congress Series 1069, 1994, pp. 375-378.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd

from cvae_mammo.data.splits import make_splits, write_splits
from cvae_mammo.evaluation.metrics import roc_with_ci
from cvae_mammo.fileio import atomic_write_csv, atomic_write_json, read_json
from cvae_mammo.inference.scoring import ScoringConfig, segmenter_scoring
from cvae_mammo.preprocessing.geometry import circle_mask, mask_to_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini_mias"
FINDINGS = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")
TISSUES = ("F", "G", "D")
RULE = "intensity_topk-contra"


def default_score_name(scoring: ScoringConfig) -> str:
    """The candidate-table name of the score ``calibrate`` keeps without ``--select-score``."""
    return "+".join(scoring.weights) + ("-contra" if scoring.contralateral_weight else "")


#: ``calibrate``'s score without ``--select-score``, in a run with and without the segmenter.
DEFAULT_SCORES = (default_score_name(segmenter_scoring()), default_score_name(ScoringConfig()))


def mias_metadata(mias: Path, out: Path) -> Path:
    """The README's one-line metadata CSV: one row per image, ``label`` = any non-NORM finding."""
    rows = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    rows["label"] = (rows["abnormality"] != "NORM").astype(int)
    meta = rows.groupby("image_id", as_index=False).agg(
        patient_id=("patient_id", "first"), background_tissue=("background_tissue", "first"),
        label=("label", "max")).assign(view="MLO")
    path = out / "mias_meta.csv"
    atomic_write_csv(path, meta)
    return path


def build_dataset(mias: Path, out: Path, size: tuple[int, int]) -> Path:
    """``cvae-mammo preprocess mini_mias/images --metadata mias_meta.csv --size HxW`` (resumable)."""
    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig

    data = out / f"data_{size[0]}x{size[1]}"
    preprocess_dataset([mias / "images"], data, PreprocessConfig(image_size=size),
                       metadata=mias_metadata(mias, out), workers=1, progress=False)
    return data


def fold_dataset(data: Path, folds: pd.DataFrame, fold: int, seed: int, out: Path) -> Path:
    """A dataset folder for one outer fold: test = that fold's women, inner train/val = the rest.

    The manifest is copied and the images folder linked, so the recipe's commands
    run on it unchanged.
    """
    folder = out / f"fold{fold}" / "data"
    if (folder / "splits.csv").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    atomic_write_csv(folder / "manifest.csv", manifest)
    if not (folder / "images").exists():
        os.symlink((data / "images").resolve(), folder / "images")
    held_out = set(folds.loc[folds["fold"] == fold, "patient_id"])
    rest = manifest[~manifest["patient_id"].isin(held_out)]
    inner = make_splits(rest, val=0.2, test=0.0, seed=seed + fold, stratify=("background_tissue",))
    test = manifest[manifest["patient_id"].isin(held_out)][["image_id", "patient_id"]].assign(
        split="test", fold=-1)
    write_splits(pd.concat([inner, test], ignore_index=True), folder / "splits.csv")
    return folder


def run_recipe(config: Path, fold_data: Path, run_dir: Path, seed: int,
               epochs: int | None) -> pd.DataFrame:
    """fit-cvae -> calibrate --select-score on val -> predict test; the scored test rows."""
    from cvae_mammo.evaluation.run_calibration import calibrate_run
    from cvae_mammo.inference.predict import predict_split
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.training.cvae import fit_cvae
    from cvae_mammo.training.lesion_segmenter import fit_lesion_segmenter, segmenter_done

    if not (run_dir / "model.keras").is_file():
        resume = (run_dir / "config.json").is_file()
        fit_cvae(fold_data, run_dir, config=config, seed=seed, epochs=epochs, resume=resume,
                 command=[sys.executable, *sys.argv])
    wanted = CVAEConfig.load(config).replace(seed=seed)
    if wanted.lesion_steps > 0 and not segmenter_done(run_dir, wanted):
        fit_lesion_segmenter(run_dir, fold_data, wanted)  # the step fit_cvae ends with
    calibrate_run(run_dir, fold_data, "val", method="youden", select_score=True, seed=seed)
    return predict_split(run_dir, fold_data, "test")


def candidate_table(base: ScoringConfig, test: pd.DataFrame, prefix: str = "") -> pd.DataFrame:
    """Every pooled score of the held-out images (alone, minus the other breast's, and plus the
    brightest-tissue rule), standardised by ``base.reference`` (the inner val normals),
    selectable or not; column names start with ``prefix``."""
    from cvae_mammo.inference.scoring import INTENSITY_SCORE, final_scores

    available = [name for name in base.reference if name in test]
    columns = {}
    for name in available:
        for contra in (0.0, 1.0):
            config = base.replace(weights={name: 1.0}, contralateral_weight=contra)
            columns[prefix + name + ("-contra" if contra else "")] = final_scores(test, config)
        if name != INTENSITY_SCORE:
            config = base.replace(weights={name: 1.0, INTENSITY_SCORE: 1.0},
                                  contralateral_weight=1.0)
            columns[f"{prefix}{name}+intensity-contra"] = final_scores(test, config)
    return pd.DataFrame(columns, index=test.index)


def unpaired_table(run_dir: Path, fold_data: Path, test: pd.DataFrame) -> pd.DataFrame:
    """Ablation of the bilateral condition: the same model scored with every partner zeroed
    (its single-image path), standardised by the inner val normals scored the same way.

    Columns ``unpaired SELECT-SCORE`` (the score chosen on val) and ``unpaired <candidate>``
    for every :func:`candidate_table` column. Empty for a model without the bilateral condition.
    """
    from cvae_mammo.inference.predict import load_predictor, load_scoring, predict_split
    from cvae_mammo.inference.scoring import final_scores, fit_reference

    predictor = load_predictor(run_dir)
    if not predictor.needs_partners:
        return pd.DataFrame(index=test.index)
    predictor.needs_partners = False
    val = predict_split(run_dir, fold_data, "val", write=False, predictor=predictor)
    alone = predict_split(run_dir, fold_data, "test", write=False, predictor=predictor)
    alone = alone.set_index("image_id").loc[test["image_id"]].reset_index()
    base = load_scoring(run_dir).replace(reference=fit_reference(val[val["label"] == 0]))
    table = candidate_table(base, alone, prefix="unpaired ")
    table.insert(0, "unpaired SELECT-SCORE", final_scores(alone, base))
    return table.set_index(test.index)


def localisation(run_dir: Path, fold_data: Path, test: pd.DataFrame, mias: Path
                 ) -> list[dict[str, float]]:
    """Top-1% map region vs annotated circle for each abnormal test image with coordinates."""
    from cvae_mammo.data.pairing import with_partners
    from cvae_mammo.inference.predict import load_predictor
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.training.cvae import ModelInputs

    findings = located_findings(mias)
    rows = test[test["image_id"].isin(findings["image_id"])]
    if rows.empty:
        return []
    predictor = load_predictor(run_dir)
    config = CVAEConfig.from_dict(read_json(run_dir / "config.json")["model"])
    paired = with_partners(rows, within=test) if predictor.needs_partners else rows
    inputs = ModelInputs.load(paired, fold_data, config.replace(bilateral=predictor.needs_partners),
                              predictor.encoder)
    _, maps = predictor.score(inputs.images, paired, inputs.partners)
    masks = predictor.masks(inputs.images)
    return [map_hit(maps[i], masks[i], row, findings)
            for i, (_, row) in enumerate(paired.iterrows())]


def located_findings(mias: Path) -> pd.DataFrame:
    """mini-MIAS findings that have centre coordinates and a radius."""
    findings = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    return findings[(findings["abnormality"] != "NORM") & (findings["x"] != "")]


def map_hit(anomaly_map: np.ndarray, mask: np.ndarray, row: pd.Series,
            findings: pd.DataFrame) -> dict[str, float]:
    """Whether the top 1% of ``anomaly_map`` inside ``mask`` touches the image's annotated
    circles (mapped into the dataset geometry of manifest ``row``), and the chance of that."""
    circle = np.zeros((1024, 1024), bool)
    for finding in findings[findings["image_id"] == row["image_id"]].itertuples():
        circle |= circle_mask((1024, 1024), (float(finding.x), 1024.0 - float(finding.y)),
                              float(finding.radius))
    target = mask_to_dataset(circle, row, anomaly_map.shape) & mask
    inside = anomaly_map[mask]
    threshold = np.partition(inside, int(0.99 * inside.size))[int(0.99 * inside.size)]
    top = (anomaly_map >= threshold) & mask
    return {"image_id": row["image_id"], "hit": float((top & target).any()),
            "chance": float(target.sum() / max(mask.sum(), 1))}


def auc_line(labels: pd.Series, scores: pd.Series, groups: pd.Series) -> dict[str, float]:
    """ROC-AUC with a patient-bootstrap 95% CI."""
    band = roc_with_ci(labels, scores, groups=groups, n_bootstrap=1000, seed=0)
    return {"auc": band.auc, "ci_low": band.auc_ci[0], "ci_high": band.auc_ci[1],
            "n": len(labels), "n_abnormal": int(labels.sum())}


def breakdown(frame: pd.DataFrame, score: str, mias: Path) -> dict[str, float]:
    """AUC per finding (that finding's images vs all normals) and per tissue."""
    findings = pd.read_csv(mias / "labels.csv", dtype=str, keep_default_na=False)
    normal = frame["label"] == 0
    out: dict[str, float] = {}
    from cvae_mammo.evaluation.metrics import roc_auc

    for finding in FINDINGS:
        ids = set(findings.loc[findings["abnormality"] == finding, "image_id"])
        chosen = normal | frame["image_id"].isin(ids)
        if frame.loc[chosen, "image_id"].isin(ids).any():
            out[finding] = roc_auc(frame.loc[chosen, "label"], frame.loc[chosen, score])
    for tissue in TISSUES:
        part = frame[frame["background_tissue"] == tissue]
        if part["label"].nunique() == 2:
            out[f"tissue {tissue}"] = roc_auc(part["label"], part[score])
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mias", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", action="append", required=True, metavar="NAME=FILE",
                        help="a CVAE config to evaluate (repeat to compare several)")
    parser.add_argument("--size", default="256x128", help="preprocessing output size HxW")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--folds-to-run", type=int, nargs="*", default=None,
                        help="screening: run only these outer folds")
    parser.add_argument("--epochs", type=int, default=None, help="override the configs' epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from cvae_mammo.inference.predict import load_scoring

    if not (args.mias / "labels.csv").is_file():
        print(f"mini-MIAS not found at {args.mias}", file=sys.stderr)
        return 2
    configs = dict(item.split("=", 1) for item in args.config)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_dataset(args.mias, args.out, size)
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    folds = make_splits(manifest, test=0.0, folds=args.folds, seed=args.seed,
                        stratify=("background_tissue",))
    to_run = args.folds_to_run if args.folds_to_run is not None else list(range(args.folds))
    oof: dict[str, list[pd.DataFrame]] = {name: [] for name in configs}
    hits: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    chosen: dict[str, list[str]] = {name: [] for name in configs}
    for fold in to_run:
        fold_data = fold_dataset(data, folds, fold, args.seed, args.out)
        for name, config in configs.items():
            started = time.perf_counter()
            run_dir = args.out / f"fold{fold}" / name
            test = run_recipe(Path(config), fold_data, run_dir, args.seed, args.epochs)
            selection = read_json(run_dir / "score_selection.json")
            chosen[name].append(f"fold {fold}: " + "+".join(selection["chosen"]["weights"])
                                + (" contra" if selection["chosen"]["contralateral_weight"]
                                   else ""))
            table = pd.concat([test[["image_id", "patient_id", "label", "background_tissue",
                                     "score", "has_partner"] if "has_partner" in test else
                                    ["image_id", "patient_id", "label", "background_tissue",
                                     "score"]],
                               candidate_table(load_scoring(run_dir), test),
                               unpaired_table(run_dir, fold_data, test)], axis=1).assign(fold=fold)
            oof[name].append(table)
            hits[name] += localisation(run_dir, fold_data, test, args.mias)
            print(f"fold {fold} {name}: {time.perf_counter() - started:.0f} s, chose "
                  f"{chosen[name][-1]}", flush=True)

    summary: dict[str, object] = {"folds_run": to_run, "configs": configs, "size": args.size}
    lines = []
    for name in configs:
        pooled = pd.concat(oof[name], ignore_index=True)
        atomic_write_csv(args.out / f"oof_{name}.csv", pooled)
        groups = pooled["patient_id"]
        recipe = auc_line(pooled["label"], pooled["score"], groups)
        lines.append({"config": name, "score": "SELECT-SCORE (chosen on val)", **recipe})
        candidates = [c for c in pooled.columns if c not in
                      {"image_id", "patient_id", "label", "background_tissue", "score",
                       "has_partner", "fold"}]
        for column in candidates:
            lines.append({"config": name, "score": column,
                          **auc_line(pooled["label"], pooled[column], groups)})
        located = pd.DataFrame(hits[name])
        default = next(score for score in DEFAULT_SCORES
                       if score in pooled and pooled[score].std() > 0)
        summary[name] = {
            "recipe": recipe, "chosen": chosen[name],
            "breakdown": breakdown(pooled, "score", args.mias),
            "default": default,
            "default_breakdown": breakdown(pooled, default, args.mias),
            "rule_breakdown": breakdown(pooled, RULE, args.mias) if RULE in pooled else {},
            "localisation": {"images": len(located),
                             "hit_fraction": float(located["hit"].mean()) if len(located) else None,
                             "chance": float(located["chance"].mean()) if len(located) else None},
        }
    table = pd.DataFrame(lines)
    atomic_write_csv(args.out / "auc_table.csv", table)
    atomic_write_json(args.out / "summary.json", summary)
    with pd.option_context("display.max_rows", 500, "display.width", 160):
        print(table.sort_values(["config", "auc"], ascending=[True, False]).to_string(
            index=False, float_format=lambda v: f"{v:.3f}"))
    for name in configs:
        print(f"\n== {name}: --select-score {summary[name]['recipe']}")
        print("   chosen per fold:", "; ".join(summary[name]["chosen"]))
        print("   --select-score per finding / tissue:", {k: round(v, 3) for k, v in
                                                          summary[name]["breakdown"].items()})
        print(f"   {summary[name]['default']} (default) per finding / tissue:",
              {k: round(v, 3) for k, v in summary[name]["default_breakdown"].items()})
        print("   rule per finding / tissue:", {k: round(v, 3) for k, v in
                                                summary[name]["rule_breakdown"].items()})
        print("   localisation:", summary[name]["localisation"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
