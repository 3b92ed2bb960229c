"""examples/: the config files load into the stage dataclasses, RSNA.md's commands parse with
the real CLI, and the quickstart notebook runs top to bottom (nbclient)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cvae_mammo.cli import COMMANDS, build_parser

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CVAE_CONFIGS = ("rsna_gpu.yaml", "mini_mias_cpu.yaml", "png_folder.yaml")
CLASSIFIER_CONFIGS = ("rsna_gpu_classifier.yaml", "mini_mias_classifier.yaml")


@pytest.mark.parametrize("name", CVAE_CONFIGS)
def test_cvae_configs_load_and_fit_their_data(name):
    from cvae_mammo.models.cvae import CVAEConfig

    config = CVAEConfig.load(EXAMPLES / "configs" / name)
    height, width = config.image_size
    assert 1.9 <= height / width <= 2.1  # the cropped-breast aspect
    assert config.to_dict() == CVAEConfig.from_dict(config.to_dict()).to_dict()
    if name == "rsna_gpu.yaml":
        assert config.image_size == (1456, 728)
        assert "machine_id" in config.conditioning


@pytest.mark.parametrize("name", CLASSIFIER_CONFIGS)
def test_classifier_configs_load(name):
    from cvae_mammo.models.classifier_config import ClassifierConfig

    config = ClassifierConfig.load(EXAMPLES / "configs" / name)
    if name == "mini_mias_classifier.yaml":  # on the CVAE recipe's segmenter, at its size
        from cvae_mammo.models.cvae import CVAEConfig

        recipe = CVAEConfig.load(EXAMPLES / "configs" / "mini_mias_cpu.yaml")
        assert config.needs_partners and config.image_size == recipe.image_size
    else:
        assert config.image_size == (1456, 728) and config.precision == "mixed"


def _commands(markdown: str) -> list[list[str]]:
    """Every `cvae-mammo ...` command in the fenced shell blocks, continuation lines joined."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("cvae-mammo "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.parametrize("document", ["RSNA.md"])
def test_documented_commands_parse_with_the_real_cli(document):
    commands = _commands((EXAMPLES / document).read_text(encoding="utf-8"))
    assert {argv[0] for argv in commands} >= {"preprocess", "split", "fit-cvae", "calibrate",
                                              "fit-classifier", "predict", "report"}
    for argv in commands:
        assert argv[0] in COMMANDS, argv
        parser, _ = build_parser(argv[0])
        parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown or malformed option
        for index, word in enumerate(argv[:-1]):
            if word == "--config":
                assert (EXAMPLES.parent / argv[index + 1]).is_file(), argv[index + 1]


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    notebook = nbformat.read(EXAMPLES / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    output = tmp_path / "quickstart_output"
    assert (output / "report" / "report.html").is_file()
    printed = "".join(out.get("text", "") for cell in notebook.cells
                      for out in cell.get("outputs", []))
    assert "ROC-AUC" in printed and "report:" in printed
