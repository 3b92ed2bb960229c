"""Nested out-of-fold detection figures on mini-MIAS: the README recipe under patient-grouped
K-fold, every choice made on inner validation women, the out-of-fold table computed once.

Every woman is held out once. For each outer fold the other women are split into inner
train / validation women (seeded, patient-grouped, stratified by tissue), and the README
recipe runs on that split file as a user runs it::

    fit_cvae(config)  ->  calibrate_run(split="val")  ->  predict_split("test")

(``fit_cvae`` ends by training the lesion segmenter, ``lesion_seeds`` of them when above 1;
a fold whose run already has them is only re-scored.)

The protocol, in the order the script follows it:

1. **Candidates, declared here**: the run's segmenter score (top 1% lesion probability minus
   the other breast's, :func:`~cvae_mammo.inference.scoring.segmenter_scoring`) plus ``w`` times
   the bilateral brightest-tissue rule, both standardised by the inner validation normals,
   for ``w`` in ``--rule-weights`` (0 is the library default). For a seed ensemble, the same
   scores of each seed's own segmenter are printed next to it (its spread; not candidates).
2. **Choice on validation only**: every candidate's ROC-AUC over the pooled inner validation
   women of all folds (each scored by its own fold's models) is printed, and the best
   candidate is taken. No test score is computed before this step.
3. **Out-of-fold, once**: the chosen score, the library default, each seed's default, the rule
   and what ``calibrate --select-score`` gives a user (its choice among the run's candidate
   scores, made per fold on that fold's val women alone) on the held-out women (folds pooled;
   each fold standardised by its val normals), ROC-AUC with a 1000-resample patient-bootstrap
   95% CI, the paired bootstrap difference to the rule, per fold, per finding and tissue, and
   localisation (the share of abnormal images with coordinates whose top-1% map region touches
   the annotated circle, against the share expected by chance).

``--classifier FILE`` also fine-tunes the companion classifier of that ClassifierConfig from
each fold's segmenter (backbone ``LesionSegmenter``, early stopping on the inner validation
women, no choice made on its test scores) and adds its out-of-fold row.

``--gamma-tta 0.8 1 1.25`` also reports the run's segmenter with its maps averaged over those
input gammas (:data:`GAMMA_VARIANT`, next to the default; not a candidate, so not chosen here) and its
paired bootstrap difference to the default on the validation and the held-out women.

``--segmenter-only`` trains each fold's CVAE for one epoch: the segmenter's scores do not
depend on it, and the recipe's other steps (calibrate, predict) run unchanged; the CVAE's own
score is then not reported.

Run::

    python benchmarks/eval_mias.py --out runs/eval_mias --config examples/configs/mini_mias_cpu.yaml \
        --segmenter-only --classifier examples/configs/mini_mias_classifier.yaml

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
from cvae_mammo.preprocessing.geometry import circle_mask, mask_to_dataset

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini_mias"
FINDINGS = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM")
TISSUES = ("F", "G", "D")
#: The column of what ``calibrate --select-score`` gives a user: chosen per fold on its own
#: ~20 val women among every candidate score of the run; reported, never the nested choice.
SELECT_SCORE = "select-score"
#: The ``--gamma-tta`` variant of the run's segmenter (reported next to the default, not chosen).
GAMMA_VARIANT = "ensemble gamma"


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
               epochs: int | None) -> None:
    """fit-cvae (CVAE, then the segmenter) -> calibrate on val with the default score."""
    from cvae_mammo.evaluation.run_calibration import calibrate_run
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
    calibrate_run(run_dir, fold_data, "val", method="youden", seed=seed)


def gamma_averaged(segmenter: object, gammas: list[float]) -> object:
    """A model that runs ``segmenter`` on its input raised to each of ``gammas`` and stacks
    the logits, so that :func:`~cvae_mammo.models.lesion_segmenter.lesion_probability`
    averages the probabilities over them (test-time gamma, as training draws 0.8-1.25)."""
    from cvae_mammo.tf_startup import keras

    inputs = keras.Input(segmenter.inputs[0].shape[1:], name="image_and_other_breast")
    outputs = [segmenter(inputs if gamma == 1 else keras.ops.power(inputs, gamma))
               for gamma in gammas]
    return keras.Model(inputs, keras.layers.Concatenate()(outputs), name="gamma_averaged")


def segmenter_variants(run_dir: Path, gammas: list[float] | None = None) -> dict[str, object]:
    """``"ensemble"``: the run's saved segmenter; for a seed ensemble also ``"seed S"``: the
    members of seed S alone (what a single-seed run with that seed saves); with ``gammas``
    also ``"ensemble gamma"``: the saved segmenter averaged over those input gammas."""
    from cvae_mammo.models.lesion_segmenter import (
        ensemble_of,
        load_lesion_segmenter,
        members_of_seed,
    )
    from cvae_mammo.training.lesion_segmenter import VALIDATION_FILE

    full = load_lesion_segmenter(run_dir)
    variants: dict[str, object] = {"ensemble": full}
    if gammas:
        variants[GAMMA_VARIANT] = gamma_averaged(full, gammas)
    seeds = read_json(run_dir / VALIDATION_FILE).get("seeds", [])
    if len(seeds) > 1:
        for seed in seeds:
            variants[f"seed {seed}"] = ensemble_of(members_of_seed(full, seed))
    return variants


def candidate_scores(run_dir: Path, fold_data: Path, rule_weights: list[float],
                     with_cvae: bool, gammas: list[float] | None = None) -> pd.DataFrame:
    """Val and test rows of one fold with every declared score, each standardised by the
    fold's val normals scored by the same model: ``<variant> w=<w>`` (segmenter score plus
    ``w`` times the rule), ``rule``, :data:`SELECT_SCORE` (what ``calibrate --select-score``
    chooses on the fold's val women; its name in ``"select-score choice"``) and, ``with_cvae``,
    ``cvae`` (mean NLL minus the other breast's); ``gammas``: also the
    :data:`GAMMA_VARIANT` scores."""
    from cvae_mammo.inference.predict import load_predictor, predict_split
    from cvae_mammo.inference.scoring import (
        INTENSITY_SCORE,
        ScoringConfig,
        final_scores,
        fit_reference,
        segmenter_scoring,
        select_scoring,
    )

    predictor = load_predictor(run_dir)
    keep = ["image_id", "patient_id", "label", "background_tissue"]
    frames: dict[str, pd.DataFrame] = {}
    for variant, segmenter in segmenter_variants(run_dir, gammas).items():
        predictor.segmenter = segmenter
        scored = {split: predict_split(run_dir, fold_data, split, write=False,
                                       predictor=predictor) for split in ("val", "test")}
        reference = fit_reference(scored["val"][scored["val"]["label"] == 0])
        base = segmenter_scoring().replace(reference=reference)
        if variant == "ensemble":  # what `calibrate --select-score` picks on this fold's val
            selected, selection_aucs = select_scoring(scored["val"], base)
        for split, rows in scored.items():
            frame = frames.setdefault(split, rows[keep].assign(split=split))
            for weight in rule_weights:
                weights = {"lesion_topk": 1.0, **({INTENSITY_SCORE: weight} if weight else {})}
                frame[f"{variant} w={weight:g}"] = final_scores(
                    rows, base.replace(weights=weights)).to_numpy()
            if variant == "ensemble":
                frame["rule"] = final_scores(rows, base.replace(
                    weights={INTENSITY_SCORE: 1.0})).to_numpy()
                frame[SELECT_SCORE] = final_scores(rows, selected).to_numpy()
                frame[f"{SELECT_SCORE} choice"] = max(selection_aucs, key=selection_aucs.get)
                if with_cvae:
                    frame["cvae"] = final_scores(rows, ScoringConfig(reference=reference)
                                                 ).to_numpy()
    return pd.concat(frames.values(), ignore_index=True)


def classifier_scores(config: Path, run_dir: Path, fold_data: Path, out: Path, seed: int
                      ) -> pd.DataFrame:
    """``cvae-mammo fit-classifier --backbone LesionSegmenter --weights RUN`` on the fold's
    labelled inner train women (early stopping on its val women), then its probability on
    the val and test women, standardised by the val normals: ``image_id``, ``split``,
    ``classifier``. A fold whose classifier run has its model is only re-scored."""
    from cvae_mammo.inference.predict import predict_split
    from cvae_mammo.training.classifier import fit_classifier

    if not (out / "model.keras").is_file():
        fit_classifier(fold_data, out, config=config, backbone="LesionSegmenter",
                       weights=str(run_dir), seed=seed, resume=(out / "config.json").is_file(),
                       command=[sys.executable, *sys.argv])
    scored = pd.concat([predict_split(out, fold_data, split, write=False).assign(split=split)
                        for split in ("val", "test")], ignore_index=True)
    normals = scored.loc[(scored["split"] == "val") & (scored["label"] == 0), "score"]
    scored["classifier"] = (scored["score"] - normals.mean()) / max(normals.std(), 1e-12)
    return scored[["image_id", "split", "classifier"]].astype({"image_id": str})


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


def auc_table(frame: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """ROC-AUC [95% CI] of each score column of ``frame``, one row per name."""
    return pd.DataFrame([{"score": name, **auc_line(frame["label"], frame[name],
                                                    frame["patient_id"])} for name in names])


def per_fold(frame: pd.DataFrame, names: list[str]) -> dict[str, list[float]]:
    """Each score's ROC-AUC within each fold's held-out women."""
    from cvae_mammo.evaluation.metrics import roc_auc

    return {name: [round(roc_auc(part["label"], part[name]), 3)
                   for _, part in frame.groupby("fold") if part["label"].nunique() == 2]
            for name in names}


def _print(title: str, table: pd.DataFrame) -> None:
    print(f"\n== {title}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from cvae_mammo.data.dataset import MammoDataset
    from cvae_mammo.evaluation.metrics import paired_roc_auc_difference

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mias", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True, help="the CVAE config (recipe)")
    parser.add_argument("--size", default="256x128", help="preprocessing output size HxW")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--folds-to-run", type=int, nargs="*", default=None,
                        help="screening: run only these outer folds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--segmenter-only", action="store_true",
                        help="train each fold's CVAE for one epoch (its score is not reported)")
    parser.add_argument("--rule-weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                        help="declared candidates: segmenter score + w * rule")
    parser.add_argument("--classifier", type=Path, default=None,
                        help="also fine-tune a classifier from each fold's segmenter with this "
                             "ClassifierConfig file (backbone and weights set per fold)")
    parser.add_argument("--gamma-tta", type=float, nargs="+", default=None,
                        help="also report the segmenter averaged over these input gammas "
                             f"({GAMMA_VARIANT!r}; e.g. 0.8 1 1.25)")
    parser.add_argument("--margin", type=float, default=0.05,
                        help="report P(chosen - rule <= margin) from the paired bootstrap")
    args = parser.parse_args(argv)
    if args.gamma_tta and 0.0 not in args.rule_weights:
        parser.error("--gamma-tta is reported next to the default score: --rule-weights needs 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not (args.mias / "labels.csv").is_file():
        print(f"mini-MIAS not found at {args.mias}", file=sys.stderr)
        return 2
    size = tuple(int(v) for v in args.size.lower().split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    data = build_dataset(args.mias, args.out, size)
    manifest = pd.read_csv(data / "manifest.csv", dtype={"image_id": str, "patient_id": str})
    folds = make_splits(manifest, test=0.0, folds=args.folds, seed=args.seed,
                        stratify=("background_tissue",))
    to_run = args.folds_to_run if args.folds_to_run is not None else list(range(args.folds))
    tables, runs = [], {}
    for fold in to_run:
        started = time.perf_counter()
        fold_data = fold_dataset(data, folds, fold, args.seed, args.out)
        runs[fold] = (args.out / f"fold{fold}" / "run", fold_data)
        run_recipe(args.config, fold_data, runs[fold][0], args.seed,
                   1 if args.segmenter_only else None)
        table = candidate_scores(runs[fold][0], fold_data, args.rule_weights,
                                 with_cvae=not args.segmenter_only,
                                 gammas=args.gamma_tta).assign(fold=fold)
        if args.classifier is not None:
            table = table.astype({"image_id": str}).merge(classifier_scores(
                args.classifier, runs[fold][0], fold_data, args.out / f"fold{fold}" / "classifier",
                args.seed), on=["image_id", "split"], how="left")
        tables.append(table)
        print(f"fold {fold}: {time.perf_counter() - started:.0f} s", flush=True)
    scores = pd.concat(tables, ignore_index=True)
    atomic_write_csv(args.out / "scores.csv", scores)
    val, test = scores[scores["split"] == "val"], scores[scores["split"] == "test"]
    candidates = [f"ensemble w={w:g}" for w in args.rule_weights]
    seeds = sorted({c.split(" w=")[0] for c in scores if c.startswith("seed ")})
    spread = [f"{seed} w={w:g}" for seed in seeds for w in args.rule_weights]
    gamma = [f"{GAMMA_VARIANT} w=0"] if f"{GAMMA_VARIANT} w=0" in scores else []
    comparators = ["rule"] + [name for name in (SELECT_SCORE, "cvae", "classifier")
                              if name in scores]

    # 2. the choice, on the pooled inner validation women only
    validation = auc_table(val, candidates + gamma + spread + comparators)
    _print(f"inner validation ({len(val)} images, {int(val['label'].sum())} abnormal; "
           "candidates: ensemble w=...)", validation)
    chosen = max(candidates, key=lambda name: validation.set_index("score").at[name, "auc"])
    default = candidates[args.rule_weights.index(0.0)] if 0.0 in args.rule_weights else chosen
    print(f"chosen on validation: {chosen}", flush=True)

    # 3. out-of-fold, once
    reported = list(dict.fromkeys([chosen, default, *gamma, *[f"{s} w=0" for s in seeds],
                                   *comparators]))
    oof = auc_table(test, reported)
    _print(f"OUT-OF-FOLD ({len(test)} images, {int(test['label'].sum())} abnormal)", oof)
    difference, interval, share = paired_roc_auc_difference(
        test["label"], test[chosen], test["rule"], test["patient_id"], margin=args.margin)
    seed_aucs = oof.set_index("score").loc[[f"{s} w=0" for s in seeds], "auc"].tolist()
    located = []
    for run_dir, fold_data in runs.values():
        held_out = MammoDataset.open(fold_data).subset(split="test")
        located += localisation(run_dir, fold_data, held_out, args.mias)
    located = pd.DataFrame(located)
    summary = {
        "config": str(args.config), "size": args.size, "folds_run": to_run, "seed": args.seed,
        "segmenter_only": args.segmenter_only, "chosen": chosen, "default": default,
        "validation": validation.to_dict("records"), "out_of_fold": oof.to_dict("records"),
        "per_fold": per_fold(test, reported),
        "chosen_minus_rule": {"difference": difference, "ci": interval,
                              f"p_difference_le_{args.margin:g}": share},
        "seed_spread": (max(seed_aucs) - min(seed_aucs)) if seed_aucs else None,
        "gamma_minus_default": {split: dict(zip(("difference", "ci"), paired_roc_auc_difference(
            part["label"], part[gamma[0]], part[default], part["patient_id"])[:2]))
            for split, part in (("validation", val), ("out_of_fold", test))} if gamma else None,
        "select_score_choices": test.groupby("fold")[f"{SELECT_SCORE} choice"].first().to_dict(),
        "breakdown": {name: breakdown(test, name, args.mias) for name in (chosen, "rule")},
        "localisation": {"images": len(located),
                         "hit_fraction": float(located["hit"].mean()) if len(located) else None,
                         "chance": float(located["chance"].mean()) if len(located) else None},
    }
    atomic_write_json(args.out / "summary.json", summary)
    for key in ("per_fold", "chosen_minus_rule", "seed_spread", "gamma_minus_default",
                "select_score_choices", "breakdown", "localisation"):
        print(f"{key}: {summary[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
