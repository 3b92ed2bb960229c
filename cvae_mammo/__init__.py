"""cvae_mammo: anomaly detection on screening mammograms.

The public API is imported lazily, so ``import cvae_mammo`` is cheap and
never loads TensorFlow; a name is imported from its module the first time it
is used.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from cvae_mammo._version import __version__

# TensorFlow 2.21's oneDNN CPU kernels crash (SIGSEGV / invalid pointer in
# conv2d_backprop_filter) when training these models on some batch shapes. The
# variable is read when TensorFlow is first imported, which in this package
# always comes after this line; set it to 1 yourself to opt back in.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # preprocessing (never loads TensorFlow)
    "PreprocessConfig": "cvae_mammo.preprocessing.batch",
    "preprocess_dataset": "cvae_mammo.preprocessing.batch",
    "read_dicom": "cvae_mammo.preprocessing.dicom",
    # data module
    "make_splits": "cvae_mammo.data.splits",
    "MammoDataset": "cvae_mammo.data.dataset",
    "build_pipeline": "cvae_mammo.data.pipeline",
    "MetadataEncoder": "cvae_mammo.data.metadata",
    # models and training
    "CVAEConfig": "cvae_mammo.models.cvae",
    "build_cvae": "cvae_mammo.models.cvae",
    "fit_cvae": "cvae_mammo.training.cvae",
    "ClassifierConfig": "cvae_mammo.models.classifier_config",
    "build_classifier": "cvae_mammo.models.classifier",
    "fit_classifier": "cvae_mammo.training.classifier",
    "load_run_model": "cvae_mammo.training.runs",
    # scoring, calibration, evaluation
    "ScoringConfig": "cvae_mammo.inference.scoring",
    "predict_split": "cvae_mammo.inference.predict",
    "Detector": "cvae_mammo.inference.detector",
    "Calibration": "cvae_mammo.evaluation.calibration",
    "calibrate": "cvae_mammo.evaluation.calibration",
    "calibrate_run": "cvae_mammo.evaluation.run_calibration",
    "aggregate_breasts": "cvae_mammo.inference.aggregate",
    "roc_auc": "cvae_mammo.evaluation.metrics",
    "probabilistic_f1": "cvae_mammo.evaluation.metrics",
    "write_report": "cvae_mammo.evaluation.report",
    "collect_runs": "cvae_mammo.evaluation.collect",
    # demo data
    "make_phantom_dataset": "cvae_mammo.synthetic.dataset",
    "run_demo": "cvae_mammo.demo",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'cvae_mammo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
