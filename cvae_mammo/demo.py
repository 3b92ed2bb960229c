"""The whole pipeline on built-in synthetic phantoms: :func:`run_demo` (``cvae-mammo demo``).

Stages, each through the same Python function its CLI subcommand calls::

    phantoms        cvae_mammo.synthetic.dataset.make_phantom_dataset  -> OUT/phantoms/
    preprocess      cvae_mammo.preprocessing.batch.preprocess_dataset           -> OUT/dataset/
                    (+ lesion masks in its geometry                  -> OUT/dataset/lesion_masks/)
    split           cvae_mammo.data.splits.make_splits + write_splits       -> OUT/dataset/splits.csv
    fit-cvae        cvae_mammo.training.cvae.fit_cvae                     -> OUT/runs/cvae/
    calibrate       cvae_mammo.evaluation.run_calibration.calibrate_run (val) -> OUT/runs/cvae/threshold.json
    fit-classifier  cvae_mammo.training.classifier.fit_classifier         -> OUT/runs/classifier/
    calibrate       (val)                                              -> .../classifier/threshold.json
    predict         cvae_mammo.inference.predict.predict_split (test, maps)      -> OUT/runs/*/scores_test.csv
    report          cvae_mammo.evaluation.collect.collect_runs + report.write_report -> OUT/report/

Everything is seeded by ``seed``. Run again into the same folder with the same
options, the demo reuses the phantoms and preprocessed images and resumes
(or just reloads) the two training runs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cvae_mammo.config import format_image_size, parse_image_size
from cvae_mammo.fileio import PathLike, atomic_write_json, package_versions
from cvae_mammo.tf_startup import start_tensorflow

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

#: Default output image size (height, width): small enough for a 2-core CPU.
DEMO_IMAGE_SIZE: tuple[int, int] = (128, 64)


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """Sizes of one demo run; :meth:`full` (the default) and :meth:`quick` (tests, CI)."""

    n_patients: int
    positive_fraction: float
    cvae_epochs: int
    classifier_epochs: int
    classifier_backbone: str
    n_bootstrap: int
    classifier_graph: bool = True

    @classmethod
    def full(cls) -> DemoOptions:
        """Sized for at most 6 minutes on an idle 2-core CPU at 128x64. The classifier
        starts from random weights (the demo runs offline) and trains in graph mode: its
        first step compiles for a minute or two on a CPU, then each epoch takes seconds,
        where eager training ran at 1.5 images/s."""
        return cls(n_patients=84, positive_fraction=0.3, cvae_epochs=16, classifier_epochs=10,
                   classifier_backbone="EfficientNetB0", n_bootstrap=500)

    @classmethod
    def quick(cls) -> DemoOptions:
        """A smoke run: every stage works, the numbers mean little (the classifier's single
        epoch runs eagerly: compiling would take longer than it)."""
        return cls(n_patients=16, positive_fraction=0.375, cvae_epochs=2, classifier_epochs=1,
                   classifier_backbone="EfficientNetB0", n_bootstrap=50, classifier_graph=False)


@dataclasses.dataclass
class DemoResult:
    """Where a demo run put its outputs, its headline metrics and each stage's seconds."""

    out_dir: Path
    dataset_dir: Path
    run_dirs: dict[str, Path]
    report_html: Path | None
    metrics: dict[str, dict[str, Any]]
    seconds: dict[str, float]


def detector_size(size: tuple[int, int]) -> tuple[int, int]:
    """Phantom detector (height, width) for an output ``size``: the breast is ~2x the output.

    Keeps the Hologic 4096x3328 aspect (1.23), so JPEG 2000 files are decoded at
    reduced resolution by the preprocessing, as real ones are.
    """
    height = max(64, round(2.5 * size[0]))
    return height, round(height / 1.23)


class _Stages:
    """Runs named stages in order with a progress line each and their durations."""

    def __init__(self, total: int, echo: Callable[[str], None]) -> None:
        self.total, self.done, self.echo = total, 0, echo
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def run(self, name: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        self.echo(f"[{self.done}/{self.total}] {name} (elapsed {elapsed:.0f} s)")
        start = time.perf_counter()
        value = function(*args, **kwargs)
        key = name if name not in self.seconds else f"{name} ({self.done})"
        self.seconds[key] = round(time.perf_counter() - start, 1)
        return value


def _split(dataset_dir: Path, seed: int) -> Path:
    """Patient-grouped stratified splits, as ``cvae-mammo split`` makes them."""
    import pandas as pd

    from cvae_mammo.data.dataset import MANIFEST_NAME
    from cvae_mammo.data.metadata import normalise_metadata
    from cvae_mammo.data.splits import make_splits, write_splits

    manifest = pd.read_csv(dataset_dir / MANIFEST_NAME,
                           dtype={"image_id": str, "patient_id": str})
    frame = normalise_metadata(manifest, "label")
    splits = make_splits(frame, val=0.2, test=0.3, seed=seed, label_column="label")
    return write_splits(splits, dataset_dir / "splits.csv")


def _fit_cvae(dataset_dir: Path, run_dir: Path, size: tuple[int, int], options: DemoOptions,
              seed: int) -> Path:
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.training.cvae import fit_cvae

    steps = max(1, math.ceil(options.n_patients * 4 * 0.5 * (1 - options.positive_fraction / 2)
                             / 8))
    # The CVAE alone: the lesion segmenter's 2 x 800 steps would more than double the demo on 2 CPU cores
    # (tests and the quickstart notebook train it; its figures are measured on mini-MIAS).
    config = CVAEConfig.small(image_size=size, epochs=options.cvae_epochs,
                              beta_warmup_steps=2 * steps, recon_every=max(1, options.cvae_epochs),
                              early_stopping_patience=options.cvae_epochs, lesion_steps=0)
    return fit_cvae(dataset_dir, run_dir, config=config, seed=seed,
                    resume=(run_dir / "config.json").is_file(),
                    command=["cvae_mammo.demo.run_demo"])


def _fit_classifier(dataset_dir: Path, run_dir: Path, size: tuple[int, int],
                    options: DemoOptions, seed: int) -> Path:
    from cvae_mammo.models.classifier_config import ClassifierConfig
    from cvae_mammo.training.classifier import fit_classifier

    # No ImageNet download (the demo runs offline): the backbone starts from random weights,
    # so there is nothing to freeze. Plain BCE on batches oversampled to 25% positives: the
    # class-balanced focal loss weighs positives by alpha = 0.25, and from random weights on
    # ~200 images it learned too little in a few epochs (test ROC-AUC 0.76-0.80 after 12).
    config = ClassifierConfig(backbone=options.classifier_backbone, weights=None, image_size=size,
                              epochs=options.classifier_epochs, freeze_epochs=0, batch_size=8,
                              learning_rate=1e-3, loss="bce", positive_fraction=0.25,
                              early_stopping_patience=options.classifier_epochs, seed=seed)
    return fit_classifier(dataset_dir, run_dir, config=config, seed=seed,
                          run_eagerly=not options.classifier_graph,
                          resume=(run_dir / "config.json").is_file(),
                          command=["cvae_mammo.demo.run_demo"])


def _report(run_dirs: dict[str, Path], dataset_dir: Path, maps: dict[str, Path], out: Path,
            options: DemoOptions, seed: int) -> dict[str, Any]:
    from cvae_mammo.evaluation.collect import collect_runs
    from cvae_mammo.evaluation.report import write_report

    names = list(run_dirs)
    runs, warnings = collect_runs([run_dirs[n] for n in names], dataset_dir, "test", names=names,
                                  maps_dirs=[maps[n] for n in names])
    for warning in warnings:
        LOGGER.warning(warning)
    return write_report(runs, out, "test", n_bootstrap=options.n_bootstrap, seed=seed,
                        warnings=warnings)


def run_demo(
    out_dir: PathLike = "cvae_mammo_demo",
    size: tuple[int, int] | str = DEMO_IMAGE_SIZE,
    seed: int = 0,
    *,
    quick: bool = False,
    options: DemoOptions | None = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> DemoResult:
    """Make phantoms and run preprocess -> split -> fit-cvae -> calibrate -> fit-classifier ->
    calibrate -> predict -> report in ``out_dir``; return where everything went.

    ``size`` is the (height, width) of the preprocessed images; ``quick`` (or
    ``options``) shrinks the run to a smoke test. ``echo`` receives the
    progress lines (stage, elapsed time) and the final summary.
    """
    import pandas as pd

    start_tensorflow()
    size = parse_image_size(size)
    options = options or (DemoOptions.quick() if quick else DemoOptions.full())
    out = Path(out_dir)
    dataset_dir, runs_dir = out / "dataset", out / "runs"
    stages = _Stages(9, echo)
    echo(f"cvae-mammo demo: {options.n_patients} women x 4 phantom mammograms -> "
         f"{format_image_size(size)} images, seed {seed}, in {out}")
    atomic_write_json(out / "demo.json", {"size": list(size), "seed": seed,
                                          "options": dataclasses.asdict(options),
                                          "versions": package_versions()})

    from cvae_mammo.synthetic.dataset import make_phantom_dataset

    phantoms = stages.run("phantoms", make_phantom_dataset, out / "phantoms",
                          n_patients=options.n_patients,
                          positive_fraction=options.positive_fraction,
                          size=detector_size(size), seed=seed, progress=progress,
                          overwrite=True)

    from cvae_mammo.preprocessing.batch import preprocess_dataset
    from cvae_mammo.preprocessing.image import PreprocessConfig

    summary = stages.run("preprocess", preprocess_dataset, phantoms.dicom_dir, dataset_dir,
                         PreprocessConfig(image_size=size), metadata=phantoms.metadata_csv,
                         workers=min(2, os.cpu_count() or 1), progress=progress)
    echo(f"    {summary.line()}")
    from cvae_mammo.synthetic.dataset import lesion_masks_in_dataset

    masks = lesion_masks_in_dataset(phantoms, dataset_dir)
    echo(f"    lesion masks in the preprocessed geometry (to check the maps) -> {masks}")
    stages.run("split", _split, dataset_dir, seed)

    from cvae_mammo.evaluation.run_calibration import calibrate_run
    from cvae_mammo.inference.predict import predict_split

    run_dirs = {"CVAE": runs_dir / "cvae", "classifier": runs_dir / "classifier"}
    fits = {"CVAE": _fit_cvae, "classifier": _fit_classifier}
    for name, run_dir in run_dirs.items():
        stage = "fit-cvae" if name == "CVAE" else "fit-classifier"
        stages.run(stage, fits[name], dataset_dir, run_dir, size, options, seed)
        calibration = stages.run(f"calibrate {name}", calibrate_run, str(run_dir),
                                 str(dataset_dir), "val", seed=seed, select_score=True)
        echo(f"    threshold {calibration.value:.4g} ({calibration.method_used}) on "
             f"{calibration.counts}")
    maps = {name: run_dir / "maps_test" for name, run_dir in run_dirs.items()}

    def predict_both() -> None:
        for name, run_dir in run_dirs.items():
            predict_split(run_dir, dataset_dir, "test", maps_dir=maps[name])

    stages.run("predict test", predict_both)
    summary_json = stages.run("report", _report, run_dirs, dataset_dir, maps, out / "report",
                              options, seed)
    metrics = {level: {name: {"roc_auc": result.get("roc_auc"),
                              "roc_auc_ci": result.get("roc_auc_ci"),
                              "pr_auc": result.get("pr_auc")}
                       for name, result in results.items()}
               for level, results in summary_json["levels"].items()}
    report_html = out / "report" / "report.html"
    result = DemoResult(out_dir=out, dataset_dir=dataset_dir, run_dirs=run_dirs,
                        report_html=report_html if report_html.is_file() else None,
                        metrics=metrics, seconds=stages.seconds)
    atomic_write_json(out / "demo.json", {
        "size": list(size), "seed": seed, "options": dataclasses.asdict(options),
        "metrics": metrics, "seconds": stages.seconds, "versions": package_versions()})
    total = time.perf_counter() - stages.started
    for level, results in metrics.items():
        for name, values in results.items():
            low, high = values["roc_auc_ci"] or (math.nan, math.nan)
            echo(f"{level:6s} {name:10s} ROC-AUC {values['roc_auc']:.3f} [{low:.3f}, {high:.3f}]")
    echo(f"done in {total:.0f} s; test split: "
         f"{int(pd.read_csv(dataset_dir / 'splits.csv')['split'].eq('test').sum())} images")
    echo(f"report -> {report_html.resolve()}")
    return result
