"""Threshold methods on constructed score sets, the no-positive fallback and threshold.json."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from cvae_mammo.errors import InputError
from cvae_mammo.evaluation.calibration import (
    Calibration,
    ThresholdMethod,
    calibrate,
    choose_threshold,
    normal_scale,
)
from cvae_mammo.evaluation.metrics import probabilistic_f1

# 10 negatives at 0, 1, ..., 9 and 5 positives at 7.5, 10, 11, 12, 13
NEGATIVES = np.arange(10.0)
POSITIVES = np.array([7.5, 10.0, 11.0, 12.0, 13.0])
SCORES = np.concatenate([NEGATIVES, POSITIVES])
LABELS = np.concatenate([np.zeros(10), np.ones(5)])


def threshold(method: str) -> float:
    value, used, warning = choose_threshold(SCORES, LABELS, method)
    assert str(used) == str(ThresholdMethod.parse(method)) and warning is None
    return value


def test_f1_and_youden_known_answers():
    # cut at 9.5: tp 4, fp 0, fn 1 -> F1 8/9; cut at 7.25 (tp 5, fp 2) gives 10/12 < 8/9
    assert threshold("f1") == pytest.approx(9.5)
    # Youden: cut 9.5 -> 0.8 + 1.0 - 1 = 0.8; cut 7.25 -> 1.0 + 0.7 - 1 = 0.7
    assert threshold("youden") == pytest.approx(9.5)


def test_sensitivity_and_specificity_known_answers():
    # keep 4 of 5 positives (0.8 >= 0.8) with the highest cut: between 9 and 10
    assert threshold("sensitivity:0.8") == pytest.approx(9.5)
    # all 5 positives: the cut must go below 7.5, i.e. between 7 and 7.5
    assert threshold("sensitivity:0.9") == pytest.approx(7.25)
    # specificity >= 0.7 allows 3 false positives: the lowest such cut is between 6 and 7
    assert threshold("specificity:0.7") == pytest.approx(6.5)
    # specificity 0.95 allows no false positive: the lowest cut above every negative (9)
    assert threshold("specificity:0.95") == pytest.approx(9.5)


def test_normal_quantile_known_answer():
    assert threshold("normal-quantile:0.5") == pytest.approx(4.5)
    assert threshold("normal-quantile") == pytest.approx(np.quantile(NEGATIVES, 0.99))


def test_pf1_is_the_best_probabilistic_f1():
    value = threshold("pf1")
    scale = normal_scale(SCORES, LABELS)
    assert scale == pytest.approx(1.4826 * 2.5)  # MAD of 0..9 is 2.5
    best = probabilistic_f1(LABELS, expit((SCORES - value) / scale))
    for t in np.linspace(-5, 20, 2001):
        assert probabilistic_f1(LABELS, expit((SCORES - t) / scale)) <= best + 1e-9
    # shifting every score shifts the threshold with it
    shifted, _, _ = choose_threshold(SCORES + 100.0, LABELS, "pf1")
    assert shifted == pytest.approx(value + 100.0, abs=1e-4)


def test_unknown_labels_are_ignored():
    scores = np.append(SCORES, [100.0, -100.0])
    labels = np.append(LABELS, [np.nan, np.nan])
    assert choose_threshold(scores, labels, "f1")[0] == pytest.approx(9.5)


def test_no_positives_falls_back_to_normal_quantile():
    with pytest.warns(UserWarning, match="no positive labels.*normal-quantile:0.99"):
        value, used, warning = choose_threshold(NEGATIVES, np.zeros(10), "f1")
    assert str(used) == "normal-quantile:0.99" and "f1" in warning
    assert value == pytest.approx(np.quantile(NEGATIVES, 0.99))
    # specificity only needs negatives
    value, used, warning = choose_threshold(NEGATIVES, np.zeros(10), "specificity:0.8")
    assert value == pytest.approx(7.5) and warning is None


def test_bad_methods_and_data():
    for text in ("f2", "sensitivity:x", "sensitivity:1.5", "f1:0.3"):
        with pytest.raises(InputError, match="threshold method"):
            ThresholdMethod.parse(text)
    with pytest.raises(InputError, match="negative"):
        choose_threshold([0.3, 0.5], [1, 1], "f1")


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    patients = np.repeat([f"p{i}" for i in range(60)], 4)
    laterality = np.tile(["L", "L", "R", "R"], 60)
    breast_label = rng.random(120) < 0.25
    labels = np.repeat(breast_label, 2).astype(float)
    labels[::2] = 0  # one positive image per positive breast
    scores = rng.normal(size=240) + 2.5 * labels
    return pd.DataFrame({"image_id": [str(i) for i in range(240)], "patient_id": patients,
                         "prediction_id": [f"{p}_{s}" for p, s in zip(patients, laterality)],
                         "score": scores, "label": labels})


def test_calibrate_image_and_breast_levels_round_trip(tmp_path):
    frame = _frame()
    image = calibrate(frame, "youden", split="val", n_bootstrap=200)
    assert image.counts["n"] == 240 and image.counts["n_patients"] == 60
    assert image.counts["n_positive"] == int(frame["label"].sum())
    assert image.normalise([image.value])[0] == pytest.approx(0.5)
    assert np.all(np.diff(image.normalise(np.linspace(-5, 5, 50))) > 0)
    predicted = image.predict(frame["score"])
    sensitivity = predicted[frame["label"] == 1].mean()
    assert image.operating_point["sensitivity"] == pytest.approx(sensitivity)
    low, high = image.operating_point["sensitivity_ci"]
    assert low <= sensitivity <= high

    breast = calibrate(frame, "f1", level="breast", aggregation="max", n_bootstrap=100)
    assert breast.counts["n"] == 120 and breast.level == "breast"
    assert breast.aggregation == "max"

    path = tmp_path / "threshold.json"
    breast.save(path)
    stored = json.loads(path.read_text())
    assert stored["method"] == "f1" and stored["normalisation"]["kind"] == "logistic"
    assert Calibration.load(path) == breast


def test_no_positive_calibration_saves_nulls(tmp_path):
    frame = _frame().assign(label=0.0)
    with pytest.warns(UserWarning):
        result = calibrate(frame, "f1", n_bootstrap=50)
    assert result.method == "f1" and result.method_used == "normal-quantile:0.99"
    path = tmp_path / "threshold.json"
    result.save(path)
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["operating_point"]["sensitivity"] is None
    loaded = Calibration.load(path)
    assert np.isnan(loaded.operating_point["sensitivity"])
    assert loaded.warning == result.warning and loaded.value == result.value


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "threshold.json"
    path.write_text(json.dumps({"method": "f1", "value": 0.3}))
    with pytest.raises(InputError, match=r"threshold\.json: not a threshold file"):
        Calibration.load(path)
    with pytest.raises(FileNotFoundError, match="calibrate"):
        Calibration.load(tmp_path / "missing.json")


def test_degenerate_threshold_is_flagged():
    # positives below every negative: the best F1 flags everything
    with pytest.warns(UserWarning, match="labels every calibration case positive"):
        value, _, warning = choose_threshold([0.1, 0.2, 0.5, 0.6], [1, 1, 0, 0], "f1")
    assert value == pytest.approx(0.1) and "barely separate" in warning
