"""The report command on two synthetic runs, and report.html in a real headless browser."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as skm

from cvae_mammo.cli import main
from cvae_mammo.evaluation.calibration import Calibration, calibrate
from cvae_mammo.evaluation.collect import collect_runs
from cvae_mammo.evaluation.report import write_report
from cvae_mammo.fileio import file_sha256

FIGURE_KINDS = ("roc", "pr", "f1", "scores", "confusion")
CHROMIUM = (os.environ.get("CVAE_MAMMO_CHROMIUM") or shutil.which("chromium")
            or "/usr/bin/chromium")


def _dataset(root: Path, n_patients: int = 60, seed: int = 0) -> pd.DataFrame:
    """manifest.csv + splits.csv: 4 images per woman, both views of a positive breast positive."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        split = "val" if patient % 2 else "test"
        for laterality in "LR":
            positive = rng.random() < 0.25
            for view in ("CC", "MLO"):
                image_id = f"{1000 + len(rows)}"
                rows.append({"image_id": image_id, "patient_id": f"{500 + patient}",
                             "laterality": laterality, "view": view,
                             "prediction_id": f"{500 + patient}_{laterality}",
                             "path": f"images/{image_id}.png", "label": int(positive),
                             "split": split, "fold": 0})
    frame = pd.DataFrame(rows)
    frame.loc[3, "label"] = None  # one unlabelled image
    root.mkdir(parents=True)
    frame.drop(columns=["split", "fold"]).to_csv(root / "manifest.csv", index=False)
    frame[["image_id", "patient_id", "split", "fold"]].to_csv(root / "splits.csv", index=False)
    return frame


def _run(root: Path, frame: pd.DataFrame, model_type: str, scores: np.ndarray, data: Path,
         level: str, aggregation: str) -> Path:
    """A run folder with config/metadata, threshold.json fitted on val, scores_test.csv."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": model_type}))
    (root / "metadata.json").write_text(json.dumps({
        "splits_sha256": file_sha256(data / "splits.csv"),
        "manifest_sha256": file_sha256(data / "manifest.csv")}))
    scored = frame.assign(score=scores)
    calibration = calibrate(scored[scored["split"] == "val"], "f1", level=level,
                            aggregation=aggregation, split="val", n_bootstrap=100)
    calibration.save(root / "threshold.json")
    test = scored[scored["split"] == "test"]
    pd.DataFrame({"image_id": test["image_id"], "prediction_id": test["prediction_id"],
                  "score": test["score"],
                  "score_normalised": calibration.normalise(test["score"]),
                  "pred_label": calibration.predict(test["score"])}).to_csv(
        root / "scores_test.csv", index=False)
    return root


@pytest.fixture()
def setup(tmp_path):
    data = tmp_path / "data"
    frame = _dataset(data)
    rng = np.random.default_rng(1)
    labels = frame["label"].fillna(0).to_numpy()
    cvae = _run(tmp_path / "runs" / "cvae", frame, "cvae",
                rng.gamma(2.0, 1.0, len(frame)) + 1.2 * labels, data, "breast", "max")
    probabilities = 1 / (1 + np.exp(-(1.5 * rng.normal(size=len(frame)) + 2.5 * labels - 2)))
    classifier = _run(tmp_path / "runs" / "clf", frame, "classifier", probabilities, data,
                      "image", "soft-or")
    maps = tmp_path / "maps_clf"
    maps.mkdir()
    for image_id in frame.loc[frame["split"] == "test", "image_id"]:
        colour = np.random.default_rng(int(image_id)).integers(0, 255, 3, dtype=np.uint8)
        Image.fromarray(np.broadcast_to(colour, (64, 32, 3)).copy()).save(maps / f"{image_id}.png")
    return {"data": data, "frame": frame, "cvae": cvae, "clf": classifier, "maps": maps,
            "out": tmp_path / "report"}


def _report(setup, *extra: str) -> int:
    return main(["report", "--run", str(setup["cvae"]), "--run", str(setup["clf"]),
                 "--data", str(setup["data"]), "--split", "test", "--out", str(setup["out"]),
                 "--n-bootstrap", "100", *extra])


def test_report_writes_every_output_with_correct_numbers(setup):
    assert _report(setup, "--maps", "", "--maps", str(setup["maps"]),
                   "--name", "CVAE", "--name", "classifier") == 0
    out = setup["out"]
    for name in ("report.html", "metrics.json", "metrics.md"):
        assert (out / name).is_file()
    for level in ("image", "breast"):
        for kind in FIGURE_KINDS:
            with Image.open(out / "figures" / f"{kind}_{level}.png") as image:
                assert image.width > 300 and image.height > 300
    assert (out / "figures" / "examples_classifier.png").is_file()
    assert not (out / "figures" / "examples_CVAE.png").exists()

    summary = json.loads((out / "metrics.json").read_text())
    test = setup["frame"].query("split == 'test'").dropna(subset=["label"])
    scores = pd.read_csv(setup["clf"] / "scores_test.csv", dtype={"image_id": str})
    merged = test.merge(scores[["image_id", "score"]], on="image_id")
    image = summary["levels"]["image"]["classifier"]
    assert image["n"] == len(test) == len(merged)
    assert image["roc_auc"] == pytest.approx(skm.roc_auc_score(merged["label"], merged["score"]))
    low, high = image["roc_auc_ci"]
    assert low < image["roc_auc"] < high
    threshold = Calibration.load(setup["clf"] / "threshold.json").value
    assert image["at_threshold"]["f1"] == pytest.approx(
        skm.f1_score(merged["label"], merged["score"] >= threshold))
    assert image["pf1_input"] == "score"
    breast = summary["levels"]["breast"]
    assert breast["classifier"]["n"] == test["prediction_id"].nunique()
    assert breast["classifier"]["aggregation"] == "soft-or"
    assert breast["CVAE"]["aggregation"] == "max"
    assert breast["CVAE"]["pf1_input"] == "score_normalised"
    assert "reused" in summary["levels"]["image"]["CVAE"]["threshold_source"]
    assert any("without a label" in w for w in summary["warnings"])

    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(http|//|file:)", page)
    sources = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(sources) == len(list((out / "figures").glob("*.png")))
    for source in sources:
        Image.open(io.BytesIO(base64.b64decode(source))).verify()
    markdown = (out / "metrics.md").read_text()
    assert markdown.count("| CVAE |") == 2 and "ROC-AUC [95% CI]" in markdown


def test_refuses_different_split_files(setup, capsys):
    metadata = setup["clf"] / "metadata.json"
    metadata.write_text(json.dumps({"splits_sha256": "0" * 64}))
    assert _report(setup) == 2
    assert "--allow-different-splits" in capsys.readouterr().err
    assert not (setup["out"] / "report.html").exists()
    assert _report(setup, "--allow-different-splits") == 0
    summary = json.loads((setup["out"] / "metrics.json").read_text())
    assert any("different split files" in w for w in summary["warnings"])


def test_run_without_threshold_and_bad_inputs(setup, capsys):
    (setup["cvae"] / "threshold.json").unlink()
    assert _report(setup) == 0
    summary = json.loads((setup["out"] / "metrics.json").read_text())
    assert summary["levels"]["image"]["cvae"]["at_threshold"] is None
    assert summary["levels"]["image"]["clf"]["at_threshold"] is not None
    scores = setup["clf"] / "scores_test.csv"
    scores.write_text(scores.read_text().replace("\n1", "\nx1", 1))
    assert _report(setup) == 2
    assert "not in" in capsys.readouterr().err


def test_a_damaged_threshold_file_is_a_one_line_user_error(setup, capsys):
    threshold = setup["clf"] / "threshold.json"
    threshold.write_text(threshold.read_text()[:40])
    assert _report(setup) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cvae-mammo report: error: ") and "\n" not in err
    assert f"{threshold}: not valid JSON" in err


def test_write_report_checks_its_inputs(setup, tmp_path):
    runs, warnings = collect_runs([setup["cvae"], setup["clf"]], setup["data"], "test")
    assert [run.model_type for run in runs] == ["cvae", "classifier"]
    assert any("without a label" in w for w in warnings)
    runs[1].images = runs[1].images.iloc[1:]
    with pytest.raises(ValueError, match="same images"):
        write_report(runs, tmp_path / "out", "test", n_bootstrap=10)
    runs[1].images = runs[0].images.assign(label=np.nan)
    with pytest.raises(ValueError, match="0 or 1"):
        write_report(runs[1:], tmp_path / "out", "test", n_bootstrap=10)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.shared_data
def test_report_scores_real_runs_without_scores_files(mias_dataset_factory, tmp_path):
    """A real tiny CVAE on mini-MIAS, calibrated two ways: report calls predict for the test split."""
    from cvae_mammo.models.cvae import CVAEConfig
    from cvae_mammo.training.cvae import fit_cvae

    dataset = mias_dataset_factory(size=(64, 32))
    config = CVAEConfig.small(image_size=(64, 32), filters=(8, 16), latent_channels=2, epochs=1,
                              batch_size=16, augment=None, recon_every=100, lesion_steps=0)
    first = fit_cvae(dataset, tmp_path / "youden", config=config, seed=0, xla=False,
                     command=["test"])
    assert main(["calibrate", "--run", str(first), "--data", str(dataset), "--method",
                 "youden"]) == 0
    second = tmp_path / "quantile"
    shutil.copytree(first, second)
    assert main(["calibrate", "--run", str(second), "--data", str(dataset), "--method",
                 "normal-quantile:0.9", "--level", "breast", "--aggregation", "max"]) == 0
    out = tmp_path / "report"
    assert main(["report", "--run", str(first), "--run", str(second), "--data", str(dataset),
                 "--out", str(out), "--n-bootstrap", "50"]) == 0
    scores = pd.read_csv(first / "scores_test.csv", dtype={"image_id": str})
    splits = pd.read_csv(dataset / "splits.csv", dtype={"image_id": str})
    assert set(scores["image_id"]) == set(splits.loc[splits["split"] == "test", "image_id"])
    summary = json.loads((out / "metrics.json").read_text())
    youden, quantile = (summary["levels"]["image"][name] for name in ("youden", "quantile"))
    assert youden["n"] == len(scores) and youden["roc_auc"] == pytest.approx(quantile["roc_auc"])
    assert youden["at_threshold"]["threshold"] != quantile["at_threshold"]["threshold"]
    assert (out / "report.html").stat().st_size > 50_000


# --------------------------------------------------------------------------- headless browser


class DevTools:
    """Chromium driven over --remote-debugging-pipe (fd 3 in, fd 4 out; NUL-separated JSON)."""

    def __init__(self, profile: Path) -> None:
        command_read, self._command_write = os.pipe()
        self._events_read, events_write = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}", "--remote-debugging-pipe"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{command_read} 4>&{events_write}',
             CHROMIUM, *flags, "about:blank"],
            pass_fds=(command_read, events_write),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(command_read)
        os.close(events_write)
        self._messages: queue.Queue[dict] = queue.Queue()
        self.events: list[dict] = []
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._events_read, 1 << 16):
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for message in complete:
                self._messages.put(json.loads(message))

    def call(self, method: str, session: str | None = None, timeout: float = 60.0,
             **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(event.get("method") == method for event in self.events):
            self.events.append(
                self._messages.get(timeout=max(deadline - time.monotonic(), 0.01)))

    def close(self) -> None:
        with contextlib.suppress(queue.Empty, OSError):
            self.call("Browser.close", timeout=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        os.close(self._command_write)
        os.close(self._events_read)


def _open_page(browser: DevTools, url: str) -> tuple[list[str], list[int]]:
    """Load ``url`` in a new tab: (console errors, naturalWidth of every decoded <img>)."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    for domain in ("Runtime", "Log", "Page"):
        browser.call(f"{domain}.enable", session)
    browser.events.clear()
    browser.call("Page.navigate", session, url=url)
    browser.wait_for("Page.loadEventFired")
    widths = browser.call(
        "Runtime.evaluate", session, awaitPromise=True, returnByValue=True,
        expression="Promise.all(Array.from(document.images).map("
                   "i => i.decode().then(() => i.naturalWidth, () => 0)))")["result"]["value"]
    browser.call("Runtime.evaluate", session, expression="1")  # flush pending events
    errors = []
    for event in browser.events:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled" and params["type"] in {"error",
                                                                                       "assert"}:
            errors.append(str(params["args"]))
        elif event.get("method") == "Runtime.exceptionThrown":
            errors.append(str(params["exceptionDetails"]))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            errors.append(params["entry"]["text"])
    browser.call("Target.closeTarget", targetId=target)
    return errors, widths


@pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                    reason=f"chromium not found at {CHROMIUM} (apt-get install -y chromium)")
def test_report_loads_in_headless_chromium(setup, tmp_path):
    assert _report(setup, "--maps", str(setup["maps"]), "--maps", str(setup["maps"])) == 0
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="data:image/png;base64,AAAA">'
                      "<script>console.error('boom')</script></body></html>")
    browser = DevTools(tmp_path / "profile")
    try:
        errors, widths = _open_page(browser, (setup["out"] / "report.html").as_uri())
        # the checker itself catches a broken image and a console error
        bad_errors, bad_widths = _open_page(browser, broken.as_uri())
    finally:
        browser.close()
    assert errors == []
    assert len(widths) == 12 and all(width > 0 for width in widths)
    assert any("boom" in error for error in bad_errors) and bad_widths == [0]
