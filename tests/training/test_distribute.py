"""tf.distribute: two local workers (MultiWorkerMirroredStrategy from TF_CONFIG) train the tiny
CVAE in lockstep, and resume in lockstep from the chief's checkpoint; only the chief writes a
run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cvae_mammo.preprocessing.imageio import write_png

pytest.importorskip("tensorflow")

WORKER = """
import json, os, sys
index, ports, data, out, weights, epochs, resume = sys.argv[1:]
os.environ["TF_CONFIG"] = json.dumps({
    "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports.split(",")]},
    "task": {"type": "worker", "index": int(index)}})
from cvae_mammo.tf_startup import start_tensorflow
start_tensorflow()
import keras
import numpy as np
from cvae_mammo.models.cvae import CVAEConfig
from cvae_mammo.training.cvae import fit_cvae

class FinalWeights(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        np.savez(weights, *self.model.get_weights())

config = CVAEConfig.small(image_size=(32, 16), filters=(4, 8), latent_channels=2, batch_size=2,
                          epochs=2, warmup_epochs=0, beta_warmup_steps=4, recon_every=1,
                          recon_images=2, augment=None, xla="off", lesion_steps=0)
fit_cvae(data, out, config=config, epochs=int(epochs), resume=resume == "resume", seed=3,
         strategy="multi-worker", command=["test"], callbacks=[FinalWeights()])
"""


def _dataset(root: Path, women: int = 6) -> Path:
    """Negatives of ``women`` women (L and R, MLO), 32x16 PNGs: 4 train, 1 val, 1 test."""
    rng = np.random.default_rng(0)
    rows = []
    for woman in range(women):
        for laterality in "LR":
            image_id = f"w{woman}{laterality}"
            pixels = np.zeros((32, 16), np.uint8)
            pixels[2:30, :12] = rng.integers(90, 200, (28, 12), dtype=np.uint8)
            write_png(root / "images" / f"{image_id}.png", pixels)
            rows.append({"image_id": image_id, "patient_id": f"p{woman}",
                         "laterality": laterality, "view": "MLO",
                         "prediction_id": f"p{woman}_{laterality}",
                         "path": f"images/{image_id}.png", "label": 0,
                         "split": (["train"] * 4 + ["val", "test"])[woman]})
    frame = pd.DataFrame(rows)
    frame.drop(columns="split").to_csv(root / "manifest.csv", index=False)
    frame.assign(fold=0)[["image_id", "patient_id", "split", "fold"]].to_csv(
        root / "splits.csv", index=False)
    return root


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _train_on_two_workers(tmp_path: Path, data: Path, runs: list[Path], epochs: int,
                          resume: bool) -> list[dict[str, np.ndarray]]:
    """Run the worker script as task 0 and 1 of a loopback cluster; their final weights."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = ",".join(map(str, _free_ports(2)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(Path.cwd())}
    weights = [tmp_path / f"weights_{index}.npz" for index in range(2)]
    workers = [subprocess.Popen([sys.executable, str(script), str(index), ports, str(data),
                                 str(runs[index]), str(weights[index]), str(epochs),
                                 "resume" if resume else "new"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for index in range(2)]
    outputs = []
    for worker in workers:
        try:
            outputs.append(worker.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail("the two workers did not finish (a collective waited forever?)")
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
    return [dict(np.load(path)) for path in weights]


def _assert_same(chief: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    assert len(chief) == len(other) > 20
    for name in chief:  # trainable weights and batch-norm statistics alike
        np.testing.assert_array_equal(chief[name], other[name])


@pytest.mark.slow
def test_two_workers_train_the_same_weights_and_only_the_chief_writes(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data")
    # Both workers are given a run folder; worker 1 must write nothing to its own.
    runs = [tmp_path / "run", tmp_path / "run_of_worker_1"]
    first = _train_on_two_workers(tmp_path, data, runs, epochs=1, resume=False)
    _assert_same(*first)
    assert not runs[1].exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["data", "run"]
    for name in ("model.keras", "config.json", "metadata.json", "history.csv",
                 "checkpoints/last.keras", "validation.json"):
        assert (runs[0] / name).exists(), name
    training = json.loads((runs[0] / "config.json").read_text())["training"]
    assert training["replicas"] == 2 and training["global_batch"] == 4
    assert training["strategy"] == "multi-worker"

    # Both resume from the chief's checkpoint (worker 1 reads it from the shared folder).
    resumed = _train_on_two_workers(tmp_path, data, [runs[0], runs[0]], epochs=2, resume=True)
    _assert_same(*resumed)
    assert not np.array_equal(first[0]["arr_0"], resumed[0]["arr_0"])
    assert pd.read_csv(runs[0] / "history.csv")["epoch"].tolist() == [1, 2]
    assert not runs[1].exists()
