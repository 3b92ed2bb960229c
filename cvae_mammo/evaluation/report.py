"""Side-by-side evaluation of several runs: metrics, figures and a self-contained HTML page.

:func:`write_report` takes each run's image scores on the same images (any
model: CVAE anomaly scores or classifier probabilities) with its calibration,
and writes ``report.html`` (figures embedded as base64 PNG, no external
resources), ``metrics.json``, ``metrics.md`` and ``figures/*.png``, at image
and breast level. Figures use matplotlib's Agg backend through
:class:`matplotlib.figure.Figure`, so no display or pyplot state is involved.
Nothing here imports TensorFlow.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve

from cvae_mammo._version import __version__
from cvae_mammo.errors import InputError
from cvae_mammo.evaluation import metrics
from cvae_mammo.evaluation.calibration import Calibration, nan_to_none
from cvae_mammo.fileio import PathLike, atomic_write_bytes, atomic_write_json, atomic_write_text
from cvae_mammo.inference.aggregate import aggregate_breasts

LOGGER = logging.getLogger(__name__)

LEVELS: tuple[str, ...] = ("image", "breast")
_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
            "#7f7f7f")
_DPI = 110


@dataclasses.dataclass
class RunScores:
    """One run's scores on the evaluated images.

    ``images`` has one row per image: ``image_id``, ``patient_id``,
    ``prediction_id``, ``score`` and ``label`` (0/1). ``calibration`` is the
    run's threshold.json (None when the run was never calibrated);
    ``maps_dir`` holds ``<image_id>.png`` anomaly/CAM maps for the example grid.
    """

    name: str
    images: pd.DataFrame
    calibration: Calibration | None = None
    model_type: str | None = None
    run_dir: str | None = None
    maps_dir: Path | None = None


@dataclasses.dataclass
class LevelScores:
    """Scores, labels and the decision threshold of one run at one level."""

    ids: np.ndarray
    groups: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    threshold: float | None
    threshold_source: str
    probabilities: np.ndarray | None
    probability_source: str | None
    aggregation: str | None


def level_scores(run: RunScores, level: str) -> LevelScores:
    """A run's scores at ``image`` level, or pooled per breast with its calibration's rule.

    A threshold calibrated at the other level is reused as is: it stays on the
    score's scale for ``mean`` and ``max`` pooling, not for ``soft-or``
    (``threshold_source`` says which).
    """
    calibration = run.calibration
    aggregation = None
    if level == "image":
        rows = run.images.rename(columns={"image_id": "id"})
    else:
        aggregation = calibration.aggregation if calibration else "mean"
        try:
            rows = aggregate_breasts(run.images, aggregation)
        except ValueError as error:
            LOGGER.warning("%s: %s; pooling breasts with the mean instead", run.name, error)
            aggregation = "mean"
            rows = aggregate_breasts(run.images, aggregation)
        rows = rows.rename(columns={"prediction_id": "id"})
    if calibration is None:
        threshold, source = None, "none (no threshold.json)"
    else:
        threshold = calibration.value
        source = f"{calibration.method_used} at {calibration.level} level"
        if calibration.level != level:
            source += (", reused; soft-or pooling changes the score scale"
                       if calibration.aggregation == "soft-or" else ", reused")
    return LevelScores(
        ids=rows["id"].astype(str).to_numpy(), groups=rows["patient_id"].astype(str).to_numpy(),
        labels=rows["label"].to_numpy(dtype=float).astype(int),
        scores=rows["score"].to_numpy(dtype=float), threshold=threshold,
        threshold_source=source, aggregation=aggregation,
        **_probabilities(run, rows["score"].to_numpy(dtype=float)))


def _probabilities(run: RunScores, scores: np.ndarray) -> dict[str, Any]:
    """The probabilities pF1 is computed on, and where they come from.

    A classifier's scores; else the normalised scores of a calibrated run; else
    scores that already lie in [0, 1]; else none.
    """
    in_range = bool(scores.min() >= 0.0 and scores.max() <= 1.0)
    if run.model_type == "classifier" and in_range:
        return {"probabilities": scores, "probability_source": "score"}
    if run.calibration is not None:
        return {"probabilities": run.calibration.normalise(scores),
                "probability_source": "score_normalised"}
    if in_range:
        return {"probabilities": scores, "probability_source": "score"}
    return {"probabilities": None, "probability_source": None}


def evaluate_level(data: LevelScores, n_bootstrap: int = 1000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[dict[str, Any], metrics.RocBand]:
    """Every metric of one run at one level, and its ROC band for the figure."""
    y, s = data.labels, data.scores
    band = metrics.roc_with_ci(y, s, data.groups, n_bootstrap, confidence, seed)
    best_f1, best_threshold = metrics.best_f1_threshold(y, s)
    probabilities, pf1_input = data.probabilities, data.probability_source
    result: dict[str, Any] = {
        "n": int(y.size), "n_positive": int(y.sum()), "n_negative": int(y.size - y.sum()),
        "n_patients": int(np.unique(data.groups).size),
        "aggregation": data.aggregation,
        "roc_auc": band.auc, "roc_auc_ci": list(band.auc_ci), "confidence": confidence,
        "n_bootstrap": n_bootstrap, "n_bootstrap_used": band.n_bootstrap_used,
        "pr_auc": metrics.pr_auc(y, s), "prevalence": float(y.mean()),
        "pf1": metrics.probabilistic_f1(y, probabilities) if probabilities is not None else None,
        "pf1_input": pf1_input,
        "pf1_binarised_best": metrics.binarised_probabilistic_f1(y, s)[0],
        "best_f1": best_f1, "best_f1_threshold": best_threshold,
        "threshold_source": data.threshold_source,
        "at_threshold": None,
    }
    if data.threshold is not None:
        at = metrics.threshold_metrics(y, s, data.threshold)
        point = metrics.operating_point_ci(y, s, data.threshold, data.groups, n_bootstrap,
                                           confidence, seed)
        at.update(sensitivity_ci=list(point["sensitivity_ci"]),
                  specificity_ci=list(point["specificity_ci"]))
        result["at_threshold"] = at
    return result, band


# --------------------------------------------------------------------------- figures


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _grid(n: int, width: float = 4.2, height: float = 3.4) -> tuple[Figure, list[Any]]:
    columns = min(n, 3)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel().tolist()
    for axis in axes[n:]:
        axis.set_visible(False)
    return figure, axes[:n]


def _operating_point(data: LevelScores) -> tuple[float, float, float] | None:
    """(FPR, TPR, precision) at the run's threshold."""
    if data.threshold is None:
        return None
    point = metrics.threshold_metrics(data.labels, data.scores, data.threshold)
    return 1.0 - point["specificity"], point["sensitivity"], point["precision"]


def roc_figure(runs: Sequence[tuple[str, LevelScores, metrics.RocBand]], level: str) -> bytes:
    """Overlaid ROC curves with bootstrap bands, AUC [CI] in the legend, thresholds marked."""
    figure = Figure(figsize=(6.2, 5.6))
    axis = figure.subplots()
    axis.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance")
    for index, (name, data, band) in enumerate(runs):
        colour = _COLOURS[index % len(_COLOURS)]
        low, high = band.auc_ci
        axis.fill_between(band.fpr_grid, band.tpr_low, band.tpr_high, color=colour, alpha=0.18,
                          linewidth=0)
        axis.plot(band.fpr_grid, band.tpr, color=colour, linewidth=2,
                  label=f"{name}: AUC {band.auc:.3f} [{low:.3f}, {high:.3f}]")
        point = _operating_point(data)
        if point is not None:
            axis.plot(point[0], point[1], marker="o", markersize=8, color=colour,
                      markeredgecolor="black", linestyle="none")
    if any(data.threshold is not None for _, data, _ in runs):
        axis.plot([], [], marker="o", color="white", markeredgecolor="black", linestyle="none",
                  label="calibrated threshold")
    confidence = runs[0][2]
    axis.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate (1 - specificity)",
             ylabel="True positive rate (sensitivity)",
             title=f"ROC, {level} level (bands: {confidence.n_bootstrap_used}-resample "
                   "patient bootstrap 95% CI)")
    axis.title.set_fontsize(9.5)
    axis.legend(loc="lower right", fontsize=8.5)
    axis.grid(alpha=0.3)
    return _png(figure)


def pr_figure(runs: Sequence[tuple[str, LevelScores, dict[str, Any]]], level: str) -> bytes:
    """Overlaid precision-recall curves with average precision and prevalence."""
    figure = Figure(figsize=(6.2, 5.6))
    axis = figure.subplots()
    for index, (name, data, result) in enumerate(runs):
        colour = _COLOURS[index % len(_COLOURS)]
        precision, recall, _ = precision_recall_curve(data.labels, data.scores)
        axis.step(recall, precision, where="post", color=colour, linewidth=2,
                  label=f"{name}: AP {result['pr_auc']:.3f}")
        point = _operating_point(data)
        if point is not None and not math.isnan(point[2]):
            axis.plot(point[1], point[2], marker="o", markersize=8, color=colour,
                      markeredgecolor="black", linestyle="none")
    prevalence = runs[0][2]["prevalence"]
    axis.axhline(prevalence, color="0.6", linestyle="--", linewidth=1,
                 label=f"prevalence {prevalence:.3f}")
    if any(data.threshold is not None for _, data, _ in runs):
        axis.plot([], [], marker="o", color="white", markeredgecolor="black", linestyle="none",
                  label="calibrated threshold")
    axis.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="Recall (sensitivity)", ylabel="Precision",
             title=f"Precision-recall, {level} level")
    axis.legend(loc="upper right", fontsize=8.5)
    axis.grid(alpha=0.3)
    return _png(figure)


def f1_figure(runs: Sequence[tuple[str, LevelScores, dict[str, Any]]], level: str) -> bytes:
    """F1, sensitivity and specificity against the threshold, one panel per run."""
    figure, axes = _grid(len(runs), height=4.3)
    for axis, (name, data, result) in zip(axes, runs):
        sweep = metrics.threshold_sweep(data.labels, data.scores)
        x = sweep.thresholds[1:]  # drop the cut above the highest score
        axis.plot(x, sweep.f1[1:], color="black", linewidth=2, label="F1")
        axis.plot(x, sweep.sensitivity[1:], color="#d62728", linewidth=1, label="sensitivity")
        axis.plot(x, sweep.specificity[1:], color="#1f77b4", linewidth=1, label="specificity")
        axis.axvline(result["best_f1_threshold"], color="0.4", linestyle=":", linewidth=1.5,
                     label=f"best F1 {result['best_f1']:.3f}")
        if data.threshold is not None:
            f1_here = result["at_threshold"]["f1"]
            axis.axvline(data.threshold, color="#2ca02c", linewidth=2,
                         label=f"calibrated t={data.threshold:.3g}, F1 {f1_here:.3f}")
        axis.set(xlabel="threshold (raw score)", ylim=(0, 1.02), title=f"{name} ({level})")
        axis.ticklabel_format(axis="x", style="plain", useOffset=False)  # no "1e-6+c" offset text
        axis.locator_params(axis="x", nbins=4)
        axis.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
        axis.grid(alpha=0.3)
    figure.suptitle(f"F1 against the threshold, {level} level", fontsize=11)
    return _png(figure)


def distribution_figure(runs: Sequence[tuple[str, LevelScores, dict[str, Any]]],
                        level: str) -> bytes:
    """Score histograms of normal and abnormal cases (density), threshold marked."""
    figure, axes = _grid(len(runs))
    for axis, (name, data, _) in zip(axes, runs):
        bins = np.histogram_bin_edges(data.scores, bins=40)
        for value, colour, label in ((0, "#1f77b4", "normal"), (1, "#d62728", "abnormal")):
            chosen = data.scores[data.labels == value]
            axis.hist(chosen, bins=bins, density=True, alpha=0.5, color=colour,
                      label=f"{label} (n={chosen.size})")
        if data.threshold is not None:
            axis.axvline(data.threshold, color="#2ca02c", linewidth=2,
                         label=f"threshold {data.threshold:.3g}")
        axis.set(xlabel="score", ylabel="density", title=f"{name} ({level})")
        axis.legend(fontsize=7.5)
    figure.suptitle(f"Score distributions per class, {level} level", fontsize=11)
    return _png(figure)


def confusion_figure(runs: Sequence[tuple[str, LevelScores, dict[str, Any]]],
                     level: str) -> bytes:
    """Confusion matrices at each run's calibrated threshold (counts and row %)."""
    figure, axes = _grid(len(runs), width=3.6, height=3.4)
    for axis, (name, data, _) in zip(axes, runs):
        axis.set(title=f"{name} ({level})")
        if data.threshold is None:
            axis.text(0.5, 0.5, "no calibrated threshold", ha="center", va="center")
            axis.set_axis_off()
            continue
        matrix = metrics.confusion_matrix(data.labels, data.scores, data.threshold)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        axis.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for row in range(2):
            for column in range(2):
                axis.text(column, row, f"{matrix[row, column]}\n{100 * rates[row, column]:.1f}%",
                          ha="center", va="center", fontsize=11,
                          color="white" if rates[row, column] > 0.6 else "black")
        axis.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["normal", "abnormal"],
                 yticklabels=["normal", "abnormal"], xlabel="predicted", ylabel="true")
        axis.set_title(f"{name} ({level})\nthreshold {data.threshold:.3g}", fontsize=9.5)
    figure.suptitle(f"Confusion matrices, {level} level", fontsize=11)
    return _png(figure)


def find_map(maps_dir: Path, image_id: str) -> Path | None:
    """The map PNG of ``image_id`` in ``maps_dir`` (``<id>.png`` or ``<id>_*.png``)."""
    exact = maps_dir / f"{image_id}.png"
    if exact.is_file():
        return exact
    matches = sorted(maps_dir.glob(f"{image_id}_*.png"))
    return matches[0] if matches else None


def example_cases(data: LevelScores, per_row: int = 4) -> dict[str, list[tuple[str, float]]]:
    """Top true positives, top false positives and worst false negatives (id, score)."""
    assert data.threshold is not None
    positive = data.scores >= data.threshold
    order = np.argsort(-data.scores, kind="stable")
    picks = {
        "true positives": [i for i in order if positive[i] and data.labels[i] == 1],
        "false positives": [i for i in order if positive[i] and data.labels[i] == 0],
        "false negatives": [i for i in order[::-1] if not positive[i] and data.labels[i] == 1],
    }
    return {kind: [(str(data.ids[i]), float(data.scores[i])) for i in chosen[:per_row]]
            for kind, chosen in picks.items()}


def examples_figure(name: str, data: LevelScores, maps_dir: Path, per_row: int = 4) -> bytes | None:
    """Grid of map PNGs: rows TP / FP / FN, highest-confidence cases first; None without maps."""
    cases = example_cases(data, per_row)
    found = {kind: [(i, s, find_map(maps_dir, i)) for i, s in chosen]
             for kind, chosen in cases.items()}
    if not any(path for chosen in found.values() for _, _, path in chosen):
        return None
    first = next(path for chosen in found.values() for _, _, path in chosen if path)
    with Image.open(first) as picture:
        aspect = picture.width / picture.height
    width = float(np.clip(2.8 * aspect, 1.4, 4.0))  # panel width for a 2.8-inch-high map
    figure = Figure(figsize=(width * per_row + 0.6, 3.4 * len(found)), layout="constrained")
    axes = figure.subplots(len(found), per_row, squeeze=False)
    for row, (kind, chosen) in enumerate(found.items()):
        for column in range(per_row):
            axis = axes[row, column]
            axis.set_xticks([])
            axis.set_yticks([])
            if column == 0:
                axis.set_ylabel(kind, fontsize=11)
            if column >= len(chosen):
                axis.text(0.5, 0.5, "none", ha="center", va="center", color="0.5")
                continue
            image_id, score, path = chosen[column]
            if path is None:
                axis.text(0.5, 0.5, "map missing", ha="center", va="center", color="0.5")
            else:
                with Image.open(path) as picture:
                    axis.imshow(np.asarray(picture.convert("RGB")))
            axis.set_title(f"{image_id}\nscore {score:.3g}", fontsize=8.5)
    figure.suptitle(f"{name}: example maps (threshold {data.threshold:.3g})", fontsize=11)
    return _png(figure)


# --------------------------------------------------------------------------- tables and page


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_ci(at: dict[str, Any], key: str) -> str:
    if not at:
        return "n/a"
    low, high = at[f"{key}_ci"]
    return f"{_number(at[key])} [{_number(low, 2)}, {_number(high, 2)}]"


TABLE_COLUMNS: tuple[str, ...] = ("run", "n (pos/neg)", "ROC-AUC [95% CI]", "PR-AUC", "pF1",
                                  "best binarised pF1", "threshold", "F1", "precision",
                                  "sensitivity", "specificity")


def table_rows(level_results: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row of :data:`TABLE_COLUMNS` per run for one level."""
    rows = []
    for name, result in level_results.items():
        at = result["at_threshold"] or {}
        low, high = result["roc_auc_ci"]
        threshold = (f"{at['threshold']:.4g} ({result['threshold_source']})" if at
                     else result["threshold_source"])
        rows.append([name, f"{result['n']} ({result['n_positive']}/{result['n_negative']})",
                     f"{result['roc_auc']:.3f} [{_number(low)}, {_number(high)}]",
                     _number(result["pr_auc"]), _number(result["pf1"]),
                     _number(result["pf1_binarised_best"]), threshold,
                     _number(at.get("f1")), _number(at.get("precision")),
                     _with_ci(at, "sensitivity"), _with_ci(at, "specificity")])
    return rows


def markdown_report(summary: dict[str, Any]) -> str:
    """metrics.md: one table per level plus the runs and warnings."""
    lines = [f"# Evaluation report: split `{summary['split']}`", ""]
    for name, info in summary["runs"].items():
        lines.append(f"- **{name}**: {info['model_type'] or 'unknown model'}, "
                     f"run `{info['run_dir']}`, calibration: {info['calibration_summary']}")
    for warning in summary["warnings"]:
        lines.append(f"- warning: {warning}")
    for level in LEVELS:
        lines += ["", f"## {level.capitalize()} level", "",
                  "| " + " | ".join(TABLE_COLUMNS) + " |",
                  "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(summary["levels"][level])]
    lines += ["", "pF1 is computed on probabilities: a classifier's scores, else the calibrated "
              "normalised score (0.5 = threshold). ROC-AUC CIs are patient-level "
              "bootstrap percentile intervals.", ""]
    return "\n".join(lines)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: left; }
th { background: #eee; }
img { max-width: 100%; height: auto; display: block; margin: 0.8em 0; }
.warning { color: #8a4b00; }
figure { margin: 1em 0; } figcaption { font-size: 0.9em; color: #555; }
.pair { display: flex; flex-wrap: wrap; gap: 1.5em; } .pair figure { flex: 1 1 420px; }
"""


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(summary: dict[str, Any], figures: dict[str, bytes],
                captions: dict[str, str]) -> str:
    """report.html: a single page with every figure inlined as a base64 PNG."""

    def embedded(key: str) -> str:
        data = base64.b64encode(figures[key]).decode("ascii")
        caption = html.escape(captions[key])
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{caption}">'
                f"<figcaption>{caption}</figcaption></figure>")

    run_rows = [[name, info["model_type"] or "unknown", info["run_dir"] or "",
                 info["calibration_summary"]] for name, info in summary["runs"].items()]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<link rel="icon" href="data:,">',
        f"<title>cvae-mammo report: {html.escape(summary['split'])}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Evaluation report: split “{html.escape(summary['split'])}”</h1>",
        f"<p>Generated {html.escape(summary['created'])} by cvae-mammo "
        f"{html.escape(summary['version'])}; {summary['n_images']} images of "
        f"{summary['n_patients']} patients, every run scored on the same images.</p>",
        _html_table(["run", "model", "run folder", "calibration"], run_rows),
    ]
    parts += [f'<p class="warning">Warning: {html.escape(w)}</p>' for w in summary["warnings"]]
    for level in LEVELS:
        parts.append(f"<h2>{level.capitalize()} level</h2>")
        parts.append(_html_table(TABLE_COLUMNS, table_rows(summary["levels"][level])))
        parts.append('<div class="pair">' + embedded(f"roc_{level}") + embedded(f"pr_{level}")
                     + "</div>")
        parts += [embedded(key) for key in figures
                  if key.endswith(f"_{level}") and key not in {f"roc_{level}", f"pr_{level}"}]
    examples = [key for key in figures if key.startswith("examples_")]
    if examples:
        parts.append("<h2>Example maps</h2>")
        parts += [embedded(key) for key in examples]
    parts.append("<p>pF1 uses probabilities: a classifier's scores, else the calibrated "
                 "normalised score (0.5 = threshold). Confidence intervals: patient-level bootstrap, "
                 "percentile method.</p></body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- entry point


def _calibration_summary(calibration: Calibration | None) -> str:
    if calibration is None:
        return "none"
    counts = calibration.counts
    return (f"{calibration.method_used} at {calibration.level} level "
            f"(aggregation {calibration.aggregation}), threshold {calibration.value:.4g}, "
            f"fitted on {calibration.split or 'a calibration set'}: {counts['n']} cases, "
            f"{counts['n_positive']} positive")


def write_report(runs: Sequence[RunScores], out_dir: PathLike, split: str,
                 n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0,
                 warnings: Sequence[str] = ()) -> dict[str, Any]:
    """Evaluate ``runs`` on their (shared) images and write the report folder.

    Writes ``report.html``, ``metrics.json``, ``metrics.md`` and
    ``figures/<kind>_<level>.png`` under ``out_dir``; returns the metrics summary.
    """
    if not runs:
        raise ValueError("no runs to report")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique, got {names}")
    out_dir = Path(out_dir)
    images = runs[0].images
    for run in runs:
        missing = {"image_id", "patient_id", "prediction_id", "score", "label"} - set(run.images)
        if missing:
            raise ValueError(f"{run.name}: image table lacks {', '.join(sorted(missing))}")
        if set(run.images["image_id"]) != set(images["image_id"]):
            raise ValueError(f"{run.name}: scored other images than {runs[0].name}; "
                             "evaluate every run on the same images")
    labels = images["label"].to_numpy(dtype=float)
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1: leave unlabelled images out of the report")
    if not ((labels == 1).any() and (labels == 0).any()):
        raise InputError(f"split {split!r}: needs labelled positive and negative images to "
                         f"evaluate; it has {int((labels == 1).sum())} positive and "
                         f"{int((labels == 0).sum())} negative")
    summary: dict[str, Any] = {
        "split": split, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"),
        "version": __version__, "n_images": len(images),
        "n_patients": int(images["patient_id"].nunique()), "warnings": list(warnings),
        "runs": {run.name: {"model_type": run.model_type, "run_dir": run.run_dir,
                            "calibration": run.calibration.to_dict() if run.calibration else None,
                            "calibration_summary": _calibration_summary(run.calibration)}
                 for run in runs},
        "levels": {},
    }
    summary["warnings"] += [f"{run.name}: calibration: {run.calibration.warning}"
                            for run in runs if run.calibration and run.calibration.warning]
    figures: dict[str, bytes] = {}
    captions: dict[str, str] = {}
    for level in LEVELS:
        evaluated = []
        for run in runs:
            data = level_scores(run, level)
            result, band = evaluate_level(data, n_bootstrap, confidence, seed)
            evaluated.append((run.name, data, result, band))
        summary["levels"][level] = {name: result for name, _, result, _ in evaluated}
        with_results = [(name, data, result) for name, data, result, _ in evaluated]
        figures[f"roc_{level}"] = roc_figure([(n, d, b) for n, d, _, b in evaluated], level)
        figures[f"pr_{level}"] = pr_figure(with_results, level)
        figures[f"f1_{level}"] = f1_figure(with_results, level)
        figures[f"scores_{level}"] = distribution_figure(with_results, level)
        figures[f"confusion_{level}"] = confusion_figure(with_results, level)
        captions.update({
            f"roc_{level}": f"ROC curves ({level} level), shaded: 95% patient-bootstrap band",
            f"pr_{level}": f"Precision-recall curves ({level} level)",
            f"f1_{level}": f"F1 against threshold ({level} level), calibrated threshold in green",
            f"scores_{level}": f"Score distributions per class ({level} level)",
            f"confusion_{level}": f"Confusion matrices at the calibrated threshold ({level} level)",
        })
    for run in runs:
        if run.maps_dir is None or run.calibration is None:
            continue
        grid = examples_figure(run.name, level_scores(run, "image"), Path(run.maps_dir))
        if grid is None:
            summary["warnings"].append(f"{run.name}: no map PNG found in {run.maps_dir}")
            continue
        key = f"examples_{_slug(run.name)}"
        figures[key] = grid
        captions[key] = f"{run.name}: top true positives, false positives and false negatives"
    for key, data in figures.items():
        atomic_write_bytes(out_dir / "figures" / f"{key}.png", data)
    atomic_write_json(out_dir / "metrics.json", nan_to_none(summary))
    atomic_write_text(out_dir / "metrics.md", markdown_report(summary))
    atomic_write_text(out_dir / "report.html", html_report(summary, figures, captions))
    LOGGER.info("report written to %s (%d figures)", out_dir, len(figures))
    return summary


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
